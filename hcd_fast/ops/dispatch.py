"""Backend dispatch: one place that maps (backend, device) to an op table.

Each backend is a module exposing the ops under their SPEC names (``sub_logit_loss``,
``bn_relu_pool``, ``pool_linear``, ``cfm``) with the signatures of ``hcd_fast.reference``, and a
``status() -> (available: bool, reason: str)`` function. A backend whose module fails to import (a
missing compiled extension, no triton) is reported as unavailable with the import error as its reason;
import of ``hcd_fast`` never fails because of it.

``backend="auto"`` picks cuda > triton > reference for CUDA tensors (triton > cuda for sub_logit_loss; see
``_AUTO_OP_ORDER`` for what that order rests on) and cpu > reference for CPU tensors.
The environment variable ``HCD_FAST_BACKEND`` (read once, at import) replaces "auto" by a fixed choice.
``op_table(backend, device)`` resolves once per (backend, device type) and caches the table.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")
OPS = ("sub_logit_loss", "bn_relu_pool", "pool_linear", "cfm", "projector_dwconv", "projector_pwconv")

_MODULES = {
    "reference": "hcd_fast.reference",
    "triton": "hcd_fast.ops.triton_ops",
    "cuda": "hcd_fast.ops.cpp_ops",
    "cpu": "hcd_fast.ops.cpp_ops",
}

# Preference order of backend="auto" per device type, and per op where one backend measured faster on the GPU.
# bn_relu_pool and pool_linear were faster in CUDA (0.28 vs 0.97 ms, 0.62 vs 1.16 ms at the ImageNet shape,
# fp32; benchmarks/results/h100/results.json), cfm mixed (CUDA faster in fp32).
# sub_logit_loss: UNMEASURED for the kernels in the tree. Triton first is kept from the run above, where the
# Triton kernels of that time took 1.27 / 2.49 ms against the CUDA kernels' 1.68 / 3.25 ms at B = 4096 / 8192
# (fp32, fwd+bwd); both backends' sub_logit_loss kernels have been rewritten since (statistics forward and
# recomputing backward, then the one-pass forward), and neither rewrite has run on a GPU. The order is to be
# re-derived from the sub_logit_loss rows of the next GPU run's results file (benchmarks/gpu_check.sh writes
# it; commit it under benchmarks/results/<device>/ and cite it here).
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_AUTO_OP_ORDER = {("cuda", "sub_logit_loss"): ("triton", "cuda", "reference")}

# Backends without projector kernels of their own that run another backend's fused projector ops where that one
# is available for the device: cuda takes the Triton projector_dwconv / projector_pwconv (kernels/projector.py)
# when triton imports, else its grouped nn modules (cuDNN). The Triton projector kernels compile for sm_90 without
# spills but are UNVERIFIED on a GPU (only run through the interpreter on CPU tensors).
PROJECTOR_FROM = {"cuda": "triton"}
_PROJECTOR_OPS = ("projector_dwconv", "projector_pwconv")

ENV_VAR = "HCD_FAST_BACKEND"
_ENV_BACKEND = os.environ.get(ENV_VAR, "").strip().lower() or None


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str
    devices: tuple

    def __str__(self) -> str:
        state = "available" if self.available else "not available"
        return f"{self.name:<10} {state:<14} {self.reason}"


_STATUS: Dict[str, BackendStatus] = {}
_IMPL: Dict[str, object] = {}


def _load(name: str) -> BackendStatus:
    """Import a backend module once and cache its status."""
    if name in _STATUS:
        return _STATUS[name]
    devices: tuple = ()
    try:
        module = importlib.import_module(_MODULES[name])
        if name == "reference":
            available, reason = True, "eager PyTorch, any device"
            devices = ("cpu", "cuda", "mps", "xpu", "meta")
        else:
            available, reason = module.status(name)
            note = getattr(module, "PROJECTOR_NOTE", None)
            donor = PROJECTOR_FROM.get(name)
            if available and donor is not None and _load(donor).available:
                note = (f"projector blocks: the {donor} backend's fused kernels (projector_dwconv, projector_pwconv; "
                        f"unverified on a GPU)")
            if available and note:
                reason = f"{reason}; {note}"
            devices = module.devices(name) if available else ()
        if available:
            _IMPL[name] = module
    except Exception as exc:  # a broken optional backend must never break import
        available, reason = False, f"import failed: {type(exc).__name__}: {exc}"
    _STATUS[name] = BackendStatus(name, available, reason, devices)
    return _STATUS[name]


def backends() -> Dict[str, BackendStatus]:
    """Every backend with whether it is available here and, if not, why."""
    return {name: _load(name) for name in BACKENDS}


def fused_projector_backends() -> Dict[str, str]:
    """Every available backend whose SepConv projector blocks run as fused kernels, with the backend whose kernels
    they are (itself, or its PROJECTOR_FROM donor)."""
    out = {}
    for name in BACKENDS:
        if not _load(name).available or name == "reference":
            continue
        donor = PROJECTOR_FROM.get(name)
        source = donor if donor is not None and _load(donor).available else name
        if getattr(_IMPL.get(source), "FUSED_PROJECTOR", False):
            out[name] = source
    return out


def check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {backend!r}")


def resolve(backend: str, device: torch.device, op: Optional[str] = None) -> str:
    """The concrete backend for ``backend`` (possibly "auto") and tensors on ``device`` (for ``op``, whose
    "auto" preference may differ from the device's default)."""
    if backend == "auto" and _ENV_BACKEND is not None and _ENV_BACKEND != "auto":
        backend = _ENV_BACKEND
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}: expected 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = _AUTO_OP_ORDER.get((device.type, op)) or _AUTO_ORDER.get(device.type, ("reference",))
        for name in order:
            status = _load(name)
            if status.available and device.type in status.devices:
                return name
        return "reference"
    check_backend_name(backend)
    status = _load(backend)
    if not status.available:
        raise RuntimeError(f"backend {backend!r} is not available: {status.reason}")
    if device.type not in status.devices:
        raise ValueError(f"backend {backend!r} runs on {'/'.join(status.devices)} tensors, "
                         f"got tensors on {device}")
    return backend


