"""Speed switches of the frozen teacher, whose forward is most of an ImageNet distillation step: weights in
bf16 (under bf16 autocast on CUDA by default; fp32 outputs), channels_last (CNN teachers on CUDA), and its
forward compiled on its own graph (CUDA graphs on CUDA; follows ``--compile``). ``resolve_teacher_speed``
turns the auto/on/off switches into a ``TeacherSpeed``; ``apply_teacher_speed`` applies it after probing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from hcd_fast.distill.errors import UserError
from hcd_fast.distill.teacher.tap import TeacherTap

SWITCHES = ("auto", "on", "off")


@dataclass(frozen=True)
class TeacherSpeed:
    weights_bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: Optional[str] = None  # torch.compile mode of the teacher forward

    def describe(self) -> str:
        on = [n for n, v in (("bf16 weights", self.weights_bf16), ("channels_last", self.channels_last),
                             (f"compiled ({self.compile_mode or 'default'})", self.compile)) if v]
        return ", ".join(on) if on else "eager fp32 (as built)"


def is_cnn(model: nn.Module) -> bool:
    """True for convolutional teachers: more than one Conv2d and no attention block (a ViT or Swin has one
    patch-embedding conv and attention modules)."""
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    attention = any("Attention" in type(m).__name__ for m in model.modules())
    return convs > 1 and not attention


def teacher_compile_auto(device: torch.device, compile_all: bool) -> bool:
    """What ``--teacher-compile auto`` means on ``device`` (``compile_all``: ``--compile``)."""
    # The default is decided here. It follows --compile until the GPU step benchmarks (benchmarks/steps.py,
    # hcd_tc vs hcd: "teacher compiled+bf16 vs eager teacher") measure the compiled bf16 teacher; where they show
    # it wins, this becomes `compile_all or device.type == "cuda"`. No GPU row exists yet.
    return compile_all


def _switch(flag: str, value: str, auto: bool) -> bool:
    if value not in SWITCHES:
        raise UserError(f"{flag}: expected one of {SWITCHES}, got {value!r}")
    return auto if value == "auto" else value == "on"


def resolve_teacher_speed(model: nn.Module, device: torch.device, amp: str, bf16: str = "auto",
                          channels_last: str = "auto", compile: str = "auto",
                          compile_all: bool = False) -> TeacherSpeed:
    """The teacher's speed settings from the CLI switches.

    Args:
        model: the bare timm teacher (to tell CNNs from transformers).
        device: the training device.
        amp: the resolved autocast of the run: "bf16", "fp16" or "off".
        bf16, channels_last, compile: "auto", "on" or "off" (``--teacher-bf16``, ``--teacher-channels-last``,
            ``--teacher-compile``).
        compile_all: ``--compile`` (the auto value of ``compile``).
    """
    cuda = device.type == "cuda"
    weights_bf16 = _switch("--teacher-bf16", bf16, cuda and amp == "bf16")
    cl = _switch("--teacher-channels-last", channels_last, cuda and is_cnn(model))
    comp = _switch("--teacher-compile", compile, teacher_compile_auto(device, compile_all))
    return TeacherSpeed(weights_bf16, cl, comp, "reduce-overhead" if (comp and cuda) else None)


def apply_teacher_speed(tap: TeacherTap, speed: TeacherSpeed) -> TeacherTap:
    """Apply ``speed`` to ``tap`` in place (returns it)."""
    if speed.weights_bf16:
        tap.model.to(torch.bfloat16)
        tap.input_dtype = torch.bfloat16
    if speed.channels_last:
        tap.model.to(memory_format=torch.channels_last)
        tap.channels_last = True
    if speed.compile:
        tap.compile_forward(mode=speed.compile_mode)
    return tap
