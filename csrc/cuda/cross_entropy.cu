// Vocab-parallel cross entropy over this rank's vocabulary shard, forward statistics and backward.
//
// Forward reads each logit once: every thread keeps an online (max, sum of exp relative to that
// max) over its vectors, rescaling the sum once per vector, and picks up the target logit when
// the target id falls in its slice of this shard. The row's (max, sum-exp, target logit) go to
// stats [3, N], which the caller merges across tensor-parallel ranks in one collective.
// Backward writes (exp(x - lse) - onehot(target)) * grad_loss in the logits' dtype.
#include "common.cuh"

namespace mlite {
namespace {

// Vectors per thread per step of the forward: all their 16-byte loads are issued before the
// math (64 bytes in flight per thread, not 16), and the running sum is rescaled once per step.
constexpr int kXentFwdItems = 4;
// Threads per row of the forward: 256 (not 512) so that an SM holds four row blocks and one
// block's closing reductions leave three others streaming.
constexpr int kXentFwdThreads = 256;
// Forward variants: 0 reduces the row's max, then its rescaled sum, then the target logit (three
// block reductions, six barriers); 1 merges (max, sum) pairs and the target logit in one
// reduction (one barrier).
constexpr int kXentFwdVariants = 2;

// (max, sum of exp(x - max)) of the union of two sets of logits; an empty set is (-inf, 0).
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
  const float nm = fmaxf(m, m2);
  if (nm == -INFINITY) return;  // both empty
  s = s * __expf(m - nm) + s2 * __expf(m2 - nm);
  m = nm;
}

// Variant 1's closing reduction over the row's threads (the contract of row_reduce_n): every
// thread gets the row's (max, sum, target logit). smem: 3 * kReduceSmemFloats floats.
__device__ __forceinline__ void row_reduce_xent(float& m, float& s, float& picked, float* smem) {
  const int width = blockDim.x < 32 ? blockDim.x : 32;
  for (int off = width / 2; off > 0; off /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    picked += __shfl_xor_sync(0xffffffffu, picked, off);
    merge_max_sum(m, s, m2, s2);
  }
  if (blockDim.x <= 32) return;
  const int warps = blockDim.x / 32;
  float* row_smem = smem + threadIdx.y * warps * 3;
  if (threadIdx.x % 32 == 0) {
    row_smem[(threadIdx.x / 32) * 3] = m;
    row_smem[(threadIdx.x / 32) * 3 + 1] = s;
    row_smem[(threadIdx.x / 32) * 3 + 2] = picked;
  }
  __syncthreads();
  m = row_smem[0];
  s = row_smem[1];
  picked = row_smem[2];
  for (int w = 1; w < warps; ++w) {
    merge_max_sum(m, s, row_smem[3 * w], row_smem[3 * w + 1]);
    picked += row_smem[3 * w + 2];
  }
}

template <typename T, int VEC, bool FUSED_REDUCE>
__global__ void __launch_bounds__(kXentFwdThreads)
    xent_fwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target, float* __restrict__ stats,
                    int64_t rows, int64_t vocab, int64_t vocab_start) {
  constexpr int U = kXentFwdItems;
  __shared__ float smem[3 * kReduceSmemFloats];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const int64_t t = valid ? target[row] - vocab_start : -1;  // index in this shard, or outside [0, vocab)
  const T* xr = logits + row * vocab;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;  // between a thread's vectors
  float m = -INFINITY, s = 0.f, picked = 0.f;
  if (valid) {
    for (int64_t c0 = threadIdx.x * VEC; c0 < vocab; c0 += U * step) {
      Pack<T, VEC> p[U];
#pragma unroll
      for (int k = 0; k < U; ++k) {
        if (c0 + k * step < vocab) p[k] = *reinterpret_cast<const Pack<T, VEC>*>(xr + c0 + k * step);
      }
      float vm = -INFINITY;
#pragma unroll
      for (int k = 0; k < U; ++k) {
        if (c0 + k * step < vocab) {
          float v[VEC];
          unpack_floats(p[k], v);
#pragma unroll
          for (int i = 0; i < VEC; ++i) vm = fmaxf(vm, v[i]);
        }
      }
      const float nm = fmaxf(m, vm);
      float add = 0.f;
#pragma unroll
      for (int k = 0; k < U; ++k) {
        const int64_t c = c0 + k * step;
        if (c < vocab) {
          float v[VEC];
          unpack_floats(p[k], v);
#pragma unroll
          for (int i = 0; i < VEC; ++i) add += __expf(v[i] - nm);
          if (t >= c && t < c + VEC) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              if (t == c + i) picked = v[i];
            }
          }
        }
      }
      s = s * __expf(m - nm) + add;
      m = nm;
    }
  }
  if constexpr (FUSED_REDUCE) {
    row_reduce_xent(m, s, picked, smem);
  } else {
    const float row_max = row_reduce(m, MaxOp{}, smem);
    s = row_reduce((m == -INFINITY) ? 0.f : s * __expf(m - row_max), SumOp{}, smem);
    m = row_max;
    picked = row_reduce(picked, SumOp{}, smem);
  }
  if (valid && threadIdx.x == 0) {
    stats[row] = m;
    stats[rows + row] = s;
    stats[2 * rows + row] = picked;
  }
}

