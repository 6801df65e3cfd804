"""Whole distillation steps: hcd-distill's own training step (``hcd_fast.distill.TrainStep``), timed in
configurations.

Every variant builds the trainer's objects (a timm student in ``Distiller`` with the method's criterion from
``hcd_fast.distill.build_criterion``, ``DistillTask`` with a ``TeacherTap``, timm's SGD at hcd-distill's
defaults) and times one ``TrainStep`` call: forward, loss, backward, optimizer step.

- ``ce``: the student alone with CE_ls; ``kd``: plain Hinton KD; ``hcd``: HCD with ``backend="auto"``.
  Fast settings: hcd-distill's defaults on the device (CUDA: bf16 autocast, channels_last student and
  input, the teacher at its speed defaults: bf16 weights, channels_last for CNNs); no host sync.
- ``hcd_tc``: ``hcd`` with the teacher compiled and in bf16 weights (hcd-distill's ``--teacher-compile on
  --teacher-bf16 on``: ``torch.compile`` with CUDA graphs on CUDA); read against ``hcd`` (the eager teacher at
  hcd-distill's defaults) for the "teacher compiled+bf16 vs eager teacher" line, which decides
  ``--teacher-compile``'s default on CUDA (``hcd_fast.distill.teacher.speed.teacher_compile_auto``). In the gpu
  profile only (its compile, tens of seconds, is the first call: outside the timed region, dropped with the
  other compiled rows once the run's time budget is spent).
- ``kd_ref``, ``hcd_ref``: the published-style baseline, a configuration of the same step: reference
  backend, fp16 autocast + GradScaler on CUDA (fp32 on the CPU), the teacher as built (fp32),
  contiguous tensors, ``loss.item()`` every step (``sync_loss``).

On the CPU the fast settings stay fp32 and contiguous by default (hcd-distill's ``--amp auto`` and
``--channels-last auto``): bf16 autocast made a ResNet18 step 7-14x slower on the development machine (an
EPYC with AVX512-BF16, no AMX) and channels_last ~20% slower. ``--step-amp bf16 --step-channels-last on``
restores them. HCD's overhead is read like for like: ``hcd`` against ``kd``, ``hcd_ref`` against ``kd_ref``.

Inputs: 224x224 on CUDA. On CPU 32x32 (CIFAR resolution), with ViT-S at ``patch_size=4`` (an 8x8 token grid)
and Swin-T at ``window_size=4`` (token grids 8, 4, 2, 1; timm shrinks the window to the grid).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn as nn

from hcd_fast import HCDConfig
from hcd_fast.distill import (Distiller, DistillTask, TeacherTap, TrainStep, build_criterion, probe_student,
                              probe_teacher)
from hcd_fast.distill.teacher.speed import apply_teacher_speed, resolve_teacher_speed

VARIANTS = ("ce", "kd", "kd_ref", "hcd_ref", "hcd", "hcd_tc")
COMPILED_VARIANTS = ("hcd_tc",)  # their first call compiles the teacher


def default_variants(profile: str) -> List[str]:
    """Every variant on the GPU; without the compiled-teacher ones on the CPU (a compile there costs minutes)."""
    return [v for v in VARIANTS if profile == "gpu" or v not in COMPILED_VARIANTS]


TEACHERS = {"vit_s": "vit_small_patch16_224", "swin_t": "swin_tiny_patch4_window7_224"}
STUDENT = "resnet18"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass(frozen=True)
class StepConfig:
    """One configuration of hcd-distill's step. ``teacher``: "fast" (hcd-distill's speed defaults for this
    amp), "compiled" (those with bf16 weights and the forward compiled: ``--teacher-bf16 on --teacher-compile
    on``), "published" (as built, fp32) or "cached" (f_t from the teacher cache: no teacher forward)."""
    method: str                 # ce | kd | hcd
    backend: str = "auto"       # of the HCD head
    amp: str = "off"            # bf16 | fp16 (with a GradScaler) | off
    channels_last: bool = False
    sync_loss: bool = False     # loss.item() every step, as published trainers log it
    teacher: str = "fast"

    def precision(self) -> str:
        return (("fp32" if self.amp == "off" else f"{self.amp}-amp") + (" channels_last" if self.channels_last else "")
                + (", teacher bf16 compiled" if self.teacher == "compiled" else ""))


def fast_config(method: str, device: torch.device, amp: str = "auto", channels_last: str = "auto",
                teacher: str = "fast") -> StepConfig:
    """hcd-distill's defaults on ``device``: bf16 + channels_last on CUDA, fp32 + contiguous on the CPU."""
    amp = ("bf16" if device.type == "cuda" else "off") if amp == "auto" else {"none": "off"}.get(amp, amp)
    cl = device.type == "cuda" if channels_last == "auto" else channels_last == "on"
    return StepConfig(method, "auto", amp, cl, False, teacher)


