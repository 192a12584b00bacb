// Fused AdamW step over fp32 main params: one pass per tensor reads the main param, its fp32
// or bf16 gradient (Megatron's --main-grads-dtype) and both moments, and writes the main param,
// the moments and (optionally) the bf16/fp16 model copy of the parameter. The moments may be stored in fp32, bf16 or fp16
// (Megatron's --exp-avg-dtype / --exp-avg-sq-dtype); all arithmetic is fp32.
//
// Registered as the torch operator mlite::adamw_step (torch.ops.mlite.adamw_step), so it
// needs no pybind entry: loading the extension registers it.
//
// The update is torch's AdamW (torch.optim.AdamW, fused form), per element:
//   g  = grad / grad_scale                      (grad_scale: optional device scalar)
//   p  = p * (1 - lr * weight_decay)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g * g
//   p  = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),  bc_i = 1 - beta_i^step
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace mlite {
namespace {

constexpr int kAdamThreads = 256;
constexpr int kAdamVec = 4;  // elements per vector: 16 bytes of fp32, 8 of bf16/fp16

struct AdamScalars {
  float lr, beta1, beta2, eps, decay;  // decay = 1 - lr * weight_decay
  float step_size, inv_bc2_sqrt;       // lr / bc1, 1 / sqrt(bc2)
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  const Vec<T, N> pk = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(pk.v[i]);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  Vec<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = pk;
}

// N elements per thread and step of a grid-stride loop over n / N vectors (N = kAdamVec when
// every pointer is aligned to its vector and n % N == 0, otherwise 1). P is the model copy's
// type, G the gradient's; `model` is null when there is none (an fp32 model updated in place).
template <int N, typename M, typename V, typename P, typename G>
__global__ void __launch_bounds__(kAdamThreads)
    adamw_kernel(float* __restrict__ param, const G* __restrict__ grad, M* __restrict__ exp_avg,
                 V* __restrict__ exp_avg_sq, P* __restrict__ model, int64_t n, AdamScalars s,
                 const float* __restrict__ grad_scale) {
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  const int64_t nvec = n / N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t off = i * N;
    float p[N], g[N], m[N], v[N];
    load_vec<N>(param + off, p);
    load_vec<N>(grad + off, g);
    load_vec<N>(exp_avg + off, m);
    load_vec<N>(exp_avg_sq + off, v);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float gj = grad_scale != nullptr ? g[j] / scale : g[j];
      p[j] *= s.decay;
      m[j] = s.beta1 * m[j] + (1.0f - s.beta1) * gj;
      v[j] = s.beta2 * v[j] + (1.0f - s.beta2) * gj * gj;
      const float denom = sqrtf(v[j]) * s.inv_bc2_sqrt + s.eps;
      p[j] -= s.step_size * m[j] / denom;
    }
    store_vec<N>(param + off, p);
    store_vec<N>(exp_avg + off, m);
    store_vec<N>(exp_avg_sq + off, v);
    if (model != nullptr) store_vec<N>(model + off, p);
  }
}

bool aligned(const void* ptr, int64_t elem_size) {
  return reinterpret_cast<uintptr_t>(ptr) % (kAdamVec * elem_size) == 0;
}

template <typename M, typename V, typename P, typename G>
void launch(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
            const at::Tensor& exp_avg_sq, const at::Tensor* model, const AdamScalars& s,
            const float* grad_scale, cudaStream_t stream) {
  const int64_t n = param.numel();
  if (n == 0) return;
  P* model_ptr = model != nullptr ? reinterpret_cast<P*>(model->data_ptr()) : nullptr;
  const bool vec = n % kAdamVec == 0 && aligned(param.data_ptr(), 4) && aligned(grad.data_ptr(), sizeof(G)) &&
                   aligned(exp_avg.data_ptr(), sizeof(M)) && aligned(exp_avg_sq.data_ptr(), sizeof(V)) &&
                   (model_ptr == nullptr || aligned(model_ptr, sizeof(P)));
  const int64_t work = vec ? n / kAdamVec : n;
  // enough blocks to fill the GPU a few times over; the grid-stride loop covers the rest
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kAdamThreads - 1) / kAdamThreads,
                                                                             max_blocks)));
  auto* p = param.data_ptr<float>();
  const auto* g = reinterpret_cast<const G*>(grad.data_ptr());
  auto* m = reinterpret_cast<M*>(exp_avg.data_ptr());
  auto* v = reinterpret_cast<V*>(exp_avg_sq.data_ptr());
  if (vec) {
    adamw_kernel<kAdamVec, M, V, P, G><<<blocks, kAdamThreads, 0, stream>>>(p, g, m, v, model_ptr, n, s, grad_scale);
  } else {
    adamw_kernel<1, M, V, P, G><<<blocks, kAdamThreads, 0, stream>>>(p, g, m, v, model_ptr, n, s, grad_scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f with a value of the C++ type of `dtype` (float, at::BFloat16 or at::Half).
template <typename F>
void with_type(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, "adamw_step: ", what, " must be float32, bfloat16 or float16, got ", dtype);
  }
}

