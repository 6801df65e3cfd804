// Entry points of the hcd_fast torch ops, per device. Schemas and registration: csrc/hcd_fast.cpp.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <array>
#include <optional>
#include <tuple>

namespace hcd_fast {

using at::Tensor;

// sub_logit_loss (hcd_fast/ops/sub_logit_loss.py, the issue-11 design): returns (loss 0-d, parts (5,) [ce,
// sub_ce, kd, sub_kl, ortho], row_stats (S, B, n, 3) [lse(zf_i), lse(zf_i / T), kl_i], ortho_coef (S, B, n, n),
// sample_stats (B, 3) [lse(z_s), lse(z_s / T), lse(z_t / T)]), all contiguous; row_stats and sample_stats in
// fp64, the others in the compute dtype (fp32, or fp64 if any logit input is fp64). The orthogonality rows are v_i = zf_i - ortho_shift * z_t with the
// target entry set to mask_fill when mask_target. A target outside [0, K) gives NaN (no read out of bounds).
#define HCD_SUB_LOGIT_LOSS_ARGS                                                                             \
  const Tensor &sub_logits, const Tensor &student_logits, const Tensor &teacher_logits,                     \
      const Tensor &target, double temperature, double label_smoothing, double ortho_threshold,             \
      double ortho_eps, bool mask_target, double mask_fill, double ortho_shift, bool detach_sub_targets,    \
      double w_gt, double w_kd, double w_kl, double w_ol
using SubLogitLossOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// sub_logit_loss_backward: (grad_sub_logits (S, B, n, K) in sub_logits' dtype, grad_student_logits (B, K) in
// student_logits' dtype), each a (0,) tensor when not needed; grad_loss is a 0-d tensor read on the device.
#define HCD_SUB_LOGIT_LOSS_BWD_ARGS                                                                           \
  const Tensor &grad_loss, const Tensor &sub_logits, const Tensor &student_logits, const Tensor &teacher_logits, \
      const Tensor &target, const Tensor &row_stats, const Tensor &ortho_coef, const Tensor &sample_stats,     \
      double temperature, double label_smoothing, double ortho_shift, bool mask_target, bool detach_sub_targets, \
      double w_gt, double w_kd, double w_kl, bool need_grad_sub, bool need_grad_student
using SubLogitLossBwdOut = std::tuple<Tensor, Tensor>;

// bn_relu_pool_fwd: (out (B, C) in x's dtype, save_mean (C,), save_invstd (C,) in the compute dtype);
// updates running_mean/running_var in place when training.
#define HCD_BN_FWD_ARGS                                                                                 \
  const Tensor &x, const Tensor &weight, const Tensor &bias, Tensor &running_mean, Tensor &running_var, \
      bool training, double momentum, double eps
// bn_relu_pool_bwd: (grad_x, grad_weight, grad_bias) in the dtypes of x, weight, bias.
#define HCD_BN_BWD_ARGS                                                                                   \
  const Tensor &grad_out, const Tensor &x, const Tensor &weight, const Tensor &bias, const Tensor &save_mean, \
      const Tensor &save_invstd, bool training
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

// pool_linear: (out (B, D), pooled (B, C) = mean_hw x), both in x's dtype.
#define HCD_POOL_LINEAR_ARGS const Tensor &x, const Tensor &weight, const Tensor &bias
using Tensor2 = std::tuple<Tensor, Tensor>;

// cfm: (zf (B, n, K), hidden (B, H) = relu(W1 u + b1) or empty (0,) without weight2), in the input dtype.
#define HCD_CFM_ARGS                                                                                 \
  const Tensor &student_feat, const Tensor &teacher_feat, const Tensor &weight1, const Tensor &bias1, \
      const std::optional<Tensor> &weight2, const std::optional<Tensor> &bias2,                      \
      const Tensor &teacher_logits, int64_t num_sub_logits, double lambda_student, double lambda_teacher

// cfm_backward (hcd_fast/ops/cfm.py, BWD_SCHEMA): (d student_feat, d weight1, d bias1, d weight2, d bias2), each
// contiguous in its input's dtype (the biases: bias1_dtype, bias2_dtype); one not in output_mask, or d weight2 /
// d bias2 without weight2, is a (0,) tensor of that dtype.
#define HCD_CFM_BWD_ARGS                                                                                      \
  const Tensor &grad_sub_logits, const Tensor &student_feat, const Tensor &teacher_feat, const Tensor &weight1, \
      const std::optional<Tensor> &weight2, const Tensor &hidden, double lambda_student,                        \
      at::ScalarType bias1_dtype, std::optional<at::ScalarType> bias2_dtype, std::array<bool, 5> output_mask
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// cfm_backward as ATen ops on any device (csrc/cpu/cfm.cpp): the CPU kernel, and the CUDA kernel's path for what its
// cuBLASLt epilogues do not cover.
Tensor5 cfm_backward_aten(HCD_CFM_BWD_ARGS);

namespace cpu {
SubLogitLossOut sub_logit_loss(HCD_SUB_LOGIT_LOSS_ARGS);
SubLogitLossBwdOut sub_logit_loss_backward(HCD_SUB_LOGIT_LOSS_BWD_ARGS);
Tensor3 bn_relu_pool_fwd(HCD_BN_FWD_ARGS);
Tensor3 bn_relu_pool_bwd(HCD_BN_BWD_ARGS);
Tensor2 pool_linear(HCD_POOL_LINEAR_ARGS);
Tensor2 cfm(HCD_CFM_ARGS);
Tensor5 cfm_backward(HCD_CFM_BWD_ARGS);
const char* capability();
}  // namespace cpu

#ifdef HCD_FAST_WITH_CUDA
namespace cuda {
SubLogitLossOut sub_logit_loss(HCD_SUB_LOGIT_LOSS_ARGS);
SubLogitLossBwdOut sub_logit_loss_backward(HCD_SUB_LOGIT_LOSS_BWD_ARGS);
Tensor3 bn_relu_pool_fwd(HCD_BN_FWD_ARGS);
Tensor3 bn_relu_pool_bwd(HCD_BN_BWD_ARGS);
Tensor2 pool_linear(HCD_POOL_LINEAR_ARGS);
Tensor2 cfm(HCD_CFM_ARGS);
Tensor5 cfm_backward(HCD_CFM_BWD_ARGS);
// Backward calls (this process) whose two ReLU/bias-gradient GEMMs both ran as cuBLASLt epilogues (tests).
int64_t cfm_backward_epilogue_calls();
}  // namespace cuda
#endif

// Dtype used for the arithmetic: fp64 if any input is fp64, else fp32.
inline at::ScalarType compute_dtype(std::initializer_list<at::ScalarType> dtypes) {
  for (auto d : dtypes)
    if (d == at::kDouble) return at::kDouble;
  return at::kFloat;
}

// BatchNorm statistics shared by the CPU and CUDA bn_relu_pool (ATen ops, device-agnostic).
// Training: running <- (1 - momentum) running + momentum * batch statistic (unbiased variance), computed in
// the compute dtype `dt` and rounded once into the stats' own dtype; returns invstd = 1/sqrt(var + eps).
inline Tensor bn_update_running_stats(const Tensor &mean, const Tensor &var, Tensor &running_mean,
                                      Tensor &running_var, int64_t count, double momentum, double eps,
                                      at::ScalarType dt) {
  const double unbias = double(count) / double(count - 1);
  running_mean.copy_(running_mean.to(dt) * (1.0 - momentum) + mean * momentum);
  running_var.copy_(running_var.to(dt) * (1.0 - momentum) + var * (momentum * unbias));
  return (var + eps).rsqrt();
}

// Layout of a gradient with respect to a (B, C, H, W) input: channels_last when x is dense channels_last and not
// also contiguous, else contiguous (hcd_fast/ops/library.py: memory_format).
inline at::MemoryFormat grad_x_format(const Tensor &x) {
  return (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ? at::MemoryFormat::ChannelsLast
                                                                                 : at::MemoryFormat::Contiguous;
}

// Eval: (mean, invstd) from the running statistics, contiguous, in `dt`.
inline std::tuple<Tensor, Tensor> bn_eval_stats(const Tensor &running_mean, const Tensor &running_var, double eps,
                                                at::ScalarType dt) {
  return {running_mean.to(dt).contiguous().clone(), (running_var.to(dt) + eps).rsqrt().contiguous()};
}

}  // namespace hcd_fast
