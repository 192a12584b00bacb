// Rotary position embedding on q or k, non-interleaved (rotate_half) form, forward and backward.
//
// t [s, b, heads, d] (any strides, last dim contiguous); cos/sin float32 [s, rot]. With
// h = rot / 2, the pair (x1, x2) = (t[i], t[i + h]) for i < h becomes
//   forward:  y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
//   backward: dx1 = dy1 c1 + dy2 s2,   dx2 = dy2 c2 - dy1 s1   (the transposed rotation)
// where c1 = cos[i], c2 = cos[i + h] (equal in the usual tables, not assumed); dims past rot
// pass through. One block per token; its threads walk (head, pair vector) items.
#include "common.cuh"

namespace mlite {
namespace {

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
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (BACKWARD) {
        y1[v] = x1[v] * c1[v] + x2[v] * s2[v];
        y2[v] = x2[v] * c2[v] - x1[v] * s1[v];
      } else {
        y1[v] = x1[v] * c1[v] - x2[v] * s1[v];
        y2[v] = x2[v] * c2[v] + x1[v] * s2[v];
      }
    }
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

}  // namespace

// backward=true applies the transposed rotation (the gradient with respect to t).
at::Tensor rotary(const at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
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
      const int items = static_cast<int>(heads * (rot / 2) / VEC);
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
