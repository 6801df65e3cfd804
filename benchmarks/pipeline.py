"""``python -m benchmarks pipeline``: where the wall time of a distillation step goes, loader to optimizer.

    python -m benchmarks pipeline                    # the device's profile (cpu here; gpu on CUDA)
    python -m benchmarks pipeline --profile quick    # tiny models and data, one repetition: a smoke run

One run measures, in images per second (and ms per step), on the same synthetic data:

- ``loader/timm``: the PIL/timm training loader alone (ImageFolder, RandomResizedCrop, flip, colour jitter,
  normalise; ``--workers`` processes), batches moved to the device; one whole epoch after an untimed one.
- ``loader/cache``: the teacher cache's replaying loader alone (same decode, stored crop and flip, f_t).
- ``loader/dali``, ``loader/dali_cache``: the NVIDIA DALI loader of ``hcd-distill --loader dali`` (nvJPEG
  on CUDA, DALI's CPU decoder otherwise; ``--workers`` DALI threads), the same views as ``loader/timm`` /
  ``loader/cache``; "skipped: DALI not installed" without ``nvidia.dali``.
- ``cache/build``: ``hcd-distill cache-teacher`` over K views of every image (a one-off cost, per view).
- ``teacher/published``: the teacher forward as the published code runs it (``torch.no_grad``, fp32 on
  CPU, fp16 autocast on CUDA); ``teacher/ours``: ``TeacherTap`` with hcd-distill's defaults on this
  device (inference mode, bf16 autocast + bf16 weights on CUDA, channels_last for CNN teachers on CUDA);
  ``teacher/bf16_weights``, ``teacher/channels_last``, ``teacher/compiled``: each switch on its own over
  the published-precision baseline of this device (fp32 on CPU, bf16 autocast on CUDA), compiled with
  CUDA graphs on CUDA.
- ``step/*``: one call of hcd-distill's training step (``TrainStep``, configured by ``benchmarks/steps.py``):
  ``step/ce``, ``step/kd``: the student alone / with Hinton KD (hcd-distill's defaults);
  ``step/hcd_published``: the published-style configuration (reference backend, fp32 on CPU / fp16 +
  GradScaler on CUDA, ``loss.item()`` every step); ``step/hcd_ours``: backend auto, the teacher at
  hcd-distill's defaults; ``step/hcd_cache``: the same with the cache's f_t (no teacher forward, z_t =
  classifier(f_t)).
- The teacher and step rows are timed together, round-robin on the CPU (``benchmarks.timing``: a change in
  the machine's load hits every row alike), after a first call each (``first_call_s``: compilation, cuDNN's
  search). On the CPU each row keeps its per-round times (``round_ms``) and the hcd ratios are also given
  per round (the median of the ratios within a round).
- ``e2e/published``, ``e2e/ours``, ``e2e/cache``: loader and step together, as training runs them (the
  loader's workers run beside the step); ``e2e/ours_dali``, ``e2e/cache_dali``: the hcd steps of
  ``e2e/ours`` / ``e2e/cache`` fed by the DALI loader. Each step runs on a fixed tensor the loaded batch is copied into
  (the work does not depend on the pixel values).

The synthetic ImageFolder (JPEGs of ImageNet-like sizes, deterministic from the seed) is generated once
under ``--data-root`` (default ``~/.cache/hcd_fast``, outside the tree) and reused. Writes
``OUT/pipeline.json``, ``OUT/pipeline.md`` and ``OUT/pipeline.png`` (stacked bars of ms per image:
loader, teacher forward, student + head step; a marker for the measured end-to-end time). The default
OUT is ``benchmarks/results/<device tag>/pipeline``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch

from benchmarks import pipeline_report as report
from benchmarks.env import SCHEMA_VERSION, environment, now, parse_device, results_dir
from benchmarks.synthetic_data import synthetic_imagefolder  # noqa: F401  (re-exported for the tests)
from benchmarks.timing import Policy, summarize, synchronize, time_providers

PROFILES = {
    # teacher, teacher kwargs, img, batch, classes, train images per class, views, workers, policy
    # cpu: 5 interleaved rounds (3 left the ratios at the mercy of a shared machine's load); the per-round
    # ratios are reported beside the ratios of the medians
    "cpu": dict(teacher="vit_small_patch16_224", teacher_kwargs={}, img=224, batch=8, classes=10, per_class=8,
                views=2, workers=2, e2e_steps=4, compile=True,
                policy=Policy(warmup=1, min_reps=5, max_reps=5, target_s=0.0)),
    "gpu": dict(teacher="vit_base_patch16_224", teacher_kwargs={}, img=224, batch=128, classes=100, per_class=26,
                views=2, workers=min(16, os.cpu_count() or 1), e2e_steps=16, compile=True,
                policy=Policy(warmup_ms=100, rep_ms=1500)),
    "quick": dict(teacher="vit_tiny_patch16_224",
                  teacher_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
                  img=32, batch=4, classes=2, per_class=4, views=2, workers=0, e2e_steps=2, compile=False,
                  policy=Policy(warmup=1, min_reps=1, max_reps=1, target_s=0.0, warmup_ms=1, rep_ms=5)),
}
STUDENT = "resnet18"


def _loader_rate(loader, device) -> Dict[str, float]:
    """img/s of one whole epoch of ``loader`` (batches moved to ``device``), timed from ``iter()`` to the
    last batch, after an untimed first epoch (persistent workers: no worker start in the timed epoch)."""
    for _ in loader:
        pass
    times, n = [], 0
    start = t0 = time.perf_counter()
    for batch in loader:
        [t.to(device, non_blocking=True) for t in batch if isinstance(t, torch.Tensor)]
        synchronize(device)
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        t0 = t1
        n += batch[0].shape[0]
    res = summarize(times)
    res["images_per_s"] = n / (time.perf_counter() - start)
    res["median_ms"] = 1e3 * loader.batch_size / res["images_per_s"]  # ms per batch at the epoch's rate
    return res


def parse_args(argv: Optional[List[str]]):
    ap = argparse.ArgumentParser(prog="python -m benchmarks pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=tuple(PROFILES), default=None, help="default: gpu on CUDA, else cpu")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--teacher", default=None, help="timm teacher (default: the profile's)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the profile's)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: the profile's)")
    ap.add_argument("--views", type=int, default=None, help="K views of the teacher cache (default: the profile's)")
    ap.add_argument("--no-compile", action="store_true", help="skip teacher/compiled")
    ap.add_argument("--data-root", default=os.path.join("~", ".cache", "hcd_fast"),
                    help="where the synthetic ImageFolder and the benchmark's teacher cache live (~/.cache/hcd_fast)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device tag>/pipeline)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    args.device = parse_device(ap, args.device)
    args.profile = args.profile or ("gpu" if args.device.type == "cuda" else "cpu")
    P = dict(PROFILES[args.profile])
    for key in ("teacher", "batch", "workers", "views"):
        if getattr(args, key) is not None:
            P[key] = getattr(args, key)
            if key == "teacher":
                P["teacher_kwargs"] = {}
    if args.no_compile:
        P["compile"] = False
    return args, P


@dataclass
class PipelineRun:
    """One run: settings, the result document, and how rows are recorded (``record``, ``skip``,
    ``time_group``); ``dump`` rewrites pipeline.json after every row."""
    args: argparse.Namespace
    P: dict
    out_dir: str
    result: dict
    start: float = field(default_factory=time.perf_counter)

    @property
    def device(self) -> torch.device:
        return self.args.device

    @property
    def rows(self) -> List[dict]:
        return self.result["rows"]

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.0f}s] {msg}", flush=True)

    def dump(self) -> None:
        path = os.path.join(self.out_dir, "pipeline.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.result, f, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def error(self, row: dict, exc: BaseException) -> None:
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:600])
        traceback.print_exception(type(exc), exc, exc.__traceback__, limit=4)
        self.log(f"{row['component']:<24} error: {row['reason']}")

    def record(self, name: str, fn: Callable[[], Dict[str, float]], **info) -> None:
        row = {"component": name, "status": "ok", "reason": None, **info}
        self.rows.append(row)
        try:
            row.update(fn())
            self.log(f"{name:<24} {row['images_per_s']:9.1f} img/s  ({row.get('median_ms', float('nan')):.1f} ms)")
        except Exception as exc:  # one failing component must not end the run
            self.error(row, exc)
        self.dump()

    def skip(self, name: str, reason: str, **info) -> None:
        self.rows.append({"component": name, "status": "skipped", "reason": reason, **info})
        self.log(f"{name:<24} skipped: {reason}")

    def time_group(self, entries) -> Dict[str, Callable[[], object]]:
        """Build each (name, factory, info) entry's callable and time its first call (compilation, cuDNN's
        search), then time them all together (round-robin on the CPU: load changes hit every row alike)."""
        fns, by_name = {}, {}
        for name, factory, info in entries:
            if factory is None:
                self.skip(name, info["reason"])
                continue
            row = by_name[name] = {"component": name, "status": "ok", "reason": None, **info}
            self.rows.append(row)
            try:
                fn = factory()
                t0 = time.perf_counter()
                fn()
                synchronize(self.device)
                row["first_call_s"] = time.perf_counter() - t0
                fns[name] = fn
            except Exception as exc:  # one failing component must not end the run
                self.error(row, exc)
        policy: Policy = self.P["policy"]
        self.log(f"timing {len(fns)} teacher/step rows together")
        timing = Policy(**{**vars(policy), "warmup": max(policy.warmup - 1, 0)})  # the first call was one
        for name, res in time_providers(fns, self.device, timing).items():
            row = by_name[name]
            if isinstance(res, BaseException):
                self.error(row, res)
                fns.pop(name)
                continue
            row.update(res)  # with round_ms on the CPU (round i of one row pairs with round i of another)
            row["images_per_s"] = self.P["batch"] / (res["median_ms"] * 1e-3)
            self.log(f"{name:<24} {row['images_per_s']:9.1f} img/s  ({row['median_ms']:.1f} ms, first call "
                     f"{row['first_call_s']:.1f} s)")
        self.dump()
        return fns


def start_run(args, P, argv) -> PipelineRun:
    out_dir = args.out or results_dir(args.device, "pipeline")
    os.makedirs(out_dir, exist_ok=True)
    env = environment(args.device)
    env["timestamp"] = now()
    env["loadavg_start"] = round(os.getloadavg()[0], 2)
    config = {k: v for k, v in P.items() if k != "policy"} | {"student": STUDENT, "policy": vars(P["policy"])}
    result = {"schema_version": SCHEMA_VERSION, "suite": "pipeline", "created": env["timestamp"], "complete": False,
              "argv": list(sys.argv[1:] if argv is None else argv), "profile": args.profile, "env": env,
              "config": config, "rows": []}
    return PipelineRun(args, P, out_dir, result)


def build_data(run: PipelineRun) -> SimpleNamespace:
    """The synthetic ImageFolder, its datasets, the seeded random teacher and the teacher cache's settings."""
    from hcd_fast.distill.config import CacheConfig
    from hcd_fast.distill.data.datasets import DataConfig, build_data as build_datasets
    from hcd_fast.distill.engine.state import seed_everything
    from hcd_fast.distill.models import create_model
    P, device = run.P, run.device
    t0 = time.perf_counter()
    root = synthetic_imagefolder(run.args.data_root, P["classes"], P["per_class"])
    run.result["data"] = {"root": root, "generate_or_reuse_s": time.perf_counter() - t0,
                          "train_images": P["classes"] * P["per_class"]}
    run.log(f"synthetic ImageFolder {root} ({run.result['data']['train_images']} training JPEGs)")
    data_cfg = DataConfig(interpolation="bicubic")  # the student's input (ImageNet statistics)
    data = build_datasets("imagefolder", root, P["img"], cfg=data_cfg)
    cache_dir = os.path.join(os.path.expanduser(run.args.data_root), f"pipeline_cache_{os.path.basename(root)}_"
                             f"{P['teacher']}_{P['img']}_k{P['views']}")
    cache_cfg = CacheConfig(
        teacher=P["teacher"], allow_random_teacher=True, teacher_kwargs=P["teacher_kwargs"], dataset="imagefolder",
        data_dir=root, img_size=P["img"], interpolation="bicubic", views=P["views"], output=cache_dir,
        batch_size=P["batch"], workers=P["workers"], device=str(device), no_progress=True)
    seed_everything(0)  # the cache's teacher: a seeded random one, as build_cache builds it
    teacher = create_model("--teacher", P["teacher"], data.num_classes, P["teacher_kwargs"], P["img"]).eval()
    return SimpleNamespace(root=root, data=data, data_cfg=data_cfg, cache_dir=cache_dir, cache_cfg=cache_cfg,
                           teacher=teacher, teacher_stats=DataConfig.of_model(P["teacher"]).stats())


