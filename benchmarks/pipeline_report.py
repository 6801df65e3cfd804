"""What the pipeline benchmark's users read: its ratios, the ms-per-image breakdown, pipeline.md and
pipeline.png."""
from __future__ import annotations

import os
import traceback
from typing import Dict, List, Optional

import numpy as np

RATIOS = {  # name: (numerator row, denominator row), in img/s
    "hcd_ours_vs_published": ("step/hcd_ours", "step/hcd_published"),
    "hcd_cache_vs_ours": ("step/hcd_cache", "step/hcd_ours"),
    "hcd_cache_vs_published": ("step/hcd_cache", "step/hcd_published"),
    "e2e_ours_vs_published": ("e2e/ours", "e2e/published"),
    "e2e_cache_vs_published": ("e2e/cache", "e2e/published"),
    "loader_dali_vs_timm": ("loader/dali", "loader/timm"),
    "loader_dali_cache_vs_cache": ("loader/dali_cache", "loader/cache"),
    "e2e_ours_dali_vs_ours": ("e2e/ours_dali", "e2e/ours"),
    "e2e_cache_dali_vs_published": ("e2e/cache_dali", "e2e/published"),
    "teacher_ours_vs_published": ("teacher/ours", "teacher/published"),
}


def ratios(rows: List[dict]) -> Dict[str, Optional[float]]:
    """img/s ratios of the rows that ran, and the hcd ratios read round by round (rows interleaved on the
    CPU: a load change between rounds cancels out, the steadier reading on a shared machine)."""
    ok = {r["component"]: r for r in rows if r["status"] == "ok"}
    out = {name: ok[a]["images_per_s"] / ok[b]["images_per_s"] if a in ok and b in ok else None
           for name, (a, b) in RATIOS.items()}
    out["hcd_ours_vs_published_per_round"] = paired_ratio(ok, "step/hcd_ours", "step/hcd_published")
    out["hcd_cache_vs_ours_per_round"] = paired_ratio(ok, "step/hcd_cache", "step/hcd_ours")
    return out


def paired_ratio(ok: Dict[str, dict], a: str, b: str) -> Optional[float]:
    """Median over rounds of (b's ms / a's ms) in the same round: a's speed-up over b, read round by round."""
    ra, rb = (ok.get(a) or {}).get("round_ms"), (ok.get(b) or {}).get("round_ms")
    if not ra or not rb or len(ra) != len(rb):
        return None
    return float(np.median([tb / ta for ta, tb in zip(ra, rb)]))


def breakdown(ok: Dict[str, dict]) -> List[dict]:
    """ms per image of each pipeline split into loader, teacher forward and student + head (the step's
    time less the teacher's), with the measured end-to-end ms per image."""
    def ms(name):
        r = ok.get(name)
        return None if r is None else 1e3 / r["images_per_s"]
    out = []
    pipelines = (("published", "loader/timm", "teacher/published", "step/hcd_published", "e2e/published"),
                 ("ours", "loader/timm", "teacher/ours", "step/hcd_ours", "e2e/ours"),
                 ("ours + cache", "loader/cache", None, "step/hcd_cache", "e2e/cache"),
                 ("ours, DALI", "loader/dali", "teacher/ours", "step/hcd_ours", "e2e/ours_dali"),
                 ("ours + cache, DALI", "loader/dali_cache", None, "step/hcd_cache", "e2e/cache_dali"))
    for label, loader, teacher, step, e2e in pipelines:
        s, t = ms(step), (ms(teacher) if teacher else 0.0)
        if s is None or t is None or ms(loader) is None and "DALI" in label:
            continue
        out.append({"pipeline": label, "loader_ms_per_img": ms(loader), "teacher_ms_per_img": t,
                    "student_head_ms_per_img": max(s - t, 0.0), "step_ms_per_img": s, "e2e_ms_per_img": ms(e2e)})
    return out


def _f(v, spec=".1f"):
    return "n/a" if v is None else f"{v:{spec}}"


