// The one registration file of hcd_fast._C: torch op schemas (namespace hcd_fast), their CPU and CUDA
// kernels, and a tiny Python module for build introspection. Fake (meta) kernels and autograd are
// registered from Python (hcd_fast/ops/cpp_ops.py) so torch.compile can trace through the ops.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "ops.h"
#include "cpu/kernels.h"

namespace hcd_fast::cpu {
std::string set_capability(const std::string& name);
}

TORCH_LIBRARY(hcd_fast, m) {
  // Loss, parts and the gradients with respect to sub_logits and student_logits, all from one pass.
  m.def(
      "sub_logit_loss(Tensor sub_logits, Tensor student_logits, Tensor teacher_logits, Tensor target, "
      "float temperature, float label_smoothing, float ortho_threshold, float ortho_eps, int gt_mask, "
      "bool detach_sub_targets, float w_gt, float w_kd, float w_kl, float w_ol, bool compute_grad) "
      "-> (Tensor loss, Tensor parts, Tensor grad_sub_logits, Tensor grad_student_logits)");
  // Training mode updates the running statistics in place.
  m.def(
      "bn_relu_pool_fwd(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
      "bool training, float momentum, float eps) -> (Tensor out, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "bn_relu_pool_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor save_mean, "
      "Tensor save_invstd, bool training) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("pool_linear(Tensor x, Tensor weight, Tensor bias) -> (Tensor out, Tensor pooled)");
  m.def(
      "cfm(Tensor student_feat, Tensor teacher_feat, Tensor weight1, Tensor bias1, Tensor? weight2, "
      "Tensor? bias2, Tensor teacher_logits, int num_sub_logits, float lambda_student, float lambda_teacher) "
      "-> (Tensor sub_logits, Tensor hidden)");
}

TORCH_LIBRARY_IMPL(hcd_fast, CPU, m) {
  m.impl("sub_logit_loss", &hcd_fast::cpu::sub_logit_loss);
  m.impl("bn_relu_pool_fwd", &hcd_fast::cpu::bn_relu_pool_fwd);
  m.impl("bn_relu_pool_bwd", &hcd_fast::cpu::bn_relu_pool_bwd);
  m.impl("pool_linear", &hcd_fast::cpu::pool_linear);
  m.impl("cfm", &hcd_fast::cpu::cfm);
}

#ifdef HCD_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(hcd_fast, CUDA, m) {
  m.impl("sub_logit_loss", &hcd_fast::cuda::sub_logit_loss);
  m.impl("bn_relu_pool_fwd", &hcd_fast::cuda::bn_relu_pool_fwd);
  m.impl("bn_relu_pool_bwd", &hcd_fast::cuda::bn_relu_pool_bwd);
  m.impl("pool_linear", &hcd_fast::cuda::pool_linear);
  m.impl("cfm", &hcd_fast::cuda::cfm);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hcd_fast C++/CUDA kernels; the ops live in torch.ops.hcd_fast";
  m.def("with_cuda", []() {
#ifdef HCD_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in.");
  m.def("cpu_capability", []() { return std::string(hcd_fast::cpu::kernels().name); },
        "The CPU kernel build in use: 'avx2' or 'default'.");
  m.def("set_cpu_capability", &hcd_fast::cpu::set_capability,
        "Use the 'default' or the 'avx2' CPU kernels (tests); returns the one in use.");
}