def cache_row(run: PipelineRun, ctx: SimpleNamespace) -> None:
    """cache/build: build the teacher cache, or reuse a matching one (its build rate recorded)."""
    from hcd_fast.distill.teacher.build import build_cache
    from hcd_fast.distill.teacher.cache import RawSource, TeacherCache, run_identity
    P = run.P
    meta_path = os.path.join(ctx.cache_dir, "meta.json")
    if os.path.isfile(meta_path):
        try:
            TeacherCache(ctx.cache_dir).check(run_identity(
                RawSource(ctx.data.train), dataset="imagefolder", img_size=P["img"], interpolation="bicubic",
                no_aug=False, digits_aug=False, val_fraction=ctx.cache_cfg.val_fraction, teacher=P["teacher"],
                teacher_kwargs=P["teacher_kwargs"], teacher_model=ctx.teacher, teacher_stats=ctx.teacher_stats))
            with open(meta_path) as f:
                m = json.load(f)
            run.skip("cache/build", f"reused {ctx.cache_dir} (built in {m['seconds']:.1f} s: "
                     f"{m['num_images'] * m['num_views'] / m['seconds']:.1f} views/s)", views_per_s=None)
            return
        except Exception as exc:
            run.log(f"stale benchmark cache {ctx.cache_dir} ({exc}); rebuilding")
            import shutil
            shutil.rmtree(ctx.cache_dir)

    def build():
        gc.collect()
        meta = build_cache(ctx.cache_cfg)
        n = meta["num_images"] * meta["num_views"]
        return {"images_per_s": n / meta["seconds"], "seconds": meta["seconds"], "views": n}
    run.record("cache/build", build, views=P["views"])


