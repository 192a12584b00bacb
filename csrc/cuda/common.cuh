// Shared pieces of megatron_lite's CUDA kernels: 16-byte vector loads, row reductions, and
// the launch shape of a "row" kernel (one group of threads per row, a few vectors per thread).
//
// Every kernel computes in float32 whatever the storage type (float, at::Half, at::BFloat16).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace mlite {

constexpr int kVecBytes = 16;

template <typename T>
constexpr int vec_width() { return kVecBytes / static_cast<int>(sizeof(T)); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Pack <-> float32. 16-bit types go through 32-bit words holding two elements: bfloat16 widens
// by a shift or a mask (exact), half by one cvt per pair, and both narrow by one cvt.rn.*x2.f32
// per pair (round to nearest even, the rounding of a scalar conversion). Element by element,
// each 16-bit value would sit in a register of its own, which cost the bf16 norm backward about
// 20 registers per thread.
template <typename T, int N>
__device__ __forceinline__ void unpack_floats(const Pack<T, N>& pk, float (&out)[N]) {
  if constexpr (std::is_same_v<T, at::BFloat16> && N % 2 == 0) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&pk);
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else if constexpr (std::is_same_v<T, at::Half> && N % 2 == 0) {
    const __half2* w = reinterpret_cast<const __half2*>(&pk);
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float2 f = __half22float2(w[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = static_cast<float>(pk.v[i]);
  }
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> pack_floats(const float (&in)[N]) {
  Pack<T, N> pk;
  if constexpr (std::is_same_v<T, at::BFloat16> && N % 2 == 0) {
    __nv_bfloat162* w = reinterpret_cast<__nv_bfloat162*>(&pk);
#pragma unroll
    for (int i = 0; i < N / 2; ++i) w[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
  } else if constexpr (std::is_same_v<T, at::Half> && N % 2 == 0) {
    __half2* w = reinterpret_cast<__half2*>(&pk);
#pragma unroll
    for (int i = 0; i < N / 2; ++i) w[i] = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) pk.v[i] = static_cast<T>(in[i]);
  }
  return pk;
}

template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  unpack_floats(*reinterpret_cast<const Pack<T, N>*>(p), out);
}

template <int N, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack_floats<T, N>(in);
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Floats of shared memory row_reduce needs per block (row_reduce_n: N times this).
constexpr int kReduceSmemFloats = 32;

// Reduce each of v[0..N) over the blockDim.x threads that share this thread's row (threadIdx.y
// picks the row), in place. blockDim.x is a power of two; blockDim.x * blockDim.y is a multiple
// of 32 (whole warps), so a row narrower than a warp is an aligned group of lanes. Every thread
// of the block must call it. When a row spans several warps it goes through smem
// (N * kReduceSmemFloats floats) behind one barrier: the caller guarantees that no thread still
// reads an earlier reduction's result from the same smem, e.g. by alternating two buffers
// between consecutive calls (the barrier of the call in between orders them).
template <int N, typename Op>
__device__ __forceinline__ void row_reduce_n(float (&v)[N], Op op, float* smem) {
  const int width = blockDim.x < 32 ? blockDim.x : 32;
  for (int off = width / 2; off > 0; off /= 2) {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] = op(v[n], __shfl_xor_sync(0xffffffffu, v[n], off));
  }
  if (blockDim.x <= 32) return;
  const int warps = blockDim.x / 32;
  float* row_smem = smem + threadIdx.y * warps * N;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) row_smem[(threadIdx.x / 32) * N + n] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    float r = row_smem[n];
    for (int w = 1; w < warps; ++w) r = op(r, row_smem[w * N + n]);
    v[n] = r;
  }
}

// One value, reusable smem (kReduceSmemFloats floats): a leading barrier lets an earlier
// reduction finish reading it.
template <typename Op>
__device__ __forceinline__ float row_reduce(float v, Op op, float* smem) {
  float a[1] = {v};
  if (blockDim.x > 32) __syncthreads();
  row_reduce_n<1>(a, op, smem);
  return a[0];
}

