"""Ops dispatched per ``HCDLoss`` forward+backward: the CPU proxy of the head's kernel launches.

On a GPU the head is launch-bound (SPEC section 4), so the number of kernels one forward+backward issues is the
measure of the launch work; the GPU profile stage counts real kernels (benchmarks/profile_head.py). On the CPU,
the ATen and custom ops that reach the dispatcher below autograd are a deterministic proxy: every one of them is
at least one kernel (or a view) on the GPU. ``OpCounter`` is a ``TorchDispatchMode`` that counts them; ops called
from inside a custom op's kernel are not seen (the custom op is one entry).

Two counts: every op dispatched (``total``), and the ops that launch a kernel (``launch_ops``: all but views,
aliases, detach and allocations without a fill).

    python -m benchmarks.op_count                 # the counts per available CPU backend and the reference
    python -m benchmarks.op_count --by-op cpu     # ... with the count per op name for one backend
"""
from __future__ import annotations

import argparse
import collections
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The head counted: S=4 stages of ResNet18-like widths (scaled down: the count does not depend on sizes), the
# default HCDConfig (n=4, a hidden CFM layer), training mode, fp32, parameter gradients None before the step
# (optimizer.zero_grad()'s default).
CHANNELS = (8, 16, 32, 64)
MAPS = (8, 4, 2, 1)
TEACHER_DIM, NUM_CLASSES, BATCH = 24, 10, 4


# Ops that launch no kernel: views, aliases, detach, and allocations without a fill. ``launch_ops`` leaves them
# out: the closer proxy of GPU kernel launches.
NO_KERNEL = frozenset({
    "aten.detach", "aten.alias", "aten.view", "aten._unsafe_view", "aten._reshape_alias", "aten.as_strided",
    "aten.t", "aten.transpose", "aten.permute", "aten.select", "aten.slice", "aten.unsqueeze", "aten.squeeze",
    "aten.expand", "aten.unbind", "aten.split", "aten.split_with_sizes", "aten.empty", "aten.empty_like",
    "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided", "aten.lift_fresh"})


def launch_ops(counts: Dict[str, int]) -> int:
    """The ops of ``counts`` that launch a kernel on a GPU (all but ``NO_KERNEL``)."""
    return sum(n for op, n in counts.items() if op not in NO_KERNEL)


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched under it, by ``OpOverloadPacket`` name (``aten.mm``, ``hcd_fast.cfm``)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def head_inputs(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(BATCH, c, m, m, generator=g, dtype=dtype).requires_grad_() for c, m in zip(CHANNELS, MAPS)]
    zs = torch.randn(BATCH, NUM_CLASSES, generator=g, dtype=dtype).requires_grad_()
    ft = torch.randn(BATCH, TEACHER_DIM, generator=g, dtype=dtype)
    zt = torch.randn(BATCH, NUM_CLASSES, generator=g, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    return feats, zs, ft, zt, y


def count_head_ops(backend: str, validate: Optional[bool] = False) -> Tuple[int, Dict[str, int]]:
    """(total, per-op counts) of one ``HCDLoss(backend=backend)`` forward+backward on CPU tensors, after one
    warm-up step (which resolves the op table and fills caches a training loop would have filled)."""
    from hcd_fast import HCDLoss

    torch.manual_seed(0)
    crit = HCDLoss(CHANNELS, TEACHER_DIM, NUM_CLASSES, backend=backend, validate=validate).train()
    for step in range(2):
        crit.zero_grad(set_to_none=True)
        feats, zs, ft, zt, y = head_inputs(seed=step)
        if step == 0:
            crit(feats, zs, ft, zt, y).backward()
            continue
        with OpCounter() as counter:
            crit(feats, zs, ft, zt, y).backward()
    return counter.total, dict(counter.counts)


def available_backends() -> Sequence[str]:
    """The reference and every fused backend that runs on CPU tensors here (cpu; triton under the interpreter)."""
    import hcd_fast

    return ["reference"] + [name for name, s in hcd_fast.backends().items()
                            if name != "reference" and s.available and "cpu" in s.devices]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.op_count", description=__doc__.splitlines()[0])
    parser.add_argument("--by-op", metavar="BACKEND", help="also print the per-op counts of this backend")
    args = parser.parse_args(argv)
    for name in available_backends():
        total, counts = count_head_ops(name)
        print(f"{name:<10} {total:4d} ops dispatched per HCDLoss forward+backward, {launch_ops(counts):4d} of them "
              f"kernel ops (no views, detach, empty)")
        if args.by_op == name:
            for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                print(f"    {n:4d} {op}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
