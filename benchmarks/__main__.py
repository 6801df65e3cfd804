"""``python -m benchmarks``: time every case with every provider, write results.json, results.md and PNGs.

    python -m benchmarks                      # the device's profile (cpu: fits 10 min on 2 cores; gpu)
    python -m benchmarks --quick              # tiny shapes, 2 repetitions: a smoke run
    python -m benchmarks --cases sub_logit_loss,steps --providers eager,fused --dtypes fp32 --out /tmp/r
    python -m benchmarks pipeline             # loader / teacher / step / end-to-end img/s (benchmarks/pipeline.py)

``--cases`` takes comma-separated patterns matched against case ids (``sub_logit_loss/imagenet/fp32``,
``sweep/sub_logit_loss/B=512/fp32``, ``head/cifar/bf16``, ``step/swin_t->resnet18``): a pattern selects a
case when it equals one of the id's ``/`` parts, is a prefix of the id, or fnmatch-matches it; ``steps``
selects the timm step benchmarks, ``ops`` every op case. The JSON schema is in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import json
import os
import sys
import time
import traceback
from typing import List, Optional

import torch

import hcd_fast
from benchmarks import cases as C
from benchmarks import report
from benchmarks import steps as ST
from benchmarks.common import (SCHEMA_VERSION, Policy, copy_bandwidth, device_tag, environment, measure_group,
                               parse_device, peak_memory, provider_unavailable_reason, select_providers,
                               synchronize)

POLICIES = {  # (ops, steps)
    "cpu": (Policy(warmup=2, min_reps=5, max_reps=30, target_s=1.0, flush_l2=False),
            Policy(warmup=2, min_reps=5, max_reps=10, target_s=2.0, flush_l2=False)),
    "gpu": (Policy(warmup=3, min_reps=10, max_reps=200, target_s=0.3, flush_l2=True),
            Policy(warmup=3, min_reps=10, max_reps=20, target_s=1.5, flush_l2=False)),
    "quick": (Policy(warmup=1, min_reps=2, max_reps=2, target_s=0.0, flush_l2=False),
              Policy(warmup=1, min_reps=2, max_reps=2, target_s=0.0, flush_l2=False)),
}
# Seconds after which the compile provider is dropped (compiling is the slow part), and 1.3x that after
# which remaining cases are skipped; recorded per row.
DEFAULT_BUDGET_S = {"cpu": 420.0, "gpu": 200.0, "quick": None}


def _selected(case_id: str, suite: str, patterns: Optional[List[str]]) -> bool:
    if not patterns:
        return True
    parts = case_id.split("/")
    for p in patterns:
        if p == suite or p in parts or case_id.startswith(p) or fnmatch.fnmatch(case_id, p):
            return True
    return False


def _loadavg() -> Optional[float]:
    """1-minute load average: on a shared CPU machine, other work competing for the cores skews times."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _log(msg: str) -> None:
    print(msg, flush=True)


def _base_row(env: dict, suite: str, case, provider: str) -> dict:
    row = {"schema_version": SCHEMA_VERSION, "suite": suite, "case": case.id,
           "op": getattr(case, "op", "step"), "group": case.group, "provider": provider,
           "mode": getattr(case, "mode", "step"), "dtype": getattr(case, "dtype", None),
           "shape": dict(case.shape), "shape_str": case.shape_str(), "target": getattr(case, "target", None),
           "status": "ok", "reason": None}
    row.update(env)
    return row


def _error(row: dict, exc: BaseException, device) -> None:
    row["status"] = "error"
    row["reason"] = f"{type(exc).__name__}: {exc}"[:600]
    traceback.print_exception(type(exc), exc, exc.__traceback__, limit=3)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _prepare(row: dict, fn_factory, device):
    """Build a provider's callable and make its first call (compilation happens here, timed separately
    as ``first_call_s``); None after an error, which is recorded in ``row``."""
    try:
        fn = fn_factory()
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        row["first_call_s"] = time.perf_counter() - t0
        return fn
    except Exception as exc:  # one failing provider must not end the run
        _error(row, exc, device)
        return None


def _time_case(case_rows: List[dict], fns: dict, device, policy: Policy) -> None:
    """Time the prepared providers of one case together, then their peak memory (CUDA)."""
    by_name = {r["provider"]: r for r in case_rows}
    for name, res in measure_group(fns, device, policy).items():
        row = by_name[name]
        if isinstance(res, BaseException):
            _error(row, res, device)
            continue
        row.update(res)
        try:
            row["peak_mem_bytes"] = peak_memory(fns[name], device)
        except Exception as exc:
            _error(row, exc, device)


