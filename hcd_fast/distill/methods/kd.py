"""kd (Hinton et al. 2015): ``w_gt * CE_ls(z_s, y) + w_kd * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from hcd_fast.distill.methods.common import Criterion, f32, kl_div_logits
from hcd_fast.distill.methods.registry import Method


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
            temperature: float = 1.0, label_smoothing: float = 0.1, w_gt: float = 1.0, w_kd: float = 1.0
            ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Hinton KD: ``w_gt * CE_ls(z_s, y) + w_kd * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    Args: student_logits z_s (B, K); teacher_logits z_t (B, K), detached; target y (B,) int64.
    Returns (loss, {"ce", "kd"}).
    """
    ce = F.cross_entropy(f32(student_logits), target, label_smoothing=label_smoothing)
    kd = kl_div_logits(teacher_logits.detach(), student_logits, temperature)
    return w_gt * ce + w_kd * kd, {"ce": ce.detach(), "kd": kd.detach()}


class KDLoss(Criterion):
    """Hinton KD, see ``kd_loss``; parts {"ce", "kd"}."""

    part_names = ("ce", "kd")

    def __init__(self, temperature: float = 1.0, label_smoothing: float = 0.1, w_gt: float = 1.0,
                 w_kd: float = 1.0):
        super().__init__()
        self.temperature, self.label_smoothing, self.w_gt, self.w_kd = temperature, label_smoothing, w_gt, w_kd

    def forward(self, student_feats, student_logits, teacher_feat, teacher_logits, target, return_parts=False):
        loss, parts = kd_loss(student_logits, teacher_logits, target, self.temperature, self.label_smoothing,
                              self.w_gt, self.w_kd)
        return (loss, parts) if return_parts else loss




METHOD = Method("kd", lambda channels, teacher_dim, num_classes, config, options, backend:
                KDLoss(config.temperature, config.label_smoothing, config.w_gt, config.w_kd), KDLoss.part_names,
                help="Hinton KD")
