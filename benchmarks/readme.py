"""Render the README's Performance summary from a committed results.json, so no number is typed by hand.

    python -m benchmarks.readme benchmarks/results/cpu/results.json
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict

from benchmarks.providers import is_fused


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def render(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    rows = data["rows"]
    env = rows[0]
    commit = env["git_commit"][:10] + (" plus uncommitted changes" if env.get("git_dirty") else "")
    fused = [p for p in data["providers"] if is_fused(p)]
    stock = [p for p in data["providers"] if p in ("compile", "compile-ro")]
    md = path.replace("results.json", "results.md")
    out = [f"Committed run: [{md}]({md}), {env['device_name']}, "
           f"torch {env['torch']}, commit `{commit}`, {env['timestamp'][:16].replace('T', ' ')} UTC, 1-min load "
           f"average {env['loadavg_start']} at the start and {data.get('loadavg_end')} at the end. Forward + "
           "backward medians in ms; speedups are over the eager reference and the best stock baseline (the faster of "
           "torch.compile and its reduce-overhead mode) in the same run:", "",
           "| case | shape | eager | " + " | ".join(f"`{p}`" for p in stock + fused) + " |",
           "|---|---|---|" + "---|" * len(stock + fused)]
    cases: "OrderedDict[str, dict]" = OrderedDict()
    for r in rows:
        if r["suite"] == "ops" and r["status"] == "ok" and r["group"] not in ("sweep", "fwd"):
            cases.setdefault(r["case"], {})[r["provider"]] = r
    for case, by in cases.items():
        if "eager" not in by:
            continue
        cells = [case, by["eager"]["shape_str"], _fmt(by["eager"]["median_ms"])]
        for p in stock:
            c = by.get(p)
            cells.append(f"{_fmt(c['median_ms'])} ({c['speedup_vs_eager']:.1f}x)" if c else "n/a")
        for p in fused:
            r = by.get(p)
            if r is None:
                cells.append("n/a")
                continue
            vs = r.get("speedup_vs_stock", r.get("speedup_vs_compile"))  # older runs: compile alone
            vs_c = f", {vs:.1f}x stock" if vs else ""
            cells.append(f"{_fmt(r['median_ms'])} ({r['speedup_vs_eager']:.1f}x eager{vs_c})")
        out.append("| " + " | ".join(cells) + " |")
    steps: "OrderedDict[str, list]" = OrderedDict()
    for r in rows:
        if r["suite"] == "steps" and r["status"] == "ok":
            steps.setdefault(r["case"], []).append(r)
    if steps:
        out += ["", "Whole optimizer steps (median ms per step; overheads of HCD over plain KD in the same run):", ""]
        for case, rs in steps.items():
            parts = []
            for r in rs:
                base = "kd_ref" if r["provider"].endswith("_ref") else "kd"
                extra = (f" ({100 * r['overhead_vs_kd']:+.0f}% vs {base})"
                         if r.get("overhead_vs_kd") is not None else "")
                parts.append(f"{r['provider']} {r['median_ms']:.0f} ms{extra}")
            out.append(f"- {case.split('/', 1)[1]} ({rs[0]['shape_str']}): " + ", ".join(parts))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default="benchmarks/results/cpu/results.json")
    print(render(ap.parse_args().results))


if __name__ == "__main__":
    main()