def _ratios(rows: List[dict], copy_gbps: float) -> None:
    ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
    for r in ok.values():
        for base in ("eager", "compile"):
            b = ok.get(base)
            r[f"speedup_vs_{base}"] = None if b is None else b["median_ms"] / r["median_ms"]
        if r.get("bytes"):
            r["gbps"] = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9
            r["copy_fraction"] = r["gbps"] / copy_gbps
        if r.get("flops"):
            r["tflops"] = r["flops"] / (r["median_ms"] * 1e-3) / 1e12
        if r.get("floor_ms"):
            r["floor_fraction"] = r["floor_ms"] / r["median_ms"]


def run(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda")
    ap.add_argument("--profile", choices=("cpu", "gpu", "quick"), default=None,
                    help="case set and timing policy; default: gpu on CUDA, cpu otherwise")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 2 repetitions (= --profile quick)")
    ap.add_argument("--cases", default=None, help="comma-separated case patterns (see the module docstring)")
    ap.add_argument("--providers", default=None,
                    help="comma list of eager, compile, fused (every available fused backend), cpu, cuda, triton")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16 (op cases only)")
    ap.add_argument("--variants", default=None, help=f"comma list of step variants, of {ST.VARIANTS}")
    ap.add_argument("--step-amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                    help="autocast of the fast step variants (auto: bf16 on CUDA, none on CPU)")
    ap.add_argument("--step-channels-last", choices=("auto", "on", "off"), default="auto",
                    help="channels_last in the fast step variants (auto: on for CUDA, off on CPU)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device tag>)")
    ap.add_argument("--budget-s", type=float, default=-1.0,
                    help="seconds after which compile is dropped (1.3x: remaining cases skipped); 0 = none")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    device = parse_device(ap, args.device)
    profile = "quick" if args.quick else (args.profile or ("gpu" if device.type == "cuda" else "cpu"))
    budget = DEFAULT_BUDGET_S[profile] if args.budget_s < 0 else (args.budget_s or None)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", device_tag(device))
    os.makedirs(out_dir, exist_ok=True)
    patterns = [p.strip() for p in args.cases.split(",") if p.strip()] if args.cases else None
    dtypes = set(args.dtypes.split(",")) if args.dtypes else None
    variants = [v for v in args.variants.split(",")] if args.variants else list(ST.VARIANTS)
    providers = select_providers(args.providers, device)
    op_policy, step_policy = POLICIES[profile]

    op_cases = [c for c in C.profile_cases(profile)
                if _selected(c.id, "ops", patterns) and (dtypes is None or c.dtype in dtypes)]
    step_cases = [c for c in ST.profile_step_cases(profile) if _selected(c.id, "steps", patterns)]
    # Target cases first, then the steps, the batch sweep, the rest: a time budget drops compile from the
    # least important cases first and never touches a target case.
    first = [c for c in op_cases if c.target and c.group != "sweep"]
    sweep = [c for c in op_cases if c.group == "sweep" and c not in first]
    plan = [("ops", c) for c in first] + [("steps", c) for c in step_cases] + [("ops", c) for c in sweep]
    plan += [("ops", c) for c in op_cases if c not in first and c not in sweep]

    env = environment(device)
    env["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["loadavg_start"] = _loadavg()
    _log(f"hcd_fast benchmarks on {env['device_name']} | torch {env['torch']} triton {env['triton']} | "
         f"commit {env['git_commit'][:12]} | profile {profile} | providers {', '.join(providers)} | "
         f"{len(plan)} cases | out {out_dir}")
    for name, st in hcd_fast.backends().items():
        _log(f"  backend {st}")
    copy_bw = copy_bandwidth(device, nbytes=(16 << 20) if profile == "quick" else None)
    _log(f"copy bandwidth {copy_bw['gbps']:.1f} GB/s")

    rows: List[dict] = []
    compile_key = None
    result = {
        "schema_version": SCHEMA_VERSION,
        "created": env["timestamp"],
        "complete": False,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "profile": profile,
        "env": env,
        "providers": providers,
        "backends": {n: {"available": s.available, "reason": s.reason, "devices": list(s.devices)}
                     for n, s in hcd_fast.backends().items()},
        "copy_bandwidth": copy_bw,
        "budget_s": budget,
        "rows": rows,
    }
    json_path = os.path.join(out_dir, "results.json")

    def dump() -> None:  # after every case, so a run killed by a timeout still leaves its rows
        with open(json_path + ".tmp", "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(json_path + ".tmp", json_path)
    for suite, case in plan:
        elapsed = time.perf_counter() - start
        case_rows: List[dict] = []
        if suite == "ops":
            names = providers
        else:
            names = variants
        if budget is not None and elapsed > 1.3 * budget:
            for p in names:
                row = _base_row(env, suite, case, p)
                row.update(status="skipped", reason=f"time budget ({budget:.0f} s x 1.3) spent")
                rows.append(row)
            _log(f"[{elapsed:6.0f}s] {case.id}: skipped (time budget)")
            continue
        try:
            bench = (C.Runner(case, device) if suite == "ops" else
                     ST.StepBench(case, device, amp=args.step_amp, channels_last=args.step_channels_last))
        except Exception as exc:
            for p in names:
                row = _base_row(env, suite, case, p)
                row.update(status="error", reason=f"setup: {type(exc).__name__}: {exc}"[:600])
                rows.append(row)
            traceback.print_exc(limit=3)
            continue
        fns = {}
        # torch.compile last: its first compile (the whole head at B=256, 224 px) can eat the stage, and the
        # fused providers must be measured before that.
        for p in sorted(names, key=lambda n: n == "compile"):
            row = _base_row(env, suite, case, p)
            case_rows.append(row)
            if suite == "ops":
                row["bytes"] = C.design_bytes(case)  # the bandwidth column: bytes the design moves
                row["essential_bytes"] = C.essential_bytes(case)  # the least any fwd+bwd moves (the floor's)
                row["flops"] = C.flops(case)
                row["floor_ms"] = C.roofline_floor_ms(case)  # on an H100, whatever device runs this
                why = provider_unavailable_reason(p, device)
                if why is None and p == "compile" and budget is not None and time.perf_counter() - start > budget:
                    why = f"time budget ({budget:.0f} s) spent before this case: compile dropped"
                if why is not None:
                    row.update(status="skipped", reason=why)
                    continue
                if p == "compile":
                    key = (case.op, case.dtype, "dynamic") if case.dynamic else None
                    if key is None or key != compile_key:
                        torch._dynamo.reset()  # compile once per case (once per sweep with dynamic=True)
                    compile_key = key
            else:
                if p not in ST.VARIANTS:
                    row.update(status="skipped", reason=f"unknown variant {p!r}")
                    continue
                row["precision"] = ST.variant_precision(p, device, args.step_amp, args.step_channels_last)
            fn = _prepare(row, lambda: bench.fn(p), device)
            if fn is not None:
                fns[p] = fn
        _time_case(case_rows, fns, device, op_policy if suite == "ops" else step_policy)
        load = _loadavg()
        for row in case_rows:
            row["loadavg"] = load  # right after the case was timed
        for row in case_rows:
            p = row["provider"]
            if row["status"] == "ok":
                floor = f", H100 floor {row['floor_ms']:.3g} ms" if row.get("floor_ms") else ""
                _log(f"[{time.perf_counter() - start:6.0f}s] {case.id:<36} {p:<8} {row['median_ms']:10.3f} ms "
                     f"(IQR {row['iqr_ms']:.3f}, {row['reps']} reps, first call {row['first_call_s']:.1f} s{floor})")
            else:
                _log(f"[{time.perf_counter() - start:6.0f}s] {case.id:<36} {p:<8} {row['status']}: {row['reason']}")
        if suite == "ops":
            _ratios(case_rows, copy_bw["gbps"])
        else:
            ok = {r["provider"]: r for r in case_rows if r["status"] == "ok"}
            for r in ok.values():
                base = ok.get("kd_ref" if r["provider"].endswith("_ref") else "kd")
                if r["provider"].startswith("hcd") and base is not None:
                    r["overhead_vs_kd"] = r["median_ms"] / base["median_ms"] - 1
                if "hcd_ref" in ok:
                    r["speedup_vs_hcd_ref"] = ok["hcd_ref"]["median_ms"] / r["median_ms"]
        rows.extend(case_rows)
        dump()
        del bench, fns
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result["complete"] = True
    result["loadavg_end"] = _loadavg()
    result["targets"] = report.evaluate_targets(rows)
    result["plots"] = [] if args.no_plots else report.safe_plots(result, out_dir)
    result["elapsed_s"] = time.perf_counter() - start
    md = report.markdown(result)
    dump()
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md + "\n")
    _log("\n" + md)
    _log(f"wrote {os.path.join(out_dir, 'results.json')}, results.md"
         + (f" and plots {', '.join(os.path.basename(p) for p in result['plots'])}" if result["plots"] else "")
         + f" in {out_dir} ({result['elapsed_s']:.0f} s)")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pipeline"]:  # the whole-pipeline benchmark (benchmarks/pipeline.py)
        from benchmarks import pipeline
        return pipeline.main(argv[1:])
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
