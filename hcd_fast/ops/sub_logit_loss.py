"""The ``sub_logit_loss`` op: schema, fake kernel, autograd, option encoding and precision, once for every backend.

Math: ``hcd_fast.reference.sub_logit_loss`` (the CE, KD, sub-logit CE, sub-logit KL and orthogonality terms).
The loss is the last node of the graph, so a kernel returns, with the loss and its parts, the gradients
d loss / d sub_logits and d loss / d student_logits computed in the same pass; backward only scales them by
grad_output and rounds them once to each input's dtype.

Kernel contract (what a backend implements, for the schema below):
    sub_logits (S, B, n, K), student_logits (B, K), teacher_logits (B, K): any float dtypes and strides;
    target (B,) integer, every value in [0, K) (checked at the public boundary; a kernel must still never
    read out of bounds). Returns loss (), parts (5,) [ce, sub_ce, kd, sub_kl, ortho], and, when compute_grad,
    grad_sub_logits (S, B, n, K) and grad_student_logits (B, K), else two (0,) tensors; all in
    ``acc_dtype`` of the three logits (float64 if any is float64, else float32).
Options, encoded once here:
    gt_mask -> (mask_target, mask_fill): the target entry of every v_i is replaced by mask_fill when
    mask_target ("zero": 0, "large_negative": LARGE_NEGATIVE; "none": kept).
    ortho_on -> ortho_shift: v_i = zf_i - ortho_shift * z_t; 0 for "fused", lambda_teacher for "raw"
    (v_i = lambda_student * z_i, the CFM sub-logit before the fusion; cosines do not depend on its scale).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from hcd_fast.config import LARGE_NEGATIVE, HCDConfig
from hcd_fast.ops.library import OpDef, acc_dtype

PART_NAMES = ("ce", "sub_ce", "kd", "sub_kl", "ortho")

SCHEMA = (
    "(Tensor sub_logits, Tensor student_logits, Tensor teacher_logits, Tensor target, float temperature, "
    "float label_smoothing, float ortho_threshold, float ortho_eps, bool mask_target, float mask_fill, "
    "float ortho_shift, bool detach_sub_targets, float w_gt, float w_kd, float w_kl, float w_ol, "
    "bool compute_grad) -> (Tensor loss, Tensor parts, Tensor grad_sub_logits, Tensor grad_student_logits)")

_MASK = {"none": (False, 0.0), "zero": (True, 0.0), "large_negative": (True, LARGE_NEGATIVE)}


def encode(config: HCDConfig) -> tuple:
    """The scalar arguments of the schema (temperature ... w_ol) for ``config``."""
    c = config
    mask_target, mask_fill = _MASK[c.gt_mask]
    shift = float(c.lambda_teacher) if c.ortho_on == "raw" else 0.0
    return (float(c.temperature), float(c.label_smoothing), float(c.ortho_threshold), float(c.ortho_eps),
            mask_target, mask_fill, shift, bool(c.detach_sub_targets), float(c.w_gt), float(c.w_kd),
            float(c.w_kl), float(c.w_ol))


def _fake(sub_logits, student_logits, teacher_logits, target, *args):
    compute_grad = args[-1]
    dt = acc_dtype(sub_logits.dtype, student_logits.dtype, teacher_logits.dtype)
    loss = sub_logits.new_empty((), dtype=dt)
    parts = sub_logits.new_empty((len(PART_NAMES),), dtype=dt)
    if compute_grad:
        return (loss, parts, sub_logits.new_empty(sub_logits.shape, dtype=dt),
                sub_logits.new_empty(student_logits.shape, dtype=dt))
    return loss, parts, sub_logits.new_empty((0,), dtype=dt), sub_logits.new_empty((0,), dtype=dt)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.compute_grad = inputs[-1]


def _backward(ctx, grad_loss, grad_parts, grad_gs, grad_gz):
    # d/d inputs = grad_output * (the gradients of the forward); one rounding to the input dtype.
    if not ctx.compute_grad:
        raise RuntimeError("sub_logit_loss was called with compute_grad=False and cannot be differentiated")
    grad_sub, grad_student = ctx.saved_tensors
    gs = (grad_sub * grad_loss).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    gz = (grad_student * grad_loss).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return (gs, gz) + (None,) * 15


OP = OpDef("sub_logit_loss", SCHEMA, _fake, _setup_context, _backward)


def bind(op) -> Callable:
    """The public form of a backend's ``sub_logit_loss`` torch op (signature of ``hcd_fast.reference``).
    Inputs are validated by the caller (``hcd_fast.functional`` / ``HCDLoss``), which also detaches the teacher;
    the backward gives teacher_logits no gradient in any case."""

    def sub_logit_loss(sub_logits: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       target: torch.Tensor, config: HCDConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        compute_grad = torch.is_grad_enabled() and (sub_logits.requires_grad or student_logits.requires_grad)
        loss, parts, _, _ = op(sub_logits, student_logits, teacher_logits, target, *encode(config),
                               compute_grad)
        parts = parts.detach()
        return loss, {name: parts[i] for i, name in enumerate(PART_NAMES)}

    return sub_logit_loss