def loaders(run: PipelineRun, ctx: SimpleNamespace) -> Dict[str, Callable]:
    """The loaders hcd-distill trains with (timm, teacher cache, DALI), as factories; times each alone."""
    from torch.utils.data import DataLoader

    from hcd_fast.distill.data.dali import DaliLoader, dali_status
    from hcd_fast.distill.teacher.cache import CachedViewDataset, RawSource, TeacherCache
    P, device, B = run.P, run.device, run.P["batch"]
    pin = device.type == "cuda"

    def dataset(cached: bool):
        if not cached:
            return ctx.data.train
        ds = CachedViewDataset(RawSource(ctx.data.train), TeacherCache(ctx.cache_dir), seed=0,
                               mean=ctx.data_cfg.mean, std=ctx.data_cfg.std)
        ds.set_epoch(0)
        return ds

    def torch_loader(cached=False, persistent=False):
        return DataLoader(dataset(cached), batch_size=B, shuffle=True, num_workers=P["workers"], pin_memory=pin,
                          drop_last=True, generator=torch.Generator().manual_seed(0),
                          persistent_workers=persistent and P["workers"] > 0)

    def dali_loader(cached=False):  # hcd-distill --loader dali over the same data and order semantics
        ds = dataset(cached)
        ds.set_epoch(0)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
        return DaliLoader(ds, order, B, device, max(P["workers"], 1), drop_last=True)

    run.record("loader/timm", lambda: _loader_rate(torch_loader(persistent=True), device), workers=P["workers"])
    run.record("loader/cache", lambda: _loader_rate(torch_loader(True, persistent=True), device),
               workers=P["workers"])
    have_dali, version = dali_status()
    run.result["env"]["dali"] = version if have_dali else None
    ctx.dali_settings = (f"DALI {version}, {'nvJPEG (mixed)' if pin else 'cpu'} decoder, "
                         f"{max(P['workers'], 1)} threads") if have_dali else None
    for name, cached in (("loader/dali", False), ("loader/dali_cache", True)):
        if have_dali:
            run.record(name, lambda cached=cached: _loader_rate(dali_loader(cached), device),
                       workers=P["workers"], settings=ctx.dali_settings)
        else:
            run.skip(name, "DALI not installed", workers=P["workers"])
    out = {"timm": torch_loader, "cache": lambda: torch_loader(True)}
    if have_dali:
        out.update(dali=dali_loader, dali_cache=lambda: dali_loader(True))
    return out


