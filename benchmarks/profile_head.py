"""Where the head's and the training step's time goes: ``torch.profiler`` tables per module (gpu_check's
``profile`` stage).

Profiles, each after warm-up, one call under ``torch.profiler``:

- ``head/<provider>``: one forward+backward of ``HCDLoss`` on ResNet18 stage maps (channels_last, bf16 autocast on
  CUDA, as hcd-distill feeds them), for the reference and every fused backend available on the device. Ranges
  (``record_function``): per grouped projector block (``projector/group<g>``: the same-shape SepConv blocks of
  several stages, ``HCDLoss.projectors.groups[g]``) its depthwise convs (``projector/group<g>/dw``), pointwise
  convs (``/pw``) and BatchNorms (``/bn``) where they run as modules (cpu/cuda; the fused ops and the reference's
  per-member blocks count in ``projector/group<g>``), the BN+ReLU+pool tail of the last blocks
  (``projector/pool``), the deepest stage's pool+linear (``projector/linear``), the groups' input concatenations
  (``projector``), the CFMs (``cfm``: one op for all stages on the fused backends), ``sub_logit_loss``, and
  ``head/other`` (validation, stacking). Backward work is attributed to the forward range whose op created its
  autograd node (the profiler's sequence numbers), as ``<range> [bwd]``.
- ``head/<provider>+graph`` (CUDA only): the same forward+backward captured in a CUDA graph, one replay
  (kernels only: a graph launch has no per-module ops).
- ``step``: one Swin-T -> ResNet18 training step (hcd-distill's own ``TrainStep``), ranges ``teacher``, ``student_forward``, ``head``, ``backward``, ``optimizer``.

Per range: GPU kernel time (ms), kernel count, and wall time (ms: the CPU duration of the range's own events).
Per profile, the whole: wall time (median of timed calls outside the profiler), the GPU busy time (sum of the
kernels' durations, one stream) and the host-bound share 1 - busy / wall. On the CPU (``--device cpu``, the
smoke test) "kernels" are the leaf CPU ops and their time is CPU time. Writes ``profile.json`` and
``profile.md`` under ``--out``.

    python -m benchmarks.profile_head --device cuda --out OUT/profile
    python -m benchmarks.profile_head --device cpu --quick --out /tmp/p     # tiny shapes (the smoke test)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
from torch.autograd import DeviceType

RANGE = "hcd:"  # prefix of this script's record_function ranges
RESNET18_CHANNELS = (64, 128, 256, 512)


# ------------------------------------------------------------------------------------------------ ranges
class _Range:
    """A record_function range opened by a forward pre-hook and closed by the forward hook."""

    def __init__(self, name: str):
        self.name, self.stack = RANGE + name, []

    def enter(self, *args):
        rf = torch.autograd.profiler.record_function(self.name)
        rf.__enter__()
        self.stack.append(rf)

    def exit(self, *args):
        if self.stack:
            self.stack.pop().__exit__(None, None, None)


def range_hooks(modules: Dict[str, nn.Module]) -> List:
    """Forward hooks opening a range named by the key around each module's ``__call__``; returns the handles."""
    handles = []
    for name, module in modules.items():
        r = _Range(name)
        handles.append(module.register_forward_pre_hook(r.enter))
        handles.append(module.register_forward_hook(r.exit))
    return handles


