"""Accuracy of the teacher cache against online teaching on the digits demo.

    python -m experiments.cache_study [--out runs/cache_study] [--views 1,4,16] [--seeds 3]

The demo's ViT teacher (trained like ``make demo``, or reused from ``--teacher``), the demo's resnet10t
student and recipe (hcd, 6 epochs, lr 0.01), with ``--digits-aug`` (RandomResizedCrop + flip) so that
views differ: online, the teacher sees a fresh view per image and epoch; with the cache, one of K stored
views per image and epoch (K in ``--views``), f_t stored in fp16. Prints and writes OUT/results.json and
OUT/results.md (mean, std, min, max of the final val top-1 over the seeds, and wall time per run).

On a shared machine the seeds can run as separate processes (``--seed-start S --seeds 1 --out OUT_S``,
``--threads 1``: one thread each wastes no time at a parallel region's barrier when the other thread is
descheduled) sharing the teacher (``--teacher``) and the caches (``--caches DIR``), then
``--merge OUT_0 OUT_1 ... --out OUT`` writes the table over all their runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from hcd_fast.distill.cli import main as cli_main
from hcd_fast.distill.cli import parse_args
from experiments.demo import STUDENT, TEACHER, train_teacher
from hcd_fast.distill.engine.run import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.cache_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/cache_study", help="output folder (runs/cache_study)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: OUT/teacher.pt, trained like "
                   "the demo's on first run)")
    p.add_argument("--views", default="1,4,16", help="comma list of K (1,4,16)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (3)")
    p.add_argument("--epochs", type=int, default=6, help="student epochs (6)")
    p.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs when training it (30)")
    p.add_argument("--lr", type=float, default=0.01, help="student peak learning rate (0.01)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (64)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (0): seeds seed-start ... + seeds - 1")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of every run (torch's default)")
    p.add_argument("--caches", default=None, help="folder of the cache_k* caches (default OUT; built if absent)")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR", help="only merge the results.json of "
                   "these study folders (same settings, other seeds) into OUT")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.merge:
        return merge(a.merge, a.out)
    common = ["--img-size", "16", "--batch-size", str(a.batch_size), "--no-progress", "--no-plots"]
    threads = ["--threads", str(a.threads)] if a.threads else []
    caches = a.caches or a.out
    t_start = time.perf_counter()
    teacher_ckpt = a.teacher or os.path.join(a.out, "teacher.pt")
    if not os.path.isfile(teacher_ckpt):
        s = train_teacher(a.out, teacher_ckpt, common, a.teacher_epochs)
        print(f"[cache_study] teacher val top-1 {s['best_top1']:.2f}%", flush=True)
    teacher = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs", TEACHER[3], "--teacher-checkpoint",
               teacher_ckpt]
    settings = ["online"] + [f"cache K={k}" for k in a.views.split(",")]
    cache_seconds = {}
    for k in a.views.split(","):
        folder = os.path.join(caches, f"cache_k{k}")
        if not os.path.isfile(os.path.join(folder, "meta.json")):
            t = time.perf_counter()
            rc = cli_main(["cache-teacher"] + teacher + threads + ["--img-size", "16", "--digits-aug", "--views", k,
                                                                   "--output", folder, "--no-progress"])
            if rc != 0:
                return rc
            cache_seconds[k] = time.perf_counter() - t
    results = {name: [] for name in settings}
    for seed in range(a.seed_start, a.seed_start + a.seeds):
        for name in settings:
            tag = name.replace("cache K=", "k")
            flags = STUDENT + teacher + common + threads + [
                "--method", "hcd", "--digits-aug", "--epochs", str(a.epochs), "--seed", str(seed),
                "--warmup-epochs", "1", "--lr", str(a.lr), "--output", os.path.join(a.out, f"{tag}_s{seed}")]
            if name != "online":
                flags += ["--teacher-cache", os.path.join(caches, f"cache_k{tag[1:]}")]
            t = time.perf_counter()
            s = run(parse_args(flags))
            results[name].append({"seed": seed, "top1": s["final_top1"], "seconds": time.perf_counter() - t})
            print(f"[cache_study] {name:<12} seed {seed}: val top-1 {s['final_top1']:.2f}%", flush=True)
    study = {"results": results, "cache_build_seconds": cache_seconds, "epochs": a.epochs, "lr": a.lr,
             "batch_size": a.batch_size, "threads": a.threads, "teacher_checkpoint": os.path.abspath(teacher_ckpt),
             "teacher_trained_here": a.teacher is None, "seeds": list(range(a.seed_start, a.seed_start + a.seeds)),
             "total_seconds": time.perf_counter() - t_start}
    write(study, a.out)
    return 0


def write(study: dict, out: str) -> None:
    """OUT/results.json and OUT/results.md (the table, also printed)."""
    lines = ["| teaching (hcd, digits, --digits-aug) | val top-1 mean (%) | std | min | max | seeds | s/run |",
             "|---|---|---|---|---|---|---|"]
    for name, rs in study["results"].items():
        accs = [r["top1"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(accs):.2f} | {std:.2f} | {min(accs):.2f} | {max(accs):.2f} | "
                     f"{len(accs)} | {statistics.mean(r['seconds'] for r in rs):.1f} |")
    md = "\n".join(lines)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(study, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md, flush=True)


def merge(folders, out: str) -> int:
    """The runs of several study folders (same settings, disjoint seeds) in one table."""
    studies = []
    for folder in folders:
        with open(os.path.join(folder, "results.json")) as f:
            studies.append(json.load(f))
    same = ("epochs", "lr", "batch_size", "teacher_checkpoint")
    for st in studies[1:]:
        diffs = [k for k in same if st.get(k) != studies[0].get(k)] + (
            ["settings"] if list(st["results"]) != list(studies[0]["results"]) else [])
        if diffs:
            print(f"cache_study --merge: the folders differ in {diffs}", file=sys.stderr)
            return 2
    seeds = [s for st in studies for s in st["seeds"]]
    if len(set(seeds)) != len(seeds):
        print(f"cache_study --merge: a seed appears twice ({seeds})", file=sys.stderr)
        return 2
    merged = {k: studies[0].get(k) for k in same + ("teacher_trained_here", "threads")}
    merged.update(results={name: [r for st in studies for r in st["results"][name]] for name in studies[0]["results"]},
                  seeds=seeds, merged_from=[os.path.abspath(f) for f in folders],
                  cache_build_seconds={k: v for st in studies for k, v in st["cache_build_seconds"].items()},
                  total_seconds=[st["total_seconds"] for st in studies])
    write(merged, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
