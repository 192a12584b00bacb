// SwiGLU and bias-GeLU (tanh form), forward and backward, on [rows, cols] tensors.
//
// Both are elementwise, read in 16-byte vectors when the feature count allows. The bias-GeLU
// backward tiles the matrix: each thread owns one column vector and walks a slice of rows,
// keeping its dbias share in registers, written as a partial row that reduce_column_partials sums.
// The forwards have three launch variants (see kActFwdVariants); swiglu_fwd can write into the
// caller's `out`. With an FP8 out_dtype the forwards write saturate(y * scale) for the FP8 linear
// the activation feeds, and record max|y| (fp8.cuh); the backwards read only x, so they are unchanged.
#include <ATen/MemoryOverlap.h>

#include "fp8.cuh"
// After common.cuh: this header uses c10's macros without including them.
#include <ATen/cuda/detail/IntegerDivider.cuh>

namespace mlite {
namespace {

constexpr int kThreads = 256;
constexpr float kGeluK0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluK1 = 0.044715f;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

__device__ __forceinline__ float gelu(float z) {
  return 0.5f * z * (1.f + tanhf(kGeluK0 * (z + kGeluK1 * z * z * z)));
}

__device__ __forceinline__ float gelu_grad(float z) {
  const float t = tanhf(kGeluK0 * (z + kGeluK1 * z * z * z));
  return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * kGeluK0 * (1.f + 3.f * kGeluK1 * z * z);
}

// Forward launch variants of SwiGLU and bias-GeLU:
//   0: a grid-stride loop over 16 blocks per SM, 64-bit index math (a 64-bit division per vector);
//   1: one vector per thread and as many blocks as that takes (the layout torch.compile
//      generates), 32-bit indices split into (row, column) by a multiply-shift divider;
//   2: as 1 with two vectors per thread, a block apart, both loaded before the math.
// 1 and 2 need fewer than 2^31 vectors; larger inputs take 0.
constexpr int kActFwdVariants = 3;
using RowDivider = at::cuda::detail::IntDivider<unsigned int>;

// Vectors per thread of a flat (variant 1 or 2) launch.
inline int flat_vectors(int64_t variant) { return variant == 2 ? 2 : 1; }

bool flat_launch(int64_t variant, int64_t n_vectors) {
  TORCH_CHECK(variant >= 0 && variant < kActFwdVariants, "activation forward variant must be 0 (grid-stride "
              "loop), 1 (one vector per thread) or 2 (two vectors per thread), got ", variant);
  return variant > 0 && n_vectors < (int64_t{1} << 31);
}

// Runs `launch(U, blocks)` for a flat kernel over n vectors, U = flat_vectors(variant) of them
// per thread (a std::integral_constant, so that U can be a template argument).
template <typename F>
void launch_flat(int64_t variant, int64_t n_vectors, F&& launch) {
  const int u = flat_vectors(variant);
  const auto blocks = static_cast<unsigned>((n_vectors + kThreads * u - 1) / (kThreads * u));
  if (u == 1) {
    launch(std::integral_constant<int, 1>{}, blocks);
  } else {
    launch(std::integral_constant<int, 2>{}, blocks);
  }
}

// Index of the k-th of a flat thread's U vectors: vectors of one block are contiguous, so each
// warp's loads cover consecutive 16-byte vectors.
template <int U>
__device__ __forceinline__ uint32_t flat_index(int k) {
  return (blockIdx.x * static_cast<uint32_t>(U) + k) * blockDim.x + threadIdx.x;
}

int64_t elementwise_blocks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, static_cast<int64_t>(sm_count()) * 16));
}

// x [rows, 2f] = [gate | up] -> y [rows, f] = silu(gate) * up. The forwards' Y is T, or an FP8 type
// (then `fp8` holds the scale and amax slot).
template <typename T, typename Y, int VEC>
__global__ void swiglu_fwd_kernel(const T* __restrict__ x, Y* __restrict__ y, int64_t rows, int64_t f, Fp8Out fp8) {
  const int64_t fv = f / VEC, n = rows * fv;
  const float scale = output_scale<Y>(fp8);
  int amax_bits = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / fv, j = (i - r * fv) * VEC;
    float g[VEC], u[VEC], out[VEC];
    load_floats<VEC>(x + r * 2 * f + j, g);
    load_floats<VEC>(x + r * 2 * f + f + j, u);
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = g[v] * sigmoid(g[v]) * u[v];
    store_output<VEC>(y + r * f + j, out, scale, amax_bits);
  }
  if constexpr (is_fp8_v<Y>) record_amax(amax_bits, fp8.amax);
}

