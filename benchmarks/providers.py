"""The providers a case is timed with, and which of them can run on a device.

- ``eager``: the reference through the public API (``backend="reference"``).
- ``compile``: ``torch.compile`` of the reference (default mode).
- ``compile-ro``: ``torch.compile(mode="reduce-overhead")`` of the reference head (CUDA graphs; head only).
- ``cpu``, ``cuda``, ``triton``: each fused backend of ``hcd_fast.backends()`` available on the device.
- ``<backend>+compile``: ``torch.compile`` over ``HCDLoss`` with that backend inside (head only).
- ``<backend>+graph``: the head's forward + backward captured in one CUDA graph (head only, CUDA only).

The best stock baseline of the head is the faster of ``compile`` and ``compile-ro``.
"""
from __future__ import annotations

from typing import List, Optional

import torch

import hcd_fast

BASE_PROVIDERS = ("eager", "compile")
STOCK = ("compile", "compile-ro")  # what PyTorch gives without hcd_fast: the baselines targets are read against
FUSED_BACKENDS = ("cpu", "cuda", "triton")
HEAD_SUFFIXES = ("+compile", "+graph")


def fused_providers(device: torch.device) -> List[str]:
    """The fused backends hcd_fast reports available for ``device``. Triton on CPU tensors runs only in
    the interpreter (orders of magnitude too slow to time), so it is left out there."""
    out = []
    for name, status in hcd_fast.backends().items():
        if name == "reference" or not status.available or device.type not in status.devices:
            continue
        if name == "triton" and device.type != "cuda":
            continue
        out.append(name)
    return out


def split(provider: str):
    """(backend or base name, suffix): "cuda+graph" -> ("cuda", "+graph"), "eager" -> ("eager", "")."""
    for suffix in HEAD_SUFFIXES:
        if provider.endswith(suffix):
            return provider[: -len(suffix)], suffix
    return provider, ""


def is_head_only(provider: str) -> bool:
    return provider == "compile-ro" or split(provider)[1] != ""


def is_fused(provider: str) -> bool:
    return split(provider)[0] in FUSED_BACKENDS


def is_compiled(provider: str) -> bool:
    """Providers whose first call compiles (dropped first when a run's time budget is spent)."""
    return provider in STOCK or provider.endswith("+compile")


def select_providers(requested: Optional[str], device: torch.device) -> List[str]:
    """Providers to run: ``requested`` is a comma list of eager, compile, compile-ro, fused (every available
    fused backend), fused+compile, fused+graph, or a backend name with or without a suffix; None means all."""
    fused = fused_providers(device)
    if not requested:
        requested = "eager,compile,compile-ro,fused,fused+compile,fused+graph"
    out: List[str] = []
    for p in (x.strip() for x in requested.split(",") if x.strip()):
        base, suffix = split(p)
        names = [b + suffix for b in fused] if base == "fused" else [p]
        for name in names:
            b, _ = split(name)
            if name not in BASE_PROVIDERS + ("compile-ro",) and b not in FUSED_BACKENDS:
                raise ValueError(f"--providers: unknown provider {name!r}; expected eager, compile, compile-ro, "
                                 f"fused, or one of {FUSED_BACKENDS} optionally with {' or '.join(HEAD_SUFFIXES)}")
            if name not in out:
                out.append(name)
    return out


def unavailable_reason(provider: str, device: torch.device) -> Optional[str]:
    """Why ``provider`` cannot run on ``device`` (None when it can)."""
    base, suffix = split(provider)
    if provider == "compile-ro" and device.type != "cuda":
        return "reduce-overhead adds CUDA graphs to compile; on the CPU it is the compile row"
    if suffix == "+graph" and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if base in BASE_PROVIDERS or provider == "compile-ro" or base in fused_providers(device):
        return None
    status = hcd_fast.backends()[base]
    if not status.available:
        return f"backend not available: {status.reason}"
    if base == "triton" and device.type != "cuda":
        return "triton on CPU tensors only runs in the interpreter (too slow to time)"
    return f"backend runs on {status.devices}, not {device.type}"
