"""PyTorch's bf16 autocast on a CPU with AMX: oneDNN's AMX kernels can give NaN gradients.

The upstream symptom: one forward+backward of a plain timm CNN under ``torch.autocast("cpu", torch.bfloat16)``
gives a non-finite loss or gradient in some trials (about 1 in 5 for a channels_last resnet10t, torch 2.11 and
2.14), and never with oneDNN capped below AMX (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``). The failure is PyTorch's and
oneDNN's, not this project's; ``benchmarks/amx_bf16_nonfinite.py`` counts the trials. oneDNN reads the variable
once, at its first primitive, so it must be in the environment before the process starts any CPU conv/matmul.
"""
from __future__ import annotations

import os
import warnings
from typing import Mapping, Optional

import torch

WORKAROUND = "ONEDNN_MAX_CPU_ISA=AVX512_CORE"
NOTE = (f"this CPU has AMX, and PyTorch's oneDNN bf16 kernels on AMX can give non-finite gradients (a PyTorch/"
        f"oneDNN bug, not hcd_fast's); run with {WORKAROUND} in the environment (set before Python starts), or "
        f"without --amp bf16 on the CPU")


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU advertises AMX bf16 (Linux's ``amx_bf16`` flag); False where that cannot be read."""
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def amx_allowed(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether oneDNN may use AMX: no ISA cap, or a cap that includes AMX (``ALL``, ``DEFAULT``, ``*AMX*``)."""
    env = os.environ if env is None else env
    cap = (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return cap in ("", "ALL", "DEFAULT") or "AMX" in cap


def amx_bf16_risk(device: torch.device, amp_dtype: Optional[torch.dtype], cpuinfo: str = "/proc/cpuinfo",
                  env: Optional[Mapping[str, str]] = None) -> bool:
    """True when a run does bf16 autocast on a CPU whose oneDNN may take the AMX path."""
    return (torch.device(device).type == "cpu" and amp_dtype == torch.bfloat16 and amx_allowed(env)
            and cpu_has_amx(cpuinfo))


_warned = False


def warn_amx_bf16_once() -> None:
    """One warning per process: the upstream failure and its workaround."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"bf16 autocast on the CPU: {NOTE}", RuntimeWarning, stacklevel=2)
