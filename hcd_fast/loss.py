"""HCDLoss: the drop-in criterion that owns the projectors and CFMs (SPEC sections 2 and 5)."""
from __future__ import annotations

import operator
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from hcd_fast import functional as HF
from hcd_fast.config import HCDConfig
from hcd_fast.modules import StageCFMs, StageProjectors, init_weights
from hcd_fast.ops.dispatch import OpTable, check_backend_name, op_table
from hcd_fast.validation import (check_float, check_logits_and_target, check_same_device, check_shape,
                                 check_target_range, resolve_validate)


def _count(name: str, v) -> int:
    """v as an int >= 1 (Python and numpy integers alike; not bool, not float)."""
    try:
        if isinstance(v, bool):
            raise TypeError
        i = operator.index(v)
    except TypeError:
        raise ValueError(f"{name}: expected an int >= 1, got {v!r}") from None
    if i < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    return i


class HCDLoss(nn.Module):
    """Heterogeneous Complementary Distillation loss.

    Args:
        student_channels: C_s of each tapped student stage, shallow to deep (S entries).
        teacher_dim: D_t, the width of the teacher's penultimate (pre-logits) feature.
        num_classes: K.
        config: every option of the loss (HCDConfig; defaults of SPEC section 2).
        backend: "auto", "reference", "triton", "cuda" or "cpu" (see ``hcd_fast.backends()``).
        validate: check target values are in [0, K). Reading them synchronises on CUDA, so None (the
            default) means on for CPU tensors and off for CUDA tensors. While a CUDA graph is captured (and under
            torch.compile) the check is a device-side assertion instead (no sync; a bad target then fails the
            CUDA context, as any device assert does).

    ``forward(student_feats, student_logits, teacher_feat, teacher_logits, target, return_parts=False)``
    takes the S stage maps ``(B, C_s, H_s, W_s)``, z_s ``(B, K)``, f_t ``(B, D_t)``, z_t ``(B, K)`` and
    y ``(B,)`` and returns the 0-d fp32 loss, or ``(loss, parts)`` with the detached unweighted parts
    "ce", "sub_ce", "kd", "sub_kl", "ortho". The teacher inputs never receive gradient.
    """

    def __init__(self, student_channels: Sequence[int], teacher_dim: int, num_classes: int,
                 config: HCDConfig = HCDConfig(), backend: str = "auto", validate: Optional[bool] = None):
        super().__init__()
        if not isinstance(config, HCDConfig):
            raise TypeError(f"config: expected an HCDConfig, got {type(config).__name__}")
        try:
            channels = tuple(_count("student_channels", c) for c in student_channels)
        except (TypeError, ValueError):
            channels = ()
        if not channels:
            raise ValueError(f"student_channels: expected a non-empty sequence of ints >= 1, got {student_channels!r}")
        teacher_dim = _count("teacher_dim", teacher_dim)
        num_classes = _count("num_classes", num_classes)
        check_backend_name(backend)
        self.config = config
        self.student_channels = channels
        self.teacher_dim = teacher_dim
        self.num_classes = num_classes
        self.backend = backend
        self.validate = validate
        self.embed_dim = config.embed_dim if config.embed_dim is not None else max(channels[-1], teacher_dim)
        hidden = teacher_dim if config.cfm_hidden == "teacher" else config.cfm_hidden
        num_stages = len(channels)
        # The S projectors, with the same-shape SepConv blocks of different stages grouped (one grouped block per
        # distance from the end for ResNet-like widths); its state_dict keeps the per-stage keys
        # projectors.<s>.blocks.<j>.dw1.weight, ..., projectors.<S-1>.proj.weight. projectors.stage(s) is stage s alone.
        self.projectors = StageProjectors(channels, self.embed_dim, backend)
        # The S CFMs as one module with stage-stacked weights (one batched GEMM per layer); its state_dict keeps
        # the per-stage keys cfms.<s>.fc1.weight, ... of separate CFM modules.
        self.cfms = StageCFMs(num_stages, self.embed_dim, teacher_dim, num_classes, config.num_sub_logits, hidden,
                              config.lambda_student, config.lambda_teacher, backend)
        init_weights(self)

    def ops(self, device: torch.device) -> OpTable:
        """This loss's op table for tensors on ``device``: resolved on the first call per device type and cached
        by ``hcd_fast.ops.op_table`` (not on the module, which stays picklable)."""
        return op_table(self.backend, device)

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_dim={self.teacher_dim}, "
                f"num_classes={self.num_classes}, embed_dim={self.embed_dim}, backend={self.backend!r}")

    def _check_inputs(self, student_feats, student_logits, teacher_feat, teacher_logits, target) -> None:
        if not isinstance(student_feats, (list, tuple)):
            raise TypeError(f"student_feats: expected a list or tuple of {len(self.student_channels)} "
                            f"tensors, got {type(student_feats).__name__}")
        if len(student_feats) != len(self.student_channels):
            raise ValueError(f"student_feats: expected {len(self.student_channels)} stage features "
                             f"(student_channels={self.student_channels}), got {len(student_feats)}")
        batch, num_classes = check_logits_and_target(student_logits, teacher_logits, target)
        if num_classes != self.num_classes:
            raise ValueError(f"student_logits: expected {self.num_classes} classes (num_classes), "
                             f"got shape {tuple(student_logits.shape)}")
        for s, (f, c) in enumerate(zip(student_feats, self.student_channels)):
            check_float(f"student_feats[{s}]", f, 4)
            check_shape(f"student_feats[{s}]", f, (batch, c, None, None), "(B, C_s, H, W)")
        check_float("teacher_feat", teacher_feat, 2)
        check_shape("teacher_feat", teacher_feat, (batch, self.teacher_dim), "(B, teacher_dim)")
        check_same_device(student_logits=student_logits, teacher_feat=teacher_feat,
                          **{f"student_feats[{s}]": f for s, f in enumerate(student_feats)})
        if resolve_validate(self.validate, target.device):
            check_target_range(target, num_classes)

    def forward(self, student_feats: Sequence[torch.Tensor], student_logits: torch.Tensor,
                teacher_feat: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                return_parts: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        # Validated once here; the ops below run without re-checking (kernels keep memory-safety checks only).
        self._check_inputs(student_feats, student_logits, teacher_feat, teacher_logits, target)
        ops = self.ops(student_logits.device)
        teacher_feat = HF.teacher_input(teacher_feat)  # the teacher is a constant: once here, for every op
        teacher_logits = HF.teacher_input(teacher_logits)
        # h (S, B, D): the projector outputs of every stage (S*B*D values); the CFMs of all stages then write the
        # fused sub-logits (S, B, n, K) in one op.
        projected = self.projectors.run(student_feats, ops)
        sub_logits = self.cfms.run(projected, teacher_feat, teacher_logits, ops)
        loss, parts = ops.sub_logit_loss(sub_logits, student_logits, teacher_logits, target, self.config)
        return (loss, parts) if return_parts else loss
