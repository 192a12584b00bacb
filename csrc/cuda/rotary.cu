// Rotary position embedding on q or k, non-interleaved (rotate_half) form, forward and backward.
//
// t [s, b, heads, d] (any strides, last dim contiguous); cos/sin float32 [s, rot]; the result goes
// to a new contiguous tensor or to `out` (any strides, last dim contiguous), e.g. a slice of the
// fused QKV gradient. `copy_heads` moves t into out with the same indexing and no rotation. With
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
#include <ATen/MemoryOverlap.h>

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

// What a kernel does to each (x1, x2) pair: rotate, rotate back, or copy unchanged (copy_heads,
// which passes rot = d and no tables).
enum RotaryMode : int { kForward = 0, kBackward = 1, kCopy = 2 };

// Element strides of a [s, b, heads, d] tensor's first three dims (the last is 1).
struct HeadStrides {
  int64_t s, b, h;
};

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

template <typename T, int VEC, int MODE>
__global__ void rotary_kernel(const T* __restrict__ t, const float* __restrict__ cos, const float* __restrict__ sin,
                              T* __restrict__ out, int64_t batch, int heads, int d, int rot, HeadStrides in,
                              HeadStrides o) {
  const int64_t token = blockIdx.x;
  const int64_t si = token / batch, bi = token % batch;
  const T* tt = t + si * in.s + bi * in.b;
  T* ot = out + si * o.s + bi * o.b;
  const int half = rot / 2;
  const int pair_vecs = half / VEC;
  for (int w = threadIdx.x; w < heads * pair_vecs; w += blockDim.x) {
    const int head = w / pair_vecs, i = (w % pair_vecs) * VEC;
    const T* src = tt + head * in.h;
    T* dst = ot + head * o.h;
    if constexpr (MODE == kCopy) {
      *reinterpret_cast<Pack<T, VEC>*>(dst + i) = *reinterpret_cast<const Pack<T, VEC>*>(src + i);
      *reinterpret_cast<Pack<T, VEC>*>(dst + half + i) = *reinterpret_cast<const Pack<T, VEC>*>(src + half + i);
    } else {
      const float* cs = cos + si * rot;
      const float* sn = sin + si * rot;
      float x1[VEC], x2[VEC], c1[VEC], c2[VEC], s1[VEC], s2[VEC], y1[VEC], y2[VEC];
      load_floats<VEC>(src + i, x1);
      load_floats<VEC>(src + half + i, x2);
      load_floats<VEC>(cs + i, c1);
      load_floats<VEC>(cs + half + i, c2);
      load_floats<VEC>(sn + i, s1);
      load_floats<VEC>(sn + half + i, s2);
      rotate_pair<MODE == kBackward>(x1, x2, c1, c2, s1, s2, y1, y2);
      store_floats<VEC>(dst + i, y1);
      store_floats<VEC>(dst + half + i, y2);
    }
  }
  const int pass_vecs = (d - rot) / VEC;
  for (int w = threadIdx.x; w < heads * pass_vecs; w += blockDim.x) {
    const int head = w / pass_vecs, i = rot + (w % pass_vecs) * VEC;
    *reinterpret_cast<Pack<T, VEC>*>(ot + head * o.h + i) =
        *reinterpret_cast<const Pack<T, VEC>*>(tt + head * in.h + i);
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
template <typename T, int VEC, int MODE>
__global__ void __launch_bounds__(kFlatThreads)
    rotary_flat_kernel(const T* __restrict__ t, const float* __restrict__ cos, const float* __restrict__ sin,
                       T* __restrict__ out, uint32_t n, Divider per_head, Divider per_token, Divider per_position,
                       int rot, int pass_vecs, HeadStrides in, HeadStrides o) {
  const uint32_t i = blockIdx.x * kFlatThreads + threadIdx.x;
  if (i >= n) return;
  const auto hp = per_head.divmod(i);         // (token * heads + head, pair vector)
  const auto th = per_token.divmod(hp.div);   // (token, head)
  const auto sb = per_position.divmod(th.div);  // (position, batch index)
  const int half = rot / 2;
  const int j = static_cast<int>(hp.mod) * VEC;
  const T* src = t + static_cast<int64_t>(sb.div) * in.s + static_cast<int64_t>(sb.mod) * in.b +
                 static_cast<int64_t>(th.mod) * in.h;
  T* dst = out + static_cast<int64_t>(sb.div) * o.s + static_cast<int64_t>(sb.mod) * o.b +
           static_cast<int64_t>(th.mod) * o.h;
  if constexpr (MODE == kCopy) {
    store_streaming<VEC>(dst + j, load_streaming<VEC>(src + j));
    store_streaming<VEC>(dst + half + j, load_streaming<VEC>(src + half + j));
  } else {
    const int64_t row = static_cast<int64_t>(sb.div) * rot;
    float x1[VEC], x2[VEC], c1[VEC], c2[VEC], s1[VEC], s2[VEC], y1[VEC], y2[VEC];
    unpack_floats(load_streaming<VEC>(src + j), x1);
    unpack_floats(load_streaming<VEC>(src + half + j), x2);
    load_table<VEC>(cos + row + j, c1);
    load_table<VEC>(cos + row + half + j, c2);
    load_table<VEC>(sin + row + j, s1);
    load_table<VEC>(sin + row + half + j, s2);
    rotate_pair<MODE == kBackward>(x1, x2, c1, c2, s1, s2, y1, y2);
    store_streaming<VEC>(dst + j, pack_floats<T, VEC>(y1));
    store_streaming<VEC>(dst + half + j, pack_floats<T, VEC>(y2));
  }
  for (int k = static_cast<int>(hp.mod); k < pass_vecs; k += static_cast<int>(per_head.divisor)) {
    store_streaming<VEC>(dst + rot + k * VEC, load_streaming<VEC>(src + rot + k * VEC));
  }
}

bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

HeadStrides head_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// `out` given by the caller: the input's shape and dtype, on its device, last dim contiguous, no
// element written twice and none shared with the input.
void check_out(const at::Tensor& out, const at::Tensor& t, const char* what) {
  TORCH_CHECK(out.device() == t.device() && out.scalar_type() == t.scalar_type() && out.sizes() == t.sizes() &&
                  out.stride(3) == 1,
              what, " out must be a ", t.scalar_type(), " ", t.sizes(), " tensor on ", t.device(),
              " with a contiguous last dim (the input's shape, dtype and device), got ", out.scalar_type(), " ",
              out.sizes(), " on ", out.device(), out.stride(3) == 1 ? "" : " (last dim strided)");
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, what, " out has overlapping elements");
  at::assert_no_overlap(out, t);
}

// One launch of MODE over t [s, b, heads, d] into out (same shape). rot = d and no tables for kCopy.
void launch_heads(const at::Tensor& t, const float* cos, const float* sin, int64_t rot, at::Tensor& out, int mode,
                  int64_t variant) {
  if (out.numel() == 0) return;
  const int64_t s = t.size(0), b = t.size(1), heads = t.size(2), d = t.size(3);
  const int vec = kVecBytes / static_cast<int>(t.element_size());
  const bool tables_ok =
      mode == kCopy || (aligned_to(cos, vec * sizeof(float)) && aligned_to(sin, vec * sizeof(float)));
  const bool vectorize = (rot / 2) % vec == 0 && (d - rot) % vec == 0 && d % vec == 0 && t.stride(0) % vec == 0 &&
                         t.stride(1) % vec == 0 && t.stride(2) % vec == 0 && out.stride(0) % vec == 0 &&
                         out.stride(1) % vec == 0 && out.stride(2) % vec == 0 &&
                         aligned_to(t.data_ptr(), kVecBytes) && aligned_to(out.data_ptr(), kVecBytes) && tables_ok;
  const HeadStrides in = head_strides(t), o = head_strides(out);
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(t.scalar_type(), "rotary", [&] {
    dispatch_vec<scalar_t>(vectorize, [&](auto vc) {
      constexpr int VEC = decltype(vc)::value;
      const scalar_t* src = t.data_ptr<scalar_t>();
      scalar_t* dst = out.data_ptr<scalar_t>();
      const int64_t pair_vecs = rot / 2 / VEC, n = s * b * heads * pair_vecs;
      auto with_mode = [&](auto launch) {
        if (mode == kForward) {
          launch(std::integral_constant<int, kForward>{});
        } else if (mode == kBackward) {
          launch(std::integral_constant<int, kBackward>{});
        } else {
          launch(std::integral_constant<int, kCopy>{});
        }
      };
      if (variant == 1 && n < (int64_t{1} << 31)) {
        with_mode([&](auto m) {
          rotary_flat_kernel<scalar_t, VEC, decltype(m)::value>
              <<<static_cast<unsigned>((n + kFlatThreads - 1) / kFlatThreads), kFlatThreads, 0, stream>>>(
                  src, cos, sin, dst, static_cast<uint32_t>(n), Divider(static_cast<unsigned>(pair_vecs)),
                  Divider(static_cast<unsigned>(heads)), Divider(static_cast<unsigned>(b)), static_cast<int>(rot),
                  static_cast<int>((d - rot) / VEC), in, o);
        });
        return;
      }
      const int items = static_cast<int>(heads * pair_vecs);
      const int threads = std::min(256, std::max(32, (items + 31) / 32 * 32));
      with_mode([&](auto m) {
        rotary_kernel<scalar_t, VEC, decltype(m)::value><<<static_cast<unsigned>(s * b), threads, 0, stream>>>(
            src, cos, sin, dst, b, static_cast<int>(heads), static_cast<int>(d), static_cast<int>(rot), in, o);
      });
    });
  });
  check_launch();
}

void check_variant(int64_t variant) {
  TORCH_CHECK(variant >= 0 && variant < kRotaryVariants, "rotary variant must be 0 (one block per token) or 1 (one "
              "vector pair per thread), got ", variant);
}

void check_input(const at::Tensor& t, const char* what) {
  check_cuda(t, what);
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, what, " must be [s, b, heads, d] with a contiguous last dim");
}

}  // namespace

