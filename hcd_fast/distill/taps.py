"""The student tap: logits z_s (B, K) and the stage maps F_s (B, C_s, H_s, W_s) of any timm model in one
forward (``forward_intermediates`` then ``forward_head``); ``probe_student`` gets C_s and K from one dry run
at the training input size, whatever the model family (timm's feature_info differs between CNNs and ViTs)."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn

Indices = Union[int, Sequence[int]]


def require_methods(model: nn.Module, names: Sequence[str], role: str) -> None:
    missing = [n for n in names if not hasattr(model, n)]
    if missing:
        raise ValueError(f"{role} model {type(model).__name__} lacks {', '.join(missing)}: hcd-distill needs a "
                         f"timm model with {', '.join(names)}")


class StudentTap(nn.Module):
    """Student wrapper: ``forward(x (B, 3, H, W)) -> (logits (B, K), [F_s (B, C_s, H_s, W_s)] * S)``.

    Args:
        model: a timm model with ``forward_intermediates`` and ``forward_head``.
        indices: which intermediates to tap, as timm takes them: an int n means the last n stages
            (default 4), a list names stage indices (shallow to deep).
    """

    def __init__(self, model: nn.Module, indices: Indices = 4):
        super().__init__()
        require_methods(model, ("forward_intermediates", "forward_head"), "student")
        self.model = model
        self.indices = indices if isinstance(indices, int) else list(indices)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        final, feats = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=False)
        return self.model.forward_head(final), list(feats)


@torch.no_grad()
def probe_student(model: nn.Module, indices: Indices, input_size: Tuple[int, int, int]) -> Tuple[Tuple[int, ...], int]:
    """(C_s of each tapped stage, K) from one eval-mode dry run on a (1, *input_size) input."""
    tap = StudentTap(model, indices)
    was_training = model.training
    model.eval()
    try:
        logits, feats = tap(torch.zeros(1, *input_size, device=device_of(model)))
    finally:
        model.train(was_training)
    for s, f in enumerate(feats):
        if f.dim() != 4:
            raise ValueError(f"student intermediates[{s}]: expected a (B, C, H, W) map, got shape "
                             f"{tuple(f.shape)}")
    if not feats:
        raise ValueError(f"student indices={indices!r} selects no stage")
    return tuple(int(f.shape[1]) for f in feats), int(logits.shape[-1])


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