def wrap_in_range(fn: Callable, name: str) -> Callable:
    def wrapped(*args, **kwargs):
        with torch.autograd.profiler.record_function(RANGE + name):
            return fn(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def head_ranges(crit):
    """Ranges on an ``HCDLoss`` (see the module docstring); removed on exit."""
    handles, patched = [], []
    projectors = crit.projectors
    for g, group in enumerate(projectors.groups):
        leaves = {}
        for i, m in enumerate(group.modules()):
            if isinstance(m, nn.Conv2d):  # the pointwise convs are grouped convs too: told apart by their kernel
                leaves[f"projector/group{g}/{'pw' if m.kernel_size == (1, 1) else 'dw'}#{i}"] = m
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                leaves[f"projector/group{g}/bn#{i}"] = m
        handles += range_hooks(leaves)
        for attr in ("run_modules", "run_fused", "run_members"):
            patched.append((group, attr))
            setattr(group, attr, wrap_in_range(getattr(group, attr), f"projector/group{g}"))
    for obj, attr, name in ((projectors, "run", "projector"), (projectors, "_pool", "projector/pool"),
                            (projectors.linear, "run", "projector/linear")):
        patched.append((obj, attr))
        setattr(obj, attr, wrap_in_range(getattr(obj, attr), name))
    if hasattr(crit.cfms, "run"):
        patched.append((crit.cfms, "run"))
        crit.cfms.run = wrap_in_range(crit.cfms.run, "cfm")
    else:
        handles += range_hooks({f"cfm/stage{s}": c for s, c in enumerate(crit.cfms)})
    table_of = crit.ops

    def ops(device):
        table = table_of(device)
        return table._replace(sub_logit_loss=wrap_in_range(table.sub_logit_loss, "sub_logit_loss"))

    crit.ops = ops
    patched.append((crit, "ops"))
    handles += range_hooks({"head/other": crit})
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for obj, attr in patched:
            del obj.__dict__[attr]


def _range_name(evt) -> Optional[str]:
    """The innermost of this script's ranges enclosing ``evt`` (itself included), without the '#i' suffix."""
    while evt is not None:
        if evt.name.startswith(RANGE):
            return evt.name[len(RANGE):].split("#")[0]
        evt = evt.cpu_parent
    return None


def _backward_parent(evt):
    while evt is not None:
        if evt.scope == 1:  # a backward function (the autograd engine's evaluate_function)
            return evt
        evt = evt.cpu_parent
    return None


def _ancestor_named(evt, prefix: str):
    while evt is not None:
        if evt.name.startswith(prefix):
            return evt
        evt = evt.cpu_parent
    return None


def attribute(events, backward_to_forward: bool, default: str = "other") -> Dict[str, Dict[str, float]]:
    """{range: {kernel_ms, kernels, wall_ms}} from the profiler's events.

    Kernels are attributed through the CPU op that launched them (``evt.kernels``); on the CPU, where there are
    none, the leaf ops are the kernels and their CPU time the kernel time. The range of an op: the innermost
    enclosing ``hcd:`` range; under the autograd engine, the forward range of the op that created the node
    (``backward_to_forward``, as ``<range> [bwd]``) or ``backward``; under ``Optimizer.step``, ``optimizer``.
    wall_ms: the CPU duration of each range's outermost events (forward ranges) and of the backward functions
    attributed to it.
    """
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    fwd_range = {}
    for e in cpu:
        if e.sequence_nr >= 0 and _backward_parent(e) is None:
            name = _range_name(e)
            if name is not None:
                fwd_range.setdefault((e.sequence_nr, e.thread), name)
    device_kernels = any(e.kernels for e in cpu)
    table: Dict[str, Dict[str, float]] = {}

    def row(name):
        return table.setdefault(name, {"kernel_ms": 0.0, "kernels": 0, "wall_ms": 0.0})

    def range_of(e) -> str:
        bw = _backward_parent(e)
        if bw is not None:
            if backward_to_forward:
                name = fwd_range.get((bw.sequence_nr, bw.fwd_thread))
                return f"{name} [bwd]" if name else "backward (other)"
            return "backward"
        if _ancestor_named(e, "Optimizer.") is not None:
            return "optimizer"
        return _range_name(e) or default

    for e in cpu:
        if e.name.startswith(RANGE) or e.is_user_annotation:
            continue
        if device_kernels:
            if not e.kernels:
                continue
            r = row(range_of(e))
            r["kernels"] += len(e.kernels)
            r["kernel_ms"] += sum(k.duration for k in e.kernels) / 1e3
        elif not e.cpu_children and not e.name.startswith(("autograd::", "Optimizer.")):
            r = row(range_of(e))
            r["kernels"] += 1
            r["kernel_ms"] += e.self_cpu_time_total / 1e3
    # Wall time: each range's outermost annotation events; backward functions by their attributed range.
    for e in cpu:
        if e.name.startswith(RANGE) and _range_name(e.cpu_parent) != _range_name(e):
            row(_range_name(e))["wall_ms"] += (e.time_range.end - e.time_range.start) / 1e3
        elif e.scope == 1 and _backward_parent(e.cpu_parent) is None:
            name = fwd_range.get((e.sequence_nr, e.fwd_thread)) if backward_to_forward else None
            key = (f"{name} [bwd]" if name else "backward (other)") if backward_to_forward else "backward"
            row(key)["wall_ms"] += (e.time_range.end - e.time_range.start) / 1e3
        elif e.name.startswith("Optimizer.step") and _ancestor_named(e.cpu_parent, "Optimizer.") is None:
            row("optimizer")["wall_ms"] += (e.time_range.end - e.time_range.start) / 1e3
    return {k: {"kernel_ms": round(v["kernel_ms"], 4), "kernels": int(v["kernels"]), "wall_ms": round(v["wall_ms"], 4)}
            for k, v in sorted(table.items())}


def device_totals(events, device: torch.device) -> Dict[str, float]:
    """GPU busy time and kernel count from the device's own events (CUDA graph kernels included)."""
    if device.type != "cuda":
        leaves = [e for e in events if e.device_type == DeviceType.CPU and not e.cpu_children
                  and not e.name.startswith((RANGE, "autograd::", "Optimizer.")) and not e.is_user_annotation]
        return {"busy_ms": sum(e.self_cpu_time_total for e in leaves) / 1e3, "kernels": len(leaves)}
    kernels = [e for e in events if e.device_type == DeviceType.CUDA
               and getattr(e, "activity_type", "kernel") in ("kernel", "", None)]
    if not kernels:  # older event lists: kernels only attached to CPU ops
        ks = [k for e in events if e.device_type == DeviceType.CPU for k in e.kernels]
        return {"busy_ms": sum(k.duration for k in ks) / 1e3, "kernels": len(ks)}
    return {"busy_ms": sum(e.time_range.end - e.time_range.start for e in kernels) / 1e3, "kernels": len(kernels)}


# ------------------------------------------------------------------------------------------------ profiling
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_one(name: str, fn: Callable[[], object], device: torch.device, reps: int, backward_to_forward: bool,
                ranges=contextlib.nullcontext) -> Dict[str, object]:
    """Warm-up (``fn`` twice), wall time of ``reps`` calls, then one call under the profiler."""
    for _ in range(2):
        fn()
    wall = wall_ms(fn, device, reps)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    with ranges():
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            sync(device)
    events = prof.events()
    totals = device_totals(events, device)
    return {"name": name, "status": "ok", "wall_ms": round(wall, 4), "busy_ms": round(totals["busy_ms"], 4),
            "kernels": int(totals["kernels"]),
            "host_bound_share": round(max(0.0, 1.0 - totals["busy_ms"] / wall), 4) if wall > 0 else None,
            "ranges": attribute(events, backward_to_forward)}


def head_setup(backend: str, device: torch.device, batch: int, img: int, num_classes: int, teacher_dim: int,
               amp: Optional[torch.dtype], seed: int = 0):
    from hcd_fast import HCDConfig, HCDLoss

    torch.manual_seed(seed)
    crit = HCDLoss(RESNET18_CHANNELS, teacher_dim, num_classes, HCDConfig(), backend=backend,
                   validate=False).to(device).train()
    g = torch.Generator().manual_seed(seed)
    maps = [max(1, img // s) for s in (4, 8, 16, 32)]
    dt = amp or torch.float32
    feats = [torch.randn(batch, c, m, m, generator=g).to(device, dt).contiguous(memory_format=torch.channels_last)
             .requires_grad_() for c, m in zip(RESNET18_CHANNELS, maps)]
    zs = torch.randn(batch, num_classes, generator=g).to(device, dt).requires_grad_()
    ft = torch.randn(batch, teacher_dim, generator=g).to(device, dt)
    zt = torch.randn(batch, num_classes, generator=g).to(device, dt)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    inputs = (feats, zs, ft, zt, y)

    def fwd_bwd(zero: bool = True):
        if zero:
            crit.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = crit(*inputs)
        loss.backward()
        return loss
    return crit, fwd_bwd


def head_graph(crit, fwd_bwd: Callable) -> Callable:
    """fwd_bwd captured in a CUDA graph after a side-stream warm-up (PyTorch's recipe); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fwd_bwd()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    crit.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        fwd_bwd(zero=False)  # the gradients are the graph's static outputs
    return graph.replay


# ------------------------------------------------------------------------------------------------ the step
TEACHER = "swin_tiny_patch4_window7_224"


def _teacher_kwargs(img: int) -> dict:
    return {} if img == 224 else {"img_size": img, "window_size": 4}  # as benchmarks/steps.py at CIFAR size


def step_setup(device: torch.device, batch: int, img: int, num_classes: int, amp: Optional[torch.dtype],
               seed: int = 0):
    """(step function, ranges context, which step) of one Swin-T -> ResNet18 hcd step: hcd-distill's TrainStep."""
    import timm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, img, img, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    cl = device.type == "cuda"
    from hcd_fast import HCDConfig
    from hcd_fast.distill import (Distiller, DistillTask, TeacherTap, TrainStep, build_criterion, probe_student,
                                  probe_teacher)
    teacher = TeacherTap(timm.create_model(TEACHER, num_classes=num_classes, **_teacher_kwargs(img)).to(device))
    teacher_dim, k = probe_teacher(teacher, (3, img, img))
    student = timm.create_model("resnet18", num_classes=k).to(device)
    channels, _ = probe_student(student, 4, (3, img, img))
    crit = build_criterion("hcd", channels, teacher_dim, k, HCDConfig(), backend="auto")
    distiller = Distiller(student, crit, indices=4).to(device)
    if cl:
        distiller = distiller.to(memory_format=torch.channels_last)
    task = DistillTask(distiller, teacher).train()
    opt = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-3)
    step = TrainStep(task, opt, amp_dtype=amp, channels_last=cl)

    @contextlib.contextmanager
    def ranges():
        handles = range_hooks({"teacher": teacher, "student_forward": distiller.student,
                               "head": distiller.criterion})
        try:
            yield
        finally:
            for h in handles:
                h.remove()
    return (lambda: step(x, y)), ranges, "hcd_fast.distill.TrainStep"


# ------------------------------------------------------------------------------------------------ output
def render(result: dict) -> str:
    lines = [f"# Profile of the HCD head and one step ({result['device_name']})", "",
             f"git {result['env'].get('git_commit')}, torch {result['env'].get('torch')}, "
             f"{'CUDA kernel time' if result['device'] == 'cuda' else 'CPU: leaf ops stand for kernels'}. "
             "Wall = median of timed calls outside the profiler; busy = sum of kernel durations; host-bound "
             "share = 1 - busy / wall. Rows: the profiler's ranges (`[bwd]`: backward work of that forward range).",
             ""]
    for p in result["profiles"]:
        lines.append(f"## {p['name']}")
        lines.append("")
        if p["status"] != "ok":
            lines += [f"{p['status']}: {p.get('reason', '')}", ""]
            continue
        lines.append(f"{p.get('what', '')}  ")
        lines.append(f"whole: wall {p['wall_ms']:.3f} ms, busy {p['busy_ms']:.3f} ms, {p['kernels']} kernels, "
                     f"host-bound share {p['host_bound_share']}")
        lines.append("")
        if p["ranges"]:
            lines += ["| range | kernel ms | kernels | wall ms |", "|---|---:|---:|---:|"]
            for name, r in p["ranges"].items():
                lines.append(f"| {name} | {r['kernel_ms']:.3f} | {r['kernels']} | {r['wall_ms']:.3f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def write(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "profile.md"), "w") as f:
        f.write(render(result))


def main(argv=None) -> int:
    from benchmarks.env import device_name, environment, parse_device
    from benchmarks.providers import fused_providers

    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_head", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--out", required=True, help="folder for profile.json and profile.md")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU smoke test)")
    ap.add_argument("--no-step", action="store_true", help="skip the training-step profile")
    ap.add_argument("--providers", default=None, help="comma list (default: reference + every fused backend)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls for the wall time (default 10, quick 2)")
    args = ap.parse_args(argv)
    device = parse_device(ap, args.device)
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if cuda else None
    if args.quick:
        head = dict(batch=2, img=32, num_classes=10, teacher_dim=24)
        step_shape = dict(batch=2, img=32, num_classes=10)
    else:
        head = dict(batch=256, img=224, num_classes=1000, teacher_dim=768)
        step_shape = dict(batch=128, img=224, num_classes=100) if cuda else dict(batch=16, img=32, num_classes=100)
    reps = args.reps or (2 if args.quick else 10)
    providers = ([p.strip() for p in args.providers.split(",")] if args.providers
                 else ["reference"] + fused_providers(device))
    result = {"schema_version": 1, "device": device.type, "device_name": device_name(device),
              "env": environment(device), "config": {"head": head, "step": step_shape, "amp": str(amp),
                                                      "channels_last": True, "reps": reps},
              "profiles": []}

    def run(name, what, make):
        t0 = time.perf_counter()
        try:
            entry = make()
        except Exception as exc:  # a failing provider is recorded; the others still run
            entry = {"name": name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        entry.update(name=name, what=what, elapsed_s=round(time.perf_counter() - t0, 2))
        result["profiles"].append(entry)
        write(result, args.out)  # after every profile: a timeout keeps what was measured
        print(f"{name}: {entry['status']} ({entry['elapsed_s']} s)", flush=True)

    for provider in providers:
        what = (f"HCDLoss(backend={provider!r}) fwd+bwd, B={head['batch']}, {head['img']} px ResNet18 maps "
                f"channels_last, K={head['num_classes']}, {'bf16 autocast' if amp else 'fp32'}")

        def make_head(provider=provider):
            crit, fwd_bwd = head_setup(provider, device, amp=amp, **head)
            return profile_one(f"head/{provider}", fwd_bwd, device, reps, True, lambda: head_ranges(crit))
        run(f"head/{provider}", what, make_head)
        if cuda:
            def make_graph(provider=provider):
                crit, fwd_bwd = head_setup(provider, device, amp=amp, **head)
                replay = head_graph(crit, fwd_bwd)
                return profile_one(f"head/{provider}+graph", replay, device, reps, False)
            run(f"head/{provider}+graph", what + ", captured in a CUDA graph (one replay)", make_graph)
    if not args.no_step:
        holder = {}

        def make_step():
            fn, ranges, kind = step_setup(device, amp=amp, **step_shape)
            holder["kind"] = kind
            return profile_one("step", fn, device, reps, False, ranges)
        run("step/swin_t->resnet18", f"one hcd training step, Swin-T -> ResNet18, B={step_shape['batch']}, "
            f"{step_shape['img']} px", make_step)
        result["profiles"][-1]["what"] += f" ({holder.get('kind', '?')})"
        write(result, args.out)
    failed = [p["name"] for p in result["profiles"] if p["status"] != "ok"]
    print(f"wrote {os.path.join(args.out, 'profile.md')}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
