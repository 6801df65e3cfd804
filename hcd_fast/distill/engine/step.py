"""One distillation update: the step ``hcd-distill`` runs and the benchmarks time.

Forward (teacher online, or its cached f_t), loss, backward, optimizer step, with the loss and its parts
kept on the device: no host sync unless asked (``sync_loss``, ``skip_nonfinite``). Every setting is an
explicit argument, so a benchmark builds the trainer's own step without the command line; the
"published-style" baseline (reference backend, fp16 autocast with a GradScaler, ``loss.item()`` every step)
is a configuration of it.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from hcd_fast.distill.distiller import DistillTask, unwrap
from hcd_fast.reference import PART_NAMES


@dataclass
class StepOutput:
    """What one ``TrainStep`` call leaves, on the device unless stated.

    vals: (1 + P,) float64, the loss then each of ``TrainStep.part_names`` (detached).
    correct: 0-d int64, the student's top-1 hits in the batch.
    nonfinite: 0-d bool, the loss was not finite (the update was still applied unless ``skipped``).
    skipped: host bool, ``skip_nonfinite`` found a non-finite loss on some rank and made no update.
    loss: host float of the loss (``sync_loss``), else None.
    """

    vals: torch.Tensor
    correct: Optional[torch.Tensor]
    nonfinite: torch.Tensor
    skipped: bool = False
    loss: Optional[float] = None


class TrainStep:
    """``step(x, y, cached_feat=None) -> StepOutput``: one update of ``task``'s trainable part.

    Args:
        task: the ``DistillTask`` (student + criterion, and the frozen teacher or None for ce).
        optimizer: steps the task's trainable parameters.
        device: where the batch goes (``non_blocking`` copies); default: the first trainable parameter's.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16), or None for no autocast.
        scaler: a ``torch.amp.GradScaler`` (fp16), or None.
        channels_last: the batch in channels_last memory format (the student should be too).
        clip_grad: clip the gradient norm of the trainable parameters to this, or None.
        sync_loss: read ``loss.item()`` after every step (one host sync; what published trainers do).
        skip_nonfinite: make no update when the loss is not finite (one host sync per step to decide).
        reduce_max: MAX over ranks of a tensor (the skip decision agrees on every rank); default identity.
        part_names: the loss parts to report; default the criterion's ``part_names`` (HCD's otherwise).
    """

    def __init__(self, task: DistillTask, optimizer: torch.optim.Optimizer, *,
                 device: Optional[torch.device] = None, amp_dtype: Optional[torch.dtype] = None,
                 scaler: Optional["torch.amp.GradScaler"] = None, channels_last: bool = False,
                 clip_grad: Optional[float] = None, sync_loss: bool = False, skip_nonfinite: bool = False,
                 reduce_max: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 part_names: Optional[Sequence[str]] = None):
        self.task, self.optimizer, self.scaler = task, optimizer, scaler
        if device is None:
            device = next(unwrap(task.trainable_module).parameters()).device
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.channels_last, self.clip_grad = channels_last, clip_grad
        self.sync_loss, self.skip_nonfinite = sync_loss, skip_nonfinite
        self.reduce_max = reduce_max if reduce_max is not None else (lambda t: t)
        criterion = unwrap(task.trainable_module).criterion
        self.part_names = tuple(part_names if part_names is not None
                                else getattr(criterion, "part_names", PART_NAMES))

    def autocast(self):
        """The step's autocast context (also the evaluation's)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor, cached_feat: Optional[torch.Tensor] = None) -> dict:
        """Batch to the device, then the task's forward under autocast: {"loss", "output", parts...}."""
        x = x.to(self.device, non_blocking=True)
        if cached_feat is not None:
            cached_feat = cached_feat.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            return self.task(x, y, cached_feat)

    def backward_and_update(self, loss: torch.Tensor) -> None:
        params = self.task.trainable_module.parameters
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(params(), self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.clip_grad:
                nn.utils.clip_grad_norm_(params(), self.clip_grad)
            self.optimizer.step()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, cached_feat: Optional[torch.Tensor] = None) -> StepOutput:
        """One update on the batch ``x`` (B, 3, H, W), ``y`` (B,); ``cached_feat`` (B, D_t): the teacher
        cache's f_t of these views (no teacher forward), or None."""
        y = y.to(self.device, non_blocking=True)
        result = self.forward(x, y, cached_feat)
        loss = result["loss"]
        vals = torch.stack([loss.detach().double()] + [result[k].detach().double() for k in self.part_names])
        nonfinite = ~torch.isfinite(vals[0])
        self.optimizer.zero_grad(set_to_none=True)
        if self.skip_nonfinite and self.reduce_max(nonfinite.to(torch.int32)).item():  # a sync, by request
            return StepOutput(vals, None, nonfinite, skipped=True)
        self.backward_and_update(loss)
        correct = (result["output"].detach().argmax(-1) == y).sum()
        return StepOutput(vals, correct, nonfinite, loss=loss.item() if self.sync_loss else None)
