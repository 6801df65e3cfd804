"""Turn result rows into the targets check, a markdown table and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional

FUSED = ("cpu", "cuda", "triton")


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def _fmt(v: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def _x(v: Optional[float]) -> str:
    return _fmt(v, ".2f", "x")


def evaluate_targets(rows: List[dict]) -> List[dict]:
    """Read the project's targets against this run (informational; never asserted anywhere)."""
    out: List[dict] = []
    ok = _ok(rows)
    device = rows[0]["device"] if rows else "cpu"
    by_case: Dict[str, List[dict]] = {}
    for r in ok:
        by_case.setdefault(r["case"], []).append(r)

    for case_id in dict.fromkeys(r["case"] for r in rows if r.get("target")):
        target = next(r["target"] for r in rows if r["case"] == case_id and r.get("target"))
        fused = [r for r in by_case.get(case_id, []) if r["provider"] in FUSED]
        bandwidth = "copy bandwidth" in target
        if target.startswith("cpu backend"):
            fused = [r for r in fused if r["provider"] == "cpu"]
            need_e, need_c = 5.0, 3.0
        elif target.startswith("H100:"):
            need_e, need_c = 5.0, 2.0
        else:  # informational: no numeric goal
            need_e = need_c = None
        if not fused:
            out.append({"target": target, "case": case_id, "provider": None, "measured": "no fused backend ran",
                        "verdict": "n/a"})
            continue
        for r in fused:
            se, sc = r.get("speedup_vs_eager"), r.get("speedup_vs_compile")
            if need_e is not None:
                met = se is not None and se >= need_e and (sc is None or sc >= need_c)
                measured = f"{_x(se)} eager, {_x(sc)} compile"
                verdict = "met" if met and sc is not None else ("not met" if not met else "met (no compile row)")
            elif not bandwidth:
                measured = f"{_x(se)} eager, {_x(sc)} compile"
                verdict = "info"
            else:
                frac = r.get("copy_fraction")
                measured = f"{_fmt(None if frac is None else 100 * frac, '.0f', '%')} of copy bandwidth"
                verdict = "n/a" if frac is None else ("met" if frac >= 0.7 else "not met")
            if target.startswith("H100:") and device != "cuda":
                verdict = "n/a (not on an H100)"
            out.append({"target": target, "case": case_id, "provider": r["provider"], "measured": measured,
                        "verdict": verdict})

    for r in ok:
        if r.get("suite") == "steps" and r["provider"] == "hcd" and r["case"] == "step/swin_t->resnet18":
            ov = r.get("overhead_vs_kd")
            verdict = "n/a" if ov is None else ("met" if ov <= 0.10 else "not met")
            if device != "cuda":
                verdict = "n/a (not on an H100)"
            out.append({"target": "H100: Swin-T->ResNet18 step, HCD overhead over KD <= 10%", "case": r["case"],
                        "provider": "hcd", "measured": f"{_fmt(None if ov is None else 100 * ov, '+.1f', '%')}",
                        "verdict": verdict})
    return out


def _throughput(r: dict) -> str:
    if r.get("gbps") is not None:
        frac = r.get("copy_fraction")
        return f"{r['gbps']:.3g} GB/s" + ("" if frac is None else f" ({100 * frac:.3g}%)")
    if r.get("tflops") is not None:
        return f"{r['tflops']:.3g} TFLOP/s"
    return ""


def _mib(v):
    return "n/a" if v is None else f"{v / 2 ** 20:.0f}"