def published_config(method: str, device: torch.device) -> StepConfig:
    return StepConfig(method, "reference", "fp16" if device.type == "cuda" else "off", False, True, "published")


def variant_config(variant: str, device: torch.device, amp: str = "auto", channels_last: str = "auto") -> StepConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown step variant {variant!r}; expected one of {VARIANTS}")
    if variant.endswith("_ref"):
        return published_config(variant[:-4], device)
    if variant.endswith("_tc"):
        return fast_config(variant[:-3], device, amp, channels_last, teacher="compiled")
    return fast_config(variant, device, amp, channels_last)


def variant_precision(variant: str, device: torch.device, amp: str = "auto", channels_last: str = "auto") -> str:
    return variant_config(variant, device, amp, channels_last).precision()


class StepModels:
    """A student, a teacher and a static batch, shared by the configurations: each gets a fresh copy of the
    same initial student and criterion, its own optimizer, and the teacher tap its config names.

    ``x`` (B, 3, H, W), ``y`` (B,) and ``cached_feat`` (B, D_t) are the static batch every step reads; a
    caller may copy loaded batches into them."""

    def __init__(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 device: torch.device, seed: int = 0):
        self.device = device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as training scripts do; the warm-up steps absorb the search
        self.student0 = student.to(device).train()
        self.teacher_model = teacher.to(device).eval()
        self.x, self.y = x.to(device), y.to(device)
        input_size = tuple(x.shape[1:])
        self.channels, self.num_classes = probe_student(self.student0, 4, input_size)
        self.taps: Dict[str, TeacherTap] = {"published": TeacherTap(self.teacher_model)}
        self.teacher_dim, _ = probe_teacher(self.taps["published"], input_size)
        g = torch.Generator().manual_seed(seed)
        self.cached_feat = torch.randn(x.shape[0], self.teacher_dim, generator=g).to(device)
        self.criteria0: Dict[str, nn.Module] = {}

    def teacher_tap(self, kind: str, amp: str) -> TeacherTap:
        """"published": the teacher as built; "fast": a copy at hcd-distill's speed defaults for ``amp``;
        "compiled": a copy with bf16 weights and its forward compiled (``--teacher-bf16 on --teacher-compile on``)."""
        if kind == "published":
            return self.taps["published"]
        forced = {"bf16": "on", "compile": "on"} if kind == "compiled" else {}
        speed = resolve_teacher_speed(self.teacher_model, self.device, amp, **forced)
        key = f"fast/{speed}"
        if key not in self.taps:
            tap = TeacherTap(copy.deepcopy(self.teacher_model))
            probe_teacher(tap, tuple(self.x.shape[1:]))  # in fp32, before the speed settings (as hcd-distill)
            self.taps[key] = apply_teacher_speed(tap, speed)
        return self.taps[key]

    def criterion(self, method: str, backend: str) -> nn.Module:
        """The method's criterion with the same initial parameters whatever the backend."""
        crit = build_criterion(method, self.channels, self.teacher_dim, self.num_classes, HCDConfig(), backend=backend)
        crit = crit.to(self.device)
        if method not in self.criteria0:
            self.criteria0[method] = copy.deepcopy(crit)
        crit.load_state_dict(self.criteria0[method].state_dict())
        return crit

    def train_step(self, config: StepConfig) -> TrainStep:
        """hcd-distill's step, built for ``config`` (fresh student copy, criterion and optimizer)."""
        import timm.optim
        distiller = Distiller(copy.deepcopy(self.student0), self.criterion(config.method, config.backend), 4)
        if config.channels_last:
            distiller = distiller.to(memory_format=torch.channels_last)
        teacher = None if config.method == "ce" else self.teacher_tap(
            config.teacher if config.teacher in ("published", "compiled") else "fast", config.amp)
        task = DistillTask(distiller, teacher, device=self.device).train()
        opt = timm.optim.create_optimizer_v2(distiller, opt="sgd", lr=0.05, weight_decay=2e-3, momentum=0.9)
        scaler = torch.amp.GradScaler(self.device.type) if config.amp == "fp16" else None
        return TrainStep(task, opt, device=self.device, amp_dtype=AMP_DTYPES[config.amp], scaler=scaler,
                         channels_last=config.channels_last, sync_loss=config.sync_loss)

    def fn(self, config: StepConfig) -> Callable[[], object]:
        """One step on the static batch (with the cached f_t when ``config.teacher == "cached"``)."""
        step = self.train_step(config)
        feat = self.cached_feat if config.teacher == "cached" else None
        return lambda: step(self.x, self.y, feat)


