// Shared pieces of the scaled masked / causal softmax kernels (softmax_fwd.cu, softmax_bwd.cu):
// where a row's mask lives, the row's (batch, head, query) index, input checks and launch shape.
//
// Scores are [B, H, SQ, SK] with softmax over SK. Masked positions take -10000 (as Megatron, so a
// fully masked row is uniform) and get zero gradient; causal positions j > i are never read,
// their probability and gradient are exactly 0.
#pragma once

#include "common.cuh"

namespace mlite {

constexpr float kMaskedScore = -10000.f;

// Where a row's mask lives: mask[b * sb + h * sh + q * sq + j * sk] (broadcast dims have stride 0).
struct MaskView {
  const bool* ptr = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
};

struct RowIndex {
  int64_t b, h, q;
};

__device__ __forceinline__ RowIndex split_row(int64_t row, int64_t heads, int64_t sq) {
  return {row / (heads * sq), (row / sq) % heads, row % sq};
}

template <int VEC>
__device__ __forceinline__ void load_mask(const MaskView& m, const RowIndex& ri, int c, bool (&out)[VEC]) {
  if (m.ptr == nullptr) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = false;
    return;
  }
  const bool* p = m.ptr + ri.b * m.sb + ri.h * m.sh + ri.q * m.sq;
  if (VEC > 1) {  // the host only vectorises when sk == 1 and the row starts are aligned
    const Pack<bool, VEC> pk = *reinterpret_cast<const Pack<bool, VEC>*>(p + c);
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = pk.v[v];
  } else {
    out[0] = p[c * m.sk];
  }
}

inline void check_scores(const at::Tensor& t, const char* what) {
  check_cuda(t, what);
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(), what, " must be a contiguous [b, heads, sq, sk] tensor, got ",
              t.sizes());
}

inline MaskView mask_view(const c10::optional<at::Tensor>& mask, const at::Tensor& scores) {
  MaskView m;
  if (!mask.has_value()) return m;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device() == scores.device(),
              "softmax mask must be a bool tensor on the scores' device (True = masked out)");
  const at::Tensor e = mask->expand(scores.sizes());
  m.ptr = e.data_ptr<bool>();
  m.sb = e.stride(0);
  m.sh = e.stride(1);
  m.sq = e.stride(2);
  m.sk = e.stride(3);
  return m;
}

inline bool mask_vectorizable(const MaskView& m, int vec) {
  return m.ptr == nullptr || (m.sk == 1 && m.sb % vec == 0 && m.sh % vec == 0 && m.sq % vec == 0 &&
                              reinterpret_cast<uintptr_t>(m.ptr) % vec == 0);
}

// Rows, mask and launch shape of one softmax call. `dy` is null for the forward.
struct SoftmaxLaunch {
  int64_t rows, heads, sq, cols;
  MaskView mask;
  RowShape shape;
  dim3 grid;
};

inline SoftmaxLaunch softmax_setup(const at::Tensor& main, const at::Tensor* dy,
                                   const c10::optional<at::Tensor>& mask, bool causal) {
  check_scores(main, dy == nullptr ? "softmax scores" : "softmax probs");
  if (dy != nullptr) {
    check_scores(*dy, "softmax grad");
    TORCH_CHECK(dy->sizes() == main.sizes() && dy->scalar_type() == main.scalar_type(),
                "softmax grad must match the probabilities' shape and dtype");
  }
  SoftmaxLaunch l;
  l.heads = main.size(1);
  l.sq = main.size(2);
  l.cols = main.size(3);
  l.rows = main.numel() / std::max<int64_t>(l.cols, 1);
  TORCH_CHECK(!causal || l.sq == l.cols, "causal softmax needs sq == sk, got ", l.sq, " and ", l.cols);
  l.mask = mask_view(mask, main);
  const int elem = static_cast<int>(main.element_size());
  const int vec = kVecBytes / elem;
  bool vectorize = aligned_rows(main.data_ptr(), l.cols, l.cols, vec, elem) && mask_vectorizable(l.mask, vec);
  if (dy != nullptr) vectorize = vectorize && aligned_rows(dy->data_ptr(), l.cols, l.cols, vec, elem);
  l.shape = row_shape(l.cols, vectorize ? vec : 1);
  TORCH_CHECK(l.shape.fits, "sequence length ", l.cols, " is too long for the softmax kernels (at most ",
              max_row_elems(elem, vectorize),
              " keys in this dtype/alignment); use flash attention or --no-fused-kernels");
  l.grid = dim3(static_cast<unsigned>((l.rows + l.shape.block.y - 1) / l.shape.block.y));
  return l;
}

}  // namespace mlite
