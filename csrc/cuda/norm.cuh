// Shared host-side pieces of the RMSNorm / LayerNorm kernels (norm_fwd.cu, norm_bwd.cu): the
// weight-dtype dispatch, input checks, and the launch shape.
#pragma once

#include "common.cuh"

namespace mlite {

// Calls f with a null pointer of the weight's element type: T itself, or float for fp32
// weights with half-precision activations.
template <typename T, typename F>
void dispatch_weight(at::ScalarType weight_type, F&& f) {
  if (weight_type == c10::CppTypeToScalarType<T>::value) {
    f(static_cast<T*>(nullptr));
  } else if constexpr (!std::is_same_v<T, float>) {
    TORCH_CHECK(weight_type == at::kFloat, "norm weight must have the input's dtype or float32, got ",
                weight_type);
    f(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(false, "norm weight of a float32 input must be float32, got ", weight_type);
  }
}

inline void check_norm_input(const at::Tensor& x, const at::Tensor& gamma) {
  check_cuda(x, "norm input");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "norm kernels take a contiguous [rows, hidden] input");
  TORCH_CHECK(gamma.is_contiguous() && gamma.numel() == x.size(1) && gamma.device() == x.device(),
              "norm weight must be a contiguous [hidden] tensor on the input's device, got ", gamma.sizes());
}

// Threads per row below which a norm row kernel keeps two vectors per thread: four warps.
constexpr int kMinRowThreads = 128;

// deep = true (the forward) takes four 16-byte vectors per thread whenever that still leaves
// kMinRowThreads threads per row: at the same register count as two (about 64), a 4096-wide
// 16-bit row then runs as 128 threads holding 64 bytes each instead of 256 holding 32, so an SM
// has twice the bytes in flight at the same occupancy.
inline RowShape norm_shape(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& beta,
                           bool deep) {
  const int64_t cols = x.size(1);
  const int vec = kVecBytes / static_cast<int>(x.element_size());
  bool vectorize = aligned_rows(x.data_ptr(), cols, cols, vec, x.element_size()) &&
                   aligned_rows(gamma.data_ptr(), cols, cols, vec, gamma.element_size());
  if (beta.has_value()) vectorize = vectorize && aligned_rows(beta->data_ptr(), cols, cols, vec, beta->element_size());
  const int64_t nvec = (cols + vec - 1) / vec;
  RowShape s = vectorize && deep && nvec >= 4 * kMinRowThreads ? row_shape_k(cols, vec, 4)
                                                                 : row_shape(cols, vectorize ? vec : 1);
  TORCH_CHECK(s.fits, "hidden size ", cols, " is too large for the norm kernels (at most ",
              max_row_elems(static_cast<int>(x.element_size()), s.vec > 1),
              " elements in this dtype/alignment); run with --no-fused-kernels");
  return s;
}

}  // namespace mlite