// Flat form of swiglu_fwd_kernel: n = rows * f / VEC vectors, per_row divides by f / VEC.
template <typename T, typename Y, int VEC, int U>
__global__ void __launch_bounds__(kThreads)
    swiglu_fwd_flat_kernel(const T* __restrict__ x, Y* __restrict__ y, uint32_t n, RowDivider per_row, int64_t f,
                           Fp8Out fp8) {
  float g[U][VEC], u[U][VEC];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const uint32_t i = flat_index<U>(k);
    if (i < n) {
      const int64_t xo = static_cast<int64_t>(i) * VEC + static_cast<int64_t>(per_row.divmod(i).div) * f;
      load_floats<VEC>(x + xo, g[k]);
      load_floats<VEC>(x + xo + f, u[k]);
    }
  }
  const float scale = output_scale<Y>(fp8);
  int amax_bits = 0;
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const uint32_t i = flat_index<U>(k);
    if (i < n) {
      float out[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) out[v] = g[k][v] * sigmoid(g[k][v]) * u[k][v];
      store_output<VEC>(y + static_cast<int64_t>(i) * VEC, out, scale, amax_bits);
    }
  }
  if constexpr (is_fp8_v<Y>) record_amax(amax_bits, fp8.amax);
}

// Each thread takes kSwigluBwdItems vectors a grid stride apart per step and issues all their
// loads (three 16-byte loads each) before any math, so more bytes are in flight per thread.
constexpr int kSwigluBwdItems = 2;

template <typename T, int VEC>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                  int64_t rows, int64_t f) {
  constexpr int U = kSwigluBwdItems;
  const int64_t fv = f / VEC, n = rows * fv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; base < n; base += U * stride) {
    float g[U][VEC], u[U][VEC], d[U][VEC];
    int64_t xo[U], yo[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t i = base + k * stride;
      if (i < n) {
        const int64_t r = i / fv, j = (i - r * fv) * VEC;
        xo[k] = r * 2 * f + j;
        yo[k] = r * f + j;
        load_floats<VEC>(x + xo[k], g[k]);
        load_floats<VEC>(x + xo[k] + f, u[k]);
        load_floats<VEC>(dy + yo[k], d[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (base + k * stride < n) {
        float dg[VEC], du[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float s = sigmoid(g[k][v]);
          du[v] = d[k][v] * g[k][v] * s;
          dg[v] = d[k][v] * u[k][v] * s * (1.f + g[k][v] * (1.f - s));
        }
        store_floats<VEC>(dx + xo[k], dg);
        store_floats<VEC>(dx + xo[k] + f, du);
      }
    }
  }
}

template <typename T, typename Y, int VEC>
__global__ void bias_gelu_fwd_kernel(const T* __restrict__ x, const T* __restrict__ bias, Y* __restrict__ y,
                                     int64_t rows, int64_t cols, Fp8Out fp8) {
  const int64_t cv = cols / VEC, n = rows * cv;
  const float scale = output_scale<Y>(fp8);
  int amax_bits = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = (i % cv) * VEC;
    float z[VEC], out[VEC];
    load_floats<VEC>(x + i * VEC, z);
    if (bias != nullptr) {
      float b[VEC];
      load_floats<VEC>(bias + j, b);
#pragma unroll
      for (int v = 0; v < VEC; ++v) z[v] += b[v];
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = gelu(z[v]);
    store_output<VEC>(y + i * VEC, out, scale, amax_bits);
  }
  if constexpr (is_fp8_v<Y>) record_amax(amax_bits, fp8.amax);
}

// Flat form of bias_gelu_fwd_kernel: n = rows * cols / VEC vectors, per_row divides by cols / VEC.
template <typename T, typename Y, int VEC, int U>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_fwd_flat_kernel(const T* __restrict__ x, const T* __restrict__ bias, Y* __restrict__ y, uint32_t n,
                              RowDivider per_row, Fp8Out fp8) {
  float z[U][VEC];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const uint32_t i = flat_index<U>(k);
    if (i < n) {
      load_floats<VEC>(x + static_cast<int64_t>(i) * VEC, z[k]);
      if (bias != nullptr) {
        float b[VEC];
        load_floats<VEC>(bias + per_row.divmod(i).mod * VEC, b);
#pragma unroll
        for (int v = 0; v < VEC; ++v) z[k][v] += b[v];
      }
    }
  }
  const float scale = output_scale<Y>(fp8);
  int amax_bits = 0;
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const uint32_t i = flat_index<U>(k);
    if (i < n) {
      float out[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) out[v] = gelu(z[k][v]);
      store_output<VEC>(y + static_cast<int64_t>(i) * VEC, out, scale, amax_bits);
    }
  }
  if constexpr (is_fp8_v<Y>) record_amax(amax_bits, fp8.amax);
}

