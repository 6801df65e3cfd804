"""The ``cfm`` op: the Complementary Feature Mapper and the teacher fusion -> fused sub-logits (B, n, K), for one
stage or for all S stages at once.

    a = W1 [h_s ; f_t] + b1,   z = W2 relu(a) + b2 (or z = a without weight2),   zf_i = ls z_i + lt z_t.

Kernel contract, one stage: student_feat h_s (B, D), teacher_feat f_t (B, D_t), weight1 (H, D + D_t), bias1 (H,),
weight2 (n*K, H) and bias2 (n*K,) or both None, teacher_logits z_t (B, K) ->
    (sub_logits (B, n, K), hidden (B, H) = relu(a), or (0,) without weight2), both in the output dtype
    promote(h_s, f_t, W1, z_t). Products accumulate in fp32 (fp64 for fp64); epilogues in fp32/fp64.
Stacked, the S stages of ``HCDLoss`` in one call (one batched GEMM per layer, no per-stage launches and no
torch.stack of the results): student_feat (S, B, D), weight1 (S, H, D + D_t), bias1 (S, H), weight2 (S, n*K, H),
bias2 (S, n*K); f_t and z_t are shared by the stages -> sub_logits (S, B, n, K), hidden (S, B, H) (or (0,)).
Precision policy (the reference's dtypes): under autocast the features and the weights are cast to the
autocast dtype first (as ``F.linear`` is), so the output is promote(autocast dtype, z_t's dtype). ``bind``'s
``weight_cast`` lets a module supply the weight casts from a cache (one cast per optimizer step, not one per call).
Backward (shared; f_t and z_t get no gradient), per stage, with dz = lambda_student * g, as batched GEMMs over the
stage dimension (one launch per product for all stages):
    dW2 = dz^T relu(a),  db2 = sum_b dz,  da = (dz W2) [a > 0],  db1 = sum_b da,
    dW1 = da^T [h_s ; f_t],  dh_s = da W1[:, :D].
Two autograd forms of the same math: ``OP`` runs that backward as ATen ops (``_backward``; the Triton backend),
``NATIVE_OP`` as one torch op of its own, ``cfm_backward`` (BWD_SCHEMA), whose kernels the C++ backends register
(csrc/cpu/cfm.cpp: the same ATen sequence; csrc/cuda/cfm.cu: cuBLASLt GEMMs with the ReLU-gradient and
bias-gradient epilogues). Kernel contract of ``cfm_backward``: grad_sub_logits (.., B, n, K), the forward's inputs
and its hidden output (0,) without weight2, lambda_student, the dtypes of bias1/bias2, output_mask (dh_s, dW1,
db1, dW2, db2) -> those five gradients, contiguous, each in its input's dtype (biases: bias1_dtype, bias2_dtype);
one not asked for (or dW2/db2 without weight2) is a (0,) tensor of that dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from hcd_fast.ops.library import OpDef, acc_dtype, autocast_cast, autocast_dtype

SCHEMA = ("(Tensor student_feat, Tensor teacher_feat, Tensor weight1, Tensor bias1, Tensor? weight2, "
          "Tensor? bias2, Tensor teacher_logits, int num_sub_logits, float lambda_student, float lambda_teacher) "
          "-> (Tensor sub_logits, Tensor hidden)")
BWD_SCHEMA = ("(Tensor grad_sub_logits, Tensor student_feat, Tensor teacher_feat, Tensor weight1, Tensor? weight2, "
              "Tensor hidden, float lambda_student, ScalarType bias1_dtype, ScalarType? bias2_dtype, "
              "bool[5] output_mask) -> (Tensor grad_student_feat, Tensor grad_weight1, Tensor grad_bias1, "
              "Tensor grad_weight2, Tensor grad_bias2)")


def out_dtype(student_feat, teacher_feat, weight1, teacher_logits) -> torch.dtype:
    dt = torch.promote_types(student_feat.dtype, teacher_feat.dtype)
    return torch.promote_types(dt, torch.promote_types(weight1.dtype, teacher_logits.dtype))


def _fake(student_feat, teacher_feat, weight1, bias1, weight2, bias2, teacher_logits, num_sub_logits,
          lambda_student, lambda_teacher):
    dt = out_dtype(student_feat, teacher_feat, weight1, teacher_logits)
    batch, num_classes = teacher_logits.shape
    stages = tuple(student_feat.shape[:-2])  # (S,) stacked, () for one stage
    zf = student_feat.new_empty(stages + (batch, num_sub_logits, num_classes), dtype=dt)
    hidden = student_feat.new_empty((0,) if weight2 is None else stages + (batch, weight1.shape[-2]), dtype=dt)
    return zf, hidden


def _setup_context(ctx, inputs, output):
    student_feat, teacher_feat, weight1, bias1, weight2, bias2 = inputs[:6]
    ctx.lambda_student = inputs[8]
    ctx.has_hidden = weight2 is not None
    ctx.save_for_backward(student_feat, teacher_feat, weight1, weight2, output[1])
    ctx.dtypes = (student_feat.dtype, weight1.dtype, bias1.dtype,
                  None if weight2 is None else weight2.dtype, None if bias2 is None else bias2.dtype)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _backward(ctx, grad_zf, grad_hidden):
    student_feat, teacher_feat, weight1, weight2, hidden = ctx.saved_tensors
    stacked = student_feat.dim() == 3
    if not stacked:  # one stage: the stacked form with S = 1
        student_feat, weight1, grad_zf = student_feat[None], weight1[None], grad_zf[None]
        if ctx.has_hidden:
            weight2, hidden = weight2[None], hidden[None]
    dt = acc_dtype(student_feat.dtype, teacher_feat.dtype, weight1.dtype)
    # GEMMs in the activation's dtype when it is bf16/fp16 (as in the forward), reductions in dt.
    gemm = student_feat.dtype if student_feat.dtype in (torch.bfloat16, torch.float16) else dt
    stages, batch, dim = student_feat.shape
    gz = _cast(grad_zf.reshape(stages, batch, -1), dt)
    if ctx.lambda_student != 1.0:
        gz = gz * ctx.lambda_student
    gz_g = _cast(gz, gemm)
    needs = ctx.needs_input_grad
    gw2 = gb2 = None
    if ctx.has_hidden:
        hid = _cast(hidden, gemm)  # exact: the forward rounded the ReLU output to the GEMM dtype
        if needs[4]:
            gw2 = _cast(torch.bmm(gz_g.transpose(1, 2), hid), ctx.dtypes[3])
        if needs[5]:
            gb2 = _cast(gz.sum(1), ctx.dtypes[4])
        ga = torch.bmm(gz_g, _cast(weight2, gemm))
        ga = torch.ops.aten.threshold_backward(ga, hid, 0.0)  # the ReLU mask, one pass
    else:
        ga = gz_g
    gh = gw1 = gb1 = None
    if needs[0]:
        gh = _cast(torch.bmm(ga, _cast(weight1[:, :, :dim], gemm)), ctx.dtypes[0])
    if needs[2]:
        u = torch.cat([_cast(student_feat, gemm), _cast(teacher_feat, gemm).expand(stages, -1, -1)], dim=2)
        gw1 = _cast(torch.bmm(ga.transpose(1, 2), u), ctx.dtypes[1])
    if needs[3]:
        gb1 = _cast(ga.sum(1, dtype=dt), ctx.dtypes[2])
    if not stacked:
        gh, gw1, gb1, gw2, gb2 = (None if g is None else g[0] for g in (gh, gw1, gb1, gw2, gb2))
    return gh, None, gw1, gb1, gw2, gb2, None, None, None, None


def _grad_dtypes(student_feat, weight1, weight2, bias1_dtype, bias2_dtype) -> tuple:
    """The dtypes of cfm_backward's five outputs (an absent weight2/bias2: weight1's and bias1's)."""
    return (student_feat.dtype, weight1.dtype, bias1_dtype, (weight1 if weight2 is None else weight2).dtype,
            bias1_dtype if bias2_dtype is None else bias2_dtype)