class OpTable(NamedTuple):
    """The ops of one resolved backend (signatures of ``hcd_fast.reference``); ``fused_projector``: whether the
    projector ops are fused kernels (the SepConv blocks then run through them instead of their modules)."""
    backend: str
    sub_logit_loss: Callable
    bn_relu_pool: Callable
    pool_linear: Callable
    cfm: Callable
    projector_dwconv: Callable
    projector_pwconv: Callable
    fused_projector: bool = False


_TABLES: Dict[Tuple[str, str], OpTable] = {}


def op_table(backend: str, device: torch.device) -> OpTable:
    """The op table of ``backend`` ("auto" allowed) for tensors on ``device``; resolved once per device type."""
    key = (backend, device.type)
    table = _TABLES.get(key)
    if table is None:
        names = [resolve(backend, device, op) for op in OPS]
        label = names[0] if len(set(names)) == 1 else "auto(" + ", ".join(
            f"{op}={n}" for op, n in zip(OPS, names)) + ")"
        for i, op in enumerate(OPS):  # a backend without projector kernels borrows a donor's (PROJECTOR_FROM)
            donor = PROJECTOR_FROM.get(names[i]) if op in _PROJECTOR_OPS else None
            if donor is not None and _load(donor).available and device.type in _load(donor).devices:
                names[i] = donor
        fused = bool(getattr(_IMPL[names[OPS.index("projector_pwconv")]], "FUSED_PROJECTOR", False))
        table = OpTable(label, *(getattr(_IMPL[n], op) for op, n in zip(OPS, names)), fused)
        _TABLES[key] = table
    return table


def get_op(op: str, backend: str, device: torch.device):
    """The implementation of ``op`` for ``backend`` ("auto" allowed) and tensors on ``device``."""
    return getattr(op_table(backend, device), op)
