"""Turn result rows into the targets check and the markdown users read; ``python -m benchmarks.report
RESULTS_JSON [OUT_DIR]`` re-renders results.md and the plots of a run."""
from __future__ import annotations

import json
import os
import re
import sys
from typing import List, Optional

from benchmarks.plots import safe_plots
from benchmarks.providers import is_fused


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def _fmt(v: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def _x(v: Optional[float]) -> str:
    return _fmt(v, ".2f", "x")


def _op_target(target: str, r: dict, device: str) -> dict:
    """One fused row read against its case's target."""
    se, sc, ss = r.get("speedup_vs_eager"), r.get("speedup_vs_compile"), r.get("speedup_vs_stock")
    if target.startswith("cpu backend"):
        met = se is not None and se >= 5.0 and (sc is None or sc >= 3.0)
        measured = f"{_x(se)} eager, {_x(sc)} compile"
        verdict = "met" if met and sc is not None else ("not met" if not met else "met (no compile row)")
    elif target.startswith("H100:"):
        met = se is not None and se >= 5.0 and (ss is None or ss >= 2.0)
        measured = f"{_x(se)} eager, {_x(ss)} best stock ({r.get('stock_provider') or 'none ran'})"
        verdict = "met" if met and ss is not None else ("not met" if not met else "met (no stock row)")
        if device != "cuda":
            verdict = "n/a (not on an H100)"
    elif "copy bandwidth" in target:  # ">= NN% of copy bandwidth"
        frac, goal = r.get("copy_fraction"), int(re.search(r"(\d+)% of copy bandwidth", target).group(1)) / 100
        measured = f"{_fmt(None if frac is None else 100 * frac, '.0f', '%')} of copy bandwidth"
        verdict = "n/a" if frac is None else ("met" if frac >= goal else "not met")
    else:  # informational: no numeric goal
        measured, verdict = f"{_x(se)} eager, {_x(sc)} compile, {_x(ss)} best stock", "info"
    return {"target": target, "case": r["case"], "provider": r["provider"], "measured": measured,
            "verdict": verdict}


TEACHER_LINE = "teacher compiled+bf16 vs eager teacher (hcd_tc vs hcd step; decides --teacher-compile's CUDA default)"


def _step_targets(ok: List[dict], device: str) -> List[dict]:
    """The step targets, read on the Swin-T -> ResNet18 step's ``hcd`` row; the teacher line on every step
    case's ``hcd_tc`` row (informational: the speedup of the compiled bf16 teacher's step over ``hcd``)."""
    out = []
    for r in ok:
        if r.get("suite") == "steps" and r.get("speedup_vs_eager_teacher") is not None:
            out.append({"target": TEACHER_LINE, "case": r["case"], "provider": r["provider"],
                        "measured": _x(r["speedup_vs_eager_teacher"]),
                        "verdict": "info" if device == "cuda" else "n/a (not on a GPU)"})
        if r.get("suite") != "steps" or r["provider"] != "hcd" or r["case"] != "step/swin_t->resnet18":
            continue
        ov, sp = r.get("overhead_vs_kd"), r.get("speedup_vs_hcd_ref")
        for target, measured, met in (
                ("H100: Swin-T->ResNet18 step, HCD overhead over KD <= 5%",
                 _fmt(None if ov is None else 100 * ov, '+.1f', '%'), None if ov is None else ov <= 0.05),
                ("H100: Swin-T->ResNet18 hcd step >= 2x the published-style step (hcd_ref)", _x(sp),
                 None if sp is None else sp >= 2.0)):
            verdict = "n/a" if met is None else ("met" if met else "not met")
            out.append({"target": target, "case": r["case"], "provider": "hcd", "measured": measured,
                        "verdict": verdict if device == "cuda" else "n/a (not on an H100)"})
    return out


def evaluate_targets(rows: List[dict]) -> List[dict]:
    """Read the project's targets against this run (informational; never asserted anywhere)."""
    out: List[dict] = []
    ok = _ok(rows)
    device = rows[0]["device"] if rows else "cpu"
    for case_id in dict.fromkeys(r["case"] for r in rows if r.get("target")):
        target = next(r["target"] for r in rows if r["case"] == case_id and r.get("target"))
        fused = [r for r in ok if r["case"] == case_id and is_fused(r["provider"])]
        if target.startswith("cpu backend"):
            fused = [r for r in fused if r["provider"] == "cpu"]
        if not fused:
            out.append({"target": target, "case": case_id, "provider": None, "measured": "no fused backend ran",
                        "verdict": "n/a"})
        out += [_op_target(target, r, device) for r in fused]
    return out + _step_targets(ok, device)


def _throughput(r: dict) -> str:
    if r.get("gbps") is not None:
        frac = r.get("copy_fraction")
        return f"{r['gbps']:.3g} GB/s" + ("" if frac is None else f" ({100 * frac:.3g}%)")
    if r.get("tflops") is not None:
        return f"{r['tflops']:.3g} TFLOP/s"
    return ""


def _mib(v):
    return "n/a" if v is None else f"{v / 2 ** 20:.0f}"


def _header(result: dict) -> List[str]:
    env = result["env"]
    commit = env["git_commit"][:12] + (" (+ uncommitted changes)" if env.get("git_dirty") else "")
    return [f"# hcd_fast benchmarks: {env['device_name']}", "",
            f"- commit `{commit}`, torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
            f"profile `{result['profile']}`, {result['created']}",
            f"- providers: {', '.join(result['providers'])}; backends: "
            + "; ".join(f"{n} {'available' if b['available'] else 'unavailable (' + b['reason'] + ')'}"
                        for n, b in result["backends"].items()),
            f"- copy bandwidth (device to device, read + write): {result['copy_bandwidth']['gbps']:.1f} GB/s; "
            f"1-min load average {env.get('loadavg_start')} at start, {result.get('loadavg_end')} at end "
            f"(on a shared CPU other work competing for the cores inflates the times)",
            "- times are medians of fwd+bwd (ops) or of one optimizer step (steps), warm-up and compilation "
            "excluded (CUDA: triton.testing.do_bench, L2 flushed; CPU: torch.utils.benchmark, providers "
            "interleaved); 'vs eager' / 'vs compile' / 'vs stock' = that provider's median / this one's (higher "
            "is faster; stock = the faster of compile and compile-ro); bandwidth = bytes the kernel design moves "
            "/ median time (% of copy bandwidth; sub_logit_loss: the byte model of kernels/sub_logit_loss.py, "
            "~1.5x its essential bytes; the other ops: their minimum bytes); peak memory on CUDA only",
            "- H100 floor = the least fwd+bwd time on an H100 SXM: max(minimum bytes / 3.35 TB/s, FLOPs / dense "
            "peak (990 TFLOP/s bf16/fp16, 67 fp32/fp64)); '% of it' = floor / median, the share of the roofline "
            "reached (shown on H100 runs only; elsewhere the column is the H100's floor, for reference)", ""]


def _targets_table(targets: List[dict]) -> List[str]:
    if not targets:
        return []
    return (["## Targets (read against, never asserted)", "", "| target | case | provider | measured | verdict |",
             "|---|---|---|---|---|"]
            + [f"| {t['target']} | {t['case']} | {t['provider'] or '-'} | {t['measured']} | {t['verdict']} |"
               for t in targets] + [""])


def _op_table(rows: List[dict], on_h100: bool) -> List[str]:
    floor_col = "H100 floor ms (% of it)" if on_h100 else "H100 floor ms (computed, not this device)"
    out = ["| case | shape | provider | median ms | IQR ms | vs eager | vs compile | vs stock | bandwidth | "
           f"{floor_col} | peak MiB | first call s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['case']} | {r['shape_str']} | {r['provider']} | {r['status']}: "
                       f"{(r.get('reason') or '')[:80]} | | | | | | | | |")
            continue
        floor = "n/a" if not r.get("floor_ms") else (
            f"{r['floor_ms']:.3g} ({100 * r['floor_ms'] / r['median_ms']:.1f}%)" if on_h100 else f"{r['floor_ms']:.3g}")
        star = " **(target)**" if r.get("target") and is_fused(r["provider"]) else ""
        out.append(f"| {r['case']} | {r['shape_str']} | {r['provider']}{star} | {r['median_ms']:.3f} | "
                   f"{r['iqr_ms']:.3f} | {_x(r.get('speedup_vs_eager'))} | {_x(r.get('speedup_vs_compile'))} | "
                   f"{_x(r.get('speedup_vs_stock'))} | {_throughput(r)} | {floor} | {_mib(r.get('peak_mem_bytes'))} | "
                   f"{_fmt(r.get('first_call_s'))} |")
    return out + [""]


def _step_table(steps: List[dict]) -> List[str]:
    out = ["## Whole distillation steps (ResNet18 student, one optimizer step)", "",
           "| teacher -> student | shape | variant | precision | median ms | IQR ms | overhead vs KD "
           "| speedup vs hcd_ref | peak MiB |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in steps:
        if r["status"] != "ok":
            out.append(f"| {r['case'][5:]} | {r['shape_str']} | {r['provider']} | | {r['status']}: "
                       f"{(r.get('reason') or '')[:80]} | | | | |")
            continue
        ov = r.get("overhead_vs_kd")
        out.append(f"| {r['case'][5:]} | {r['shape_str']} | {r['provider']} | {r['precision']} | "
                   f"{r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {'' if ov is None else f'{100 * ov:+.1f}%'} | "
                   f"{_x(r.get('speedup_vs_hcd_ref'))} | {_mib(r.get('peak_mem_bytes'))} |")
    return out + ["", "Every variant is one call of hcd-distill's training step in a configuration (see "
                  "benchmarks/steps.py): ce = student alone; kd = plain KD; *_ref = as the published code runs it "
                  "(reference backend, fp32 on CPU / fp16 autocast on CUDA, loss.item() every step); hcd = "
                  "backend='auto', no host sync, in the precision shown; hcd_tc = hcd with the teacher compiled "
                  "(CUDA graphs on CUDA) and in bf16 weights, its compile in the first call, outside the timed "
                  "region. Overhead: hcd vs kd, hcd_ref vs kd_ref.", ""]


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = _header(result) + _targets_table(result.get("targets") or [])
    on_h100 = "H100" in str(result["env"].get("device_name", ""))
    ops = [r for r in rows if r["suite"] == "ops" and r["group"] not in ("sweep", "fwd")]
    sweep = [r for r in rows if r["suite"] == "ops" and r["group"] == "sweep"]
    fwd = [r for r in rows if r["suite"] == "ops" and r["group"] == "fwd"]
    steps = [r for r in rows if r["suite"] == "steps"]
    if ops:
        lines += ["## Ops and the HCD head (forward + backward)", ""] + _op_table(ops, on_h100)
    if sweep:
        lines += ["## sub_logit_loss batch sweep (compile with dynamic=True, compiled once for the sweep)", ""]
        lines += _op_table(sweep, on_h100)
    if fwd:
        lines += ["## sub_logit_loss forward alone (no autograd; bandwidth = the forward design's bytes / time)", ""]
        lines += _op_table(fwd, on_h100)
    if steps:
        lines += _step_table(steps)
    heads = [r for r in ops if r["op"] == "head" and r.get("inputs")]
    if heads:
        lines += [f"Head inputs: {heads[0]['inputs']} (as hcd-distill feeds them).", ""]
    plots = result.get("plots") or []
    if plots:
        lines += ["Plots: " + ", ".join(f"[{os.path.basename(p)}]({os.path.basename(p)})" for p in plots), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m benchmarks.report RESULTS_JSON [OUT_DIR]``: re-render results.md and the plots."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(main.__doc__)
        return 2
    with open(argv[0]) as f:
        result = json.load(f)
    out_dir = argv[1] if len(argv) > 1 else os.path.dirname(os.path.abspath(argv[0]))
    os.makedirs(out_dir, exist_ok=True)
    result.setdefault("targets", evaluate_targets(result["rows"]))
    result["plots"] = safe_plots(result, out_dir)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(result) + "\n")
    print(f"wrote results.md and {len(result['plots'])} plots in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
