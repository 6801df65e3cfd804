"""Whole distillation steps with timm models: one optimizer step of a ResNet18 student per variant.

Variants (one optimizer step each; SGD momentum 0.9, lr 0.05, wd 2e-3 over student + HCD head):

- ``ce``: the student alone with CE_ls. Fast settings (below).
- ``kd``: plain Hinton KD (CE_ls + T^2 KL). Fast settings.
- ``kd_ref``: plain KD as the published code runs it: fp32 on CPU / fp16 autocast + GradScaler on CUDA,
  the teacher under ``torch.no_grad``, contiguous tensors, ``loss.item()`` every step (a host sync).
- ``hcd_ref``: HCD as the published code runs it: ``HCDLoss(backend="reference")`` in those settings.
- ``hcd``: HCD with hcd_fast: ``HCDLoss(backend="auto")`` (the best fused backend available), in the fast
  settings.

Fast settings: on CUDA bf16 autocast and channels_last student and input; the teacher in
``torch.inference_mode``; no host sync. On the CPU the fast settings stay fp32 and contiguous by default:
there bf16 autocast made a ResNet18 step 7-14x slower on the development machine (an EPYC with AVX512-BF16,
no AMX; 60 ms fp32 vs 440-870 ms bf16 for B=16 at 32x32) and channels_last ~20% slower, so they would
measure oneDNN's bf16 path, not HCD. ``--step-amp bf16 --step-channels-last on`` restores them.
HCD's overhead is read like for like: ``hcd`` against ``kd`` and ``hcd_ref`` against ``kd_ref``.

Taps: the student's four stage maps and final features come from one ``forward_intermediates`` call and the
logits from ``forward_head``; the teacher feature is ``forward_head(forward_features(x), pre_logits=True)``.
Inputs: 224x224 on CUDA. On CPU 32x32 (CIFAR resolution), with ViT-S at ``patch_size=4`` (an 8x8 token grid;
patch 16 would leave 2x2 tokens) and Swin-T at ``window_size=4`` (token grids 8, 4, 2, 1: the window divides
the first two and timm shrinks it to the grid on the last two).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from hcd_fast import HCDConfig, HCDLoss

VARIANTS = ("ce", "kd", "kd_ref", "hcd_ref", "hcd")
TEACHERS = {"vit_s": "vit_small_patch16_224", "swin_t": "swin_tiny_patch4_window7_224"}
STUDENT = "resnet18"


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


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def fast_settings(device: torch.device, amp: str = "auto", channels_last: str = "auto"):
    """(autocast dtype or None, channels_last) of the fast variants: bf16 + channels_last on CUDA, fp32 +
    contiguous on the CPU unless asked otherwise (see the module docstring)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if channels_last == "auto":
        channels_last = "on" if device.type == "cuda" else "off"
    return AMP_DTYPES[amp], channels_last == "on"


def variant_precision(variant: str, device: torch.device, amp: str = "auto", channels_last: str = "auto") -> str:
    if variant.endswith("_ref"):
        return "fp16-amp" if device.type == "cuda" else "fp32"
    dtype, cl = fast_settings(device, amp, channels_last)
    name = {torch.bfloat16: "bf16-amp", torch.float16: "fp16-amp", None: "fp32"}[dtype]
    return name + (" channels_last" if cl else "")


def _teacher_kwargs(teacher: str, img: int) -> dict:
    if img == 224:
        return {}
    if teacher == "vit_s":
        return {"img_size": img, "patch_size": 4}
    return {"img_size": img, "window_size": 4}


class StepBench:
    """Models of one teacher/student pair, shared by the variants (each variant gets a fresh copy of the
    same initial student and head, and its own optimizer)."""

    def __init__(self, case: StepCase, device: torch.device, seed: int = 0, amp: str = "auto",
                 channels_last: str = "auto"):
        import timm
        self.case, self.device = case, device
        self.amp_dtype, self.channels_last = fast_settings(device, amp, channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as training scripts do; the warm-up steps absorb the search
        torch.manual_seed(seed)
        self.student0 = timm.create_model(STUDENT, num_classes=case.num_classes).to(device)
        self.teacher = timm.create_model(TEACHERS[case.teacher], num_classes=case.num_classes,
                                         **_teacher_kwargs(case.teacher, case.img)).to(device).eval()
        self.teacher.requires_grad_(False)
        self.channels = tuple(self.student0.feature_info[i]["num_chs"] for i in range(1, 5))
        self.head0 = HCDLoss(self.channels, self.teacher.num_features, case.num_classes, config=HCDConfig(),
                             backend="reference", validate=False).to(device)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(case.batch, 3, case.img, case.img, generator=g).to(device)
        self.y = torch.randint(0, case.num_classes, (case.batch,), generator=g).to(device)

    def fn(self, variant: str) -> Callable[[], None]:
        dev = self.device
        fast = not variant.endswith("_ref")
        student = copy.deepcopy(self.student0).train()
        x = self.x
        cl = fast and self.channels_last
        if cl:
            student = student.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        head = None
        if variant.startswith("hcd"):
            head = HCDLoss(self.channels, self.teacher.num_features, self.case.num_classes, config=HCDConfig(),
                           backend="auto" if fast else "reference", validate=False).to(dev).train()
            head.load_state_dict(self.head0.state_dict())
            if cl:
                head = head.to(memory_format=torch.channels_last)
        params = list(student.parameters()) + (list(head.parameters()) if head is not None else [])
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=2e-3)
        use_teacher = variant != "ce"
        teacher, y, T = self.teacher, self.y, 1.0
        if fast:
            amp_dtype = self.amp_dtype
            amp = ((lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype is not None  # noqa: E731
                   else contextlib.nullcontext)
            teacher_ctx = torch.inference_mode
            scaler = None
        elif dev.type == "cuda":
            amp = lambda: torch.autocast("cuda", dtype=torch.float16)  # noqa: E731
            teacher_ctx = torch.no_grad
            scaler = torch.amp.GradScaler("cuda")
        else:
            amp, teacher_ctx, scaler = contextlib.nullcontext, torch.no_grad, None

        def step():
            opt.zero_grad(set_to_none=True)
            with amp():
                if use_teacher:
                    with teacher_ctx():
                        t = teacher.forward_features(x)
                        ft = teacher.forward_head(t, pre_logits=True)
                        zt = teacher.forward_head(t)
                    if fast:  # inference tensors cannot be saved for backward: leave inference mode
                        ft, zt = ft.clone(), zt.clone()
                if head is not None:
                    final, feats = student.forward_intermediates(x, indices=4, intermediates_only=False)
                    zs = student.forward_head(final)
                else:
                    zs = student(x)
                loss = F.cross_entropy(zs.float(), y, label_smoothing=0.1)
                if variant.startswith("kd"):
                    log_q = F.log_softmax(zs.float() / T, dim=-1)
                    log_p = F.log_softmax(zt.float() / T, dim=-1)
                    loss = loss + T * T * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
                elif head is not None:
                    loss = head(list(feats), zs, ft, zt, y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            if not fast:
                loss.item()  # the published code logs the loss every step: a host sync
        return step
