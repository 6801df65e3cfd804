"""The comparison methods of the trainer (SPEC section 9): ce, kd, dkd and ofa.

Every criterion here has the call signature of ``hcd_fast.HCDLoss`` so the trainer treats all methods
alike: ``criterion(student_feats, student_logits, teacher_feat, teacher_logits, target,
return_parts=True) -> (loss, parts)``, ``parts`` a dict of detached fp32 0-d tensors. Notation: z_s
student logits (B, K), z_t teacher logits (B, K, never receives gradient), y targets (B,), T the
temperature, CE_ls cross-entropy with label smoothing ls. All losses are computed in fp32 (fp64 stays
fp64), from log-probabilities on both sides of every KL so logits in the hundreds stay finite.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hcd_fast.modules import ConvProjector, LinearProjector, init_weights

METHODS = ("hcd", "ce", "kd", "dkd", "ofa")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kl_div_logits(target_logits: torch.Tensor, input_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(target/T) || softmax(input/T)), batch mean; (B, K), (B, K) -> 0-d."""
    log_p = F.log_softmax(_f32(target_logits) / temperature, dim=-1)
    log_q = F.log_softmax(_f32(input_logits) / temperature, dim=-1)
    return temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
            temperature: float = 1.0, label_smoothing: float = 0.1, w_gt: float = 1.0, w_kd: float = 1.0
            ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Hinton KD: ``w_gt * CE_ls(z_s, y) + w_kd * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    Args: student_logits z_s (B, K); teacher_logits z_t (B, K), detached; target y (B,) int64.
    Returns (loss, {"ce", "kd"}).
    """
    ce = F.cross_entropy(_f32(student_logits), target, label_smoothing=label_smoothing)
    kd = kl_div_logits(teacher_logits.detach(), student_logits, temperature)
    return w_gt * ce + w_kd * kd, {"ce": ce.detach(), "kd": kd.detach()}


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
    zs = _f32(student_logits) / T
    zt = _f32(teacher_logits).detach() / T
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
    ce = F.cross_entropy(_f32(student_logits), target, label_smoothing=label_smoothing)
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature)
    ramp = min(float(epoch) / warmup, 1.0) if warmup > 0 else 1.0
    loss = w_gt * ce + ramp * (alpha * tckd + beta * nckd)
    return loss, {"ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach()}


def ofa_term(logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
             temperature: float = 1.0) -> torch.Tensor:
    """OFA-KD's adaptive target loss (Hao et al. 2023); (B, K), (B, K), (B,) -> 0-d:

    ``mean_b sum_k -((softmax(z_t/T) + onehot_y)^eps - onehot_y) * log_softmax(z/T)``.
    eps = 1 is plain CE against the teacher distribution; eps > 1 sharpens towards the target class.
    """
    log_q = F.log_softmax(_f32(logits) / temperature, dim=-1)
    p_t = F.softmax(_f32(teacher_logits).detach() / temperature, dim=-1)
    onehot = F.one_hot(target, log_q.shape[-1]).to(p_t.dtype)
    weight = (p_t + onehot).pow(eps) - onehot
    return -(weight * log_q).sum(-1).mean()


class _Criterion(nn.Module):
    """Common argument handling: the trainer calls every method like HCDLoss."""

    part_names: Tuple[str, ...] = ()

    def set_epoch(self, epoch: float) -> None:
        """The trainer calls this at the start of every epoch (1-based); only DKD uses it."""
        self.epoch = float(epoch)


class CELoss(_Criterion):
    """The student alone: ``CE_ls(z_s, y)``; parts {"ce"}."""

    part_names = ("ce",)

    def __init__(self, label_smoothing: float = 0.1):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student_feats, student_logits, teacher_feat, teacher_logits, target, return_parts=False):
        ce = F.cross_entropy(_f32(student_logits), target, label_smoothing=self.label_smoothing)
        return (ce, {"ce": ce.detach()}) if return_parts else ce


class KDLoss(_Criterion):
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


class DKDLoss(_Criterion):
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


class OFALoss(_Criterion):
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
        ce = F.cross_entropy(_f32(student_logits), target, label_smoothing=self.label_smoothing)
        kd = ofa_term(student_logits, teacher_logits, target, self.eps, self.temperature)
        stage = sum(ofa_term(head(proj(f)), teacher_logits, target, self.eps, self.temperature)
                    for f, proj, head in zip(student_feats, self.projectors, self.heads))
        loss = self.w_gt * ce + self.w_kd * kd + self.w_ofa * stage
        parts = {"ce": ce.detach(), "kd": kd.detach(), "ofa": stage.detach()}
        return (loss, parts) if return_parts else loss
