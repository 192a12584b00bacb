// Scaled masked and causal softmax, backward: dx = scale * y * (dy - sum(dy * y)) per row,
// the row of y and dy held in registers between the reduction and the write.
#include "softmax.cuh"

namespace mlite {
namespace {

// dx = scale * y * (dy - sum(dy * y)), zero at masked / causal-masked positions.
template <typename T, int VEC, int K, bool CAUSAL>
__global__ void __launch_bounds__(kRowThreads)
    softmax_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                       MaskView mask, int64_t rows, int64_t heads, int64_t sq, int cols, float scale) {
  __shared__ float smem[kReduceSmemFloats];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const RowIndex ri = split_row(valid ? row : 0, heads, sq);
  const int limit = CAUSAL ? static_cast<int>(ri.q) + 1 : cols;
  float yv[K][VEC], dv[K][VEC];
  float dot = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
    if (valid && c < limit) {
      load_floats<VEC>(y + row * cols + c, yv[k]);
      load_floats<VEC>(dy + row * cols + c, dv[k]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) yv[k][i] = dv[k][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) dot += yv[k][i] * dv[k][i];
  }
  dot = row_reduce(dot, SumOp{}, smem);
  if (!valid) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
    if (c < cols) {
      float out[VEC];
      bool masked[VEC];
      load_mask<VEC>(mask, ri, c, masked);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        out[i] = (masked[i] || c + i >= limit) ? 0.f : scale * yv[k][i] * (dv[k][i] - dot);
      }
      store_floats<VEC>(dx + row * cols + c, out);
    }
  }
}

template <bool CAUSAL>
at::Tensor softmax_bwd(const at::Tensor& dy, const at::Tensor& probs, const c10::optional<at::Tensor>& mask,
                       double scale) {
  const SoftmaxLaunch l = softmax_setup(probs, &dy, mask, CAUSAL);
  const c10::cuda::CUDAGuard guard(probs.device());
  auto dx = at::empty_like(probs);
  if (dx.numel() == 0) return dx;
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(probs.scalar_type(), "softmax_bwd", [&] {
    dispatch_row<scalar_t>(l.shape, [&](auto vc, auto kc) {
      softmax_bwd_kernel<scalar_t, decltype(vc)::value, decltype(kc)::value, CAUSAL>
          <<<l.grid, l.shape.block, 0, stream>>>(dy.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>(),
                                                 dx.data_ptr<scalar_t>(), l.mask, l.rows, l.heads, l.sq,
                                                 static_cast<int>(l.cols), static_cast<float>(scale));
    });
  });
  check_launch();
  return dx;
}

}  // namespace

at::Tensor scaled_masked_softmax_bwd(const at::Tensor& dy, const at::Tensor& probs,
                                     const c10::optional<at::Tensor>& mask, double scale) {
  return softmax_bwd<false>(dy, probs, mask, scale);
}

at::Tensor scaled_upper_triang_softmax_bwd(const at::Tensor& dy, const at::Tensor& probs, double scale) {
  return softmax_bwd<true>(dy, probs, c10::nullopt, scale);
}

}  // namespace mlite
