// FP8 outputs for kernels that feed an FP8 linear under delayed scaling (megatron_lite/model/fp8.py):
// a kernel computes y in float32 as usual and stores saturate(y * scale) in E4M3 or E5M2, recording
// amax = max(amax, max|y|) into a device scalar. The output type Y is a template argument of those
// kernels (norm_fwd.cu, activations.cu, fp8.cu): T itself writes y as before, an FP8 type these bytes.
#pragma once

#include <cuda_fp8.h>

#include "common.cuh"

namespace mlite {

template <typename Y>
constexpr bool is_fp8_v = std::is_same_v<Y, at::Float8_e4m3fn> || std::is_same_v<Y, at::Float8_e5m2>;

template <typename Y>
constexpr __nv_fp8_interpretation_t fp8_interpretation() {
  return std::is_same_v<Y, at::Float8_e4m3fn> ? __NV_E4M3 : __NV_E5M2;
}

// Device pointers of an FP8 output: the scale (float32 scalar) and the amax slot (null: not recorded).
// Both null for an output of the input's type.
struct Fp8Out {
  const float* scale = nullptr;
  float* amax = nullptr;
};

template <typename Y>
__device__ __forceinline__ float output_scale(const Fp8Out& fp8) {
  if constexpr (is_fp8_v<Y>) {
    return *fp8.scale;
  } else {
    return 1.f;
  }
}

// y[0..N) stored at p as Y. For an FP8 Y: saturate(y * scale) rounded to nearest even, two elements
// per cvt.rn.satfinite (|v| past the format's max gives +-max, NaN stays NaN: torch's clamp then
// cast), the N bytes in one store; amax_bits gathers max|y|, as float bit patterns (the order of
// non-negative floats, with a NaN above inf, so that a NaN is never dropped).
template <int N, typename Y>
__device__ __forceinline__ void store_output(Y* p, const float (&y)[N], float scale, int& amax_bits) {
  if constexpr (is_fp8_v<Y>) {
    constexpr __nv_fp8_interpretation_t kind = fp8_interpretation<Y>();
    Pack<uint8_t, N> pk;
#pragma unroll
    for (int i = 0; i < N; ++i) amax_bits = max(amax_bits, __float_as_int(fabsf(y[i])));
    if constexpr (N % 2 == 0) {
      uint16_t* w = reinterpret_cast<uint16_t*>(&pk);
#pragma unroll
      for (int i = 0; i < N / 2; ++i) {
        // the multiply torch does in float32, never contracted into an FMA with y's last add
        const float2 s = make_float2(__fmul_rn(y[2 * i], scale), __fmul_rn(y[2 * i + 1], scale));
        w[i] = __nv_cvt_float2_to_fp8x2(s, __NV_SATFINITE, kind);  // .x in the low (first) byte
      }
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) pk.v[i] = __nv_cvt_float_to_fp8(__fmul_rn(y[i], scale), __NV_SATFINITE, kind);
    }
    *reinterpret_cast<Pack<uint8_t, N>*>(p) = pk;
  } else {
    store_floats<N>(p, y);
  }
}

// Folds every thread's amax_bits into *amax: a reduction over the block, then one atomicMax on the
// int bit pattern from its first thread (for non-negative floats, and NaN, the int order is the float
// order). The atomic is skipped where the slot already holds as much: the slot only grows, so a stale
// read costs at most an atomic, and most blocks of a launch issue none. Every thread of the block
// must call it (whole warps); amax null returns at once.
__device__ __forceinline__ void record_amax(int amax_bits, float* amax) {
  if (amax == nullptr) return;
  __shared__ int warp_max[32];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax_bits = max(amax_bits, __shfl_xor_sync(0xffffffffu, amax_bits, off));
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int warps = static_cast<int>(blockDim.x * blockDim.y) / 32;
  if (warps > 1) {
    if (tid % 32 == 0) warp_max[tid / 32] = amax_bits;
    __syncthreads();
    if (tid >= 32) return;
    amax_bits = tid < warps ? warp_max[tid] : 0;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) amax_bits = max(amax_bits, __shfl_xor_sync(0xffffffffu, amax_bits, off));
  }
  if (tid == 0 && amax_bits > __float_as_int(__ldcg(amax))) atomicMax(reinterpret_cast<int*>(amax), amax_bits);
}

inline bool is_fp8_type(at::ScalarType t) { return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2; }

// Calls f with a null pointer of the FP8 type `type`.
template <typename F>
void dispatch_fp8(at::ScalarType type, F&& f) {
  if (type == at::kFloat8_e4m3fn) {
    f(static_cast<at::Float8_e4m3fn*>(nullptr));
  } else {
    TORCH_CHECK(type == at::kFloat8_e5m2, "FP8 outputs are float8_e4m3fn or float8_e5m2, got ", type);
    f(static_cast<at::Float8_e5m2*>(nullptr));
  }
}

// Calls f with a null pointer of the output type: T itself, or an FP8 type.
template <typename T, typename F>
void dispatch_output(at::ScalarType type, F&& f) {
  if (type == c10::CppTypeToScalarType<T>::value) {
    f(static_cast<T*>(nullptr));
  } else {
    TORCH_CHECK(is_fp8_type(type), "output dtype must be the input's (", c10::CppTypeToScalarType<T>::value,
                ") or an FP8 type, got ", type);
    dispatch_fp8(type, std::forward<F>(f));
  }
}

inline void check_fp8_scalar(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1 && t.device() == x.device(), op, " ", name,
              " must be a one-element float32 tensor on ", x.device(), ", got ", t.scalar_type(), " ", t.sizes(),
              " on ", t.device());
}

// The checked FP8 side of `op`'s output of type `out_type`: for an FP8 type the scale (required) and the
// amax slot (optional); for the input's type (x's) neither may be given.
inline Fp8Out fp8_output(at::ScalarType out_type, const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& amax, const at::Tensor& x, const char* op) {
  if (!is_fp8_type(out_type)) {
    TORCH_CHECK(out_type == x.scalar_type(), op, " writes the input's dtype (", x.scalar_type(),
                ") or an FP8 dtype, got ", out_type);
    TORCH_CHECK(!scale.has_value() && !amax.has_value(), op, " takes a scale and amax only for an FP8 out_dtype");
    return {};
  }
  TORCH_CHECK(scale.has_value(), op, " with out_dtype ", out_type, " needs the scale its output is multiplied by");
  check_fp8_scalar(*scale, x, op, "scale");
  Fp8Out fp8;
  fp8.scale = scale->data_ptr<float>();
  if (amax.has_value()) {
    check_fp8_scalar(*amax, x, op, "amax");
    fp8.amax = amax->data_ptr<float>();
  }
  return fp8;
}

}  // namespace mlite
