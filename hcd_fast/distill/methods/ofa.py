"""ofa (Hao et al., NeurIPS 2023): OFA-KD's adaptive target loss on the student logits and on a projector +
linear head per tapped stage."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hcd_fast.distill.methods.common import Criterion, f32
from hcd_fast.distill.methods.registry import Method
from hcd_fast.distill.options import option
from hcd_fast.modules import ConvProjector, LinearProjector, init_weights


@dataclass(frozen=True)
class OFAOptions:
    """ofa's own options; each is the CLI flag of the same name."""

    ofa_eps: float = option(1.0, "ofa: exponent eps (1 CIFAR, 1.5 ImageNet)", gt=0.0, le=10.0)
    w_ofa: float = option(1.0, "ofa: weight of the per-stage OFA terms", ge=0.0, le=1000.0)


def ofa_term(logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
             temperature: float = 1.0) -> torch.Tensor:
    """OFA-KD's adaptive target loss (Hao et al. 2023); (B, K), (B, K), (B,) -> 0-d:

    ``mean_b sum_k -((softmax(z_t/T) + onehot_y)^eps - onehot_y) * log_softmax(z/T)``.
    eps = 1 is plain CE against the teacher distribution; eps > 1 sharpens towards the target class.
    """
    log_q = F.log_softmax(f32(logits) / temperature, dim=-1)
    p_t = F.softmax(f32(teacher_logits).detach() / temperature, dim=-1)
    onehot = F.one_hot(target, log_q.shape[-1]).to(p_t.dtype)
    weight = (p_t + onehot).pow(eps) - onehot
    return -(weight * log_q).sum(-1).mean()


class OFALoss(Criterion):
    """OFA-KD: ``w_gt * CE_ls(z_s, y) + w_kd * ofa(z_s, z_t) + w_ofa * sum_s ofa(head_s(proj_s(F_s)), z_t)``.

    Every tapped stage s gets the HCD projector (SepConv blocks + GAP, or conv1x1 + GAP for the deepest
    stage; ``hcd_fast.modules``) to width D = max(C_last, D_t) (or ``embed_dim``), then ``Linear(D, K)``.
    Parts {"ce", "kd" (ofa on z_s), "ofa" (summed over stages)}.

    Args:
        student_channels: C_s of each tapped stage, shallow to deep.
        teacher_dim: D_t.
        num_classes: K.
        eps: OFA's exponent (1 on CIFAR, 1.5 on ImageNet).
    """

    part_names = ("ce", "kd", "ofa")

    def __init__(self, student_channels: Sequence[int], teacher_dim: int, num_classes: int,
                 temperature: float = 1.0, label_smoothing: float = 0.1, eps: float = 1.0, w_gt: float = 1.0,
                 w_kd: float = 1.0, w_ofa: float = 1.0, embed_dim: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        channels = tuple(student_channels)
        self.student_channels = channels
        self.embed_dim = embed_dim if embed_dim is not None else max(channels[-1], teacher_dim)
        num_stages = len(channels)
        self.projectors = nn.ModuleList(
            ConvProjector(c, num_stages - 1 - s, self.embed_dim, backend) if s < num_stages - 1
            else LinearProjector(c, self.embed_dim, backend)
            for s, c in enumerate(channels))
        self.heads = nn.ModuleList(nn.Linear(self.embed_dim, num_classes) for _ in channels)
        self.temperature, self.label_smoothing, self.eps = temperature, label_smoothing, eps
        self.w_gt, self.w_kd, self.w_ofa = w_gt, w_kd, w_ofa
        init_weights(self)

    def forward(self, student_feats, student_logits, teacher_feat, teacher_logits, target, return_parts=False):
        if len(student_feats) != len(self.projectors):
            raise ValueError(f"student_feats: expected {len(self.projectors)} stage features "
                             f"(student_channels={self.student_channels}), got {len(student_feats)}")
        teacher_logits = teacher_logits.detach()
        ce = F.cross_entropy(f32(student_logits), target, label_smoothing=self.label_smoothing)
        kd = ofa_term(student_logits, teacher_logits, target, self.eps, self.temperature)
        stage = sum(ofa_term(head(proj(f)), teacher_logits, target, self.eps, self.temperature)
                    for f, proj, head in zip(student_feats, self.projectors, self.heads))
        loss = self.w_gt * ce + self.w_kd * kd + self.w_ofa * stage
        parts = {"ce": ce.detach(), "kd": kd.detach(), "ofa": stage.detach()}
        return (loss, parts) if return_parts else loss


METHOD = Method("ofa", lambda channels, teacher_dim, num_classes, config, o, backend:
                OFALoss(tuple(channels), teacher_dim, num_classes, config.temperature, config.label_smoothing,
                        o.ofa_eps, config.w_gt, config.w_kd, o.w_ofa, config.embed_dim, backend),
                OFALoss.part_names, options=OFAOptions, help="OFA-KD")
