"""The ``sub_logit_loss`` op: schema, fake kernels, autograd, option encoding and precision, once for every backend.

Math: ``hcd_fast.reference.sub_logit_loss`` (the CE, KD, sub-logit CE, sub-logit KL and orthogonality terms).
Two torch ops per backend (issue 11): the forward returns the loss, its parts and small per-row statistics;
``sub_logit_loss_backward`` recomputes the gradient from the inputs and those statistics, reading grad_output
from device memory (a 0-d tensor, never ``.item()``) and writing d/d sub_logits and d/d student_logits once,
each in its input's dtype. No per-element fp32 gradient is stored between the two.

Notation: zf = sub_logits (S, B, n, K), zs = student_logits (B, K), zt = teacher_logits (B, K), y = target (B,),
T = temperature, ls = label_smoothing, lse1(x) = logsumexp(x), lseT(x) = logsumexp(x / T), p = softmax(x),
P = softmax(x / T); acc = ``acc_dtype`` of the three logits (float64 if any is float64, else float32).

Kernel contract of ``sub_logit_loss`` (what a backend implements, for FWD_SCHEMA):
    zf, zs, zt: any float dtypes and strides; y (B,) integer. Returns, contiguous:
    - loss (), parts (5,) [ce, sub_ce, kd, sub_kl, ortho] in acc (unweighted; stage terms summed over stages);
    - row_stats (S, B, n, 3) in float64: [lse1(zf_i), lseT(zf_i), kl_i], kl_i = sum_k P_a,k (log P_a,k -
      log P_c,k) with a = zf_i, c = zs (the row's KL without the T^2 factor);
    - ortho_coef (S, B, n, n) in acc: M with d(w_ol * OL) / d v_i = sum_j M_ij v_j, i.e. with c = 1 / (B n (n-1)),
      r_i = max(||v_i||, eps), G_ij = v_i.v_j / (r_i r_j):
      M_ij = w_ol 4c relu(G_ij - theta) / (r_i r_j) (i != j),
      M_ii = -[||v_i|| > eps] sum_j w_ol 4c relu(G_ij - theta) G_ij / r_i^2; all zero when n == 1;
    - sample_stats (B, 3) in float64: [lse1(zs), lseT(zs), lseT(zt)].
    The two statistics tensors are float64 whatever the inputs (a deviation from design11.md's "acc", which the
    large-logit tests decided): an fp32 log-sum-exp is off by up to 2^-24 |lse| (1.5e-5 at |lse| ~ 250), and
    exp(x - lse) in the backward inherits that as relative error, times log-ratios in the hundreds in the KL
    gradient (1.4e-5 relative error of d sub_logits at logits ~150, tests/test_op_contract.py). A kernel
    computes the (max, log-sum) pair in acc and stores max + log-sum in float64; the backward splits the
    statistic into hi = fp32(lse) and lo = fp32(lse - hi) and forms (x - hi) - lo: fp32 arithmetic per element.
Kernel contract of ``sub_logit_loss_backward`` (BWD_SCHEMA), g = grad_loss (0-d, acc, read on the device):
    dzs[b,k] = g (w_gt/B (p_s,k - (1-ls)[k==y] - ls/K) + w_kd/B T (P_s,k - P_t,k)
                  + w_kl/(B n) sum_{s,i} T (P_s,k - P_zf,k))
    dzf[s,b,i,k] = g (w_gt/(B n) (p_zf,k - (1-ls)[k==y] - ls/K)
                      + (0 if detach_sub_targets else w_kl/(B n) T P_zf,k (log P_zf,k - log P_s,k - kl_i))
                      + (0 if mask_target and k == y else sum_j M_ij (zf[s,b,j,k] - ortho_shift zt[b,k])))
    grad_sub_logits (S, B, n, K) contiguous in zf's dtype when need_grad_sub, grad_student_logits (B, K)
    contiguous in zs's dtype when need_grad_student; an output not needed is a (0,) tensor, not computed.
Targets: range-checked at the public boundary (validate). Unchecked, a kernel never reads out of bounds and a
    sample whose target is outside [0, K) makes the loss and every part NaN and its gradient rows NaN (the
    trainer's non-finite check then fires), the same on every backend.
Options, encoded once here:
    gt_mask -> (mask_target, mask_fill): the target entry of every v_i is replaced by mask_fill when
    mask_target ("zero": 0, "large_negative": LARGE_NEGATIVE; "none": kept); its derivative is 0, so the
    backward needs only mask_target.
    ortho_on -> ortho_shift: v_i = zf_i - ortho_shift * z_t; 0 for "fused", lambda_teacher for "raw"
    (v_i = lambda_student * z_i, the CFM sub-logit before the fusion; cosines do not depend on its scale).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from hcd_fast.config import LARGE_NEGATIVE, HCDConfig
from hcd_fast.ops.library import OpDef, acc_dtype

PART_NAMES = ("ce", "sub_ce", "kd", "sub_kl", "ortho")
ROW_STATS = ("lse1", "lseT", "kl")            # row_stats[..., j]
SAMPLE_STATS = ("lse1_s", "lseT_s", "lseT_t")  # sample_stats[:, j]

FWD_SCHEMA = (
    "(Tensor sub_logits, Tensor student_logits, Tensor teacher_logits, Tensor target, float temperature, "
    "float label_smoothing, float ortho_threshold, float ortho_eps, bool mask_target, float mask_fill, "
    "float ortho_shift, bool detach_sub_targets, float w_gt, float w_kd, float w_kl, float w_ol) "
    "-> (Tensor loss, Tensor parts, Tensor row_stats, Tensor ortho_coef, Tensor sample_stats)")
BWD_SCHEMA = (
    "(Tensor grad_loss, Tensor sub_logits, Tensor student_logits, Tensor teacher_logits, Tensor target, "
    "Tensor row_stats, Tensor ortho_coef, Tensor sample_stats, float temperature, float label_smoothing, "
    "float ortho_shift, bool mask_target, bool detach_sub_targets, float w_gt, float w_kd, float w_kl, "
    "bool need_grad_sub, bool need_grad_student) -> (Tensor grad_sub_logits, Tensor grad_student_logits)")

_MASK = {"none": (False, 0.0), "zero": (True, 0.0), "large_negative": (True, LARGE_NEGATIVE)}


def encode(config: HCDConfig) -> tuple:
    """The scalar arguments of FWD_SCHEMA (temperature ... w_ol) for ``config``."""
    c = config
    mask_target, mask_fill = _MASK[c.gt_mask]
    shift = float(c.lambda_teacher) if c.ortho_on == "raw" else 0.0
    return (float(c.temperature), float(c.label_smoothing), float(c.ortho_threshold), float(c.ortho_eps),
            mask_target, mask_fill, shift, bool(c.detach_sub_targets), float(c.w_gt), float(c.w_kd),
            float(c.w_kl), float(c.w_ol))


STATS_DTYPE = torch.float64  # row_stats and sample_stats, whatever the inputs (module docstring)


def _fake(sub_logits, student_logits, teacher_logits, target, *args):
    num_stages, batch, n, _ = sub_logits.shape
    dt = acc_dtype(sub_logits.dtype, student_logits.dtype, teacher_logits.dtype)
    return (sub_logits.new_empty((), dtype=dt), sub_logits.new_empty((len(PART_NAMES),), dtype=dt),
            sub_logits.new_empty((num_stages, batch, n, len(ROW_STATS)), dtype=STATS_DTYPE),
            sub_logits.new_empty((num_stages, batch, n, n), dtype=dt),
            sub_logits.new_empty((batch, len(SAMPLE_STATS)), dtype=STATS_DTYPE))


def _backward_fake(grad_loss, sub_logits, student_logits, teacher_logits, target, row_stats, ortho_coef,
                   sample_stats, *args):
    need_grad_sub, need_grad_student = args[-2], args[-1]
    return (sub_logits.new_empty(sub_logits.shape if need_grad_sub else (0,)),
            student_logits.new_empty(student_logits.shape if need_grad_student else (0,)))


def _setup_context(ctx, inputs, output):
    zf, zs, zt, y, temperature, ls, _, _, mask_target, _, shift, detach, w_gt, w_kd, w_kl, _ = inputs
    ctx.save_for_backward(zf, zs, zt, y, output[2], output[3], output[4])
    ctx.scalars = (temperature, ls, shift, mask_target, detach, w_gt, w_kd, w_kl)


def _backward(backward_op, ctx, grad_loss, grad_parts, grad_row_stats, grad_ortho_coef, grad_sample_stats):
    # The backward op recomputes the gradient from the saved inputs and statistics (module docstring);
    # grad_loss stays on the device. parts and the statistics are not differentiable outputs.
    need_sub, need_student = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_sub or need_student):
        return (None,) * 16
    gs, gz = backward_op(grad_loss, *ctx.saved_tensors, *ctx.scalars, need_sub, need_student)
    return (gs if need_sub else None, gz if need_student else None) + (None,) * 14


BACKWARD = OpDef("sub_logit_loss_backward", BWD_SCHEMA, _backward_fake)
OP = OpDef("sub_logit_loss", FWD_SCHEMA, _fake, _setup_context, _backward, backward_op=BACKWARD)


def bind(op) -> Callable:
    """The public form of a backend's ``sub_logit_loss`` torch op (signature of ``hcd_fast.reference``).
    Inputs are validated by the caller (``hcd_fast.functional`` / ``HCDLoss``), which also detaches the teacher;
    the backward gives teacher_logits no gradient in any case."""

    def sub_logit_loss(sub_logits: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       target: torch.Tensor, config: HCDConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        loss, parts, _, _, _ = op(sub_logits, student_logits, teacher_logits, target, *encode(config))
        parts = parts.detach()
        return loss, {name: parts[i] for i, name in enumerate(PART_NAMES)}

    return sub_logit_loss
