"""Shared pieces of the benchmarks: environment record, providers, timers, copy bandwidth.

Timing method (SPEC section 7):
- CPU: ``time.perf_counter`` around each call (every call ends in a backward, so the work is done when
  it returns); warm-up calls excluded; median, quartiles and min over the repetitions.
- CUDA: one pair of CUDA events per repetition, a 256 MiB buffer zeroed before each one so the L2 cache
  is cold (as ``triton.testing.do_bench`` does), a single synchronisation after all repetitions.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import hcd_fast

SCHEMA_VERSION = 1
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Providers: "eager" is the reference through the public API, "compile" is torch.compile of the
# reference, every other name is a fused backend of hcd_fast.backends().
BASE_PROVIDERS = ("eager", "compile")
FUSED_BACKENDS = ("cpu", "cuda", "triton")


def parse_device(ap, value: str) -> torch.device:
    """--device auto|cpu|cuda -> torch.device (auto: cuda if available); ap.error (exit 2) for cuda without one."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if value == "auto" else value)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    return device


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


def select_providers(requested: Optional[str], device: torch.device) -> List[str]:
    """Providers to run: ``requested`` is a comma list of eager, compile, fused (every available fused
    backend) or a backend name; None means all of them."""
    fused = fused_providers(device)
    if not requested:
        return list(BASE_PROVIDERS) + fused
    out: List[str] = []
    for p in (x.strip() for x in requested.split(",") if x.strip()):
        names = fused if p == "fused" else [p]
        for name in names:
            if name not in BASE_PROVIDERS + FUSED_BACKENDS:
                raise ValueError(f"--providers: unknown provider {name!r}; expected eager, compile, fused "
                                 f"or one of {FUSED_BACKENDS}")
            if name not in out:
                out.append(name)
    return out


def provider_unavailable_reason(provider: str, device: torch.device) -> Optional[str]:
    """Why a requested fused provider cannot run here (None when it can)."""
    if provider in BASE_PROVIDERS or provider in fused_providers(device):
        return None
    status = hcd_fast.backends()[provider]
    if not status.available:
        return f"backend not available: {status.reason}"
    if provider == "triton" and device.type != "cuda":
        return "triton on CPU tensors only runs in the interpreter (too slow to time)"
    return f"backend runs on {status.devices}, not {device.type}"


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Policy:
    """How long to time: warm-up calls, then repetitions until ``target_s`` of measured time has passed,
    within [min_reps, max_reps]."""
    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 30
    target_s: float = 1.0
    flush_l2: bool = True


def summarize(times_ms: List[float]) -> Dict[str, float]:
    s = sorted(times_ms)
    if len(s) >= 2:
        q = statistics.quantiles(s, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = s[0]
    return {"median_ms": statistics.median(s), "p25_ms": p25, "p75_ms": p75, "iqr_ms": p75 - p25,
            "min_ms": s[0], "reps": len(s)}


_FLUSH: Dict[torch.device, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    return _FLUSH[device]


def measure(fn: Callable[[], object], device: torch.device, policy: Policy) -> Dict[str, float]:
    """Time ``fn`` (warm-up excluded) and return the summary of :func:`summarize`."""
    for _ in range(policy.warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        times: List[float] = []
        start = time.perf_counter()
        while len(times) < policy.max_reps and (len(times) < policy.min_reps
                                                 or time.perf_counter() - start < policy.target_s):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return summarize(times)
    # CUDA: estimate one call, pick the repetition count, then event-time each call.
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    synchronize(device)
    est = max((time.perf_counter() - t0) / 3, 1e-6)
    reps = int(min(policy.max_reps, max(policy.min_reps, policy.target_s / est)))
    cache = _l2_flush_buffer(device) if policy.flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if cache is not None:
            cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    synchronize(device)
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def measure_group(fns: Dict[str, Callable[[], object]], device: torch.device, policy: Policy
                  ) -> Dict[str, object]:
    """Time several providers of one case. On the CPU their repetitions are interleaved round-robin, so a
    change in the load from other processes during the case hits every provider alike and the ratios stay
    comparable; on CUDA (a device of its own) each is timed by :func:`measure` in turn. Returns
    {name: summary dict, or the exception it raised}."""
    out: Dict[str, object] = {}
    if device.type == "cuda":
        for name, fn in fns.items():
            try:
                out[name] = measure(fn, device, policy)
            except Exception as exc:  # noqa: PERF203
                out[name] = exc
        return out
    live = dict(fns)
    for name, fn in list(live.items()):
        try:
            for _ in range(policy.warmup):
                fn()
        except Exception as exc:
            out[name] = exc
            del live[name]
    times: Dict[str, List[float]] = {name: [] for name in live}
    start = time.perf_counter()
    rounds = 0
    while live and rounds < policy.max_reps and (rounds < policy.min_reps
                                                  or time.perf_counter() - start < policy.target_s * len(fns)):
        order = list(live)
        order = order[rounds % len(order):] + order[:rounds % len(order)]  # rotate who goes first
        for name in order:
            try:
                t0 = time.perf_counter()
                live[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:
                out[name] = exc
                del live[name]
        rounds += 1
    for name in live:
        out[name] = summarize(times[name])
    return out


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes allocated at the peak of one call beyond what was allocated before it (CUDA); None on CPU,
    where the caching allocators of torch and oneDNN leave no honest per-call number."""
    if device.type != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, policy: Optional[Policy] = None
                   ) -> Dict[str, float]:
    """Device-to-device copy bandwidth, GB/s counting the read and the write: the ceiling a memory-bound
    kernel is compared with. 1 GiB on CUDA (far beyond L2), 256 MiB on CPU."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    policy = policy or Policy(warmup=2, min_reps=5, max_reps=50, target_s=0.5, flush_l2=False)
    stats = measure(lambda: dst.copy_(src), device, policy)
    del src, dst
    return {"bytes": 2 * nbytes, "median_ms": stats["median_ms"],
            "gbps": 2 * nbytes / (stats["median_ms"] * 1e-3) / 1e9}
