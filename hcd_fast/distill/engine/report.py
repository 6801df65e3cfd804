"""What a run tells its user: messages, per-epoch metrics files, loss and accuracy plots, the summary."""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

from hcd_fast.distill.checkpoint import atomic_write_bytes, atomic_write_text


def warn(text: str) -> None:
    print(f"hcd-distill: warning: {text}", file=sys.stderr, flush=True)


def info(is_main: bool, text: str) -> None:
    if is_main:
        print(f"hcd-distill: {text}", flush=True)


def write_metrics(history: List[dict], out: str) -> None:
    import csv
    import io
    if not history:
        return
    keys = list(history[0].keys())
    for row in history[1:]:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(buf.getvalue(), os.path.join(out, "metrics.csv"))
    atomic_write_text("".join(json.dumps(r) + "\n" for r in history), os.path.join(out, "metrics.jsonl"))


def _save_fig(fig, path: str) -> None:
    import io
    buf = io.BytesIO()
    fig.tight_layout(), fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(buf.getvalue(), path)


def write_plots(history: List[dict], part_names, out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    epochs = [r["epoch"] for r in history]
    has_val = all(r.get("val_top1") is not None for r in history)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in history], label="total", linewidth=2)
    for name in part_names:
        ax.plot(epochs, [r[f"train_{name}"] for r in history], label=name)
    if has_val:
        ax.plot(epochs, [r["val_loss"] for r in history], "--", label="val CE")
    ax.set_xlabel("epoch"), ax.set_ylabel("loss (epoch mean)"), ax.set_yscale("log"), ax.legend()
    ax.set_title("loss parts (unweighted)")
    _save_fig(fig, os.path.join(out, "loss.png")), plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_top1"] for r in history], label="train top-1")
    if has_val:
        ax.plot(epochs, [r["val_top1"] for r in history], label="val top-1", linewidth=2)
    ax.set_xlabel("epoch"), ax.set_ylabel("accuracy (%)"), ax.legend(), ax.set_title("accuracy")
    _save_fig(fig, os.path.join(out, "accuracy.png")), plt.close(fig)


def _pct(v: Optional[float]) -> str:
    return "n/a (no validation data)" if v is None else f"{v:.2f}"


def format_summary(summary: dict) -> str:
    best = _pct(summary["best_top1"]) + (f" (epoch {summary['best_epoch']})" if summary["best_top1"] is not None else "")
    rows = [("method", summary["method"]), ("teacher", summary["teacher"]), ("student", summary["student"]),
            ("dataset", summary["dataset"]), ("epochs", summary["epochs"]),
            ("best val top-1 (%)", best), ("final val top-1 (%)", _pct(summary["final_top1"])),
            ("train wall time (s)", f"{summary['train_seconds']:.1f}"),
            ("train images/s", f"{summary['images_per_s']:.0f}"),
            ("skipped images", f"{summary['skipped_images']} files, {summary['skipped_samples']} samples"),
            ("skipped steps", summary["skipped_steps"]), ("output", summary["output"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