// Launch shape of a row kernel: rows of `cols` elements read in vectors of `vec`, each of the
// block.x threads of a row holding up to `k` vectors in registers, and block.y rows per block so
// that small rows still fill whole warps. Three (vec, k) variants are compiled per dtype (see
// dispatch_row): 16-byte vectors with k = 2 or 4, and single elements with k = 16.
struct RowShape {
  int vec = 1;
  int k = 1;
  dim3 block;
  bool fits = false;  // false: the row needs more than kRowThreads threads
};

constexpr int kRowThreads = 512;  // row kernels are compiled with __launch_bounds__(kRowThreads)

inline int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// The shape with k vectors per thread (k is 2 or 4 for vec > 1, 16 for vec == 1).
inline RowShape row_shape_k(int64_t cols, int vec, int k) {
  RowShape s;
  s.vec = vec;
  const int64_t nvec = (cols + vec - 1) / vec;
  s.k = k;
  const int64_t threads = (nvec + s.k - 1) / s.k;
  s.fits = threads <= kRowThreads;
  const int tx = next_pow2(std::max<int64_t>(threads, 1));
  s.block = dim3(tx, std::max(1, 128 / tx));
  return s;
}

// Two vectors per thread unless the row needs more than kRowThreads threads that way.
inline RowShape row_shape(int64_t cols, int vec) {
  const int64_t nvec = (cols + vec - 1) / vec;
  return row_shape_k(cols, vec, vec == 1 ? 16 : (nvec <= 2 * kRowThreads ? 2 : 4));
}

// Largest row a row kernel takes: 512 threads x 4 vectors of 16 bytes, or 512 x 16 elements.
inline int64_t max_row_elems(int elem_size, bool vectorized) {
  return vectorized ? static_cast<int64_t>(kRowThreads) * 4 * (kVecBytes / elem_size) : kRowThreads * 16;
}

// True when `ptr` and every row start (rows of `row_stride` elements) sit on `vec`-element
// boundaries of 16 bytes, so the row can be read in 16-byte vectors.
inline bool aligned_rows(const void* ptr, int64_t row_stride, int64_t cols, int vec, int elem_size) {
  return vec > 1 && cols % vec == 0 && row_stride % vec == 0 &&
         reinterpret_cast<uintptr_t>(ptr) % (static_cast<uintptr_t>(vec) * elem_size) == 0;
}

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks of `threads` threads that all SMs hold at once for this kernel (as its register and
// shared memory use allow), capped at `wanted`: the grid of a persistent kernel that runs as one
// resident wave, with no second wave starting behind the first and no drain between them.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, int64_t wanted) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return std::max<int64_t>(1, std::min<int64_t>(wanted, static_cast<int64_t>(sm_count()) * std::max(1, per_sm)));
}

// Calls f with std::integral_constant<int, VEC>: the 16-byte width of T, or 1.
template <typename T, typename F>
void dispatch_vec(bool vectorize, F&& f) {
  if (vectorize) {
    f(std::integral_constant<int, vec_width<T>()>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Calls f(integral_constant VEC, integral_constant K) for the variant row_shape chose.
template <typename T, typename F>
void dispatch_row(const RowShape& s, F&& f) {
  using I = std::integral_constant<int, 1>;
  using V = std::integral_constant<int, vec_width<T>()>;
  if (s.vec == 1) {
    f(I{}, std::integral_constant<int, 16>{});
  } else if (s.k == 2) {
    f(V{}, std::integral_constant<int, 2>{});
  } else {
    f(V{}, std::integral_constant<int, 4>{});
  }
}

// AT_DISPATCH over the three storage types the kernels support (no double), binding scalar_t.
#define MLITE_DISPATCH_TYPES(TYPE, NAME, ...)                                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)            \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                     \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Sum partials [n_partials, cols] (float32) over dim 0 into out[cols] (out's dtype).
void reduce_column_partials(const at::Tensor& partials, at::Tensor& out);

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

}  // namespace mlite
