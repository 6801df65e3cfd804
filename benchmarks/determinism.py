"""``python -m benchmarks.determinism``: every fused backend gives bit-identical results run to run.

For each available fused backend on the device (and the eager reference, for comparison) and each op at
the ImageNet-like shape (``--quick``: tiny shapes), in fp32 and bf16: two fwd+bwd calls on the same inputs
must give bitwise-equal outputs and gradients (the kernels reduce without atomics). A third
call with a different batch size in between checks no state leaks between shapes. Writes a JSON report
and exits 1 on any mismatch. Reads tensors back to the host: a check, not a hot path.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List

import torch

from benchmarks import cases as C
from benchmarks.env import environment
from benchmarks.ops import OpRunner
from benchmarks.providers import fused_providers


def _snapshot(runner: OpRunner, provider: str) -> List[torch.Tensor]:
    """Output and gradients of one fwd+bwd (running stats of bn_relu_pool excluded: they are updated by
    design on every call)."""
    fn = runner.fn(provider)
    out = [fn().detach().clone()]
    return out + [t.grad.detach().clone() for t in runner.leaves if t.grad is not None]


def _cases(quick: bool) -> List[C.Case]:
    if quick:
        base = [c for c in C.profile_cases("quick") if c.group == "quick" and c.op != "head"]
        out = []
        for c in base:
            for dt in ("fp32", "bf16"):
                out.append(C.Case(c.op, c.group, dt, dict(c.shape)))
        return out
    out = []
    for op in ("sub_logit_loss", "bn_relu_pool", "pool_linear", "cfm"):
        for dt in ("fp32", "bf16"):
            out += [c for c in C._family_cases("imagenet", [dt], [op], 224, 224)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.determinism")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    providers = fused_providers(device)
    report = {"env": environment(device), "providers": providers, "checks": []}
    failures = 0
    for case in _cases(args.quick):
        for provider in providers:
            entry = {"case": case.id, "shape": case.shape_str(), "provider": provider}
            try:
                r1 = OpRunner(case, device, seed=1)
                a = _snapshot(r1, provider)
                b = _snapshot(r1, provider)
                # A different shape in between, then the first shape again on fresh (equal) inputs.
                other = C.Case(case.op, case.group, case.dtype,
                               {**case.shape, "B": max(1, case.shape["B"] // 2 + 1)})
                _snapshot(OpRunner(other, device, seed=2), provider)
                c = _snapshot(OpRunner(case, device, seed=1), provider)
                same = len(a) == len(b) == len(c) and all(torch.equal(x, y) and torch.equal(x, z)
                                                          for x, y, z in zip(a, b, c))
                entry["deterministic"] = bool(same)
                entry["tensors"] = len(a)
                if not same:
                    entry["max_abs_diff"] = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))
                    failures += 1
            except Exception as exc:
                entry["deterministic"] = None
                entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
                failures += 1
            report["checks"].append(entry)
            state = {True: "bitwise equal", False: "MISMATCH", None: "ERROR " + entry.get("error", "")}
            print(f"{case.id:<32} {provider:<8} {state[entry['deterministic']]}", flush=True)
    if not providers:
        print(f"no fused backend available on {device.type}: nothing to check")
    report["failures"] = failures
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"determinism: {len(report['checks'])} checks, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