def teacher_entries(run: PipelineRun, teacher: torch.nn.Module, x: torch.Tensor) -> list:
    """(name, factory, info) of the teacher rows: as published, hcd-distill's defaults, each switch alone."""
    from hcd_fast.distill.teacher.tap import TeacherTap
    from hcd_fast.distill.teacher.speed import TeacherSpeed, apply_teacher_speed, is_cnn, resolve_teacher_speed
    cuda = run.device.type == "cuda"
    published_amp = (lambda: torch.autocast("cuda", dtype=torch.float16)) if cuda else None
    base_amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None

    def published():  # as published: no_grad, forward_features + forward_head twice (pre-logits, logits)
        with torch.no_grad(), (published_amp() if published_amp else contextlib.nullcontext()):
            t = teacher.forward_features(x)
            return teacher.forward_head(t, pre_logits=True), teacher.forward_head(t)

    def tap_fn(speed, amp):
        tap = apply_teacher_speed(TeacherTap(copy.deepcopy(teacher)), speed)

        def fwd():
            with (amp() if amp else contextlib.nullcontext()):
                return tap(x)
        return fwd
    ours = resolve_teacher_speed(teacher, run.device, "bf16" if cuda else "off")
    rows = [("teacher/ours", ours, ("bf16 autocast, " if cuda else "fp32, ") + ours.describe()),
            ("teacher/bf16_weights", TeacherSpeed(weights_bf16=True), "bf16 weights"),
            ("teacher/channels_last", TeacherSpeed(channels_last=True) if is_cnn(teacher) else None,
             "channels_last" if is_cnn(teacher) else f"{run.P['teacher']} is not a CNN (channels_last applies to "
             "CNN teachers only)")]
    mode = "reduce-overhead" if cuda else None
    rows.append(("teacher/compiled", TeacherSpeed(compile=True, compile_mode=mode) if run.P["compile"] else None,
                 f"torch.compile ({mode or 'default'})" if run.P["compile"] else
                 "compile off for this profile (--no-compile or quick)"))
    entries = [("teacher/published", lambda: published,
                {"settings": "fp16 autocast, no_grad" if cuda else "fp32, no_grad"})]
    for name, speed, desc in rows:
        entries.append((name, None, {"reason": desc}) if speed is None else
                       (name, lambda speed=speed: tap_fn(speed, base_amp), {"settings": desc}))
    return entries


