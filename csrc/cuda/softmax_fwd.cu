// Scaled masked and causal softmax, forward: one thread group per row keeps the row in
// registers, so max, exp-sum and normalisation never re-read global memory.
#include "softmax.cuh"

namespace mlite {
namespace {

template <typename T, int VEC, int K, bool CAUSAL>
__global__ void __launch_bounds__(kRowThreads)
    softmax_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, MaskView mask, int64_t rows,
                       int64_t heads, int64_t sq, int cols, float scale) {
  __shared__ float smem[kReduceSmemFloats];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const RowIndex ri = split_row(valid ? row : 0, heads, sq);
  const int limit = CAUSAL ? static_cast<int>(ri.q) + 1 : cols;  // elements past limit are not read
  const T* xr = x + row * cols;
  float v[K][VEC];
  float mx = -INFINITY;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
    if (valid && c < limit) {
      load_floats<VEC>(xr + c, v[k]);
      bool masked[VEC];
      load_mask<VEC>(mask, ri, c, masked);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        v[k][i] *= scale;
        if (masked[i]) v[k][i] = kMaskedScore;
        if (c + i >= limit) v[k][i] = -INFINITY;
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = -INFINITY;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) mx = fmaxf(mx, v[k][i]);
  }
  mx = row_reduce(mx, MaxOp{}, smem);
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      v[k][i] = __expf(v[k][i] - mx);  // exp(-inf) = 0 for unread and padding slots
      sum += v[k][i];
    }
  }
  const float inv = 1.f / row_reduce(sum, SumOp{}, smem);
  if (!valid) return;
  T* yr = y + row * cols;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
    if (c < cols) {
      float out[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = v[k][i] * inv;
      store_floats<VEC>(yr + c, out);
    }
  }
}

template <bool CAUSAL>
at::Tensor softmax_fwd(const at::Tensor& scores, const c10::optional<at::Tensor>& mask, double scale) {
  const SoftmaxLaunch l = softmax_setup(scores, nullptr, mask, CAUSAL);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto probs = at::empty_like(scores);
  if (probs.numel() == 0) return probs;
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(scores.scalar_type(), "softmax_fwd", [&] {
    dispatch_row<scalar_t>(l.shape, [&](auto vc, auto kc) {
      softmax_fwd_kernel<scalar_t, decltype(vc)::value, decltype(kc)::value, CAUSAL>
          <<<l.grid, l.shape.block, 0, stream>>>(scores.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>(), l.mask,
                                                 l.rows, l.heads, l.sq, static_cast<int>(l.cols),
                                                 static_cast<float>(scale));
    });
  });
  check_launch();
  return probs;
}

}  // namespace

at::Tensor scaled_masked_softmax_fwd(const at::Tensor& scores, const c10::optional<at::Tensor>& mask, double scale) {
  return softmax_fwd<false>(scores, mask, scale);
}

at::Tensor scaled_upper_triang_softmax_fwd(const at::Tensor& scores, double scale) {
  return softmax_fwd<true>(scores, c10::nullopt, scale);
}

}  // namespace mlite
