// RMSNorm and LayerNorm backward.
//
// A persistent grid (one resident wave): each thread group walks rows, one or two per step, writes
// dx, and keeps its share of dgamma and dbeta in registers, written once as a partial row;
// reduce_column_partials then sums the partial rows (deterministic, no atomics). With
// `dresidual`, dx is rounded to x's dtype and dresidual added to it (rounded again): the gradient of
// a residual stream that feeds both the norm and a later add, as autograd would accumulate it.
#include "norm.cuh"

namespace mlite {
namespace {

// Rows each thread group takes per step, by variant: 0 -> one, 1 -> two. With two, the x and dy
// loads of both rows are issued before any math (twice the bytes in flight per thread), and the
// rows' sums share one block reduction (one barrier per two rows instead of one per row). Two rows
// only where a thread holds two 16-byte vectors of a row (16-bit rows up to 8192, fp32 up to
// 4096); with four, or sixteen single elements, ptxas spills at 128 registers, so those rows
// take one per step in either variant.
constexpr int kNormBwdVariants = 2;

// dx = rstd * (dy*g - mean(dy*g) - xhat * mean(dy*g * xhat)); RMSNorm drops the mean(dy*g) term.
// RMS and BETA are compile-time so that RMSNorm and bias-free LayerNorm carry neither the mean
// nor the dbeta accumulators in registers. The weight is re-read per step (an L1 hit) rather
// than held across steps: holding it costs 8-16 registers and pushed the kernel into spills.
// Group g takes rows (it * R + j) * groups + g, so neighbouring groups read neighbouring rows.
template <typename T, typename W, int VEC, int K, int R, bool RMS, bool BETA>
__global__ void __launch_bounds__(kRowThreads)
    norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ gamma,
                    const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                    T* __restrict__ dx, float* __restrict__ dgamma_part, float* __restrict__ dbeta_part,
                    int64_t rows, int cols, const T* __restrict__ dresidual) {
  constexpr int S = RMS ? 1 : 2;  // sums per row: dy*g*xhat, and dy*g for LayerNorm
  __shared__ float smem[2][R * S * kReduceSmemFloats];  // alternated between steps: one barrier each
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // The same for every thread: the reductions synchronise the block.
  const int64_t iters = (rows + groups * R - 1) / (groups * R);
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
    int64_t row[R];
    bool valid[R];
    float mean[R], rstd[R];
    Pack<T, VEC> xp[R][K], dyp[R][K];
#pragma unroll
    for (int j = 0; j < R; ++j) {
      row[j] = (it * R + j) * groups + group;
      valid[j] = row[j] < rows;
      mean[j] = (!RMS && valid[j]) ? mean_in[row[j]] : 0.f;
      rstd[j] = valid[j] ? rstd_in[row[j]] : 0.f;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * VEC;
        if (valid[j] && c < cols) {
          xp[j][k] = *reinterpret_cast<const Pack<T, VEC>*>(x + row[j] * cols + c);
          dyp[j][k] = *reinterpret_cast<const Pack<T, VEC>*>(dy + row[j] * cols + c);
        }
      }
    }
    float sums[R * S];  // row j: [j * S] sum(dy*g*xhat), [j * S + 1] sum(dy*g)
#pragma unroll
    for (int n = 0; n < R * S; ++n) sums[n] = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (c >= cols) continue;
      float g[VEC];
      load_floats<VEC>(gamma + c, g);
#pragma unroll
      for (int j = 0; j < R; ++j) {
        if (!valid[j]) continue;
        float xv[VEC], dv[VEC];
        unpack_floats(xp[j][k], xv);
        unpack_floats(dyp[j][k], dv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xhat = (xv[i] - mean[j]) * rstd[j];
          const float dg = dv[i] * g[i];
          sums[j * S] += dg * xhat;
          if constexpr (!RMS) sums[j * S + 1] += dg;
          acc_g[k][i] += dv[i] * xhat;
          if constexpr (BETA) acc_b[k][i] += dv[i];
        }
      }
    }
    row_reduce_n<R * S>(sums, SumOp{}, smem[it & 1]);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (c >= cols) continue;
      float g[VEC];
      load_floats<VEC>(gamma + c, g);
