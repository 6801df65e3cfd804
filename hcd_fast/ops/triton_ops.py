"""Triton backend: one ``torch.autograd.Function`` per fused op over the kernels in ``hcd_fast.kernels``.

Each Function's forward and backward call ``torch.library.custom_op`` ops (namespace ``hcd_triton``) with
fake (meta) implementations, so ``torch.compile(..., fullgraph=True)`` traces through them without a graph
break; the kernels themselves are opaque to the compiler.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, which
``hcd_fast.kernels`` sets when no CUDA device is present; for tests, it is slow).
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional, Tuple

import torch

from hcd_fast.config import HCDConfig

try:
    import triton  # noqa: F401

    from hcd_fast.kernels import sub_logit_loss as _k_sll
    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # reported by status(), never raised at import
    _IMPORT_ERROR = exc

PART_NAMES = ("ce", "sub_ce", "kd", "sub_kl", "ortho")
Tensor = torch.Tensor


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def status(name: str) -> Tuple[bool, str]:
    if _IMPORT_ERROR is not None:
        return False, f"triton kernels failed to import: {type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    if _interpreting():
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1; CPU tensors, slow)"
    return False, "no CUDA device and TRITON_INTERPRET is not 1"


def devices(name: str) -> tuple:
    found = ("cuda",) if torch.cuda.is_available() else ()
    return found + (("cpu",) if _interpreting() else ())


def _guard(t: Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# sub_logit_loss
# ------------------------------------------------------------------------------------------------
if _IMPORT_ERROR is None:

    @torch.library.custom_op("hcd_triton::sub_logit_loss_fwd", mutates_args=())
    def _sub_logit_loss_fwd(
        sub_logits: Tensor, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
        temperature: float, label_smoothing: float, ortho_threshold: float, ortho_eps: float,
        gt_mask: str, detach_sub_targets: bool, w_gt: float, w_kd: float, w_kl: float, w_ol: float,
        compute_grad: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        with _guard(sub_logits):
            return _k_sll.sub_logit_loss_forward(
                sub_logits, student_logits, teacher_logits, target, temperature, label_smoothing,
                ortho_threshold, ortho_eps, gt_mask, detach_sub_targets, w_gt, w_kd, w_kl, w_ol,
                compute_grad)

    @_sub_logit_loss_fwd.register_fake
    def _(sub_logits, student_logits, teacher_logits, target, temperature, label_smoothing,
          ortho_threshold, ortho_eps, gt_mask, detach_sub_targets, w_gt, w_kd, w_kl, w_ol, compute_grad):
        acc = _acc_dtype(sub_logits.dtype)
        loss = sub_logits.new_empty((), dtype=acc)
        parts = sub_logits.new_empty((len(PART_NAMES),), dtype=acc)
        if compute_grad:
            return (loss, parts, sub_logits.new_empty(sub_logits.shape, dtype=acc),
                    sub_logits.new_empty(student_logits.shape, dtype=acc))
        return loss, parts, sub_logits.new_empty((0,), dtype=acc), sub_logits.new_empty((0,), dtype=acc)


def _config_args(config: HCDConfig) -> tuple:
    return (float(config.temperature), float(config.label_smoothing), float(config.ortho_threshold),
            float(config.ortho_eps), config.gt_mask, bool(config.detach_sub_targets), float(config.w_gt),
            float(config.w_kd), float(config.w_kl), float(config.w_ol))


class SubLogitLossFunction(torch.autograd.Function):
    """The HCD loss; the forward kernel also writes d loss / d (sub_logits, student_logits), the backward
    scales them by grad_output (the loss is the last node of the graph)."""

    @staticmethod
    def forward(ctx, sub_logits, student_logits, teacher_logits, target, config_args):
        compute_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        loss, parts, grad_zf, grad_zs = torch.ops.hcd_triton.sub_logit_loss_fwd(
            sub_logits, student_logits, teacher_logits.detach(), target, *config_args, compute_grad)
        ctx.save_for_backward(grad_zf, grad_zs)
        ctx.dtypes = (sub_logits.dtype, student_logits.dtype)
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, grad_parts):
        grad_zf, grad_zs = ctx.saved_tensors
        d_zf = (grad_zf * grad_loss).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        d_zs = (grad_zs * grad_loss).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return d_zf, d_zs, None, None, None


def sub_logit_loss(sub_logits: Tensor, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                   config: HCDConfig) -> Tuple[Tensor, Dict[str, Tensor]]:
    """See ``hcd_fast.reference.sub_logit_loss``: zf (S, B, n, K), z_s (B, K), z_t (B, K), y (B,)."""
    loss, parts = SubLogitLossFunction.apply(sub_logits, student_logits, teacher_logits, target,
                                             _config_args(config))
    return loss, {name: parts[i] for i, name in enumerate(PART_NAMES)}