// block (32 column vectors, 8 rows); grid (column tiles, row groups). dbias_part [gridDim.y * 8, cols].
template <typename T, int VEC>
__global__ void bias_gelu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ bias,
                                     T* __restrict__ dx, float* __restrict__ dbias_part, int64_t rows, int64_t cols) {
  const int64_t col = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * VEC;
  if (col >= cols) return;
  const int64_t group = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  float b[VEC], acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) b[v] = acc[v] = 0.f;
  if (bias != nullptr) load_floats<VEC>(bias + col, b);
  for (int64_t r = group; r < rows; r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    float z[VEC], d[VEC], out[VEC];
    load_floats<VEC>(x + r * cols + col, z);
    load_floats<VEC>(dy + r * cols + col, d);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      out[v] = d[v] * gelu_grad(z[v] + b[v]);
      acc[v] += out[v];
    }
    store_floats<VEC>(dx + r * cols + col, out);
  }
  if (dbias_part != nullptr) store_floats<VEC>(dbias_part + group * cols + col, acc);
}

void check_2d(const at::Tensor& t, const char* what) {
  check_cuda(t, what);
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), what, " must be a contiguous [rows, features] tensor");
}

// Whether rows of `cols` elements of every tensor can be read or written in vectors of the first
// tensor's 16-byte width (an FP8 output then takes vectors of as many bytes as the input has elements).
bool vectorizable(std::initializer_list<const at::Tensor*> ts, int64_t cols) {
  const int vec = kVecBytes / static_cast<int>((*ts.begin())->element_size());
  for (const at::Tensor* t : ts) {
    if (!aligned_rows(t->data_ptr(), cols, cols, vec, static_cast<int>(t->element_size()))) return false;
  }
  return true;
}

void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->is_contiguous() && bias->numel() == x.size(1) && bias->scalar_type() == x.scalar_type() &&
                  bias->device() == x.device(),
              "bias-GeLU bias must be a contiguous [", x.size(1), "] tensor with the input's dtype and device");
}

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& out, int64_t variant,
                      const c10::optional<at::ScalarType>& out_dtype, const c10::optional<at::Tensor>& scale,
                      const c10::optional<at::Tensor>& amax) {
  check_2d(x, "swiglu input");
  TORCH_CHECK(x.size(1) % 2 == 0, "swiglu input needs an even last dim [gate | up], got ", x.size(1));
  const at::ScalarType y_type = out_dtype.value_or(x.scalar_type());
  const Fp8Out fp8 = fp8_output(y_type, scale, amax, x, "swiglu_fwd");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), f = x.size(1) / 2;
  if (out.has_value()) {
    TORCH_CHECK(out->device() == x.device() && out->scalar_type() == y_type && out->dim() == 2 &&
                    out->size(0) == rows && out->size(1) == f && out->is_contiguous(),
                "swiglu_fwd out must be a contiguous [", rows, ", ", f, "] ", y_type, " tensor on ", x.device(),
                " (the input's rows, half its features, the output dtype, the input's device), got ", out->sizes(),
                " ", out->scalar_type(), " on ", out->device(), out->is_contiguous() ? "" : " (not contiguous)");
    at::assert_no_overlap(*out, x);
  }
  auto y = out.has_value() ? *out : at::empty({rows, f}, x.options().dtype(y_type));
  if (y.numel() == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(x.scalar_type(), "swiglu_fwd", [&] {
    dispatch_output<scalar_t>(y_type, [&](auto* ytag) {
      using Y = std::remove_pointer_t<decltype(ytag)>;
      Y* yp = static_cast<Y*>(y.data_ptr());
      dispatch_vec<scalar_t>(vectorizable({&x, &y}, f), [&](auto vc) {
        constexpr int VEC = decltype(vc)::value;
        const int64_t n = rows * f / VEC;
        if (!flat_launch(variant, n)) {
          swiglu_fwd_kernel<scalar_t, Y, VEC><<<elementwise_blocks(n), kThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), yp, rows, f, fp8);
          return;
        }
        const RowDivider per_row(static_cast<unsigned>(f / VEC));
        launch_flat(variant, n, [&](auto u, unsigned blocks) {
          swiglu_fwd_flat_kernel<scalar_t, Y, VEC, decltype(u)::value><<<blocks, kThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), yp, static_cast<uint32_t>(n), per_row, f, fp8);
        });
      });
    });
  });
  check_launch();
  return y;
}