def _fake_backward(grad_sub_logits, student_feat, teacher_feat, weight1, weight2, hidden, lambda_student,
                   bias1_dtype, bias2_dtype, output_mask):
    dts = _grad_dtypes(student_feat, weight1, weight2, bias1_dtype, bias2_dtype)
    shapes = (student_feat.shape, weight1.shape, weight1.shape[:-1],
              None if weight2 is None else weight2.shape, None if weight2 is None else weight2.shape[:-1])
    return tuple(student_feat.new_empty(shape if (need and shape is not None) else (0,), dtype=dt)
                 for shape, dt, need in zip(shapes, dts, output_mask))


def _backward_native(backward_op, ctx, grad_zf, grad_hidden):
    student_feat, teacher_feat, weight1, weight2, hidden = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[2], needs[3], ctx.has_hidden and needs[4], ctx.has_hidden and needs[5]]
    grads = backward_op(grad_zf, student_feat, teacher_feat, weight1, weight2 if ctx.has_hidden else None, hidden,
                        ctx.lambda_student, ctx.dtypes[2], ctx.dtypes[4], mask)
    gh, gw1, gb1, gw2, gb2 = (g if need else None for g, need in zip(grads, mask))
    return gh, None, gw1, gb1, gw2, gb2, None, None, None, None


OP = OpDef("cfm", SCHEMA, _fake, _setup_context, _backward)
BWD = OpDef("cfm_backward", BWD_SCHEMA, _fake_backward)
NATIVE_OP = OpDef("cfm", SCHEMA, _fake, _setup_context, _backward_native, backward_op=BWD)


def bind(op) -> Callable:
    """The public form of a backend's ``cfm`` torch op (signature of ``hcd_fast.reference.cfm``, plus
    ``weight_cast(dtype, tensor)``: how the weights are cast under autocast, default ``tensor.to(dtype)``)."""

    def cfm(student_feat: torch.Tensor, teacher_feat: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor,
            weight2: Optional[torch.Tensor], bias2: Optional[torch.Tensor], teacher_logits: torch.Tensor,
            num_sub_logits: int, lambda_student: float = 1.0, lambda_teacher: float = 1.0,
            weight_cast: Optional[Callable] = None) -> torch.Tensor:
        cast = autocast_dtype(student_feat.device.type)
        if cast is not None:
            weight_cast = weight_cast or autocast_cast
            student_feat, teacher_feat = autocast_cast(cast, student_feat), autocast_cast(cast, teacher_feat)
            weight1, bias1, weight2, bias2 = (weight_cast(cast, t) for t in (weight1, bias1, weight2, bias2))
        return op(student_feat, teacher_feat, weight1, bias1, weight2, bias2, teacher_logits,
                  int(num_sub_logits), float(lambda_student), float(lambda_teacher))[0]

    return cfm