@dataclass
class StepCase:
    teacher: str          # vit_s | swin_t
    batch: int
    img: int
    num_classes: int = 100
    group: str = "steps"

    @property
    def id(self) -> str:
        return f"step/{self.teacher}->resnet18"

    @property
    def shape(self) -> Dict[str, int]:
        return {"B": self.batch, "img": self.img, "K": self.num_classes}

    def shape_str(self) -> str:
        return f"B={self.batch} img={self.img} K={self.num_classes}"


def profile_step_cases(profile: str) -> List[StepCase]:
    if profile == "gpu":
        return [StepCase("swin_t", 128, 224), StepCase("vit_s", 128, 224)]
    if profile == "cpu":
        return [StepCase("vit_s", 16, 32), StepCase("swin_t", 16, 32)]
    if profile == "quick":
        return [StepCase("vit_s", 2, 32)]
    raise ValueError(profile)


def _teacher_kwargs(teacher: str, img: int) -> dict:
    if img == 224:
        return {}
    if teacher == "vit_s":
        return {"img_size": img, "patch_size": 4}
    return {"img_size": img, "window_size": 4}


class StepBench(StepModels):
    """The timm ResNet18 student and the case's teacher (random weights), seeded; ``fn(variant)``."""

    def __init__(self, case: StepCase, device: torch.device, seed: int = 0, amp: str = "auto",
                 channels_last: str = "auto"):
        import timm
        self.case, self.amp, self.channels_last = case, amp, channels_last
        torch.manual_seed(seed)
        student = timm.create_model(STUDENT, num_classes=case.num_classes)
        teacher = timm.create_model(TEACHERS[case.teacher], num_classes=case.num_classes,
                                    **_teacher_kwargs(case.teacher, case.img))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(case.batch, 3, case.img, case.img, generator=g)
        y = torch.randint(0, case.num_classes, (case.batch,), generator=g)
        super().__init__(student, teacher, x, y, device, seed)

    def fn(self, variant) -> Callable[[], object]:
        config = variant if isinstance(variant, StepConfig) else variant_config(
            variant, self.device, self.amp, self.channels_last)
        return super().fn(config)


__all__ = ["VARIANTS", "COMPILED_VARIANTS", "default_variants",
           "StepConfig", "StepModels", "StepBench", "StepCase", "fast_config",
           "published_config", "variant_config", "variant_precision", "profile_step_cases"]
