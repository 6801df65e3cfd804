"""The one timing engine of the benchmarks: ``triton.testing.do_bench`` on CUDA, ``torch.utils.benchmark`` on
the CPU, plus the one thing they lack, interleaving on a shared CPU.

- CUDA: ``do_bench`` times each call with CUDA events, flushing the L2 cache (a 256 MiB buffer zeroed)
  before each, after a warm-up measured in milliseconds. The per-call times are summarised here.
- CPU: ``torch.utils.benchmark``'s clock and ``Measurement`` statistics, with the providers of a case called
  one repetition at a time in round-robin: on a machine shared with other processes a change of load during
  a case then hits every provider alike, and ratios measured within a case stay comparable.
"""
from __future__ import annotations

import statistics
import time
import timeit
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch.utils import benchmark as tub
from torch.utils.benchmark.utils.common import TaskSpec


@dataclass
class Policy:
    """How long to time. CPU: ``warmup`` calls, then rounds until ``target_s`` per provider has passed,
    within [min_reps, max_reps]. CUDA: ``do_bench(warmup=warmup_ms, rep=rep_ms)``."""
    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 30
    target_s: float = 1.0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times_ms: List[float]) -> Dict[str, float]:
    """Median, quartiles (linear interpolation, as torch.quantile), IQR, minimum and count of times in ms."""
    s = sorted(times_ms)
    if len(s) >= 2:
        q = statistics.quantiles(s, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = s[0]
    return {"median_ms": statistics.median(s), "p25_ms": p25, "p75_ms": p75, "iqr_ms": p75 - p25,
            "min_ms": s[0], "reps": len(s)}


def cuda_times(fn: Callable[[], object], policy: Policy) -> List[float]:
    """Per-call times (ms) of ``fn`` from ``triton.testing.do_bench`` (L2 flushed before each call)."""
    from triton.testing import do_bench
    try:
        times = do_bench(fn, warmup=policy.warmup_ms, rep=policy.rep_ms, return_mode="all")
    except (AssertionError, TypeError):  # a triton without return_mode="all": its quartiles, count unknown
        q = do_bench(fn, warmup=policy.warmup_ms, rep=policy.rep_ms, quantiles=[0.0, 0.25, 0.5, 0.75])
        return list(q)
    return [float(t) for t in times]


def time_cuda(fn: Callable[[], object], policy: Policy) -> Dict[str, float]:
    return summarize(cuda_times(fn, policy))


def time_cpu_interleaved(fns: Dict[str, Callable[[], object]], policy: Policy,
                         clock: Callable[[], float] = timeit.default_timer) -> Dict[str, object]:
    """Time CPU providers together, one call each per round, rotating who goes first. ``clock`` is the
    Timer's (``timeit.default_timer``; e.g. ``time.process_time`` for CPU time). Returns {name: summary, or
    the exception it raised}; ``summary["round_ms"]`` keeps the per-round times (round i of one provider
    pairs with round i of another).

    ``Timer.timeit(1)`` runs two warm-up calls before every timed call (tripling a step's cost), so a round
    times one call with the clock, and ``torch.utils.benchmark.Measurement`` gives the statistics."""
    out: Dict[str, object] = {}
    live = dict(fns)
    for name in list(live):
        try:
            for _ in range(policy.warmup):
                live[name]()
        except Exception as exc:  # one failing provider must not end the case
            out[name] = exc
            del live[name]
    raw: Dict[str, List[float]] = {name: [] for name in live}
    start, rounds = time.perf_counter(), 0
    while live and rounds < policy.max_reps and (
            rounds < policy.min_reps or time.perf_counter() - start < policy.target_s * len(fns)):
        order = list(live)
        for name in order[rounds % len(order):] + order[:rounds % len(order)]:
            try:
                t0 = clock()
                live[name]()
                raw[name].append(clock() - t0)
            except Exception as exc:
                out[name] = exc
                del live[name]
        rounds += 1
    for name in live:
        spec = TaskSpec(stmt=name, setup="", num_threads=torch.get_num_threads())
        m = tub.Measurement(number_per_run=1, raw_times=raw[name], task_spec=spec)
        round_ms = [t * 1e3 for t in m.times]
        out[name] = {**summarize(round_ms), "median_ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3,
                     "round_ms": round_ms}
    return out


def time_providers(fns: Dict[str, Callable[[], object]], device: torch.device, policy: Policy
                   ) -> Dict[str, object]:
    """Time several providers of one case: interleaved on the CPU, each in turn with do_bench on CUDA."""
    if device.type != "cuda":
        return time_cpu_interleaved(fns, policy)
    out: Dict[str, object] = {}
    for name, fn in fns.items():
        try:
            out[name] = time_cuda(fn, policy)
        except Exception as exc:  # noqa: PERF203
            out[name] = exc
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


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None) -> Dict[str, float]:
    """Device-to-device copy bandwidth, GB/s counting the read and the write: the ceiling a memory-bound
    kernel is compared with. 1 GiB on CUDA (far beyond L2), 256 MiB on CPU."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    policy = Policy(warmup=2, min_reps=5, max_reps=50, target_s=0.5, warmup_ms=25, rep_ms=200)
    stats = time_providers({"copy": lambda: dst.copy_(src)}, device, policy)["copy"]
    del src, dst
    if isinstance(stats, BaseException):
        raise stats
    return {"bytes": 2 * nbytes, "median_ms": stats["median_ms"],
            "gbps": 2 * nbytes / (stats["median_ms"] * 1e-3) / 1e9}
