"""ce: the student alone, ``CE_ls(z_s, y)`` (the no-distillation baseline)."""
from __future__ import annotations

import torch.nn.functional as F

from hcd_fast.distill.methods.common import Criterion, f32
from hcd_fast.distill.methods.registry import Method


class CELoss(Criterion):
    """The student alone: ``CE_ls(z_s, y)``; parts {"ce"}."""

    part_names = ("ce",)

    def __init__(self, label_smoothing: float = 0.1):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student_feats, student_logits, teacher_feat, teacher_logits, target, return_parts=False):
        ce = F.cross_entropy(f32(student_logits), target, label_smoothing=self.label_smoothing)
        return (ce, {"ce": ce.detach()}) if return_parts else ce




METHOD = Method("ce", lambda channels, teacher_dim, num_classes, config, options, backend:
                CELoss(config.label_smoothing), CELoss.part_names, needs_teacher=False,
                help="the student alone")