def markdown(result: dict) -> str:
    env, rows = result["env"], result["rows"]
    lines = [f"# hcd_fast benchmarks: {env['device_name']}", ""]
    commit = env["git_commit"][:12] + (" (+ uncommitted changes)" if env.get("git_dirty") else "")
    lines += [f"- commit `{commit}`, torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
              f"profile `{result['profile']}`, {result['created']}",
              f"- providers: {', '.join(result['providers'])}; backends: "
              + "; ".join(f"{n} {'available' if b['available'] else 'unavailable (' + b['reason'] + ')'}"
                          for n, b in result["backends"].items()),
              f"- copy bandwidth (device to device, read + write): {result['copy_bandwidth']['gbps']:.1f} GB/s; "
              f"1-min load average {env.get('loadavg_start')} at start, {result.get('loadavg_end')} at end "
              f"(on a shared CPU other work competing for the cores inflates the times)",
              "- times are medians of fwd+bwd (ops) or of one optimizer step (steps), warm-up excluded; "
              "'vs eager' / 'vs compile' = that provider's median / this one's (higher is faster); "
              "bandwidth = bytes the kernel design moves / median time (% of copy bandwidth; sub_logit_loss: the "
              "byte model of kernels/sub_logit_loss.py, ~1.5x its essential bytes; the other ops: their minimum "
              "bytes); peak memory on CUDA only",
              "- H100 floor = the least fwd+bwd time on an H100 SXM: max(minimum bytes / 3.35 TB/s, FLOPs / dense peak "
              "(990 TFLOP/s bf16/fp16, 67 fp32/fp64)); '% of it' = floor / median, the share of the roofline reached "
              "(shown on H100 runs only; elsewhere the column is the H100's floor, for reference)",
              ""]
    targets = result.get("targets") or []
    if targets:
        lines += ["## Targets (read against, never asserted)", "",
                  "| target | case | provider | measured | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['case']} | {t['provider'] or '-'} | {t['measured']} | {t['verdict']} |"
                  for t in targets]
        lines.append("")

    ops = [r for r in rows if r["suite"] == "ops" and r["group"] != "sweep"]
    sweep = [r for r in rows if r["suite"] == "ops" and r["group"] == "sweep"]
    steps = [r for r in rows if r["suite"] == "steps"]
    on_h100 = "H100" in str(env.get("device_name", ""))
    floor_col = "H100 floor ms (% of it)" if on_h100 else "H100 floor ms (computed, not this device)"
    head = ("| case | shape | provider | median ms | IQR ms | vs eager | vs compile | bandwidth | "
            f"{floor_col} | peak MiB | first call s |")
    sep = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"

    def floor_cell(r):
        if not r.get("floor_ms"):
            return "n/a"
        if not on_h100:
            return f"{r['floor_ms']:.3g}"
        return f"{r['floor_ms']:.3g} ({100 * r['floor_ms'] / r['median_ms']:.1f}%)"

    def op_lines(rs):
        out = []
        for r in rs:
            if r["status"] != "ok":
                out.append(f"| {r['case']} | {r['shape_str']} | {r['provider']} | {r['status']}: "
                           f"{(r.get('reason') or '')[:80]} | | | | | | | |")
                continue
            star = " **(target)**" if r.get("target") and r["provider"] in FUSED else ""
            out.append(f"| {r['case']} | {r['shape_str']} | {r['provider']}{star} | {r['median_ms']:.3f} | "
                       f"{r['iqr_ms']:.3f} | {_x(r.get('speedup_vs_eager'))} | "
                       f"{_x(r.get('speedup_vs_compile'))} | {_throughput(r)} | {floor_cell(r)} | "
                       f"{_mib(r.get('peak_mem_bytes'))} | "
                       f"{_fmt(r.get('first_call_s'))} |")
        return out

    if ops:
        lines += ["## Ops and the HCD head (forward + backward)", "", head, sep] + op_lines(ops) + [""]
    if sweep:
        lines += ["## sub_logit_loss batch sweep (compile with dynamic=True, compiled once for the sweep)", "", head, sep]
        lines += op_lines(sweep) + [""]
    if steps:
        lines += ["## Whole distillation steps (ResNet18 student, one optimizer step)", "",
                  "| teacher -> student | shape | variant | precision | median ms | IQR ms | overhead vs KD "
                  "| speedup vs hcd_ref | peak MiB |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in steps:
            if r["status"] != "ok":
                lines.append(f"| {r['case'][5:]} | {r['shape_str']} | {r['provider']} | | {r['status']}: "
                             f"{(r.get('reason') or '')[:80]} | | | | |")
                continue
            ov = r.get("overhead_vs_kd")
            lines.append(f"| {r['case'][5:]} | {r['shape_str']} | {r['provider']} | {r['precision']} | "
                         f"{r['median_ms']:.1f} | {r['iqr_ms']:.1f} | "
                         f"{'' if ov is None else f'{100 * ov:+.1f}%'} | "
                         f"{_x(r.get('speedup_vs_hcd_ref'))} | {_mib(r.get('peak_mem_bytes'))} |")
        lines += ["", "Variants: ce = student alone; kd = plain KD; *_ref = as the published code runs it "
                  "(reference backend, fp32 on CPU / fp16 autocast on CUDA, loss.item() every step); hcd = "
                  "hcd_fast backend='auto', teacher in inference mode, no host sync, in the precision shown "
                  "(bf16 autocast + channels_last on CUDA; fp32 on CPU, see benchmarks/steps.py). Overhead: "
                  "hcd vs kd, hcd_ref vs kd_ref.", ""]
    plots = result.get("plots") or []
    if plots:
        lines += ["Plots: " + ", ".join(f"[{os.path.basename(p)}]({os.path.basename(p)})" for p in plots), ""]
    return "\n".join(lines)


PROVIDER_STYLE = {"eager": ("tab:gray", "o"), "compile": ("tab:blue", "s"), "cpu": ("tab:green", "^"),
                  "cuda": ("tab:red", "^"), "triton": ("tab:purple", "v")}


def plots(result: dict, out_dir: str) -> List[str]:
    """Write the PNGs; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ok(result["rows"])
    written: List[str] = []
    title_dev = result["env"]["device_name"]
    copy_gbps = result["copy_bandwidth"]["gbps"]

    sweep = [r for r in rows if r["suite"] == "ops" and r["group"] == "sweep"]
    if sweep:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for dtype in sorted({r["dtype"] for r in sweep}):
            for prov in dict.fromkeys(r["provider"] for r in sweep):
                rs = sorted((r for r in sweep if r["provider"] == prov and r["dtype"] == dtype),
                            key=lambda r: r["shape"]["B"])
                if not rs:
                    continue
                color, marker = PROVIDER_STYLE.get(prov, ("black", "x"))
                label = f"{prov} {dtype}"
                bs = [r["shape"]["B"] for r in rs]
                ax1.plot(bs, [r["median_ms"] for r in rs], marker=marker, color=color, label=label)
                ax2.plot(bs, [r["gbps"] for r in rs], marker=marker, color=color, label=label)
        ax2.axhline(copy_gbps, color="black", linestyle="--", linewidth=1, label=f"copy {copy_gbps:.0f} GB/s")
        ax2.axhline(0.7 * copy_gbps, color="black", linestyle=":", linewidth=1, label="70% of copy")
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            sh = sweep[0]["shape"]
            ax.set_xlabel(f"batch B (S={sh['S']}, n={sh['n']}, K={sh['K']})")
            ax.grid(True, which="both", alpha=0.3)
        ax1.set_ylabel("fwd+bwd median time (ms)")
        ax1.set_title("time: flat = launch-bound, slope 1 = bandwidth-bound")
        ax2.set_ylabel("achieved bandwidth (GB/s, design bytes)")
        ax2.set_title("achieved bandwidth vs device copy")
        ax2.legend(fontsize=7)
        fig.suptitle(f"sub_logit_loss fwd+bwd batch sweep: {title_dev}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, "sub_logit_loss_sweep.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    ops = [r for r in rows if r["suite"] == "ops" and r["group"] != "sweep"]
    if ops:
        cases = list(dict.fromkeys(r["case"] for r in ops))
        provs = [p for p in dict.fromkeys(r["provider"] for r in ops) if p != "eager"]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cases) + 2), 4.2))
        width = 0.8 / max(1, len(provs))
        for j, prov in enumerate(provs):
            vals = []
            for c in cases:
                r = next((r for r in ops if r["case"] == c and r["provider"] == prov), None)
                vals.append(r["speedup_vs_eager"] if r and r.get("speedup_vs_eager") else 0.0)
            color, _ = PROVIDER_STYLE.get(prov, ("black", "x"))
            xs = [i + (j - (len(provs) - 1) / 2) * width for i in range(len(cases))]
            ax.bar(xs, [v or float("nan") for v in vals], width, label=prov, color=color)
            for x, v in zip(xs, vals):
                if v:
                    ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=6)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=1, label="eager = 1")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("speedup over eager reference, fwd+bwd (log)")
        ax.set_title(f"ops and HCD head: {title_dev}", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, "ops_speedup.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    steps = [r for r in rows if r["suite"] == "steps"]
    if steps:
        cases = list(dict.fromkeys(r["case"] for r in steps))
        fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 3.6), squeeze=False)
        for ax, c in zip(axes[0], cases):
            rs = [r for r in steps if r["case"] == c]
            ax.barh([f"{r['provider']} ({r['precision']})" for r in rs], [r["median_ms"] for r in rs],
                    xerr=[r["iqr_ms"] / 2 for r in rs], color="tab:blue")
            ax.invert_yaxis()
            ax.set_xlabel("median step time (ms)")
            ax.set_title(f"{c[5:]} ({rs[0]['shape_str']})", fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
        fig.suptitle(f"one optimizer step: {title_dev}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, "steps.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def safe_plots(result: dict, out_dir: str) -> List[str]:
    """:func:`plots`, or none with a message where matplotlib is missing (the GPU machine may lack it):
    ``python -m benchmarks.report results.json`` renders them later from the JSON."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib not installed: no plots (render them later: python -m benchmarks.report "
              f"{os.path.join(out_dir, 'results.json')})")
        return []
    try:
        return plots(result, out_dir)
    except Exception as exc:  # a plotting problem must not lose the measurements
        print(f"plots failed: {type(exc).__name__}: {exc}")
        return []


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
