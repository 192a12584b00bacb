// RMSNorm and LayerNorm forward over the last dim.
//
// One thread group per row holds the row in registers (k vectors per thread), reduces mean and
// variance in float32 (two passes over the registers, not sum-of-squares), and writes y plus the
// per-row mean and 1/std that the backward needs. y goes to a new tensor or to the caller's `out`.
// With `residual`, the row normalised is x + residual, rounded to x's dtype and written out as well
// (the residual stream of a pre-norm transformer): the same numbers as a separate add then the norm,
// with one pass over the rows less. With an FP8 out_dtype, y is written as saturate(y * scale) for the
// FP8 linear it feeds, and max|y| recorded (fp8.cuh); the backward needs x, not y, so it is unchanged.
#include <ATen/MemoryOverlap.h>

#include "fp8.cuh"
#include "norm.cuh"

namespace mlite {
namespace {

// Y: T, or an FP8 type (then `fp8` holds the scale and amax slot).
template <typename T, typename W, typename Y, int VEC, int K>
__global__ void __launch_bounds__(kRowThreads)
    norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ gamma, const W* __restrict__ beta,
                    Y* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                    int64_t rows, int cols, float eps, bool rms, const T* __restrict__ residual,
                    T* __restrict__ sum_out, Fp8Out fp8) {
  __shared__ float smem[kReduceSmemFloats];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const T* xr = x + row * cols;
  float v[K][VEC];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
    if (valid && c < cols) {
      load_floats<VEC>(xr + c, v[k]);
      if (residual != nullptr) {
        float r[VEC];
        load_floats<VEC>(residual + row * cols + c, r);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[k][i] = __fadd_rn(v[k][i], r[i]);  // the add alone, as torch's
        // rounded as an add of two T tensors stores it, and normalised as stored
        const Pack<T, VEC> rounded = pack_floats<T, VEC>(v[k]);
        *reinterpret_cast<Pack<T, VEC>*>(sum_out + row * cols + c) = rounded;
        unpack_floats(rounded, v[k]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[k][i];
  }
  const float mean = rms ? 0.f : row_reduce(sum, SumOp{}, smem) / cols;
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
    if (c < cols) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) sq += (v[k][i] - mean) * (v[k][i] - mean);
    }
  }
  const float rstd = rsqrtf(row_reduce(sq, SumOp{}, smem) / cols + eps);
  int amax_bits = 0;  // max|y| of this thread's elements (FP8 Y)
  if (valid) {
    if (threadIdx.x == 0) {
      rstd_out[row] = rstd;
      if (mean_out != nullptr) mean_out[row] = mean;
    }
    const float scale = output_scale<Y>(fp8);
    Y* yr = y + row * cols;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (c < cols) {
        float g[VEC], out[VEC];
        load_floats<VEC>(gamma + c, g);
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = (v[k][i] - mean) * rstd * g[i];
        if (beta != nullptr) {
          float b[VEC];
          load_floats<VEC>(beta + c, b);
#pragma unroll
          for (int i = 0; i < VEC; ++i) out[i] += b[i];
        }
        store_output<VEC>(yr + c, out, scale, amax_bits);
      }
    }
  }
  // a block reduction: the threads of rows past the end take part too
  if constexpr (is_fp8_v<Y>) record_amax(amax_bits, fp8.amax);
}

}  // namespace

std::vector<at::Tensor> norm_fwd(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& beta,
                                 double eps, bool rms, const c10::optional<at::Tensor>& out,
                                 const c10::optional<at::Tensor>& residual,
                                 const c10::optional<at::ScalarType>& out_dtype, const c10::optional<at::Tensor>& scale,
                                 const c10::optional<at::Tensor>& amax) {
  check_norm_input(x, gamma);
  if (residual.has_value()) {
    TORCH_CHECK(residual->device() == x.device() && residual->scalar_type() == x.scalar_type() &&
                    residual->sizes() == x.sizes() && residual->is_contiguous(),
                "norm_fwd residual must be a contiguous ", x.sizes(), " ", x.scalar_type(), " tensor on ", x.device(),
                " (the input's shape, dtype and device), got ", residual->sizes(), " ", residual->scalar_type(),
                " on ", residual->device(), residual->is_contiguous() ? "" : " (not contiguous)");
  }
  const at::ScalarType y_type = out_dtype.value_or(x.scalar_type());
  const Fp8Out fp8 = fp8_output(y_type, scale, amax, x, "norm_fwd");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  if (out.has_value()) {
    TORCH_CHECK(out->device() == x.device() && out->scalar_type() == y_type && out->sizes() == x.sizes() &&
                    out->is_contiguous(),
                "norm_fwd out must be a contiguous ", x.sizes(), " ", y_type, " tensor on ", x.device(),
                " (the input's shape and device, the output dtype), got ", out->sizes(), " ", out->scalar_type(),
                " on ", out->device(), out->is_contiguous() ? "" : " (not contiguous)");
    at::assert_no_overlap(*out, x);  // the kernel reads x through a read-only (__restrict__) path
    if (residual.has_value()) at::assert_no_overlap(*out, *residual);
  }
  auto y = out.has_value() ? *out : at::empty_like(x, x.options().dtype(y_type));
  auto stats = x.options().dtype(at::kFloat);
  auto rstd = at::empty({rows}, stats);
  auto mean = rms ? at::Tensor() : at::empty({rows}, stats);
  auto sum = residual.has_value() ? at::empty_like(x) : at::Tensor();
  if (rows == 0 || cols == 0) return {y, mean, rstd, sum};
  const RowShape s = norm_shape(x, gamma, beta, true);
  const dim3 grid(static_cast<unsigned>((rows + s.block.y - 1) / s.block.y));
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(x.scalar_type(), "norm_fwd", [&] {
    using T = scalar_t;
    dispatch_weight<T>(gamma.scalar_type(), [&](auto* wtag) {
      using W = std::remove_pointer_t<decltype(wtag)>;
      dispatch_output<T>(y_type, [&](auto* ytag) {
        using Y = std::remove_pointer_t<decltype(ytag)>;
        dispatch_row<T>(s, [&](auto vc, auto kc) {
          norm_fwd_kernel<T, W, Y, decltype(vc)::value, decltype(kc)::value><<<grid, s.block, 0, stream>>>(
              x.data_ptr<T>(), gamma.data_ptr<W>(), beta.has_value() ? beta->data_ptr<W>() : nullptr,
              static_cast<Y*>(y.data_ptr()), rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), rows,
              static_cast<int>(cols), static_cast<float>(eps), rms,
              residual.has_value() ? residual->data_ptr<T>() : nullptr,
              residual.has_value() ? sum.data_ptr<T>() : nullptr, fp8);
        });
      });
    });
  });
  check_launch();
  return {y, mean, rstd, sum};
}

}  // namespace mlite
