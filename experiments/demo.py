"""``make demo`` / ``python -m experiments.demo``: heterogeneous distillation on real data, on a CPU.

1. Train a small ViT teacher (timm vit, 16x16 input, patch 4, depth 4, width 64) on scikit-learn's embedded
   8x8 digits (upsampled), with hcd-distill's own trainer (``--method ce``); cached as runs/demo/teacher.pt.
2. Distill it into a tiny CNN (timm resnet10t with widths 16-32-64-128) with ce (no teacher), kd and hcd,
   the same budget and hyper-parameters each, over several seeds; print top-1 (mean and spread), wall time
   per run, and ms per training step measured interleaved (robust to other jobs on the machine).

Every run goes through ``hcd_fast.distill.engine.run.run`` with CLI flags, exactly as ``hcd-distill`` would.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import torch

from hcd_fast.distill.checkpoint import safe_load
from hcd_fast.distill.cli import parse_args
from hcd_fast.distill.engine.run import run

TEACHER = ["--student", "vit_tiny_patch16_224", "--student-kwargs",
           '{"img_size": 16, "patch_size": 4, "depth": 4, "embed_dim": 64, "num_heads": 4}']
STUDENT = ["--student", "resnet10t", "--student-kwargs", '{"channels": [16, 32, 64, 128], "stem_width": 16}']


def step_times(methods, batch_size: int, rounds: int = 8, steps: int = 10) -> dict:
    """Median ms per training step of each method, measured interleaved (round-robin) so that load from
    other processes hits every method alike. Random weights: the cost does not depend on them."""
    import statistics as st

    import timm

    from hcd_fast.distill import Distiller, DistillTask, TeacherTap, TrainStep, build_criterion, probe_student
    torch.manual_seed(0)
    teacher = TeacherTap(timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4,
                                           depth=4, embed_dim=64, num_heads=4))
    runs = {}
    for method in methods:
        student = timm.create_model("resnet10t", num_classes=10, channels=(16, 32, 64, 128), stem_width=16)
        channels, _ = probe_student(student, 4, (3, 16, 16))
        distiller = Distiller(student, build_criterion(method, channels, 64, 10))
        task = DistillTask(distiller, teacher if method != "ce" else None).train()
        runs[method] = TrainStep(task, torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9))
    x, y = torch.randn(batch_size, 3, 16, 16), torch.randint(0, 10, (batch_size,))
    times = {m: [] for m in runs}
    for r in range(rounds + 1):  # round 0 warms up
        for method, step in runs.items():
            t = time.perf_counter()
            for _ in range(steps):
                step(x, y)
            if r:
                times[method].append((time.perf_counter() - t) / steps * 1e3)
    return {m: st.median(v) for m, v in times.items()}


def train_teacher(out_dir: str, teacher_ckpt: str, common: list, epochs: int) -> dict:
    """Train the demo's ViT teacher with ce under OUT_DIR/teacher_run and publish its best.pt as teacher_ckpt
    (written to a temporary name, then moved); returns the run's summary."""
    out = os.path.join(out_dir, "teacher_run")
    s = run(parse_args(TEACHER + common + [
        "--method", "ce", "--indices", "1", "--epochs", str(epochs), "--opt", "adamw", "--lr", "2e-3",
        "--weight-decay", "0.05", "--min-lr", "1e-5", "--warmup-epochs", "2", "--output", out]))
    shutil.copyfile(os.path.join(out, "best.pt"), teacher_ckpt + ".tmp")
    os.replace(teacher_ckpt + ".tmp", teacher_ckpt)
    return s


def _usable_teacher(path: str) -> bool:
    """A cached teacher written by this version of the trainer (it records its input normalisation)."""
    from hcd_fast.distill.errors import UserError
    try:
        return os.path.isfile(path) and "data_config" in safe_load(path, "teacher")
    except UserError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (runs/demo)")
    p.add_argument("--methods", default="ce,kd,hcd", help="comma list of methods (ce,kd,hcd)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (3)")
    p.add_argument("--epochs", type=int, default=6, help="student epochs, the same for every method (6)")
    p.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs on first run (30)")
    p.add_argument("--lr", type=float, default=0.01, help="student peak learning rate, every method (0.01; at "
                   "0.05 HCD's large initial loss, about 40 against ce's 2.3, stalls its first epochs)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (64)")
    p.add_argument("--retrain-teacher", action="store_true", help="ignore the cached teacher")
    a = p.parse_args(argv)
    # --overwrite: the demo's own run folders are replaced on every run (the teacher is cached separately).
    common = ["--img-size", "16", "--batch-size", str(a.batch_size), "--no-progress", "--no-plots", "--overwrite"]
    os.makedirs(a.out, exist_ok=True)
    teacher_ckpt = os.path.join(a.out, "teacher.pt")

    t0 = time.perf_counter()
    if a.retrain_teacher or not _usable_teacher(teacher_ckpt):
        print(f"[demo] training the ViT teacher on digits ({a.teacher_epochs} epochs) ...", flush=True)
        s = train_teacher(a.out, teacher_ckpt, common, a.teacher_epochs)
        print(f"[demo] teacher: val top-1 {s['best_top1']:.2f}% ({time.perf_counter() - t0:.0f} s), cached "
              f"at {teacher_ckpt}", flush=True)
    else:
        print(f"[demo] using the cached teacher {teacher_ckpt}", flush=True)
    teacher_acc = safe_load(teacher_ckpt, "teacher")["best_top1"]

    results = {}
    for method in a.methods.split(","):
        for seed in range(a.seeds):
            flags = STUDENT + common + [
                "--method", method, "--epochs", str(a.epochs), "--seed", str(seed), "--warmup-epochs", "1",
                "--lr", str(a.lr),
                "--output", os.path.join(a.out, f"{method}_s{seed}")]
            if method != "ce":
                flags += ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs", TEACHER[3],
                          "--teacher-checkpoint", teacher_ckpt]
            t = time.perf_counter()
            s = run(parse_args(flags))
            wall = time.perf_counter() - t
            results.setdefault(method, []).append((s["final_top1"], wall))
            print(f"[demo] {method:<4} seed {seed}: val top-1 {s['final_top1']:.2f}%  ({wall:.1f} s)", flush=True)

    lines = [f"teacher ViT (depth 4, width 64): val top-1 {teacher_acc:.2f}%",
             f"student resnet10t (16-32-64-128), {a.epochs} epochs, lr {a.lr}, {a.seeds} seeds, digits val "
             f"(359 images):",
             f"  {'method':<7} {'top-1 mean':>10} {'std':>6} {'min':>6} {'max':>6} {'s/run':>7}"]
    for method, rs in results.items():
        accs = [r[0] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"  {method:<7} {statistics.mean(accs):>10.2f} {std:>6.2f} {min(accs):>6.2f} {max(accs):>6.2f} "
                     f"{statistics.mean(r[1] for r in rs):>7.1f}")
    ms = step_times(list(results), a.batch_size)
    lines.append("  ms/step (median of interleaved rounds, batch %d): " % a.batch_size
                 + ", ".join(f"{m} {v:.1f}" for m, v in ms.items()))
    lines.append(f"total wall time {time.perf_counter() - t0:.0f} s, torch threads {torch.get_num_threads()}")
    text = "\n".join(lines)
    with open(os.path.join(a.out, "results.txt"), "w") as f:
        f.write(text + "\n")
    print("\n[demo] results\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