template <typename T, int VEC>
// `grad` may be `logits` itself (in-place backward): each element is read, then written, by one thread.
__global__ void xent_bwd_kernel(const T* logits, const int64_t* __restrict__ target,
                                const float* __restrict__ lse, const float* __restrict__ grad_loss,
                                T* grad, int64_t rows, int64_t vocab, int64_t vocab_start) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t t = target[row] - vocab_start;
  const float l = lse[row], g = grad_loss[row];
  const T* xr = logits + row * vocab;
  T* gr = grad + row * vocab;
  for (int64_t c = threadIdx.x * VEC; c < vocab; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float v[VEC];
    load_floats<VEC>(xr + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = (__expf(v[i] - l) - (c + i == t ? 1.f : 0.f)) * g;
    store_floats<VEC>(gr + c, v);
  }
}

// max_threads (a power of two) threads per row, fewer for a short row; small rows share a block.
dim3 xent_block(int64_t vocab, int vec, int max_threads) {
  const int threads = std::min<int64_t>(max_threads, next_pow2((vocab + vec - 1) / vec));
  return dim3(threads, std::max(1, 128 / threads));
}

void check_xent_inputs(const at::Tensor& logits, const at::Tensor& target) {
  check_cuda(logits, "cross-entropy logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "cross-entropy logits must be contiguous [tokens, vocab]");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == logits.size(0) &&
                  target.device() == logits.device(),
              "cross-entropy target must be a contiguous int64 [tokens] tensor on the logits' device");
}

}  // namespace

// stats [3, tokens] float32: per-token max, sum of exp(x - max), and the target's logit (0 when
// the target id is outside [vocab_start, vocab_start + vocab)).
at::Tensor vocab_parallel_xent_fwd(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                                   int64_t variant) {
  check_xent_inputs(logits, target);
  TORCH_CHECK(variant >= 0 && variant < kXentFwdVariants, "cross-entropy forward variant must be 0 (three "
              "reductions) or 1 (one merged reduction), got ", variant);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "cross-entropy logits have an empty vocabulary dim");
  auto stats = at::empty({3, rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return stats;
  const int vec = kVecBytes / static_cast<int>(logits.element_size());
  const bool vectorize = aligned_rows(logits.data_ptr(), vocab, vocab, vec, logits.element_size());
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(logits.scalar_type(), "xent_fwd", [&] {
    dispatch_vec<scalar_t>(vectorize, [&](auto vc) {
      constexpr int VEC = decltype(vc)::value;
      const dim3 block = xent_block(vocab, VEC, kXentFwdThreads);
      const dim3 grid(static_cast<unsigned>((rows + block.y - 1) / block.y));
      auto launch = [&](auto kernel) {
        kernel<<<grid, block, 0, stream>>>(logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(),
                                           stats.data_ptr<float>(), rows, vocab, vocab_start);
      };
      if (variant == 1) {
        launch(xent_fwd_kernel<scalar_t, VEC, true>);
      } else {
        launch(xent_fwd_kernel<scalar_t, VEC, false>);
      }
    });
  });
  check_launch();
  return stats;
}

// With `inplace` the gradient is written over `logits` (which is returned): one logits-sized
// buffer less at the loss's backward, where a training step's memory peaks.
at::Tensor vocab_parallel_xent_bwd(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                                   const at::Tensor& lse, const at::Tensor& grad_loss, bool inplace) {
  check_xent_inputs(logits, target);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  for (const at::Tensor* t : {&lse, &grad_loss}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == rows &&
                    t->device() == logits.device(),
                "cross-entropy lse and grad_loss must be contiguous float32 [tokens] tensors");
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  auto grad = inplace ? logits : at::empty_like(logits);
  if (grad.numel() == 0) return grad;
  const int vec = kVecBytes / static_cast<int>(logits.element_size());
  const bool vectorize = aligned_rows(logits.data_ptr(), vocab, vocab, vec, logits.element_size());
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(logits.scalar_type(), "xent_bwd", [&] {
    dispatch_vec<scalar_t>(vectorize, [&](auto vc) {
      constexpr int VEC = decltype(vc)::value;
      const dim3 block = xent_block(vocab, VEC, 512);
      const dim3 grid(static_cast<unsigned>((rows + block.y - 1) / block.y));
      xent_bwd_kernel<scalar_t, VEC><<<grid, block, 0, stream>>>(
          logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), lse.data_ptr<float>(),
          grad_loss.data_ptr<float>(), grad.data_ptr<scalar_t>(), rows, vocab, vocab_start);
    });
  });
  check_launch();
  return grad;
}

}  // namespace mlite
