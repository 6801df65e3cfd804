"""``python -m benchmarks``: time every case with every provider, write results.json, results.md and PNGs.

``--cases`` takes comma-separated patterns matched against case ids (``sub_logit_loss/imagenet/fp32``,
``sweep/sub_logit_loss/B=512/fp32``, ``head/cifar/bf16``, ``step/swin_t->resnet18``): a pattern selects a
case when it equals one of the id's ``/`` parts, is a prefix of the id, or fnmatch-matches it; ``steps``
selects the step benchmarks, ``ops`` every op case. The JSON schema is in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import hcd_fast
from benchmarks import cases as C
from benchmarks import report
from benchmarks import steps as ST
from benchmarks.env import SCHEMA_VERSION, environment, loadavg, now, parse_device, results_dir
from benchmarks.ops import make_runner
from benchmarks.plots import safe_plots
from benchmarks.providers import STOCK, is_compiled, is_head_only, select_providers, unavailable_reason
from benchmarks.timing import Policy, copy_bandwidth, peak_memory, synchronize, time_providers

POLICIES = {  # (ops, steps)
    "cpu": (Policy(warmup=2, min_reps=5, max_reps=30, target_s=1.0),
            Policy(warmup=2, min_reps=5, max_reps=10, target_s=2.0)),
    "gpu": (Policy(warmup_ms=25, rep_ms=100), Policy(warmup_ms=100, rep_ms=1000)),
    "quick": (Policy(warmup=1, min_reps=2, max_reps=2, target_s=0.0, warmup_ms=1, rep_ms=5),
              Policy(warmup=1, min_reps=2, max_reps=2, target_s=0.0, warmup_ms=1, rep_ms=5)),
}
# Seconds after which the compiled providers are dropped (compiling is the slow part), and 1.3x that after
# which remaining cases are skipped; recorded per row.
DEFAULT_BUDGET_S = {"cpu": 420.0, "gpu": 200.0, "quick": None}


def parse_args(argv: Optional[List[str]]):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda")
    ap.add_argument("--profile", choices=("cpu", "gpu", "quick"), default=None,
                    help="case set and timing policy; default: gpu on CUDA, cpu otherwise")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 2 repetitions (= --profile quick)")
    ap.add_argument("--cases", default=None, help="comma-separated case patterns (see the module docstring)")
    ap.add_argument("--providers", default=None,
                    help="comma list of eager, compile, compile-ro, fused (every available fused backend), "
                         "fused+compile, fused+graph, or a backend name (cpu, cuda, triton) with or without "
                         "+compile / +graph")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16 (op cases only)")
    ap.add_argument("--variants", default=None, help=f"comma list of step variants, of {ST.VARIANTS}")
    ap.add_argument("--step-amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                    help="autocast of the fast step variants (auto: bf16 on CUDA, none on CPU)")
    ap.add_argument("--step-channels-last", choices=("auto", "on", "off"), default="auto",
                    help="channels_last in the fast step variants (auto: on for CUDA, off on CPU)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device tag>)")
    ap.add_argument("--budget-s", type=float, default=-1.0,
                    help="seconds after which compiled providers are dropped (1.3x: remaining cases skipped); "
                         "0 = none")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    args.device = parse_device(ap, args.device)
    try:
        args.providers = select_providers(args.providers, args.device)
    except ValueError as exc:
        ap.error(str(exc))
    args.profile = "quick" if args.quick else (args.profile or ("gpu" if args.device.type == "cuda" else "cpu"))
    args.budget = DEFAULT_BUDGET_S[args.profile] if args.budget_s < 0 else (args.budget_s or None)
    args.variants = args.variants.split(",") if args.variants else ST.default_variants(args.profile)
    bad = [v for v in args.variants if v not in ST.VARIANTS]
    if bad:
        ap.error(f"--variants: unknown variant {bad[0]!r}; expected some of {', '.join(ST.VARIANTS)}")
    return args


def selected(case_id: str, suite: str, patterns: Optional[List[str]]) -> bool:
    if not patterns:
        return True
    parts = case_id.split("/")
    return any(p == suite or p in parts or case_id.startswith(p) or fnmatch.fnmatch(case_id, p) for p in patterns)


def make_plan(args) -> list:
    """[(suite, case)]: target cases first, then the steps, the batch sweep, the rest, so a time budget
    drops compile from the least important cases first and never touches a target case."""
    patterns = [p.strip() for p in args.cases.split(",") if p.strip()] if args.cases else None
    dtypes = set(args.dtypes.split(",")) if args.dtypes else None
    ops = [c for c in C.profile_cases(args.profile)
           if selected(c.id, "ops", patterns) and (dtypes is None or c.dtype in dtypes)]
    steps = [c for c in ST.profile_step_cases(args.profile) if selected(c.id, "steps", patterns)]
    first = [c for c in ops if c.target and c.group != "sweep"]
    sweep = [c for c in ops if c.group == "sweep" and c not in first]
    rest = [c for c in ops if c not in first and c not in sweep]
    return ([("ops", c) for c in first] + [("steps", c) for c in steps] + [("ops", c) for c in sweep]
            + [("ops", c) for c in rest])


@dataclass
class Run:
    """One run: its settings, result document and clock; ``dump`` rewrites results.json."""
    args: argparse.Namespace
    out_dir: str
    env: dict
    result: dict
    start: float = field(default_factory=time.perf_counter)
    compile_key: Optional[tuple] = None  # the last compiled (op, dtype) of the dynamic-shape sweep

    @property
    def rows(self) -> List[dict]:
        return self.result["rows"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.0f}s] {msg}", flush=True)

    def dump(self) -> None:  # after every case, so a run killed by a timeout still leaves its rows
        path = os.path.join(self.out_dir, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.result, f, indent=1, default=str)
        os.replace(path + ".tmp", path)


def start_run(args, argv) -> Run:
    out_dir = args.out or results_dir(args.device)
    os.makedirs(out_dir, exist_ok=True)
    env = environment(args.device)
    env["timestamp"] = now()
    env["loadavg_start"] = loadavg()
    backends = hcd_fast.backends()
    result = {"schema_version": SCHEMA_VERSION, "created": env["timestamp"], "complete": False,
              "argv": list(sys.argv[1:] if argv is None else argv), "profile": args.profile, "env": env,
              "providers": args.providers, "variants": args.variants,
              "backends": {n: {"available": s.available, "reason": s.reason, "devices": list(s.devices)}
                           for n, s in backends.items()},
              "copy_bandwidth": None, "budget_s": args.budget, "rows": []}
    run = Run(args, out_dir, env, result)
    run.log(f"hcd_fast benchmarks on {env['device_name']} | torch {env['torch']} triton {env['triton']} | commit "
            f"{env['git_commit'][:12]} | profile {args.profile} | providers {', '.join(args.providers)} | "
            f"out {out_dir}")
    for st in backends.values():
        run.log(f"  backend {st}")
    result["copy_bandwidth"] = copy_bandwidth(args.device, (16 << 20) if args.profile == "quick" else None)
    run.log(f"copy bandwidth {result['copy_bandwidth']['gbps']:.1f} GB/s")
    return run


def base_row(run: Run, suite: str, case, provider: str) -> dict:
    row = {"schema_version": SCHEMA_VERSION, "suite": suite, "case": case.id, "op": getattr(case, "op", "step"),
           "group": case.group, "provider": provider, "mode": getattr(case, "mode", "step"),
           "dtype": getattr(case, "dtype", None), "shape": dict(case.shape), "shape_str": case.shape_str(),
           "target": getattr(case, "target", None), "status": "ok", "reason": None}
    row.update(run.env)
    return row


def record_error(row: dict, exc: BaseException, device: torch.device, prefix: str = "") -> None:
    row["status"] = "error"
    row["reason"] = f"{prefix}{type(exc).__name__}: {exc}"[:600]
    traceback.print_exception(type(exc), exc, exc.__traceback__, limit=3)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepare(row: dict, factory: Callable[[], Callable], device: torch.device) -> Optional[Callable]:
    """Build a provider's callable and make its first call (compilation, capture, cuDNN's search happen
    here, out of the timed region, timed as ``first_call_s``); None after an error, recorded in ``row``."""
    try:
        fn = factory()
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        row["first_call_s"] = time.perf_counter() - t0
        return fn
    except Exception as exc:  # one failing provider must not end the run
        record_error(row, exc, device)
        return None


def store_times(row: dict, res, fn: Callable, device: torch.device) -> None:
    if isinstance(res, BaseException):
        record_error(row, res, device)
        return
    row.update({k: v for k, v in res.items() if k != "round_ms"})
    try:
        row["peak_mem_bytes"] = peak_memory(fn, device)
    except Exception as exc:
        record_error(row, exc, device)


def time_case(run: Run, rows: List[dict], factories: Dict[str, Callable], policy: Policy) -> None:
    """Prepare and time the providers of one case. CPU: all prepared, then timed together, interleaved.
    CUDA: each prepared and timed in turn with do_bench, results.json rewritten after each (a long compile
    cut short by a timeout keeps the rows before it)."""
    device = run.args.device
    by_name = {r["provider"]: r for r in rows}
    fns: Dict[str, Callable] = {}
    for name, factory in factories.items():
        why = over_budget(run, name)  # checked before each provider: at most one compile runs past the budget
        if why is not None:
            by_name[name].update(status="skipped", reason=why)
            continue
        fn = prepare(by_name[name], factory, device)
        if fn is None:
            continue
        if device.type == "cuda":
            store_times(by_name[name], time_providers({name: fn}, device, policy)[name], fn, device)
            run.dump()
        else:
            fns[name] = fn
    if fns:
        for name, res in time_providers(fns, device, policy).items():
            store_times(by_name[name], res, fns[name], device)


def over_budget(run: Run, provider: str) -> Optional[str]:
    """Why a compiled provider is dropped now (the run's time budget is spent), else None."""
    budget = run.args.budget
    compiles = is_compiled(provider) or provider in ST.COMPILED_VARIANTS
    if compiles and budget is not None and run.elapsed() > budget:
        return f"time budget ({budget:.0f} s) spent before this provider: compiled providers dropped"
    return None


def op_case(run: Run, case: C.Case, policy: Policy) -> List[dict]:
    providers = [p for p in run.args.providers if case.op == "head" or not is_head_only(p)]
    if case.mode == "fwd":  # the forward's bandwidth: eager and the fused backends (no compile: gpu_check's budget)
        providers = [p for p in providers if not is_compiled(p)]
    runner = make_runner(case, run.args.device)
    rows, factories = [], {}
    key = (case.op, case.dtype) if case.dynamic else None
    if any(is_compiled(p) for p in providers) and (key is None or key != run.compile_key):
        torch._dynamo.reset()  # compile once per case, once for the whole sweep (dynamic=True)
    run.compile_key = key
    # Compiled providers last: their first compile (the whole head at B=256, 224 px) can eat the budget,
    # and the others must be measured before that.
    for p in sorted(providers, key=is_compiled):
        row = base_row(run, "ops", case, p)
        rows.append(row)
        row.update(bytes=C.design_bytes(case), essential_bytes=C.essential_bytes(case), flops=C.flops(case),
                   floor_ms=C.roofline_floor_ms(case))
        if case.op == "head":
            row["inputs"] = runner.describe_inputs()
        why = unavailable_reason(p, run.args.device)
        if why is not None:
            row.update(status="skipped", reason=why)
            continue
        factories[p] = lambda p=p: runner.fn(p)
    time_case(run, rows, factories, policy)
    op_ratios(rows, run.result["copy_bandwidth"]["gbps"])
    return rows


def op_ratios(rows: List[dict], copy_gbps: float) -> None:
    """Within-case ratios: vs eager, vs compile, vs the best stock baseline (faster of compile, compile-ro);
    achieved bandwidth and FLOP rate; share of the H100 roofline floor."""
    ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
    stock = min((ok[p] for p in STOCK if p in ok), key=lambda r: r["median_ms"], default=None)
    for r in ok.values():
        for name, b in (("eager", ok.get("eager")), ("compile", ok.get("compile")), ("stock", stock)):
            r[f"speedup_vs_{name}"] = None if b is None else b["median_ms"] / r["median_ms"]
        r["stock_provider"] = None if stock is None else stock["provider"]
        if r.get("bytes"):
            r["gbps"] = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9
            r["copy_fraction"] = r["gbps"] / copy_gbps
        if r.get("flops"):
            r["tflops"] = r["flops"] / (r["median_ms"] * 1e-3) / 1e12
        if r.get("floor_ms"):
            r["floor_fraction"] = r["floor_ms"] / r["median_ms"]


def step_case(run: Run, case, policy: Policy) -> List[dict]:
    a = run.args
    bench = ST.StepBench(case, a.device, amp=a.step_amp, channels_last=a.step_channels_last)
    rows, factories = [], {}
    for v in a.variants:
        row = base_row(run, "steps", case, v)
        row["precision"] = ST.variant_precision(v, a.device, a.step_amp, a.step_channels_last)
        rows.append(row)
        factories[v] = lambda v=v: bench.fn(v)
    time_case(run, rows, factories, policy)
    ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
    for r in ok.values():
        base = ok.get("kd_ref" if r["provider"].endswith("_ref") else "kd")
        if r["provider"].startswith("hcd") and not r["provider"].endswith("_tc") and base is not None:
            r["overhead_vs_kd"] = r["median_ms"] / base["median_ms"] - 1
        if "hcd_ref" in ok:
            r["speedup_vs_hcd_ref"] = ok["hcd_ref"]["median_ms"] / r["median_ms"]
        if r["provider"].endswith("_tc") and r["provider"][:-3] in ok:  # teacher compiled+bf16 vs eager teacher
            r["speedup_vs_eager_teacher"] = ok[r["provider"][:-3]]["median_ms"] / r["median_ms"]
    return rows


def log_rows(run: Run, rows: List[dict]) -> None:
    for row in rows:
        p, case = row["provider"], row["case"]
        if row["status"] != "ok":
            run.log(f"{case:<36} {p:<14} {row['status']}: {row['reason']}")
            continue
        floor = f", H100 floor {row['floor_ms']:.3g} ms" if row.get("floor_ms") else ""
        run.log(f"{case:<36} {p:<14} {row['median_ms']:10.3f} ms (IQR {row['iqr_ms']:.3f}, {row['reps']} reps, "
                f"first call {row['first_call_s']:.1f} s{floor})")


def run_case(run: Run, suite: str, case) -> None:
    names = run.args.variants if suite == "steps" else run.args.providers
    budget = run.args.budget
    if budget is not None and run.elapsed() > 1.3 * budget:
        for p in names:
            run.rows.append({**base_row(run, suite, case, p), "status": "skipped",
                             "reason": f"time budget ({budget:.0f} s x 1.3) spent"})
        run.log(f"{case.id}: skipped (time budget)")
        return
    op_policy, step_policy = POLICIES[run.args.profile]
    try:
        rows = op_case(run, case, op_policy) if suite == "ops" else step_case(run, case, step_policy)
    except Exception as exc:  # the case's setup failed: every provider records it
        rows = [base_row(run, suite, case, p) for p in names]
        for row in rows:
            record_error(row, exc, run.args.device, prefix="setup: ")
    load = loadavg()
    for row in rows:
        row["loadavg"] = load  # right after the case was timed
    log_rows(run, rows)
    run.rows.extend(rows)
    run.dump()
    gc.collect()
    if run.args.device.type == "cuda":
        torch.cuda.empty_cache()


def finish(run: Run) -> dict:
    result, out_dir = run.result, run.out_dir
    result["complete"] = True
    result["loadavg_end"] = loadavg()
    result["targets"] = report.evaluate_targets(run.rows)
    result["plots"] = [] if run.args.no_plots else safe_plots(result, out_dir)
    result["elapsed_s"] = run.elapsed()
    md = report.markdown(result)
    run.dump()
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md + "\n")
    print("\n" + md, flush=True)
    plots = ", ".join(os.path.basename(p) for p in result["plots"])
    print(f"wrote {os.path.join(out_dir, 'results.json')}, results.md" + (f" and plots {plots}" if plots else "")
          + f" in {out_dir} ({result['elapsed_s']:.0f} s)", flush=True)
    return result


def run(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    bench = start_run(args, argv)
    plan = make_plan(args)
    bench.log(f"{len(plan)} cases")
    for suite, case in plan:
        run_case(bench, suite, case)
    return finish(bench)
