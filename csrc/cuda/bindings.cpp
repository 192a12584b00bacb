// Python bindings of megatron_lite's CUDA kernels (module megatron_lite.ops._cuda_kernels, or
// the JIT-built module of the same content). The autograd wrappers live in
// megatron_lite/ops/cuda_ops.py; these functions take and return plain tensors.
#include <torch/extension.h>

#include <vector>

namespace mlite {

std::vector<at::Tensor> norm_fwd(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& beta,
                                 double eps, bool rms, const c10::optional<at::Tensor>& out,
                                 const c10::optional<at::Tensor>& residual,
                                 const c10::optional<at::ScalarType>& out_dtype, const c10::optional<at::Tensor>& scale,
                                 const c10::optional<at::Tensor>& amax);
std::vector<at::Tensor> norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma,
                                 const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, bool rms,
                                 bool has_beta, int64_t variant, const c10::optional<at::Tensor>& dresidual);
at::Tensor swiglu_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& out, int64_t variant,
                      const c10::optional<at::ScalarType>& out_dtype, const c10::optional<at::Tensor>& scale,
                      const c10::optional<at::Tensor>& amax);
at::Tensor swiglu_bwd(const at::Tensor& dy, const at::Tensor& x);
at::Tensor bias_gelu_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t variant,
                         const c10::optional<at::ScalarType>& out_dtype, const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& amax);
std::vector<at::Tensor> bias_gelu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                      const c10::optional<at::Tensor>& bias);
at::Tensor rotary(const at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, bool backward, int64_t variant,
                  const c10::optional<at::Tensor>& out);
at::Tensor copy_heads(const at::Tensor& t, const c10::optional<at::Tensor>& out, int64_t variant);
at::Tensor scaled_masked_softmax_fwd(const at::Tensor& scores, const c10::optional<at::Tensor>& mask, double scale);
at::Tensor scaled_masked_softmax_bwd(const at::Tensor& dy, const at::Tensor& probs,
                                     const c10::optional<at::Tensor>& mask, double scale);
at::Tensor scaled_upper_triang_softmax_fwd(const at::Tensor& scores, double scale);
at::Tensor scaled_upper_triang_softmax_bwd(const at::Tensor& dy, const at::Tensor& probs, double scale);
at::Tensor vocab_parallel_xent_fwd(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                                   int64_t variant);
at::Tensor vocab_parallel_xent_bwd(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                                   const at::Tensor& lse, const at::Tensor& grad_loss, bool inplace);
at::Tensor cast_fp8(const at::Tensor& t, const at::Tensor& scale, const c10::optional<at::Tensor>& amax,
                    at::ScalarType dtype);

}  // namespace mlite

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_lite fused CUDA kernels (float32 accumulation; fp32/fp16/bf16 storage)";
  // `variant` picks one of a kernel's launch designs (each documented at its kernel); 0 is the
  // default. `out`, when given, receives the result instead of a new tensor. `out_dtype` float8_e4m3fn
  // or float8_e5m2 (norm and activation forwards) writes saturate(y * scale) instead of y, and
  // amax = max(amax, max|y|) when `amax` is given (scale and amax one-element float32 tensors).
  m.def("norm_fwd", &mlite::norm_fwd,
        "RMSNorm/LayerNorm forward -> (y, mean or None, rstd, x + residual or None); with residual the row "
        "normalised is x + residual",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"), py::kw_only(),
        py::arg("out") = py::none(), py::arg("residual") = py::none(), py::arg("out_dtype") = py::none(),
        py::arg("scale") = py::none(), py::arg("amax") = py::none());
  m.def("norm_bwd", &mlite::norm_bwd,
        "RMSNorm/LayerNorm backward -> (dx, dweight, dbias or None); dresidual, when given, is added to dx",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("rms"),
        py::arg("has_bias"), py::kw_only(), py::arg("variant") = 0, py::arg("dresidual") = py::none());
  m.def("swiglu_fwd", &mlite::swiglu_fwd, "silu(gate) * up of x = [gate | up]", py::arg("x"), py::kw_only(),
        py::arg("out") = py::none(), py::arg("variant") = 0, py::arg("out_dtype") = py::none(),
        py::arg("scale") = py::none(), py::arg("amax") = py::none());
  m.def("swiglu_bwd", &mlite::swiglu_bwd, "SwiGLU backward -> dx", py::arg("dy"), py::arg("x"));
  m.def("bias_gelu_fwd", &mlite::bias_gelu_fwd, "gelu_tanh(x + bias)", py::arg("x"), py::arg("bias"), py::kw_only(),
        py::arg("variant") = 0, py::arg("out_dtype") = py::none(), py::arg("scale") = py::none(),
        py::arg("amax") = py::none());
  m.def("bias_gelu_bwd", &mlite::bias_gelu_bwd, "bias-GeLU backward -> (dx, dbias or None)", py::arg("dy"),
        py::arg("x"), py::arg("bias"));
  m.def("rotary", &mlite::rotary, "rotary embedding (backward=True: transposed rotation)", py::arg("t"),
        py::arg("cos"), py::arg("sin"), py::arg("backward"), py::kw_only(), py::arg("variant") = 0,
        py::arg("out") = py::none());
  m.def("copy_heads", &mlite::copy_heads, "t [s, b, heads, d] copied into out (or a new contiguous tensor)",
        py::arg("t"), py::kw_only(), py::arg("out") = py::none(), py::arg("variant") = 0);
  m.def("scaled_masked_softmax_fwd", &mlite::scaled_masked_softmax_fwd, "softmax(scale * x, mask -> -10000)",
        py::arg("scores"), py::arg("mask"), py::arg("scale"));
  m.def("scaled_masked_softmax_bwd", &mlite::scaled_masked_softmax_bwd, "masked softmax backward", py::arg("dy"),
        py::arg("probs"), py::arg("mask"), py::arg("scale"));
  m.def("scaled_upper_triang_softmax_fwd", &mlite::scaled_upper_triang_softmax_fwd, "causal softmax(scale * x)",
        py::arg("scores"), py::arg("scale"));
  m.def("scaled_upper_triang_softmax_bwd", &mlite::scaled_upper_triang_softmax_bwd, "causal softmax backward",
        py::arg("dy"), py::arg("probs"), py::arg("scale"));
  m.def("vocab_parallel_xent_fwd", &mlite::vocab_parallel_xent_fwd,
        "per-token [max, sum exp(x - max), target logit] of a vocab shard -> [3, tokens] float32",
        py::arg("logits"), py::arg("target"), py::arg("vocab_start"), py::kw_only(), py::arg("variant") = 0);
  m.def("vocab_parallel_xent_bwd", &mlite::vocab_parallel_xent_bwd,
        "(exp(x - lse) - onehot(target)) * grad_loss (inplace=True: written over logits)", py::arg("logits"),
        py::arg("target"), py::arg("vocab_start"), py::arg("lse"), py::arg("grad_loss"), py::kw_only(),
        py::arg("inplace") = false);
  m.def("cast_fp8", &mlite::cast_fp8,
        "saturate(t * scale) in dtype (float8_e4m3fn or float8_e5m2); amax = max(amax, max|t|) when amax is given",
        py::arg("t"), py::arg("scale"), py::arg("amax"), py::arg("dtype"));
}
