"""Evaluation of the bare student, and the BatchNorm modes of training."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hcd_fast.distill.engine.distributed import DistContext
from hcd_fast.modules import ConvProjector


def set_bn_frozen(module: nn.Module) -> None:
    """BatchNorm layers and HCD/OFA conv projectors (whose fused BN tail follows the projector's own
    training flag) to eval mode: running statistics instead of batch statistics."""
    for m in module.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, ConvProjector)):
            m.eval()


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, ConvProjector)) for m in module.modules())


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, autocast, channels_last: bool, ctx: DistContext,
             on_bad=None) -> Dict[str, Optional[float]]:
    """Top-1/top-5 and CE of the bare student over the whole validation set (summed over ranks); None
    values when there is no validation data."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # ce sum, top-1, top-5 correct, count
    for x, y, bad in loader:
        if bad and on_bad is not None:
            on_bad(bad)
        if x is None:
            continue
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        logits = logits.float()
        hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), hit[:, 0].sum(), hit.any(-1).sum(),
                             torch.tensor(y.shape[0], device=device)]).double()
    model.train(was_training)
    vals = ctx.all_reduce(sums).tolist()
    if vals[3] == 0:
        return {"val_loss": None, "val_top1": None, "val_top5": None}
    n = vals[3]
    return {"val_loss": vals[0] / n, "val_top1": 100.0 * vals[1] / n, "val_top5": 100.0 * vals[2] / n}
