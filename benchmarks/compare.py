"""``python -m benchmarks compare OLD.json NEW.json``: speedup ratios of two benchmark runs side by side.

    python -m benchmarks compare benchmarks/results/cpu/results.json /tmp/new/results.json
    python -m benchmarks compare OLD.json NEW.json --band 0.15 --out compare.md

Per case and fused provider it prints the ratios each run measured against its own eager reference (ops:
``eager``; steps: ``hcd_ref``) and, where both runs have it, against the best stock baseline (the faster of
``compile`` and ``compile-ro``; runs before ``compile-ro`` existed have ``compile`` alone), and flags a ratio that
fell by more than the noise band as a REGRESSION (rose: ``faster``). Ratios, not times: both providers of a
ratio were timed in the same run, close together, so machine-wide slowdowns (load from other users, clock)
mostly cancel; times of two runs on a shared machine do not compare.

Noise band of one comparison: max(--band, Z * s), where s combines the standard errors of the four medians
behind the two ratios, each estimated from its run's IQR and repetitions (a median of n samples with
interquartile range IQR has standard error ~1.2533 * (IQR / 1.349) / sqrt(n) for Gaussian noise), in relative
terms: s = sqrt(sum of (se / median)^2). Z = 3. The floor --band (default 0.10) covers what the within-run
spread does not see: run-to-run drift of a ratio from load that changes between the two providers' timings,
frequency and memory placement on the shared 2-core development machine (benchmarks/README.md: how it was
chosen). Runs measured with a 1-min load average above their thread count are flagged as not comparable.
Exit status: 0 when nothing regressed, 1 when a ratio regressed or a case that ran in OLD failed or
is missing in NEW, 2 when a file cannot be read.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Dict, List, Optional, Tuple

DEFAULT_BAND = 0.10
Z = 3.0
BASELINES = {"ops": ("eager", "stock"), "steps": ("hcd_ref", None)}
STOCK = ("compile", "compile-ro")  # rows of their own in no comparison: the baselines


class CompareError(Exception):
    """A results file that cannot be compared (the message names it)."""


def load(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise CompareError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise CompareError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise CompareError(f"{path}: not a benchmarks results.json (no 'rows' list)")
    return data


def _index(data: dict) -> Dict[Tuple[str, str], Dict[str, dict]]:
    """{(suite, case): {provider: row}}."""
    out: Dict[Tuple[str, str], Dict[str, dict]] = {}
    for r in data["rows"]:
        if isinstance(r, dict) and {"suite", "case", "provider"} <= set(r):
            out.setdefault((r["suite"], r["case"]), {})[r["provider"]] = r
    return out


def _ok(row: Optional[dict]) -> bool:
    return bool(row) and row.get("status") == "ok" and (row.get("median_ms") or 0) > 0


def _rel_se(row: dict) -> float:
    """Relative standard error of the row's median, from its IQR and repetitions."""
    reps = max(int(row.get("reps") or 1), 1)
    iqr = float(row.get("iqr_ms") or 0.0)
    return 1.2533 * (iqr / 1.349) / math.sqrt(reps) / row["median_ms"]


def _baseline(rows: Dict[str, dict], base: Optional[str]) -> Optional[dict]:
    """The row of ``base``; "stock" is the faster ok row of compile and compile-ro."""
    if base != "stock":
        return rows.get(base) if base is not None else None
    return min((rows[p] for p in STOCK if _ok(rows.get(p))), key=lambda r: r["median_ms"], default=None)


def _ratio(rows: Dict[str, dict], provider: str, base: Optional[str]):
    """(baseline median / provider median, its relative standard error) or None."""
    b = _baseline(rows, base)
    if not (_ok(rows.get(provider)) and _ok(b)):
        return None
    p = rows[provider]
    return b["median_ms"] / p["median_ms"], math.hypot(_rel_se(p), _rel_se(b))


def compare(old: dict, new: dict, band: float = DEFAULT_BAND, z: float = Z) -> List[dict]:
    """One record per (suite, case, provider) that is not a baseline: the ratios of both runs, their change
    (new / old - 1), the band and a verdict: "ok" (within the band), "REGRESSION", "faster", "failed in new"
    (ran in OLD, not ok in NEW), "missing in new", "new" (only in NEW), "n/a" (no ratio in OLD either)."""
    a, b = _index(old), _index(new)
    records = []
    for key in sorted(set(a) | set(b), key=lambda k: (k[0] != "ops", k[1])):
        suite, case = key
        bases = BASELINES.get(suite, ("eager", "stock"))
        rows_a, rows_b = a.get(key, {}), b.get(key, {})
        for provider in sorted(set(rows_a) | set(rows_b)):
            if provider in bases or (suite == "ops" and provider in STOCK):
                continue
            rec = {"suite": suite, "case": case, "provider": provider, "verdict": "ok", "band": None}
            worst = None
            for label, base in zip(("eager", "stock"), bases):
                ra, rb = _ratio(rows_a, provider, base), _ratio(rows_b, provider, base)
                rec[f"old_vs_{label}"] = ra[0] if ra else None
                rec[f"new_vs_{label}"] = rb[0] if rb else None
                rec[f"change_vs_{label}"] = None
                if ra and rb:
                    change = rb[0] / ra[0] - 1
                    limit = max(band, z * math.hypot(ra[1], rb[1]))
                    rec[f"change_vs_{label}"] = change
                    rec["band"] = max(rec["band"] or 0.0, limit)
                    score = change / limit  # < -1: beyond the band, slower
                    worst = score if worst is None else min(worst, score)
                    if change > limit and rec["verdict"] == "ok":
                        rec["verdict"] = "faster"
            if worst is not None and worst < -1:
                rec["verdict"] = "REGRESSION"
            elif worst is None:
                if _ok(rows_a.get(provider)) and not rows_b:
                    rec["verdict"] = "missing in new"
                elif _ok(rows_a.get(provider)) and not _ok(rows_b.get(provider)):
                    rec["verdict"] = "failed in new"
                elif not rows_a:
                    rec["verdict"] = "new"
                else:
                    rec["verdict"] = "n/a"
            records.append(rec)
    return records


