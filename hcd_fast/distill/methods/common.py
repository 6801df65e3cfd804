"""What the baseline criteria share: fp32 math on low-precision logits, the temperature-scaled KL, and
HCDLoss's call signature ``criterion(student_feats, student_logits, teacher_feat, teacher_logits, target,
return_parts=True) -> (loss, parts)`` (``parts``: detached fp32 0-d tensors). Every KL is computed from
log-probabilities on both sides, so logits in the hundreds stay finite."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kl_div_logits(target_logits: torch.Tensor, input_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(target/T) || softmax(input/T)), batch mean; (B, K), (B, K) -> 0-d."""
    log_p = F.log_softmax(f32(target_logits) / temperature, dim=-1)
    log_q = F.log_softmax(f32(input_logits) / temperature, dim=-1)
    return temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class Criterion(nn.Module):
    """Common argument handling: the trainer calls every method like HCDLoss."""

    part_names: Tuple[str, ...] = ()

    def set_epoch(self, epoch: float) -> None:
        """The trainer calls this at the start of every epoch (1-based); only DKD uses it."""
        self.epoch = float(epoch)