void check_tensor(const at::Tensor& t, const at::Tensor& param, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == param.device(), "adamw_step: ", what, " must be on ", param.device());
  TORCH_CHECK(t.is_contiguous(), "adamw_step: ", what, " must be contiguous");
  TORCH_CHECK(t.numel() == param.numel(), "adamw_step: ", what, " has ", t.numel(), " elements, the param ",
              param.numel());
}

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList models, double lr, double beta1, double beta2, double eps, double weight_decay,
                double step, const std::optional<at::Tensor>& grad_scale) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count,
              "adamw_step: params, grads, exp_avgs and exp_avg_sqs must have the same length");
  TORCH_CHECK(models.empty() || models.size() == count, "adamw_step: model_params must be empty or one per param");
  TORCH_CHECK(step >= 1.0, "adamw_step: step counts from 1, got ", step);
  if (count == 0) return;
  const float* scale_ptr = nullptr;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->is_cuda() && grad_scale->scalar_type() == at::kFloat && grad_scale->numel() == 1,
                "adamw_step: grad_scale must be a one-element float32 CUDA tensor");
    scale_ptr = grad_scale->data_ptr<float>();
  }
  AdamScalars s;
  s.lr = static_cast<float>(lr);
  s.beta1 = static_cast<float>(beta1);
  s.beta2 = static_cast<float>(beta2);
  s.eps = static_cast<float>(eps);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
  s.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, step)));
  const c10::cuda::CUDAGuard guard(params[0].device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.is_cuda() && p.scalar_type() == at::kFloat && p.is_contiguous(),
                "adamw_step: params must be contiguous float32 CUDA tensors (the fp32 main params)");
    const bool bf16_grad = grads[i].scalar_type() == at::kBFloat16;
    TORCH_CHECK(bf16_grad || grads[i].scalar_type() == at::kFloat,
                "adamw_step: grads must be float32 or bfloat16, got ", grads[i].scalar_type());
    check_tensor(grads[i], p, "grad");
    check_tensor(exp_avgs[i], p, "exp_avg");
    check_tensor(exp_avg_sqs[i], p, "exp_avg_sq");
    const at::Tensor* model = nullptr;
    if (!models.empty()) {
      check_tensor(models[i], p, "model param");
      TORCH_CHECK(models[i].scalar_type() != at::kFloat, "adamw_step: a float32 model param is updated in place; "
                  "pass no model_params for it");
      model = &models[i];
    }
    with_type(exp_avgs[i].scalar_type(), "exp_avg", [&](auto m_tag) {
      using M = decltype(m_tag);
      with_type(exp_avg_sqs[i].scalar_type(), "exp_avg_sq", [&](auto v_tag) {
        using V = decltype(v_tag);
        auto with_grad = [&](auto p_tag) {
          using P = decltype(p_tag);
          if (bf16_grad) {
            launch<M, V, P, at::BFloat16>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], model, s, scale_ptr, stream);
          } else {
            launch<M, V, P, float>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], model, s, scale_ptr, stream);
          }
        };
        if (model == nullptr || model->scalar_type() == at::kBFloat16) {
          with_grad(at::BFloat16{});
        } else {
          TORCH_CHECK(model->scalar_type() == at::kHalf, "adamw_step: model params must be bfloat16 or float16");
          with_grad(at::Half{});
        }
      });
    });
  }
}

}  // namespace
}  // namespace mlite

TORCH_LIBRARY_FRAGMENT(mlite, m) {
  m.def("adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] model_params, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "float step, Tensor? grad_scale) -> ()");
}

TORCH_LIBRARY_IMPL(mlite, CUDA, m) { m.impl("adamw_step", &mlite::adamw_step); }
