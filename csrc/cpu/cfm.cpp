// CPU cfm: the Complementary Feature Mapper without materialising u = [h ; f_t], for one stage (B, D) or the S
// stages stacked (S, B, D) with stacked weights (hcd_fast/ops/cfm.py), as batched GEMMs:
//   a  = h W1[:, :D]^T + f_t W1[:, D:]^T + b1   (two GEMMs accumulating into one output)
//   z  = relu(a) W2^T + b2                       (or z = a without a hidden layer)
//   zf = lambda_s z + lambda_t z_t               (broadcast over the n sub-logits, in place)
// fp32/fp64 inputs: arithmetic in that precision. bf16/fp16 activations (autocast included): the GEMMs run
// in that dtype, as eager F.linear does (the BLAS accumulates in fp32; on CPUs with bf16 dot-product
// instructions this is several times faster than an fp32 GEMM), each GEMM's output is widened to fp32 and
// the bias, ReLU and fusion epilogues run in fp32; the hidden activation and the output are rounded to the
// input dtype.
// The backward (cfm_backward_aten, hcd_fast/ops/cfm.py's math) is ATen on any device: batched GEMMs over the stages.
#include "ops.h"

namespace hcd_fast::cpu {

// The dtype the GEMMs run in: the activation's own when it is bf16/fp16, else the compute dtype.
static at::ScalarType gemm_dtype(const at::Tensor& student_feat, at::ScalarType compute) {
  const auto t = student_feat.scalar_type();
  return (t == at::kBFloat16 || t == at::kHalf) ? t : compute;
}

Tensor2 cfm(HCD_CFM_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto out_dtype = at::promote_types(at::promote_types(student_feat.scalar_type(), teacher_feat.scalar_type()),
                                           at::promote_types(weight1.scalar_type(), teacher_logits.scalar_type()));
  const auto dt = compute_dtype({out_dtype});
  // Stacked stages (S, B, D) with weights (S, ...): batched GEMMs; one stage is the stacked form with S = 1.
  const bool stacked = student_feat.dim() == 3;
  const auto stage = [stacked](const Tensor& t) { return stacked ? t : t.unsqueeze(0); };
  const Tensor h = stage(student_feat), w1 = stage(weight1).to(gemm_dtype(student_feat, dt));
  const int64_t S = h.size(0), B = h.size(1), D = h.size(2), Dt = teacher_feat.size(1);
  const int64_t K = teacher_logits.size(1);
  const auto gemm = w1.scalar_type();
  // Two GEMMs over the two halves of W1 (the concat [h ; f_t] is never built), summed in dt; the teacher half
  // is one GEMM broadcast over the stages.
  Tensor a = at::bmm(h.to(gemm), w1.narrow(2, 0, D).transpose(1, 2)).to(dt);
  a.add_(at::matmul(teacher_feat.to(gemm), w1.narrow(2, D, Dt).transpose(1, 2)))
      .add_(stage(bias1).to(dt).unsqueeze(1));
  Tensor z, hidden;
  if (weight2.has_value() && weight2->defined()) {
    // The hidden activation is kept (for backward) and fed to the second GEMM in the output dtype, as the
    // reference's F.linear chain rounds it.
    hidden = a.relu_().to(out_dtype);
    z = at::bmm(hidden.to(gemm), stage(*weight2).to(gemm).transpose(1, 2)).to(dt)
            .add_(stage(*bias2).to(dt).unsqueeze(1));
    if (!stacked) hidden = hidden.squeeze(0);
  } else {
    hidden = at::empty({0}, a.options().dtype(out_dtype));
    z = a;
  }
  Tensor zf = z.view({S, B, num_sub_logits, K});
  zf.mul_(lambda_student).add_(teacher_logits.to(dt).unsqueeze(1), lambda_teacher);
  zf = zf.to(out_dtype);
  return {stacked ? zf : zf.squeeze(0), hidden};
}

Tensor5 cfm_backward(HCD_CFM_BWD_ARGS) {
  return cfm_backward_aten(grad_sub_logits, student_feat, teacher_feat, weight1, weight2, hidden, lambda_student,
                           bias1_dtype, bias2_dtype, output_mask);
}

}  // namespace hcd_fast::cpu

namespace hcd_fast {

// Per stage, with dz = lambda_s g (S, B, n K) in the compute dtype dt and the GEMMs in the forward's GEMM dtype
// (the activation's dtype when bf16/fp16, else dt):
//   dW2 = dz^T relu(a),  db2 = sum_b dz,  da = (dz W2) [hidden > 0],  db1 = sum_b da,
//   dW1 = da^T [h ; f_t],  dh = da W1[:, :D];  without W2, da = dz.
Tensor5 cfm_backward_aten(HCD_CFM_BWD_ARGS) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool stacked = student_feat.dim() == 3;
  const auto stage = [stacked](const Tensor& t) { return stacked ? t : t.unsqueeze(0); };
  const auto unstage = [stacked](const Tensor& t) { return (stacked ? t : t.squeeze(0)).contiguous(); };
  const bool has_hidden = weight2.has_value() && weight2->defined();
  const at::ScalarType dts[5] = {student_feat.scalar_type(), weight1.scalar_type(), bias1_dtype,
                                 (has_hidden ? *weight2 : weight1).scalar_type(), bias2_dtype.value_or(bias1_dtype)};
  const auto none = [&](int i) { return at::empty({0}, student_feat.options().dtype(dts[i])); };
  const Tensor h = stage(student_feat), w1 = stage(weight1);
  const auto dt = compute_dtype({h.scalar_type(), teacher_feat.scalar_type(), weight1.scalar_type()});
  const auto act = h.scalar_type();
  const auto g = (act == at::kBFloat16 || act == at::kHalf) ? act : dt;
  const int64_t S = h.size(0), B = h.size(1), D = h.size(2);
  Tensor gz = grad_sub_logits.reshape({S, B, grad_sub_logits.size(-2) * grad_sub_logits.size(-1)}).to(dt);
  if (lambda_student != 1.0) gz = gz * lambda_student;
  const Tensor gz_g = gz.to(g);
  Tensor out[5] = {none(0), none(1), none(2), none(3), none(4)};
  Tensor ga = gz_g;
  if (has_hidden) {
    const Tensor hid = stage(hidden).to(g);  // exact: the forward rounded the ReLU output to g
    if (output_mask[3]) out[3] = unstage(at::bmm(gz_g.transpose(1, 2), hid).to(dts[3]));
    if (output_mask[4]) out[4] = unstage(gz.sum(1).to(dts[4]));
    ga = at::threshold_backward(at::bmm(gz_g, stage(*weight2).to(g)), hid, 0);  // the ReLU mask, one pass
  }
  if (output_mask[0]) out[0] = unstage(at::bmm(ga, w1.narrow(2, 0, D).to(g)).to(dts[0]));
  if (output_mask[1]) {
    const Tensor u = at::cat({h.to(g), teacher_feat.to(g).expand({S, B, teacher_feat.size(1)})}, 2);
    out[1] = unstage(at::bmm(ga.transpose(1, 2), u).to(dts[1]));
  }
  if (output_mask[2]) out[2] = unstage(ga.sum(1, false, dt).to(dts[2]));
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace hcd_fast
