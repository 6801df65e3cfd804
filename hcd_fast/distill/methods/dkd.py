"""dkd (Zhao et al., CVPR 2022): ``w_gt * CE_ls + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from hcd_fast.distill.methods.common import Criterion, f32
from hcd_fast.distill.methods.registry import Method
from hcd_fast.distill.options import option


@dataclass(frozen=True)
class DKDOptions:
    """dkd's own options (defaults: OFA-KD's CIFAR setting); each is the CLI flag of the same name."""

    dkd_alpha: float = option(1.0, "dkd: TCKD weight", ge=0.0, le=1000.0)
    dkd_beta: float = option(2.0, "dkd: NCKD weight (8 is common on ImageNet)", ge=0.0, le=1000.0)
    dkd_warmup: float = option(20.0, "dkd: epochs of linear ramp-up of the KD terms", ge=0.0)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD terms (Zhao et al. 2022); (B, K), (B, K), (B,) -> (TCKD, NCKD), batch means.

    With p = softmax(z/T) and the binary distribution b = [p_y, 1 - p_y]:
      TCKD = T^2 * KL(b_t || b_s)
      NCKD = T^2 * KL(softmax over k != y of z_t/T || softmax over k != y of z_s/T)
    Computed exactly from log-probabilities: log(1 - p_y) = logsumexp_{k != y} - logsumexp_k; the target
    entry is removed with -inf (not the -1000 offset of the original code) and excluded from the sum.
    """
    T = temperature
    zs = f32(student_logits) / T
    zt = f32(teacher_logits).detach() / T
    is_y = F.one_hot(target, zs.shape[-1]).bool()

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:
        lse_all = torch.logsumexp(z, dim=-1)
        log_py = z.gather(1, target[:, None]).squeeze(1) - lse_all
        log_rest = torch.logsumexp(z.masked_fill(is_y, float("-inf")), dim=-1) - lse_all
        return torch.stack([log_py, log_rest], dim=-1)

    bs, bt = binary_log_probs(zs), binary_log_probs(zt)
    tckd = T * T * (bt.exp() * (bt - bs)).sum(-1).mean()
    # Non-target distributions: log_softmax over k != y; the masked entry's log-prob is -inf, so it is
    # zeroed before the product (its probability is exactly 0) to keep both value and gradient finite.
    ls_s = F.log_softmax(zs.masked_fill(is_y, float("-inf")), dim=-1).masked_fill(is_y, 0.0)
    ls_t = F.log_softmax(zt.masked_fill(is_y, float("-inf")), dim=-1).masked_fill(is_y, 0.0)
    nckd = T * T * (ls_t.exp().masked_fill(is_y, 0.0) * (ls_t - ls_s)).sum(-1).mean()
    return tckd, nckd


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, epoch: float,
             temperature: float = 1.0, label_smoothing: float = 0.1, w_gt: float = 1.0, alpha: float = 1.0,
             beta: float = 2.0, warmup: float = 20.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DKD: ``w_gt * CE_ls(z_s, y) + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)``.

    ``epoch`` counts from 1 in the first epoch, as in the DKD code. Returns (loss, {"ce", "tckd", "nckd"}).
    """
    ce = F.cross_entropy(f32(student_logits), target, label_smoothing=label_smoothing)
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature)
    ramp = min(float(epoch) / warmup, 1.0) if warmup > 0 else 1.0
    loss = w_gt * ce + ramp * (alpha * tckd + beta * nckd)
    return loss, {"ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach()}


class DKDLoss(Criterion):
    """Decoupled KD, see ``dkd_loss``; parts {"ce", "tckd", "nckd"}. Defaults: OFA-KD's CIFAR setting."""

    part_names = ("ce", "tckd", "nckd")

    def __init__(self, temperature: float = 1.0, label_smoothing: float = 0.1, w_gt: float = 1.0,
                 alpha: float = 1.0, beta: float = 2.0, warmup: float = 20.0):
        super().__init__()
        self.temperature, self.label_smoothing, self.w_gt = temperature, label_smoothing, w_gt
        self.alpha, self.beta, self.warmup = alpha, beta, warmup
        self.epoch = 1.0

    def forward(self, student_feats, student_logits, teacher_feat, teacher_logits, target, return_parts=False):
        loss, parts = dkd_loss(student_logits, teacher_logits, target, self.epoch, self.temperature,
                               self.label_smoothing, self.w_gt, self.alpha, self.beta, self.warmup)
        return (loss, parts) if return_parts else loss




METHOD = Method("dkd", lambda channels, teacher_dim, num_classes, config, o, backend:
                DKDLoss(config.temperature, config.label_smoothing, config.w_gt, o.dkd_alpha, o.dkd_beta,
                        o.dkd_warmup), DKDLoss.part_names, options=DKDOptions, help="decoupled KD")
