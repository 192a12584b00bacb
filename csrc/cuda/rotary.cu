// Rotary position embedding on q or k, non-interleaved (rotate_half) form, forward and backward.
//
// t [s, b, heads, d] (any strides, last dim contiguous); cos/sin float32 [s, rot]. With
// h = rot / 2, the pair (x1, x2) = (t[i], t[i + h]) for i < h becomes
//   forward:  y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
//   backward: dx1 = dy1 c1 + dy2 s2,   dx2 = dy2 c2 - dy1 s1   (the transposed rotation)
// where c1 = cos[i], c2 = cos[i + h] (equal in the usual tables, not assumed); dims past rot
// pass through. Two launch variants (kRotaryVariants), both evaluating rotate_pair, so their
// results are bitwise equal:
//   0: one block per token; its threads walk (head, pair vector) items with 64-bit index math;
//   1: flat: one (x1, x2) vector pair per thread over the whole tensor, blocks spanning tokens,
//      32-bit indices split by multiply-shift dividers, cos/sin through the read-only cache
//      (each table row is reused by the batch x heads pairs of its position) and t / out with
//      streaming hints (touched once). Needs fewer than 2^31 pairs; larger inputs take 0.
#include "common.cuh"
// After common.cuh: this header uses c10's macros without including them.
#include <ATen/cuda/detail/IntegerDivider.cuh>

namespace mlite {
namespace {

constexpr int kRotaryVariants = 2;
// Variant 1's block: its bf16/fp16 kernels take 52-56 registers (the ten loads of a pair are in
// flight at once), so an SM holds 9 blocks of 128 threads (36 warps) but only 4 of 256 (32).
constexpr int kFlatThreads = 128;
using Divider = at::cuda::detail::IntDivider<unsigned int>;

// The rotation of one vector pair. Products and sums are pinned (__fmul_rn cannot be fused,
// __fmaf_rn is one rounding) so that every variant rounds identically.
template <bool BACKWARD, int VEC>
__device__ __forceinline__ void rotate_pair(const float (&x1)[VEC], const float (&x2)[VEC], const float (&c1)[VEC],
                                            const float (&c2)[VEC], const float (&s1)[VEC], const float (&s2)[VEC],
                                            float (&y1)[VEC], float (&y2)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (BACKWARD) {
      y1[v] = __fmaf_rn(x1[v], c1[v], __fmul_rn(x2[v], s2[v]));
      y2[v] = __fmaf_rn(x2[v], c2[v], -__fmul_rn(x1[v], s1[v]));
    } else {
      y1[v] = __fmaf_rn(x1[v], c1[v], -__fmul_rn(x2[v], s1[v]));
      y2[v] = __fmaf_rn(x2[v], c2[v], __fmul_rn(x1[v], s2[v]));
    }
  }
}

template <typename T, int VEC, bool BACKWARD>
__global__ void rotary_kernel(const T* __restrict__ t, const float* __restrict__ cos, const float* __restrict__ sin,
                              T* __restrict__ out, int64_t batch, int heads, int d, int rot, int64_t stride_s,
                              int64_t stride_b, int64_t stride_h) {
  const int64_t token = blockIdx.x;
  const int64_t si = token / batch, bi = token % batch;
  const T* tt = t + si * stride_s + bi * stride_b;
  T* ot = out + token * heads * static_cast<int64_t>(d);
  const float* cs = cos + si * rot;
  const float* sn = sin + si * rot;
  const int half = rot / 2;
  const int pair_vecs = half / VEC;
  for (int w = threadIdx.x; w < heads * pair_vecs; w += blockDim.x) {
    const int head = w / pair_vecs, i = (w % pair_vecs) * VEC;
    float x1[VEC], x2[VEC], c1[VEC], c2[VEC], s1[VEC], s2[VEC], y1[VEC], y2[VEC];
    load_floats<VEC>(tt + head * stride_h + i, x1);
    load_floats<VEC>(tt + head * stride_h + half + i, x2);
    load_floats<VEC>(cs + i, c1);
    load_floats<VEC>(cs + half + i, c2);
    load_floats<VEC>(sn + i, s1);
    load_floats<VEC>(sn + half + i, s2);
    rotate_pair<BACKWARD>(x1, x2, c1, c2, s1, s2, y1, y2);
    store_floats<VEC>(ot + head * d + i, y1);
    store_floats<VEC>(ot + head * d + half + i, y2);
  }
  const int pass_vecs = (d - rot) / VEC;
  for (int w = threadIdx.x; w < heads * pass_vecs; w += blockDim.x) {
    const int head = w / pass_vecs, i = rot + (w % pass_vecs) * VEC;
    *reinterpret_cast<Pack<T, VEC>*>(ot + head * d + i) =
        *reinterpret_cast<const Pack<T, VEC>*>(tt + head * stride_h + i);
  }
}

// The native type of a Pack's size, for the cache-hint intrinsics (__ldcs / __stcs).
template <int BYTES>
struct Word;
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<16> {
  using type = uint4;
};

// A pack read or written once: evict-first (ld/st.global.cs), leaving the caches to cos/sin.
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_streaming(const T* p) {
  using W = typename Word<sizeof(Pack<T, N>)>::type;
  Pack<T, N> pk;
  *reinterpret_cast<W*>(&pk) = __ldcs(reinterpret_cast<const W*>(p));
  return pk;
}

template <int N, typename T>
__device__ __forceinline__ void store_streaming(T* p, const Pack<T, N>& pk) {
  using W = typename Word<sizeof(Pack<T, N>)>::type;
  __stcs(reinterpret_cast<W*>(p), *reinterpret_cast<const W*>(&pk));
}

// N floats of a cos/sin row through the read-only cache, 16 bytes per load where N allows.
template <int N>
__device__ __forceinline__ void load_table(const float* p, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N / 4; ++k) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(p) + k);
      out[4 * k] = f.x;
      out[4 * k + 1] = f.y;
      out[4 * k + 2] = f.z;
      out[4 * k + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = __ldg(p + k);
  }
}

