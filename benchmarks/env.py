"""Where a result was measured: device, versions, git commit, load average (recorded in every result row)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Dict, Optional

import torch

import hcd_fast

SCHEMA_VERSION = 1
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_device(ap, value: str) -> torch.device:
    """--device auto|cpu|cuda -> torch.device (auto: cuda if available); ap.error (exit 2) for cuda without one."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if value == "auto" else value)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    return device


def git_commit() -> Dict[str, object]:
    """$HCD_GIT_COMMIT when set (the caller knows the tree: a copy on a GPU machine may carry a stale .git),
    else HEAD of the repository, and whether the code under test differs from it (None when unknown)."""
    env = os.environ.get("HCD_GIT_COMMIT", "").strip()
    if env:
        return {"git_commit": env, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no", "--",
                                "hcd_fast", "kernels", "csrc", "benchmarks/*.py"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except Exception:
        commit, dirty = "", None
    return {"git_commit": commit or "unknown", "git_dirty": dirty if commit else None}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    """Folder name for results: cpu, h100, h200, a100, ... (the GPU's model)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    for model in ("h200", "h100", "a100", "l40s", "l4", "a10g", "v100", "t4", "b200", "gh200"):
        if model in name:
            return model
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "cuda"


def environment(device: torch.device) -> Dict[str, object]:
    """What every result row records about where it was measured."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "hcd_fast": hcd_fast.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "host": platform.node(),
    }
    env.update(git_commit())
    return env


def loadavg() -> Optional[float]:
    """1-minute load average: on a shared CPU machine, other work competing for the cores skews times."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def results_dir(device: torch.device, *sub: str) -> str:
    """benchmarks/results/<device tag>/<sub...>: where a run writes by default."""
    return os.path.join(REPO_ROOT, "benchmarks", "results", device_tag(device), *sub)
