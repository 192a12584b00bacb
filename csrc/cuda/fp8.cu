// The cast of a tensor to FP8 for an FP8 GEMM (megatron_lite/model/fp8.py): y = saturate(t * scale)
// in E4M3 or E5M2, and amax = max(amax, max|t|) recorded in the same pass, where the torch form
// takes a reduction and a cast, each a pass over t.
//
// A grid-stride loop over 16-byte input vectors (one resident wave, so that each thread reduces
// many vectors and the block's one atomic is rare), the n % VEC last elements one per thread.
#include "fp8.cuh"

namespace mlite {
namespace {

constexpr int kThreads = 256;

template <typename T, typename Y, int VEC>
__global__ void __launch_bounds__(kThreads)
    cast_fp8_kernel(const T* __restrict__ t, Y* __restrict__ y, int64_t n, Fp8Out fp8) {
  const float scale = *fp8.scale;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_vectors = n / VEC;
  int amax_bits = 0;
  for (int64_t i = first; i < n_vectors; i += stride) {
    float v[VEC];
    load_floats<VEC>(t + i * VEC, v);
    store_output<VEC>(y + i * VEC, v, scale, amax_bits);
  }
  for (int64_t i = n_vectors * VEC + first; i < n; i += stride) {
    float v[1];
    load_floats<1>(t + i, v);
    store_output<1>(y + i, v, scale, amax_bits);
  }
  record_amax(amax_bits, fp8.amax);
}

}  // namespace

at::Tensor cast_fp8(const at::Tensor& t, const at::Tensor& scale, const c10::optional<at::Tensor>& amax,
                    at::ScalarType dtype) {
  check_cuda(t, "cast_fp8 input");
  TORCH_CHECK(t.is_contiguous(), "cast_fp8 takes a contiguous tensor");
  TORCH_CHECK(is_fp8_type(dtype), "cast_fp8 casts to float8_e4m3fn or float8_e5m2, got ", dtype);
  const Fp8Out fp8 = fp8_output(dtype, scale, amax, t, "cast_fp8");
  const c10::cuda::CUDAGuard guard(t.device());
  auto y = at::empty(t.sizes(), t.options().dtype(dtype));
  const int64_t n = t.numel();
  if (n == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(t.scalar_type(), "cast_fp8", [&] {
    using T = scalar_t;
    const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % kVecBytes == 0;
    dispatch_fp8(dtype, [&](auto* ytag) {
      using Y = std::remove_pointer_t<decltype(ytag)>;
      dispatch_vec<T>(aligned, [&](auto vc) {
        constexpr int VEC = decltype(vc)::value;
        auto kernel = cast_fp8_kernel<T, Y, VEC>;
        const int64_t blocks = resident_blocks(kernel, kThreads, (n / VEC + kThreads - 1) / kThreads);
        kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(t.data_ptr<T>(), static_cast<Y*>(y.data_ptr()),
                                                                      n, fp8);
      });
    });
  });
  check_launch();
  return y;
}

}  // namespace mlite