def _x(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.2f}x"


def _pct(v: Optional[float]) -> str:
    return "" if v is None else f"{100 * v:+.1f}%"


def _run_line(name: str, path: str, data: dict) -> str:
    env = data.get("env") or {}
    return (f"- {name}: `{path}`: {env.get('device_name', '?')}, commit `{str(env.get('git_commit', '?'))[:12]}`, "
            f"profile {data.get('profile', '?')}, {data.get('created', '?')}, 1-min load "
            f"{env.get('loadavg_start', '?')} -> {data.get('loadavg_end', '?')}")


def loaded(data: dict) -> Optional[Tuple[float, int]]:
    """(highest 1-min load average recorded in the run, threads it used) when the load exceeded the threads:
    other work competed for the cores and the ratios are not comparable; else None."""
    threads = [r.get("threads") for r in data["rows"] if isinstance(r, dict) and r.get("threads")]
    loads = [r.get("loadavg") for r in data["rows"] if isinstance(r, dict)]
    loads += [(data.get("env") or {}).get("loadavg_start"), data.get("loadavg_end")]
    loads = [float(v) for v in loads if isinstance(v, (int, float))]
    if not threads or not loads or max(loads) <= max(threads):
        return None
    return max(loads), max(threads)


def markdown(records: List[dict], old_path: str, old: dict, new_path: str, new: dict, band: float,
             z: float = Z) -> str:
    lines = ["# Benchmark comparison (speedup ratios; higher is faster)", "",
             _run_line("old", old_path, old), _run_line("new", new_path, new),
             f"- noise band per row: max({band:.0%}, {z:g} x the combined standard error of its four medians); "
             "REGRESSION = a ratio fell by more than its band", ""]
    if (old.get("env") or {}).get("device_name") != (new.get("env") or {}).get("device_name"):
        lines += ["**Warning: the runs are on different devices; their ratios do not compare.**", ""]
    for name, data in (("old", old), ("new", new)):
        load = loaded(data)
        if load is not None:
            lines += [f"**Warning: the {name} run was measured under load (1-min load average up to {load[0]:g} on "
                      f"{load[1]} threads): its ratios move by far more than the band (three runs of one commit at "
                      "load 9-11 on 2 cores differed by up to 80%); rerun on an idle machine.**", ""]
    lines += ["| case | provider | vs eager old | new | change | vs stock old | new | change | band | verdict |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        verdict = f"**{r['verdict']}**" if r["verdict"] in ("REGRESSION", "failed in new", "missing in new") \
            else r["verdict"]
        band_cell = "" if r["band"] is None else f"{r['band']:.0%}"
        lines.append(f"| {r['case']} | {r['provider']} | {_x(r['old_vs_eager'])} | {_x(r['new_vs_eager'])} | "
                     f"{_pct(r['change_vs_eager'])} | {_x(r['old_vs_stock'])} | {_x(r['new_vs_stock'])} | "
                     f"{_pct(r['change_vs_stock'])} | {band_cell} | {verdict} |")
    bad = [r for r in records if r["verdict"] in ("REGRESSION", "failed in new", "missing in new")]
    lines += ["", f"{len(bad)} of {len(records)} rows regressed, failed or are missing" if bad else
              f"no regression beyond the noise band ({len(records)} rows)"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__.split("\n")[0])
    ap.add_argument("old", help="results.json of the earlier run (e.g. benchmarks/results/cpu/results.json)")
    ap.add_argument("new", help="results.json of the run to check")
    ap.add_argument("--band", type=float, default=DEFAULT_BAND,
                    help=f"noise floor: relative ratio change tolerated (default {DEFAULT_BAND})")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    if not 0 <= args.band < 1:
        print(f"python -m benchmarks compare: --band must be in [0, 1), got {args.band}", file=sys.stderr)
        return 2
    try:
        old, new = load(args.old), load(args.new)
    except CompareError as exc:
        print(f"python -m benchmarks compare: {exc}", file=sys.stderr)
        return 2
    records = compare(old, new, args.band)
    md = markdown(records, args.old, old, args.new, new, args.band)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md + "\n")
    return 1 if any(r["verdict"] in ("REGRESSION", "failed in new", "missing in new") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
