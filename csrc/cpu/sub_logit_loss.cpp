// CPU entry points of the fused sub-logit loss (hcd_fast/ops/sub_logit_loss.py): dtype/contiguity handling,
// the parallel loops and the deterministic batch reduction. The row math is in sub_logit_loss_kernel.h.
//
// Inputs keep their dtype (fp32, bf16, fp16, fp64; rows of a reduced dtype are converted per task into a
// cache-resident fp32 buffer), and are made contiguous (a no-op for the usual layouts). fp64 anywhere makes
// the compute dtype fp64 (then every input is read as fp64). Gradients are written once in their input's dtype.
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/kernels.h"
#include "ops.h"

namespace hcd_fast::cpu {

namespace {

// The tensor the kernels read: contiguous, in its own dtype when that is a supported storage dtype for the
// compute dtype `dt` (fp32 compute: fp32/bf16/fp16; fp64 compute: fp64), else converted to `dt`.
Tensor storage(const Tensor& x, at::ScalarType dt) {
  const auto s = x.scalar_type();
  const bool keep = dt == at::kDouble ? s == at::kDouble : (s == at::kFloat || s == at::kBFloat16 || s == at::kHalf);
  return (keep ? x : x.to(dt)).contiguous();
}

Dtype dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return Dtype::Float;
    case at::kDouble: return Dtype::Double;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kHalf: return Dtype::Half;
    default: TORCH_CHECK(false, "sub_logit_loss (cpu): unsupported dtype ", x.scalar_type());
  }
  return Dtype::Float;
}

// Rows of work per task: about 16K elements, so small problems stay on one thread.
int64_t grain(int64_t elems_per_item) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(elems_per_item, 1)); }

void check_shapes(const Tensor& sub, const Tensor& zs, const Tensor& zt, const Tensor& y) {
  TORCH_CHECK(sub.dim() == 4, "sub_logit_loss: sub_logits must be (S, B, n, K), got ", sub.sizes());
  const int64_t B = sub.size(1), K = sub.size(3);
  TORCH_CHECK(zs.dim() == 2 && zs.size(0) == B && zs.size(1) == K && zt.sizes() == zs.sizes() && y.dim() == 1 &&
                  y.size(0) == B,
              "sub_logit_loss: inconsistent shapes: sub_logits ", sub.sizes(), ", student_logits ", zs.sizes(),
              ", teacher_logits ", zt.sizes(), ", target ", y.sizes());
}

}  // namespace

SubLogitLossOut sub_logit_loss(HCD_SUB_LOGIT_LOSS_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_shapes(sub_logits, student_logits, teacher_logits, target);
  const auto dt = compute_dtype({sub_logits.scalar_type(), student_logits.scalar_type(),
                                 teacher_logits.scalar_type()});
  const Tensor sub = storage(sub_logits, dt), zs = storage(student_logits, dt), zt = storage(teacher_logits, dt);
  const Tensor y = target.to(at::kLong).contiguous();
  const int64_t S = sub.size(0), B = sub.size(1), n = sub.size(2), K = sub.size(3);
  const auto opts = sub.options().dtype(dt);
  // row_stats and sample_stats are fp64 whatever the inputs (the op's contract: an fp32 log-sum-exp is off by
  // up to 2^-24 |lse|, which a backward reading it would turn into relative gradient error).
  Tensor row_stats = at::empty({S, B, n, 3}, opts.dtype(at::kDouble));
  Tensor ortho_coef = at::empty({S, B, n, n}, opts);
  Tensor sample_stats = at::empty({B, 3}, opts.dtype(at::kDouble));
  Tensor sample_aux = at::empty({B, 2}, opts);
  Tensor sample_partials = at::empty({B, 2}, opts);
  Tensor row_partials = at::empty({S * B, 3}, opts);
  Tensor parts = at::empty({5}, opts);
  Tensor loss = at::empty({}, opts);

  auto run = [&](auto tag) {
    using T = decltype(tag);
    SubLogitLossFwdArgs<T> a{};
    a.sub_logits = sub.data_ptr();
    a.student_logits = zs.data_ptr();
    a.teacher_logits = zt.data_ptr();
    a.sub_dtype = dtype_of(sub), a.student_dtype = dtype_of(zs), a.teacher_dtype = dtype_of(zt);
    a.target = y.data_ptr<int64_t>();
    a.row_stats = row_stats.data_ptr<double>();
    a.ortho_coef = ortho_coef.data_ptr<T>();
    a.sample_stats = sample_stats.data_ptr<double>();
    a.sample_aux = sample_aux.data_ptr<T>();
    a.sample_partials = sample_partials.data_ptr<T>();
    a.row_partials = row_partials.data_ptr<T>();
    a.S = S, a.B = B, a.n = n, a.K = K;
    a.temperature = temperature, a.label_smoothing = label_smoothing;
    a.ortho_threshold = ortho_threshold, a.ortho_eps = ortho_eps;
    a.mask_target = mask_target, a.mask_fill = mask_fill, a.ortho_shift = ortho_shift;
    a.w_ol = w_ol;
    const KernelTable& kt = kernels();
    // Phase 2 reads phase 1's sample_aux: two parallel regions, in order.
    at::parallel_for(0, B, grain(2 * K), [&](int64_t b0, int64_t b1) {
      if constexpr (std::is_same_v<T, float>) kt.sub_logit_loss_samples_f(a, b0, b1);
      else kt.sub_logit_loss_samples_d(a, b0, b1);
    });
    at::parallel_for(0, S * B, grain(n * K), [&](int64_t r0, int64_t r1) {
      if constexpr (std::is_same_v<T, float>) kt.sub_logit_loss_rows_f(a, r0, r1);
      else kt.sub_logit_loss_rows_d(a, r0, r1);
    });
    // Deterministic batch reduction: the partials summed in index order, in double.
    const T* sp = sample_partials.data_ptr<T>();
    const T* rp = row_partials.data_ptr<T>();
    double ce = 0, kd = 0, sub_ce = 0, sub_kl = 0, ortho = 0;
    for (int64_t b = 0; b < B; ++b) ce += double(sp[2 * b]), kd += double(sp[2 * b + 1]);
    for (int64_t r = 0; r < S * B; ++r)
      sub_ce += double(rp[3 * r]), sub_kl += double(rp[3 * r + 1]), ortho += double(rp[3 * r + 2]);
    const double rows = double(B) * double(n);
    // n == 1: the hinge sums are 0 (or NaN for an out-of-range target, which must reach the part).
    const double pv[5] = {ce / double(B), sub_ce / rows, kd / double(B), sub_kl / rows,
                          n > 1 ? ortho / (rows * double(n - 1)) : ortho};
    T* po = parts.data_ptr<T>();
    for (int j = 0; j < 5; ++j) po[j] = T(pv[j]);
    *loss.data_ptr<T>() = T(w_gt * (pv[0] + pv[1]) + w_kd * pv[2] + w_kl * pv[3] + w_ol * pv[4]);
  };
  if (dt == at::kDouble) run(double{});
  else run(float{});
  return {loss, parts, row_stats, ortho_coef, sample_stats};
}

