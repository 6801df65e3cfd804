"""Distiller (the trainable part) and DistillTask (timm ``TrainingTask`` contract).

``Distiller`` owns the student (through ``StudentTap``) and the criterion (``HCDLoss`` or a baseline of
``hcd_fast.distill.methods``); its forward is everything that has gradient, so DDP wraps exactly it.
The teacher lives outside it (``DistillTask.teacher``): frozen, never wrapped, never checkpointed.
"""
from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from hcd_fast.distill.taps import Indices, StudentTap
from hcd_fast.distill.teacher.tap import TeacherTap

# timm.task (TrainingTask) arrived in timm 1.0.2x; older timm gets a plain nn.Module base with the same API.
HAS_TIMM_TASK = importlib.util.find_spec("timm.task") is not None
if HAS_TIMM_TASK:
    from timm.task import TrainingTask as _TaskBase
else:  # pragma: no cover - depends on the installed timm
    class _TaskBase(nn.Module):
        def __init__(self, device=None, dtype=None, verbose=True):
            super().__init__()
            self.device = device if device is not None else torch.device("cpu")
            self.dtype = dtype if dtype is not None else torch.get_default_dtype()
            self.verbose = verbose


class Distiller(nn.Module):
    """Student + distillation criterion; the whole trainable part.

    ``forward(x (B, 3, H, W), target (B,), teacher_feat (B, D_t) | None, teacher_logits (B, K) | None)
    -> (student_logits (B, K), loss 0-d fp32, parts dict of detached 0-d tensors)``.
    Teacher tensors are None only for method "ce".

    Args:
        student: a timm model (wrapped in ``StudentTap``) or a ``StudentTap``.
        criterion: ``HCDLoss`` or a baseline criterion.
        indices: stages to tap when ``student`` is a bare model (timm's forward_intermediates indices).
    """

    def __init__(self, student: nn.Module, criterion: nn.Module, indices: Indices = 4):
        super().__init__()
        self.student = student if isinstance(student, StudentTap) else StudentTap(student, indices)
        self.criterion = criterion

    @property
    def model(self) -> nn.Module:
        """The bare student (what is deployed)."""
        return self.student.model

    def no_weight_decay(self) -> set:
        """The student's own no-weight-decay names (e.g. a ViT's pos_embed), for timm's optimizer factory."""
        fn = getattr(self.student.model, "no_weight_decay", None)
        return {f"student.model.{name}" for name in fn()} if fn is not None else set()

    def forward(self, x: torch.Tensor, target: torch.Tensor, teacher_feat: Optional[torch.Tensor],
                teacher_logits: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        logits, feats = self.student(x)
        loss, parts = self.criterion(feats, logits, teacher_feat, teacher_logits, target, return_parts=True)
        return logits, loss, parts


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


class DistillTask(_TaskBase):
    """Heterogeneous distillation as a timm ``TrainingTask``: ``forward(input, target)`` returns
    ``{"loss", "output" (student logits), <every loss part>}``.

    Args:
        distiller: the trainable ``Distiller`` (``trainable_module``; DDP wraps it).
        teacher: the frozen ``TeacherTap``; None for method "ce" (no teacher forward at all).
    """

    def __init__(self, distiller: Distiller, teacher: Optional[TeacherTap], device=None, dtype=None,
                 verbose: bool = False):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.trainable_module = distiller
        self.teacher = teacher

    def train(self, mode: bool = True) -> "DistillTask":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> "DistillTask":
        """Wrap the Distiller (student + heads) in DDP; the teacher stays unwrapped."""
        self.trainable_module = nn.parallel.DistributedDataParallel(self.trainable_module, device_ids=device_ids,
                                                                    **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, teacher: bool = True,
                teacher_mode: Optional[str] = None, **kwargs) -> nn.Module:
        """Compile the student and (``teacher=True``) teacher forwards in place (state_dict keys unchanged);
        the teacher's with ``teacher_mode`` (e.g. "reduce-overhead": CUDA graphs), unless already compiled."""
        distiller = unwrap(self.trainable_module)
        distiller.student.compile(backend=backend, mode=mode, **kwargs)
        if teacher and self.teacher is not None and not self.teacher.compiled:
            # The teacher forward on its own graph (static shapes: training drops the last batch).
            self.teacher.compile_forward(mode=teacher_mode, backend=backend, **kwargs)
        return distiller.model

    def get_trainable_module(self, ema: bool = False):
        return None if ema else self.trainable_module

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False):
        """The bare student: projectors and CFMs exist only in training."""
        return unwrap(self.trainable_module).model if module is None else module

    def no_sync(self):
        module = self.trainable_module
        return module.no_sync() if hasattr(module, "no_sync") else nullcontext()

    def teacher_outputs(self, input: torch.Tensor, cached_feat: Optional[torch.Tensor] = None):
        """(f_t, z_t): the teacher forward, or with ``cached_feat`` (B, D_t) from the teacher cache the
        classifier alone on it (no teacher forward)."""
        if self.teacher is None:
            return None, None
        if cached_feat is not None:
            feat = cached_feat.float()
            return feat, self.teacher.logits_from_feat(feat)
        return self.teacher(input)

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                cached_feat: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        teacher_feat, teacher_logits = self.teacher_outputs(input, cached_feat)
        logits, loss, parts = self.trainable_module(input, target, teacher_feat, teacher_logits)
        return {"loss": loss, "output": logits, **parts}


# The HCD task under the name timm users look for (the task runs every method; HCD is the default).
HCDTask = DistillTask
