"""``python -m benchmarks.step_parts``: the parts of the pipeline benchmark's CPU hcd step, in CPU time.

Why: on a shared, oversubscribed CPU the wall time of a 2-thread step swings 2x between rounds (a parallel
region waits for a descheduled thread), so ``step/hcd_ours`` against ``step/hcd_published`` in
``benchmarks/pipeline.py`` is read through that noise. This measures the work of each part instead: the
process CPU time of one thread (``torch.set_num_threads(1)`` unless ``--threads``), in interleaved rounds,
at the pipeline's CPU shapes (ViT-S teacher -> ResNet18 student, 224 px, batch 8, 10 classes):

- ``teacher/published`` (``no_grad``, forward_features + forward_head twice) and ``teacher/ours``
  (``TeacherTap``: inference mode, pre-logits then classifier);
- ``student``: the student's forward, CE and backward and the SGD step, no head;
- ``student+head/reference``, ``student+head/ours`` (backend auto: the fused cpu ops), and ``/ours_cl``
  (the same with a channels_last student and input): the hcd step less the teacher (a constant f_t, z_t);
- ``head/reference``, ``head/ours``: HCDLoss forward + backward alone on the student's stage maps;
- ``step/published`` (teacher as published, reference head, ``loss.item()``) and ``step/ours`` (TeacherTap,
  backend auto), as the pipeline benchmark's hcd steps.

Writes ``OUT/step_parts.json`` and ``OUT/step_parts.md`` (default ``benchmarks/results/cpu/step_parts``).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from benchmarks.common import environment


def build(batch: int, img: int, classes: int) -> Dict[str, Callable[[], None]]:
    import timm

    from hcd_fast import HCDConfig, HCDLoss
    from hcd_fast.distill.teacher.tap import TeacherTap

    torch.manual_seed(0)
    teacher = timm.create_model("vit_small_patch16_224", num_classes=classes, img_size=img).eval()
    teacher.requires_grad_(False)
    student0 = timm.create_model("resnet18", num_classes=classes)
    channels = tuple(student0.feature_info[i]["num_chs"] for i in range(1, 5))
    head0 = HCDLoss(channels, teacher.num_features, classes, HCDConfig(), backend="reference", validate=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    tap = TeacherTap(copy.deepcopy(teacher))
    ft_c, zt_c = torch.randn(batch, teacher.num_features, generator=g), torch.randn(batch, classes, generator=g)

    def teacher_published():
        with torch.no_grad():
            t = teacher.forward_features(x)
            return teacher.forward_head(t, pre_logits=True), teacher.forward_head(t)

    def teacher_const():
        return ft_c, zt_c

    def step_fn(teacher_fn, backend: Optional[str], item: bool, channels_last: bool = False):
        student, xx = copy.deepcopy(student0).train(), x
        if channels_last:
            student, xx = student.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        head = None
        if backend is not None:
            head = HCDLoss(channels, teacher.num_features, classes, HCDConfig(), backend=backend, validate=False)
            head.load_state_dict(head0.state_dict())
        params = list(student.parameters()) + (list(head.parameters()) if head is not None else [])
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=2e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            ft, zt = teacher_fn()
            if ft.is_inference():  # as the pipeline's step: inference tensors leave inference mode
                ft, zt = ft.clone(), zt.clone()
            final, feats = student.forward_intermediates(xx, indices=4, intermediates_only=False)
            zs = student.forward_head(final)
            loss = head(list(feats), zs, ft, zt, y) if head is not None else F.cross_entropy(zs, y, label_smoothing=0.1)
            loss.backward()
            opt.step()
            if item:
                loss.item()
        return step

    with torch.no_grad():
        _, feats0 = student0.forward_intermediates(x, indices=4, intermediates_only=False)
    feats = [f.detach().clone().requires_grad_(True) for f in feats0]
    zs0 = torch.randn(batch, classes, generator=g, requires_grad=True)

    def head_fn(backend: str):
        head = HCDLoss(channels, teacher.num_features, classes, HCDConfig(), backend=backend, validate=False)
        head.load_state_dict(head0.state_dict())

        def run():
            head(feats, zs0, ft_c, zt_c, y).backward()
        return run

    return {"teacher/published": teacher_published, "teacher/ours": lambda: tap(x),
            "student": step_fn(teacher_const, None, False),
            "student+head/reference": step_fn(teacher_const, "reference", True),
            "student+head/ours": step_fn(teacher_const, "auto", False),
            "student+head/ours_cl": step_fn(teacher_const, "auto", False, channels_last=True),
            "head/reference": head_fn("reference"), "head/ours": head_fn("auto"),
            "step/published": step_fn(teacher_published, "reference", True),
            "step/ours": step_fn(lambda: tap(x), "auto", False)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_parts", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work done)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu",
                                                  "step_parts"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    fns = build(a.batch, a.img, 10)
    env = environment(torch.device("cpu"))
    load_start = os.getloadavg()[0]
    for fn in fns.values():  # first calls (allocations, oneDNN primitives)
        fn()
    cpu: Dict[str, List[float]] = {n: [] for n in fns}
    wall: Dict[str, List[float]] = {n: [] for n in fns}
    for r in range(a.rounds):
        names = list(fns)
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            c0, w0 = time.process_time(), time.perf_counter()
            fns[name]()
            cpu[name].append((time.process_time() - c0) * 1e3)
            wall[name].append((time.perf_counter() - w0) * 1e3)
        print(f"round {r + 1}/{a.rounds} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    med = {n: statistics.median(v) for n, v in cpu.items()}
    ratios = {"student+head: reference / ours": med["student+head/reference"] / med["student+head/ours"],
              "student+head: ours / ours_cl": med["student+head/ours"] / med["student+head/ours_cl"],
              "head: reference / ours": med["head/reference"] / med["head/ours"],
              "teacher: published / ours": med["teacher/published"] / med["teacher/ours"],
              "step: published / ours": med["step/published"] / med["step/ours"]}
    shares = {"teacher": med["teacher/ours"] / med["step/ours"],
              "head": (med["student+head/ours"] - med["student"]) / med["step/ours"]}
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = {"suite": "step_parts", "created": created, "env": env, "threads": a.threads, "batch": a.batch,
              "img": a.img, "rounds": a.rounds,
              "loadavg_start": round(load_start, 2), "loadavg_end": round(os.getloadavg()[0], 2),
              "cpu_ms": cpu, "wall_ms": wall, "cpu_median_ms": med, "ratios": ratios, "shares_of_step_ours": shares}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "step_parts.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# Parts of the CPU hcd step (process CPU time, {a.threads} thread(s))", "",
             f"{env['device_name']}, torch {env['torch']}, commit {str(env['git_commit'])[:12]}, {result['created']}, "
             f"load average {result['loadavg_start']} -> {result['loadavg_end']}. ViT-S -> ResNet18, {a.img} px, "
             f"batch {a.batch}, {a.rounds} interleaved rounds.", "",
             "| part | CPU ms (median) | min | max | wall ms (median) |", "|---|---:|---:|---:|---:|"]
    for n in fns:
        lines.append(f"| {n} | {med[n]:.1f} | {min(cpu[n]):.1f} | {max(cpu[n]):.1f} | "
                     f"{statistics.median(wall[n]):.1f} |")
    lines += ["", "| ratio (CPU time) | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f}x |" for k, v in ratios.items()]
    lines += ["", f"Shares of step/ours: teacher {100 * shares['teacher']:.1f}%, HCD head (student+head/ours less "
              f"student) {100 * shares['head']:.1f}%."]
    md = "\n".join(lines)
    with open(os.path.join(a.out, "step_parts.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