SubLogitLossBwdOut sub_logit_loss_backward(HCD_SUB_LOGIT_LOSS_BWD_ARGS) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_shapes(sub_logits, student_logits, teacher_logits, target);
  const auto dt = compute_dtype({sub_logits.scalar_type(), student_logits.scalar_type(),
                                 teacher_logits.scalar_type()});
  const Tensor sub = storage(sub_logits, dt), zs = storage(student_logits, dt), zt = storage(teacher_logits, dt);
  const Tensor y = target.to(at::kLong).contiguous();
  const int64_t S = sub.size(0), B = sub.size(1), n = sub.size(2), K = sub.size(3);
  TORCH_CHECK(grad_loss.numel() == 1, "sub_logit_loss_backward: grad_loss must have one element");
  TORCH_CHECK(row_stats.numel() == S * B * n * 3 && ortho_coef.numel() == S * B * n * n,
              "sub_logit_loss_backward: row_stats ", row_stats.sizes(), " / ortho_coef ", ortho_coef.sizes(),
              " do not match sub_logits ", sub.sizes());
  const Tensor gl = grad_loss.to(dt).contiguous();
  const Tensor rs = row_stats.to(at::kDouble).contiguous(), oc = ortho_coef.to(dt).contiguous();
  // Gradients in the inputs' own dtypes, written once by the kernel.
  Tensor gsub = need_grad_sub ? at::empty(sub_logits.sizes(), sub_logits.options()) : at::empty({0}, sub_logits.options());
  Tensor gzs = need_grad_student ? at::empty(student_logits.sizes(), student_logits.options())
                                 : at::empty({0}, student_logits.options());
  if (!need_grad_sub && !need_grad_student) return {gsub, gzs};

  auto run = [&](auto tag) {
    using T = decltype(tag);
    SubLogitLossBwdArgs<T> a{};
    a.grad_loss = gl.data_ptr<T>();
    a.sub_logits = sub.data_ptr();
    a.student_logits = zs.data_ptr();
    a.teacher_logits = zt.data_ptr();
    a.sub_dtype = dtype_of(sub), a.student_dtype = dtype_of(zs), a.teacher_dtype = dtype_of(zt);
    a.target = y.data_ptr<int64_t>();
    a.row_stats = rs.data_ptr<double>();
    a.ortho_coef = oc.data_ptr<T>();
    a.grad_sub_logits = need_grad_sub ? gsub.data_ptr() : nullptr;
    a.grad_student_logits = need_grad_student ? gzs.data_ptr() : nullptr;
    a.grad_sub_dtype = need_grad_sub ? dtype_of(gsub) : Dtype::Float;
    a.grad_student_dtype = need_grad_student ? dtype_of(gzs) : Dtype::Float;
    a.S = S, a.B = B, a.n = n, a.K = K;
    a.temperature = temperature, a.label_smoothing = label_smoothing, a.ortho_shift = ortho_shift;
    a.mask_target = mask_target, a.detach_sub_targets = detach_sub_targets;
    a.w_gt = w_gt, a.w_kd = w_kd, a.w_kl = w_kl;
    const KernelTable& kt = kernels();
    at::parallel_for(0, B, grain((S * n + 2) * K), [&](int64_t b0, int64_t b1) {
      if constexpr (std::is_same_v<T, float>) kt.sub_logit_loss_bwd_f(a, b0, b1);
      else kt.sub_logit_loss_bwd_d(a, b0, b1);
    });
  };
  if (dt == at::kDouble) run(double{});
  else run(float{});
  return {gsub, gzs};
}

}  // namespace hcd_fast::cpu
