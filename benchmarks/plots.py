"""The PNG plots of a benchmark run (matplotlib, Agg backend): the sub_logit_loss batch sweep, the op and
head speedups over eager, and the step times. ``python -m benchmarks.report`` re-renders them from a JSON."""
from __future__ import annotations

import os
from typing import List

PROVIDER_STYLE = {"eager": ("tab:gray", "o"), "compile": ("tab:blue", "s"), "compile-ro": ("tab:cyan", "s"),
                  "cpu": ("tab:green", "^"), "cuda": ("tab:red", "^"), "triton": ("tab:purple", "v"),
                  "cuda+compile": ("salmon", "^"), "triton+compile": ("orchid", "v"), "cpu+compile": ("lime", "^"),
                  "cuda+graph": ("darkred", "^"), "triton+graph": ("indigo", "v")}


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def _save(fig, plt, out_dir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_plot(plt, sweep: List[dict], copy_gbps: float, title: str, out_dir: str) -> str:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for dtype in sorted({r["dtype"] for r in sweep}):
        for prov in dict.fromkeys(r["provider"] for r in sweep):
            rs = sorted((r for r in sweep if r["provider"] == prov and r["dtype"] == dtype),
                        key=lambda r: r["shape"]["B"])
            if not rs:
                continue
            color, marker = PROVIDER_STYLE.get(prov, ("black", "x"))
            bs = [r["shape"]["B"] for r in rs]
            ax1.plot(bs, [r["median_ms"] for r in rs], marker=marker, color=color, label=f"{prov} {dtype}")
            ax2.plot(bs, [r["gbps"] for r in rs], marker=marker, color=color, label=f"{prov} {dtype}")
    ax2.axhline(copy_gbps, color="black", linestyle="--", linewidth=1, label=f"copy {copy_gbps:.0f} GB/s")
    ax2.axhline(0.7 * copy_gbps, color="black", linestyle=":", linewidth=1, label="70% of copy")
    sh = sweep[0]["shape"]
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"batch B (S={sh['S']}, n={sh['n']}, K={sh['K']})")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("fwd+bwd median time (ms)")
    ax1.set_title("time: flat = launch-bound, slope 1 = bandwidth-bound")
    ax2.set_ylabel("achieved bandwidth (GB/s, design bytes)")
    ax2.set_title("achieved bandwidth vs device copy")
    ax2.legend(fontsize=7)
    fig.suptitle(f"sub_logit_loss fwd+bwd batch sweep: {title}", fontsize=10)
    return _save(fig, plt, out_dir, "sub_logit_loss_sweep.png")


def ops_plot(plt, ops: List[dict], title: str, out_dir: str) -> str:
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
    ax.set_title(f"ops and HCD head: {title}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, plt, out_dir, "ops_speedup.png")


def steps_plot(plt, steps: List[dict], title: str, out_dir: str) -> str:
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
    fig.suptitle(f"one optimizer step: {title}", fontsize=10)
    return _save(fig, plt, out_dir, "steps.png")


def plots(result: dict, out_dir: str) -> List[str]:
    """Write the PNGs; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ok(result["rows"])
    title = result["env"]["device_name"]
    sweep = [r for r in rows if r["suite"] == "ops" and r["group"] == "sweep"]
    ops = [r for r in rows if r["suite"] == "ops" and r["group"] not in ("sweep", "fwd")]
    steps = [r for r in rows if r["suite"] == "steps"]
    written = []
    if sweep:
        written.append(sweep_plot(plt, sweep, result["copy_bandwidth"]["gbps"], title, out_dir))
    if ops:
        written.append(ops_plot(plt, ops, title, out_dir))
    if steps:
        written.append(steps_plot(plt, steps, title, out_dir))
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