// backward=true applies the transposed rotation (the gradient with respect to t).
at::Tensor rotary(const at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, bool backward, int64_t variant,
                  const c10::optional<at::Tensor>& out) {
  check_variant(variant);
  check_input(t, "rotary input");
  const int64_t s = t.size(0), d = t.size(3);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == s &&
                  cos.device() == t.device() && sin.device() == t.device(),
              "rotary cos/sin must be contiguous float32 [s, rot] tensors on the input's device");
  const int64_t rot = cos.size(1);
  TORCH_CHECK(rot % 2 == 0 && rot > 0 && rot <= d, "rotary dim ", rot, " must be even, positive and <= head dim ", d);
  if (out.has_value()) check_out(*out, t, "rotary");
  const c10::cuda::CUDAGuard guard(t.device());
  at::Tensor result = out.has_value() ? *out : at::empty(t.sizes(), t.options());
  launch_heads(t, cos.data_ptr<float>(), sin.data_ptr<float>(), rot, result, backward ? kBackward : kForward, variant);
  return result;
}

at::Tensor copy_heads(const at::Tensor& t, const c10::optional<at::Tensor>& out, int64_t variant) {
  check_variant(variant);
  check_input(t, "copy_heads input");
  TORCH_CHECK(t.size(3) % 2 == 0, "copy_heads needs an even head dim, got ", t.size(3));
  if (out.has_value()) check_out(*out, t, "copy_heads");
  const c10::cuda::CUDAGuard guard(t.device());
  at::Tensor result = out.has_value() ? *out : at::empty(t.sizes(), t.options());
  launch_heads(t, nullptr, nullptr, t.size(3), result, kCopy, variant);
  return result;
}

}  // namespace mlite