#pragma unroll
      for (int j = 0; j < R; ++j) {
        if (!valid[j]) continue;
        const float mean_dyg_xhat = sums[j * S] / cols;
        const float mean_dyg = RMS ? 0.f : sums[j * S + 1] / cols;
        float xv[VEC], dv[VEC], out[VEC];
        unpack_floats(xp[j][k], xv);
        unpack_floats(dyp[j][k], dv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xhat = (xv[i] - mean[j]) * rstd[j];
          out[i] = rstd[j] * (dv[i] * g[i] - mean_dyg - xhat * mean_dyg_xhat);
        }
        if (dresidual != nullptr) {
          float dr[VEC];
          unpack_floats(pack_floats<T, VEC>(out), out);
          load_floats<VEC>(dresidual + row[j] * cols + c, dr);
#pragma unroll
          for (int i = 0; i < VEC; ++i) out[i] = __fadd_rn(out[i], dr[i]);  // never contracted into an FMA
        }
        store_floats<VEC>(dx + row[j] * cols + c, out);
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
                                 bool has_beta, int64_t variant, const c10::optional<at::Tensor>& dresidual) {
  check_norm_input(x, gamma);
  TORCH_CHECK(variant >= 0 && variant < kNormBwdVariants, "norm_bwd variant must be 0 (one row per thread group "
              "per step) or 1 (two rows per step), got ", variant);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(),
              "norm grad must be contiguous with the input's shape and dtype");
  TORCH_CHECK(!(rms && has_beta), "RMSNorm has no bias: call norm_bwd with has_bias=False when rms=True");
  TORCH_CHECK(!dresidual.has_value() || (dresidual->sizes() == x.sizes() && dresidual->is_contiguous() &&
                                         dresidual->scalar_type() == x.scalar_type() &&
                                         dresidual->device() == x.device()),
              "norm_bwd dresidual must be contiguous with the input's shape, dtype and device");
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
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(x.scalar_type(), "norm_bwd", [&] {
    using T = scalar_t;
    dispatch_weight<T>(gamma.scalar_type(), [&](auto* wtag) {
      using W = std::remove_pointer_t<decltype(wtag)>;
      dispatch_row<T>(s, [&](auto vc, auto kc) {
        constexpr int VEC = decltype(vc)::value, K = decltype(kc)::value;
        constexpr bool kTwoRowsFit = VEC > 1 && K == 2;
        const int rows_per_step = kTwoRowsFit && variant == 1 ? 2 : 1;
        // Enough blocks that each group has rows_per_step rows, at most one resident wave.
        const int64_t row_blocks = (rows + s.block.y * rows_per_step - 1) / (s.block.y * rows_per_step);
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
              has_beta ? dbeta_part.data_ptr<float>() : nullptr, rows, static_cast<int>(cols),
              dresidual.has_value() ? dresidual->data_ptr<T>() : nullptr);
          check_launch();
          reduce_column_partials(dgamma_part, dgamma);
          if (has_beta) reduce_column_partials(dbeta_part, dbeta);
        };
        auto pick = [&](auto rc) {
          constexpr int R = decltype(rc)::value;
          if (rms) {
            launch(norm_bwd_kernel<T, W, VEC, K, R, true, false>);
          } else if (has_beta) {
            launch(norm_bwd_kernel<T, W, VEC, K, R, false, true>);
          } else {
            launch(norm_bwd_kernel<T, W, VEC, K, R, false, false>);
          }
        };
        if constexpr (kTwoRowsFit) {
          if (rows_per_step == 2) {
            pick(std::integral_constant<int, 2>{});
            return;
          }
        }
        pick(std::integral_constant<int, 1>{});
      });
    });
  });
  return {dx, dgamma, dbeta};
}

}  // namespace mlite