def markdown(result: dict) -> str:
    env, cfg = result["env"], result["config"]
    lines = [f"# Pipeline benchmark ({result['profile']} profile)", "",
             f"{env['device_name']}, torch {env['torch']}, commit {str(env['git_commit'])[:12]}, {result['created']}, "
             f"load average {env.get('loadavg_start')} -> {result.get('loadavg_end')}. Teacher {cfg['teacher']} "
             f"(random weights) -> student {cfg['student']}, {cfg['img']} px, batch {cfg['batch']}, "
             f"{cfg['workers']} loader workers, synthetic ImageFolder of {result['data']['train_images']} JPEGs, "
             f"teacher cache K={cfg['views']} fp16, DALI {env.get('dali') or 'not installed'}.", "",
             "| component | img/s | ms (median) | settings | status |", "|---|---:|---:|---|---|"]
    for r in result["rows"]:
        settings = r.get("settings") or r.get("precision") or (f"{r['workers']} workers" if "workers" in r else "")
        lines.append(f"| {r['component']} | {_f(r.get('images_per_s'))} | {_f(r.get('median_ms'))} | {settings} | "
                     f"{r['status'] if r['status'] == 'ok' else r['status'] + ': ' + str(r['reason'])} |")
    rt = result.get("ratios", {})
    lines += ["", "| ratio (img/s) | value |", "|---|---:|"]
    lines += [f"| {k} | {_f(v, '.2f')}{'x' if v is not None else ''} |" for k, v in rt.items()]
    lines += ["", "Where the time goes (ms per image; loader + teacher + student/head is a serial sum, the loader's "
              "workers overlap the step in training; e2e is measured):", "",
              "| pipeline | loader | teacher fwd | student + head | step | e2e |", "|---|---:|---:|---:|---:|---:|"]
    for b in result.get("breakdown", []):
        lines.append(f"| {b['pipeline']} | {_f(b['loader_ms_per_img'], '.2f')} | "
                     f"{_f(b['teacher_ms_per_img'], '.2f')} | {_f(b['student_head_ms_per_img'], '.2f')} | "
                     f"{_f(b['step_ms_per_img'], '.2f')} | {_f(b['e2e_ms_per_img'], '.2f')} |")
    if result["profile"] == "cpu":
        lines += ["", f"CPU targets (read, never asserted): hcd_cache >= 1.5x hcd_ours: "
                  f"{_f(rt.get('hcd_cache_vs_ours'), '.2f')}x (per round "
                  f"{_f(rt.get('hcd_cache_vs_ours_per_round'), '.2f')}x); hcd_ours >= 1.2x hcd_published: "
                  f"{_f(rt.get('hcd_ours_vs_published'), '.2f')}x (per round "
                  f"{_f(rt.get('hcd_ours_vs_published_per_round'), '.2f')}x)."]
    return "\n".join(lines)


def safe_plot(result: dict, out_dir: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return []
    try:
        bd = result.get("breakdown", [])
        if not bd:
            return []
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [b["pipeline"] for b in bd]
        bottom = np.zeros(len(bd))
        for key, label in (("loader_ms_per_img", "loader (PIL/timm, DALI, or cache replay)"),
                           ("teacher_ms_per_img", "teacher forward"),
                           ("student_head_ms_per_img", "student + HCD head (fwd, bwd, optimizer)")):
            vals = np.array([b[key] or 0.0 for b in bd])
            ax.bar(names, vals, bottom=bottom, label=label)
            bottom += vals
        e2e = [b["e2e_ms_per_img"] for b in bd]
        ax.plot([n for n, v in zip(names, e2e) if v is not None], [v for v in e2e if v is not None], "kD",
                label="measured end to end")
        cfg = result["config"]
        ax.set_ylabel("ms per image"), ax.legend(fontsize=8)
        ax.set_title(f"{cfg['teacher']} -> {cfg['student']}, {cfg['img']} px, B={cfg['batch']} "
                     f"({result['env']['device_name'][:40]})", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, "pipeline.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]
    except Exception:  # a plot must not lose the numbers
        traceback.print_exc(limit=3)
        return []