def step_entries(run: PipelineRun, models) -> list:
    """(name, factory, info) of the step rows: hcd-distill's TrainStep in configurations."""
    from benchmarks.steps import fast_config, published_config
    dev = run.device
    configs = {"step/ce": fast_config("ce", dev), "step/kd": fast_config("kd", dev),
               "step/hcd_published": published_config("hcd", dev), "step/hcd_ours": fast_config("hcd", dev),
               "step/hcd_cache": fast_config("hcd", dev, teacher="cached")}
    return [(name, lambda c=c: models.fn(c), {"precision": c.precision()}) for name, c in configs.items()]


def e2e_rate(run: PipelineRun, make_loader: Callable, step: Callable, models, feat_at: Optional[int]):
    """Loader and step together, as training runs them: each loaded batch is copied into the step's static
    batch (and f_t into its cached feature at ``feat_at``: 2 for DataLoader, 3 for DaliLoader)."""
    def go():
        device, B = run.device, run.P["batch"]
        it = iter(make_loader())
        first = next(it)  # worker start excluded, as for the loaders
        models.x.copy_(first[0].to(device))
        step()
        synchronize(device)
        t0, n = time.perf_counter(), 0
        for i, batch in enumerate(it):
            if i >= run.P["e2e_steps"]:
                break
            models.x.copy_(batch[0].to(device, non_blocking=True))
            if feat_at is not None:
                models.cached_feat.copy_(batch[feat_at].to(device, non_blocking=True))
            step()
            n += batch[0].shape[0]
        synchronize(device)
        dt = time.perf_counter() - t0
        del it
        return {"images_per_s": n / dt, "median_ms": dt * 1e3 / max(n // B, 1), "steps": n // B}
    return go


def e2e_rows(run: PipelineRun, ctx, made: Dict[str, Callable], built: Dict[str, Callable], models) -> None:
    for name, loader, step_name, feat_at in (
            ("e2e/published", "timm", "step/hcd_published", None), ("e2e/ours", "timm", "step/hcd_ours", None),
            ("e2e/cache", "cache", "step/hcd_cache", 2), ("e2e/ours_dali", "dali", "step/hcd_ours", None),
            ("e2e/cache_dali", "dali_cache", "step/hcd_cache", 3)):
        info = {"workers": run.P["workers"]}
        if loader not in made:
            run.skip(name, "DALI not installed", **info)
            continue
        if loader.startswith("dali"):
            info["settings"] = ctx.dali_settings
        if step_name not in built:
            run.skip(name, f"{step_name} failed")
            continue
        run.record(name, e2e_rate(run, made[loader], built[step_name], models, feat_at), **info)


def finish(run: PipelineRun) -> dict:
    result = run.result
    result["ratios"] = report.ratios(run.rows)
    result["breakdown"] = report.breakdown({r["component"]: r for r in run.rows if r["status"] == "ok"})
    result["complete"] = True
    result["loadavg_end"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = time.perf_counter() - run.start
    result["plots"] = [] if run.args.no_plots else report.safe_plot(result, run.out_dir)
    run.dump()
    md = report.markdown(result)
    with open(os.path.join(run.out_dir, "pipeline.md"), "w") as f:
        f.write(md + "\n")
    print("\n" + md, flush=True)
    print(f"wrote {os.path.join(run.out_dir, 'pipeline.json')}, pipeline.md"
          + (" and pipeline.png" if result["plots"] else "") + f" ({result['elapsed_s']:.0f} s)", flush=True)
    return result


def run(argv: Optional[List[str]] = None) -> dict:
    import timm

    from benchmarks.steps import StepModels
    args, P = parse_args(argv)
    bench = start_run(args, P, argv)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ctx = build_data(bench)
    cache_row(bench, ctx)
    made = loaders(bench, ctx)
    g = torch.Generator().manual_seed(0)
    B, img, K = P["batch"], P["img"], ctx.data.num_classes
    x = torch.randn(B, 3, img, img, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    torch.manual_seed(0)
    models = StepModels(timm.create_model(STUDENT, num_classes=K), ctx.teacher, x, y, args.device)
    built = bench.time_group(teacher_entries(bench, models.teacher_model, models.x) + step_entries(bench, models))
    gc.collect()
    e2e_rows(bench, ctx, made, built, models)
    return finish(bench)


def main(argv: Optional[List[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