at::Tensor swiglu_bwd(const at::Tensor& dy, const at::Tensor& x) {
  check_2d(x, "swiglu input");
  check_2d(dy, "swiglu grad");
  const int64_t rows = x.size(0), f = x.size(1) / 2;
  TORCH_CHECK(dy.size(0) == rows && dy.size(1) == f && dy.scalar_type() == x.scalar_type(),
              "swiglu grad must be [rows, f] with the input's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  if (dy.numel() == 0) return dx;
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(x.scalar_type(), "swiglu_bwd", [&] {
    dispatch_vec<scalar_t>(vectorizable({&x, &dy}, f), [&](auto vc) {
      constexpr int VEC = decltype(vc)::value;
      swiglu_bwd_kernel<scalar_t, VEC><<<elementwise_blocks(rows * f / VEC), kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), rows, f);
    });
  });
  check_launch();
  return dx;
}

at::Tensor bias_gelu_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t variant,
                         const c10::optional<at::ScalarType>& out_dtype, const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& amax) {
  check_2d(x, "bias-GeLU input");
  check_bias(bias, x);
  const at::ScalarType y_type = out_dtype.value_or(x.scalar_type());
  const Fp8Out fp8 = fp8_output(y_type, scale, amax, x, "bias_gelu_fwd");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  auto y = at::empty_like(x, x.options().dtype(y_type));
  if (y.numel() == 0) return y;
  const bool vec = vectorizable({&x, &y}, cols) && (!bias.has_value() || vectorizable({&*bias}, cols));
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(x.scalar_type(), "bias_gelu_fwd", [&] {
    dispatch_output<scalar_t>(y_type, [&](auto* ytag) {
      using Y = std::remove_pointer_t<decltype(ytag)>;
      Y* yp = static_cast<Y*>(y.data_ptr());
      dispatch_vec<scalar_t>(vec, [&](auto vc) {
        constexpr int VEC = decltype(vc)::value;
        const int64_t n = rows * cols / VEC;
        const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
        if (!flat_launch(variant, n)) {
          bias_gelu_fwd_kernel<scalar_t, Y, VEC><<<elementwise_blocks(n), kThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), b, yp, rows, cols, fp8);
          return;
        }
        const RowDivider per_row(static_cast<unsigned>(cols / VEC));
        launch_flat(variant, n, [&](auto u, unsigned blocks) {
          bias_gelu_fwd_flat_kernel<scalar_t, Y, VEC, decltype(u)::value><<<blocks, kThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), b, yp, static_cast<uint32_t>(n), per_row, fp8);
        });
      });
    });
  });
  check_launch();
  return y;
}

std::vector<at::Tensor> bias_gelu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                      const c10::optional<at::Tensor>& bias) {
  check_2d(x, "bias-GeLU input");
  check_2d(dy, "bias-GeLU grad");
  check_bias(bias, x);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "bias-GeLU grad must match the input's shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  auto dx = at::empty_like(x);
  auto dbias = bias.has_value() ? at::empty_like(*bias) : at::Tensor();
  if (cols == 0) return {dx, dbias};
  if (rows == 0) {
    if (bias.has_value()) dbias.zero_();
    return {dx, dbias};
  }
  const bool vec = vectorizable({&x, &dy}, cols) && (!bias.has_value() || vectorizable({&*bias}, cols));
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(x.scalar_type(), "bias_gelu_bwd", [&] {
    dispatch_vec<scalar_t>(vec, [&](auto vc) {
      constexpr int VEC = decltype(vc)::value;
      const dim3 block(32, 8);
      const int64_t col_tiles = (cols / VEC + block.x - 1) / block.x;
      const int64_t row_tiles = (rows + block.y - 1) / block.y;
      const int64_t wanted = std::max<int64_t>(1, static_cast<int64_t>(sm_count()) * 8 / col_tiles);
      const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(std::min(row_tiles, wanted)));
      at::Tensor part;
      if (bias.has_value()) {
        part = at::empty({static_cast<int64_t>(grid.y) * block.y, cols}, x.options().dtype(at::kFloat));
      }
      bias_gelu_bwd_kernel<scalar_t, VEC><<<grid, block, 0, stream>>>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
          dx.data_ptr<scalar_t>(), bias.has_value() ? part.data_ptr<float>() : nullptr, rows, cols);
      check_launch();
      if (bias.has_value()) reduce_column_partials(part, dbias);
    });
  });
  return {dx, dbias};
}

}  // namespace mlite