// Variant 1. Thread i rotates pair vector i of the tensor, i = (token * heads + head) *
// pair_vecs + p with token = position * batch + batch index; the dividers split i in that order.
// The pass-through vectors of a (token, head) are copied by its pair threads, p, p + pair_vecs, ...
template <typename T, int VEC, bool BACKWARD>
__global__ void __launch_bounds__(kFlatThreads)
    rotary_flat_kernel(const T* __restrict__ t, const float* __restrict__ cos, const float* __restrict__ sin,
                       T* __restrict__ out, uint32_t n, Divider per_head, Divider per_token, Divider per_position,
                       int d, int rot, int pass_vecs, int64_t stride_s, int64_t stride_b, int64_t stride_h) {
  const uint32_t i = blockIdx.x * kFlatThreads + threadIdx.x;
  if (i >= n) return;
  const auto hp = per_head.divmod(i);         // (token * heads + head, pair vector)
  const auto th = per_token.divmod(hp.div);   // (token, head)
  const auto sb = per_position.divmod(th.div);  // (position, batch index)
  const int half = rot / 2;
  const int j = static_cast<int>(hp.mod) * VEC;
  const T* src = t + static_cast<int64_t>(sb.div) * stride_s + static_cast<int64_t>(sb.mod) * stride_b +
                 static_cast<int64_t>(th.mod) * stride_h;
  T* dst = out + static_cast<int64_t>(hp.div) * d;
  const int64_t row = static_cast<int64_t>(sb.div) * rot;
  float x1[VEC], x2[VEC], c1[VEC], c2[VEC], s1[VEC], s2[VEC], y1[VEC], y2[VEC];
  unpack_floats(load_streaming<VEC>(src + j), x1);
  unpack_floats(load_streaming<VEC>(src + half + j), x2);
  load_table<VEC>(cos + row + j, c1);
  load_table<VEC>(cos + row + half + j, c2);
  load_table<VEC>(sin + row + j, s1);
  load_table<VEC>(sin + row + half + j, s2);
  rotate_pair<BACKWARD>(x1, x2, c1, c2, s1, s2, y1, y2);
  store_streaming<VEC>(dst + j, pack_floats<T, VEC>(y1));
  store_streaming<VEC>(dst + half + j, pack_floats<T, VEC>(y2));
  for (int k = static_cast<int>(hp.mod); k < pass_vecs; k += static_cast<int>(per_head.divisor)) {
    store_streaming<VEC>(dst + rot + k * VEC, load_streaming<VEC>(src + rot + k * VEC));
  }
}

}  // namespace

