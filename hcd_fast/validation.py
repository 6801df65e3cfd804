"""Input checks with messages that name the argument and give expected vs actual.

Everything here reads only shapes, dtypes and devices (no device synchronisation), except
``check_target_range``, which reads the target values and is therefore behind ``validate``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, ndim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor, ndim: Optional[int] = None) -> None:
    check_tensor(name, t, ndim)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got dtype {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[Optional[int]], what: str = "") -> None:
    """``expected`` may hold None for a free dimension."""
    ok = t.dim() == len(expected) and all(e is None or e == a for e, a in zip(expected, t.shape))
    if not ok:
        shown = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
        suffix = f" [{what}]" if what else ""
        raise ValueError(f"{name}: expected shape {shown}{suffix}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} (the device of {first_name}), "
                             f"got one on {t.device}")


def check_target(target, batch: int) -> None:
    check_tensor("target", target, 1)
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target: expected integer class indices (torch.int64), got dtype {target.dtype}")
    if target.shape[0] != batch:
        raise ValueError(f"target: expected shape ({batch},) (the batch size of student_logits), "
                         f"got {tuple(target.shape)}")


def check_target_range(target: torch.Tensor, num_classes: int) -> None:
    """Targets in [0, K). Reads the values: synchronises on CUDA, so only behind ``validate``; a device-side
    assertion under torch.compile and during CUDA-graph capture."""
    if target.numel() == 0:
        return
    if torch.compiler.is_compiling() or (target.is_cuda and torch.cuda.is_current_stream_capturing()):
        # Device-side: reading the values would synchronise (and cannot be captured in a CUDA graph).
        torch._assert_async(((target >= 0) & (target < num_classes)).all(),
                            f"target: expected class indices in [0, {num_classes})")
        return
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"target: expected class indices in [0, {num_classes}), got a value {bad}")


def resolve_validate(validate: Optional[bool], device: torch.device) -> bool:
    """validate=None means: on for CPU tensors (the check is free), off for CUDA (it would sync)."""
    if validate is None:
        return device.type == "cpu"
    return bool(validate)


def check_logits_and_target(student_logits, teacher_logits, target) -> tuple:
    """z_s (B, K), z_t (B, K), y (B,) -> (B, K)."""
    check_float("student_logits", student_logits, 2)
    batch, num_classes = student_logits.shape
    check_float("teacher_logits", teacher_logits, 2)
    check_shape("teacher_logits", teacher_logits, (batch, num_classes), "the shape of student_logits")
    check_target(target, batch)
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, target=target)
    return batch, num_classes
