// RMSNorm and LayerNorm backward.
//
// A persistent grid: each thread group walks rows, writes dx, and keeps its share of dgamma and
// dbeta in registers, written once as a partial row; reduce_column_partials then sums the
// partial rows (deterministic, no atomics).
#include "norm.cuh"

namespace mlite {
namespace {

// dx = rstd * (dy*g - mean(dy*g) - xhat * mean(dy*g * xhat)); RMSNorm drops the mean(dy*g) term.
// RMS and BETA are compile-time so that RMSNorm and bias-free LayerNorm carry neither the mean
// nor the dbeta accumulators in registers. The weight is re-read per row (an L1 hit) rather than
// held across rows: holding it costs 8-16 registers and pushed the kernel into spills.
template <typename T, typename W, int VEC, int K, bool RMS, bool BETA>
__global__ void __launch_bounds__(kRowThreads)
    norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ gamma,
                    const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                    T* __restrict__ dx, float* __restrict__ dgamma_part, float* __restrict__ dbeta_part,
                    int64_t rows, int cols) {
  __shared__ float smem[kReduceSmemFloats];
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t iters = (rows + groups - 1) / groups;  // the same for every thread: reductions synchronise
  constexpr int KB = BETA ? K : 1;  // dbeta accumulators only when there is a beta
  float acc_g[K][VEC], acc_b[KB][VEC];
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc_g[k][i] = 0.f;
  }
#pragma unroll
  for (int k = 0; k < KB; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc_b[k][i] = 0.f;
  }
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t row = it * groups + group;
    const bool valid = row < rows;
    const float mean = (!RMS && valid) ? mean_in[row] : 0.f;
    const float rstd = valid ? rstd_in[row] : 0.f;
    Pack<T, VEC> xp[K], dyp[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (valid && c < cols) {
        xp[k] = *reinterpret_cast<const Pack<T, VEC>*>(x + row * cols + c);
        dyp[k] = *reinterpret_cast<const Pack<T, VEC>*>(dy + row * cols + c);
      }
    }
    float s_dyg = 0.f, s_dyg_xhat = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (valid && c < cols) {
        float g[VEC];
        load_floats<VEC>(gamma + c, g);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xhat = (static_cast<float>(xp[k].v[i]) - mean) * rstd;
          const float d = static_cast<float>(dyp[k].v[i]);
          const float dg = d * g[i];
          s_dyg += dg;
          s_dyg_xhat += dg * xhat;
          acc_g[k][i] += d * xhat;
          if constexpr (BETA) acc_b[k][i] += d;
        }
      }
    }
    const float mean_dyg = RMS ? 0.f : row_reduce(s_dyg, SumOp{}, smem) / cols;
    const float mean_dyg_xhat = row_reduce(s_dyg_xhat, SumOp{}, smem) / cols;
    if (!valid) continue;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (c < cols) {
        float g[VEC], out[VEC];
        load_floats<VEC>(gamma + c, g);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xhat = (static_cast<float>(xp[k].v[i]) - mean) * rstd;
          out[i] = rstd * (static_cast<float>(dyp[k].v[i]) * g[i] - mean_dyg - xhat * mean_dyg_xhat);
        }
        store_floats<VEC>(dx + row * cols + c, out);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
    if (c < cols) {
      store_floats<VEC>(dgamma_part + group * cols + c, acc_g[k]);
      if constexpr (BETA) store_floats<VEC>(dbeta_part + group * cols + c, acc_b[k]);
    }
  }
}

}  // namespace

std::vector<at::Tensor> norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma,
                                 const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, bool rms,
                                 bool has_beta) {
  check_norm_input(x, gamma);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(),
              "norm grad must be contiguous with the input's shape and dtype");
  TORCH_CHECK(!(rms && has_beta), "RMSNorm has no bias: call norm_bwd with has_bias=False when rms=True");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  auto dx = at::empty_like(x);
  auto dgamma = at::empty_like(gamma);
  auto dbeta = has_beta ? at::empty_like(gamma) : at::Tensor();
  if (cols == 0) return {dx, dgamma, dbeta};
  if (rows == 0) {
    dgamma.zero_();
    if (has_beta) dbeta.zero_();
    return {dx, dgamma, dbeta};
  }
  const RowShape s = norm_shape(x, gamma, c10::nullopt, false);
  const int threads = static_cast<int>(s.block.x * s.block.y);
  const int64_t row_blocks = (rows + s.block.y - 1) / s.block.y;
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(x.scalar_type(), "norm_bwd", [&] {
    using T = scalar_t;
    dispatch_weight<T>(gamma.scalar_type(), [&](auto* wtag) {
      using W = std::remove_pointer_t<decltype(wtag)>;
      dispatch_row<T>(s, [&](auto vc, auto kc) {
        constexpr int VEC = decltype(vc)::value, K = decltype(kc)::value;
        auto launch = [&](auto kernel) {
          // One resident wave: as many blocks as the SMs hold at this kernel's register count.
          int per_sm = 0;
          C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
          const int64_t blocks =
              std::min<int64_t>(row_blocks, static_cast<int64_t>(sm_count()) * std::max(1, per_sm));
          const int64_t groups = blocks * s.block.y;
          auto partial_opts = x.options().dtype(at::kFloat);
          auto dgamma_part = at::empty({groups, cols}, partial_opts);
          auto dbeta_part = has_beta ? at::empty({groups, cols}, partial_opts) : at::Tensor();
          kernel<<<static_cast<unsigned>(blocks), s.block, 0, stream>>>(
              dy.data_ptr<T>(), x.data_ptr<T>(), gamma.data_ptr<W>(), rms ? nullptr : mean->data_ptr<float>(),
              rstd.data_ptr<float>(), dx.data_ptr<T>(), dgamma_part.data_ptr<float>(),
              has_beta ? dbeta_part.data_ptr<float>() : nullptr, rows, static_cast<int>(cols));
          check_launch();
          reduce_column_partials(dgamma_part, dgamma);
          if (has_beta) reduce_column_partials(dbeta_part, dbeta);
        };
        if (rms) {
          launch(norm_bwd_kernel<T, W, VEC, K, true, false>);
        } else if (has_beta) {
          launch(norm_bwd_kernel<T, W, VEC, K, false, true>);
        } else {
          launch(norm_bwd_kernel<T, W, VEC, K, false, false>);
        }
      });
    });
  });
  return {dx, dgamma, dbeta};
}

}  // namespace mlite
