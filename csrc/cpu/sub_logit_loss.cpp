// CPU entry of the fused sub-logit loss: dtype/contiguity handling, the parallel loop over samples and the
// deterministic batch reduction. The row math is in sub_logit_loss_kernel.h.
#include <ATen/Parallel.h>

#include "cpu/kernels.h"
#include "ops.h"

namespace hcd_fast::cpu {

namespace {
template <typename T>
SubLogitLossArgs<T> make_args(const Tensor& sub, const Tensor& zs, const Tensor& zt, const Tensor& y,
                              const Tensor& gsub, const Tensor& gzs, const Tensor& partials, bool grad) {
  SubLogitLossArgs<T> a{};
  a.sub_logits = sub.data_ptr<T>();
  a.student_logits = zs.data_ptr<T>();
  a.teacher_logits = zt.data_ptr<T>();
  a.target = y.data_ptr<int64_t>();
  a.grad_sub_logits = grad ? gsub.data_ptr<T>() : nullptr;
  a.grad_student_logits = grad ? gzs.data_ptr<T>() : nullptr;
  a.partials = partials.data_ptr<T>();
  return a;
}
}  // namespace

SubLogitLossOut sub_logit_loss(HCD_SUB_LOGIT_LOSS_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(sub_logits.dim() == 4, "sub_logits: expected (S, B, n, K)");
  const auto dt = compute_dtype({sub_logits.scalar_type(), student_logits.scalar_type(),
                                 teacher_logits.scalar_type()});
  // Low-precision inputs are converted once to fp32 (the kernels compute in fp32); no-ops otherwise.
  const Tensor sub = sub_logits.to(dt).contiguous();
  const Tensor zs = student_logits.to(dt).contiguous();
  const Tensor zt = teacher_logits.to(dt).contiguous();
  const Tensor y = target.to(at::kLong).contiguous();
  const int64_t S = sub.size(0), B = sub.size(1), n = sub.size(2), K = sub.size(3);
  TORCH_CHECK(zs.size(0) == B && zs.size(1) == K && zt.sizes() == zs.sizes() && y.size(0) == B,
              "sub_logit_loss: inconsistent shapes");
  const int64_t* yp = y.data_ptr<int64_t>();
  // Memory safety (the kernels index rows with the target); the user-facing check is at the public boundary.
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(yp[b] >= 0 && yp[b] < K, "sub_logit_loss (cpu): target class index ", yp[b], " out of range for ", K,
                " classes");
  const auto opts = sub.options();
  Tensor gsub = compute_grad ? at::empty({S, B, n, K}, opts) : at::empty({0}, opts);
  Tensor gzs = compute_grad ? at::empty({B, K}, opts) : at::empty({0}, opts);
  Tensor partials = at::empty({B, 5}, opts);
  Tensor parts = at::empty({5}, opts);
  Tensor loss = at::empty({}, opts);

  const int64_t work_per_sample = (S * n + 2) * K;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(work_per_sample, 1));

  auto run = [&](auto tag) {
    using T = decltype(tag);
    SubLogitLossArgs<T> a = make_args<T>(sub, zs, zt, y, gsub, gzs, partials, compute_grad);
    a.S = S, a.B = B, a.n = n, a.K = K;
    a.temperature = temperature, a.label_smoothing = label_smoothing;
    a.ortho_threshold = ortho_threshold, a.ortho_eps = ortho_eps;
    a.mask_target = mask_target, a.mask_fill = mask_fill, a.ortho_shift = ortho_shift;
    a.detach_sub_targets = detach_sub_targets;
    a.w_gt = w_gt, a.w_kd = w_kd, a.w_kl = w_kl, a.w_ol = w_ol;
    const KernelTable& kt = kernels();
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      if constexpr (std::is_same_v<T, float>) kt.sub_logit_loss_f(a, b0, b1);
      else kt.sub_logit_loss_d(a, b0, b1);
    });
    // Deterministic batch reduction: per-sample partials summed in order, in double.
    const T* p = partials.data_ptr<T>();
    double sum[5] = {0, 0, 0, 0, 0};
    for (int64_t b = 0; b < B; ++b)
      for (int j = 0; j < 5; ++j) sum[j] += double(p[b * 5 + j]);
    const double rows = double(B) * double(n);
    const double pv[5] = {sum[0] / B, sum[1] / rows, sum[2] / B, sum[3] / rows,
                          n > 1 ? sum[4] / (rows * double(n - 1)) : 0.0};
    T* po = parts.data_ptr<T>();
    for (int j = 0; j < 5; ++j) po[j] = T(pv[j]);
    *loss.data_ptr<T>() = T(w_gt * (pv[0] + pv[1]) + w_kd * pv[2] + w_kl * pv[3] + w_ol * pv[4]);
  };
  if (dt == at::kDouble) run(double{});
  else run(float{});
  return {loss, parts, gsub, gzs};
}

}  // namespace hcd_fast::cpu
