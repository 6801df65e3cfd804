"""``python -m benchmarks step-parts``: the parts of the pipeline benchmark's CPU hcd step, in CPU time.

Why: on a shared, oversubscribed CPU the wall time of a 2-thread step swings 2x between rounds (a parallel
region waits for a descheduled thread), so ``step/hcd_ours`` against ``step/hcd_published`` in
``benchmarks/pipeline.py`` is read through that noise. This measures the work of each part instead: the
process CPU time of one thread (``torch.set_num_threads(1)`` unless ``--threads``), in interleaved rounds
(``benchmarks.timing`` with ``time.process_time`` as the clock), at the pipeline's CPU shapes (ViT-S teacher ->
ResNet18 student, 224 px, batch 8, 10 classes). Every step part is hcd-distill's ``TrainStep`` in a
configuration (``benchmarks/steps.py``):

- ``teacher/published`` (``no_grad``, forward_features + forward_head twice) and ``teacher/ours``
  (``TeacherTap`` at hcd-distill's defaults);
- ``student``: the ce step (student forward, CE, backward, SGD step; no teacher, no head);
- ``student+head/reference``, ``student+head/ours`` (backend auto) and ``/ours_cl`` (the same with a
  channels_last student and input): the hcd step with the teacher cache's f_t (no teacher forward);
- ``head/reference``, ``head/ours``: HCDLoss forward + backward alone on the student's stage maps;
- ``step/published`` (the published-style configuration) and ``step/ours`` (backend auto), as the pipeline
  benchmark's hcd steps.

Writes ``OUT/step_parts.json`` and ``OUT/step_parts.md`` (default ``benchmarks/results/cpu/step_parts``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.env import environment, loadavg, now, results_dir
from benchmarks.steps import StepConfig, StepModels, fast_config, published_config
from benchmarks.timing import Policy, time_cpu_interleaved


def build(batch: int, img: int, classes: int) -> Dict[str, Callable[[], object]]:
    import timm
    torch.manual_seed(0)
    teacher = timm.create_model("vit_small_patch16_224", num_classes=classes, img_size=img)
    student = timm.create_model("resnet18", num_classes=classes)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, img, img, generator=g), torch.randint(0, classes, (batch,), generator=g)
    cpu = torch.device("cpu")
    m = StepModels(student, teacher, x, y, cpu)

    def teacher_published():
        with torch.no_grad():
            t = m.teacher_model.forward_features(x)
            return m.teacher_model.forward_head(t, pre_logits=True), m.teacher_model.forward_head(t)

    with torch.no_grad():
        _, feats0 = m.student0.forward_intermediates(x, indices=4, intermediates_only=False)
    feats = [f.detach().clone().requires_grad_(True) for f in feats0]
    zs = torch.randn(batch, classes, generator=g, requires_grad=True)
    zt = torch.randn(batch, classes, generator=g)

    def head_fn(backend: str):
        head = m.criterion("hcd", backend)
        return lambda: head(feats, zs, m.cached_feat, zt, y).backward()

    tap = m.teacher_tap("fast", "off")
    return {"teacher/published": teacher_published, "teacher/ours": lambda: tap(x),
            "student": m.fn(fast_config("ce", cpu)),
            "student+head/reference": m.fn(StepConfig("hcd", "reference", sync_loss=True, teacher="cached")),
            "student+head/ours": m.fn(fast_config("hcd", cpu, teacher="cached")),
            "student+head/ours_cl": m.fn(fast_config("hcd", cpu, channels_last="on", teacher="cached")),
            "head/reference": head_fn("reference"), "head/ours": head_fn("auto"),
            "step/published": m.fn(published_config("hcd", cpu)), "step/ours": m.fn(fast_config("hcd", cpu))}


def summarize_parts(cpu: Dict[str, List[float]]) -> dict:
    med = {n: statistics.median(v) for n, v in cpu.items()}
    ratios = {"student+head: reference / ours": med["student+head/reference"] / med["student+head/ours"],
              "student+head: ours / ours_cl": med["student+head/ours"] / med["student+head/ours_cl"],
              "head: reference / ours": med["head/reference"] / med["head/ours"],
              "teacher: published / ours": med["teacher/published"] / med["teacher/ours"],
              "step: published / ours": med["step/published"] / med["step/ours"]}
    shares = {"teacher": med["teacher/ours"] / med["step/ours"],
              "head": (med["student+head/ours"] - med["student"]) / med["step/ours"]}
    return {"cpu_median_ms": med, "ratios": ratios, "shares_of_step_ours": shares}


def markdown(result: dict) -> str:
    env, cpu, med = result["env"], result["cpu_ms"], result["cpu_median_ms"]
    lines = [f"# Parts of the CPU hcd step (process CPU time, {result['threads']} thread(s))", "",
             f"{env['device_name']}, torch {env['torch']}, commit {str(env['git_commit'])[:12]}, {result['created']}, "
             f"load average {result['loadavg_start']} -> {result['loadavg_end']}. ViT-S -> ResNet18, {result['img']} "
             f"px, batch {result['batch']}, {result['rounds']} interleaved rounds.", "",
             "| part | CPU ms (median) | min | max |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {med[n]:.1f} | {min(v):.1f} | {max(v):.1f} |" for n, v in cpu.items()]
    lines += ["", "| ratio (CPU time) | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f}x |" for k, v in result["ratios"].items()]
    sh = result["shares_of_step_ours"]
    lines += ["", f"Shares of step/ours: teacher {100 * sh['teacher']:.1f}%, HCD head (student+head/ours less "
              f"student) {100 * sh['head']:.1f}%."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks step-parts", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work done)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--out", default=results_dir(torch.device("cpu"), "step_parts"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    fns = build(a.batch, a.img, 10)
    result = {"suite": "step_parts", "created": now(), "env": environment(torch.device("cpu")), "threads": a.threads,
              "batch": a.batch, "img": a.img, "rounds": a.rounds, "loadavg_start": loadavg()}
    for fn in fns.values():  # first calls (allocations, oneDNN primitives)
        fn()
    policy = Policy(warmup=0, min_reps=a.rounds, max_reps=a.rounds, target_s=0.0)
    timed = time_cpu_interleaved(fns, policy, clock=time.process_time)
    for res in timed.values():
        if isinstance(res, BaseException):
            raise res
    result["cpu_ms"] = {n: timed[n]["round_ms"] for n in fns}
    result.update(summarize_parts(result["cpu_ms"]), loadavg_end=loadavg())
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "step_parts.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(a.out, "step_parts.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