// backward=true applies the transposed rotation (the gradient with respect to t).
at::Tensor rotary(const at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, bool backward,
                  int64_t variant) {
  TORCH_CHECK(variant >= 0 && variant < kRotaryVariants, "rotary variant must be 0 (one block per token) or 1 (one "
              "vector pair per thread), got ", variant);
  check_cuda(t, "rotary input");
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "rotary input must be [s, b, heads, d] with a contiguous last dim");
  const int64_t s = t.size(0), b = t.size(1), heads = t.size(2), d = t.size(3);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == s &&
                  cos.device() == t.device() && sin.device() == t.device(),
              "rotary cos/sin must be contiguous float32 [s, rot] tensors on the input's device");
  const int64_t rot = cos.size(1);
  TORCH_CHECK(rot % 2 == 0 && rot > 0 && rot <= d, "rotary dim ", rot, " must be even, positive and <= head dim ", d);
  const c10::cuda::CUDAGuard guard(t.device());
  auto out = at::empty({s, b, heads, d}, t.options());
  if (out.numel() == 0) return out;
  const int vec = kVecBytes / static_cast<int>(t.element_size());
  const bool vectorize = (rot / 2) % vec == 0 && (d - rot) % vec == 0 && t.stride(0) % vec == 0 &&
                         t.stride(1) % vec == 0 && t.stride(2) % vec == 0 && d % vec == 0 &&
                         reinterpret_cast<uintptr_t>(t.data_ptr()) % kVecBytes == 0 &&
                         reinterpret_cast<uintptr_t>(cos.data_ptr()) % (vec * sizeof(float)) == 0 &&
                         reinterpret_cast<uintptr_t>(sin.data_ptr()) % (vec * sizeof(float)) == 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(t.scalar_type(), "rotary", [&] {
    dispatch_vec<scalar_t>(vectorize, [&](auto vc) {
      constexpr int VEC = decltype(vc)::value;
      const int64_t pair_vecs = rot / 2 / VEC, n = s * b * heads * pair_vecs;
      if (variant == 1 && n < (int64_t{1} << 31)) {
        auto launch = [&](auto kernel) {
          kernel<<<static_cast<unsigned>((n + kFlatThreads - 1) / kFlatThreads), kFlatThreads, 0, stream>>>(
              t.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<scalar_t>(),
              static_cast<uint32_t>(n), Divider(static_cast<unsigned>(pair_vecs)),
              Divider(static_cast<unsigned>(heads)), Divider(static_cast<unsigned>(b)), static_cast<int>(d),
              static_cast<int>(rot), static_cast<int>((d - rot) / VEC), t.stride(0), t.stride(1), t.stride(2));
        };
        if (backward) {
          launch(rotary_flat_kernel<scalar_t, VEC, true>);
        } else {
          launch(rotary_flat_kernel<scalar_t, VEC, false>);
        }
        return;
      }
      const int items = static_cast<int>(heads * pair_vecs);
      const int threads = std::min(256, std::max(32, (items + 31) / 32 * 32));
      auto launch = [&](auto kernel) {
        kernel<<<static_cast<unsigned>(s * b), threads, 0, stream>>>(
            t.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<scalar_t>(), b,
            static_cast<int>(heads), static_cast<int>(d), static_cast<int>(rot), t.stride(0), t.stride(1),
            t.stride(2));
      };
      if (backward) {
        launch(rotary_kernel<scalar_t, VEC, true>);
      } else {
        launch(rotary_kernel<scalar_t, VEC, false>);
      }
    });
  });
  check_launch();
  return out;
}

}  // namespace mlite
