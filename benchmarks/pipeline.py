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
- ``step/ce``, ``step/kd``: one optimizer step of the student alone / with Hinton KD (fast settings).
- ``step/hcd_published``: HCD as the published code runs it (eager reference loss, fp32 on CPU / fp16 +
  GradScaler on CUDA, ``loss.item()`` every step); ``step/hcd_ours``: HCDLoss(backend="auto") with the
  teacher at hcd-distill's defaults; ``step/hcd_cache``: the same without a teacher forward (f_t from the
  cache, z_t = classifier(f_t)).
- The teacher and step rows are timed together, round-robin on the CPU (``benchmarks.common.measure_group``:
  a change in the machine's load hits every row alike), after a first call each (``first_call_s``:
  compilation, cuDNN's search). On the CPU each row keeps its per-round times (``round_ms``) and the hcd
  ratios are also given per round (the median of the ratios within a round).
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
import datetime
import gc
import json
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from benchmarks.common import (SCHEMA_VERSION, Policy, device_tag, environment, measure_group, parse_device,
                               summarize, synchronize)

PROFILES = {
    # teacher, teacher kwargs, img, batch, classes, train images per class, views, workers, policy
    # cpu: 5 interleaved rounds (3 left the ratios at the mercy of a shared machine's load); the per-round
    # ratios are reported beside the ratios of the medians
    "cpu": dict(teacher="vit_small_patch16_224", teacher_kwargs={}, img=224, batch=8, classes=10, per_class=8,
                views=2, workers=2, e2e_steps=4, compile=True,
                policy=Policy(warmup=1, min_reps=5, max_reps=5, target_s=0.0, flush_l2=False)),
    "gpu": dict(teacher="vit_base_patch16_224", teacher_kwargs={}, img=224, batch=128, classes=100, per_class=26,
                views=2, workers=min(16, os.cpu_count() or 1), e2e_steps=16, compile=True,
                policy=Policy(warmup=3, min_reps=10, max_reps=20, target_s=1.5, flush_l2=False)),
    "quick": dict(teacher="vit_tiny_patch16_224",
                  teacher_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
                  img=32, batch=4, classes=2, per_class=4, views=2, workers=0, e2e_steps=2, compile=False,
                  policy=Policy(warmup=1, min_reps=1, max_reps=1, target_s=0.0, flush_l2=False)),
}
STUDENT = "resnet18"


# ------------------------------------------------------------------------------------ synthetic data
def _jpeg(args) -> None:
    path, seed, idx, width, height = args
    from PIL import Image
    rng = np.random.default_rng([seed, idx])
    # Smooth colour fields plus texture: JPEG sizes and decode costs like photographs, not like noise.
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-24, 25, size=img.shape, dtype=np.int16)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def synthetic_imagefolder(root: str, classes: int, per_class: int, seed: int = 0, val_per_class: int = 1,
                          sizes=((500, 375), (375, 500), (500, 333), (640, 480), (400, 400))) -> str:
    """An ImageFolder (``root/train/cXXX/*.jpg``, ``root/val/...``) of deterministic synthetic JPEGs at
    ImageNet-like sizes, made once: a finished folder holds ``DONE`` and is reused as it is."""
    tag = "x".join(f"{w}-{h}" for w, h in sizes)
    import hashlib
    digest = hashlib.sha256(tag.encode()).hexdigest()[:8]
    name = f"synth_imagefolder_c{classes}_n{per_class}_v{val_per_class}_s{seed}_{digest}"
    folder = os.path.join(os.path.expanduser(root), name)
    if os.path.isfile(os.path.join(folder, "DONE")):
        return folder
    jobs = []
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = os.path.join(folder, split, f"c{c:03d}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                idx = len(jobs)
                w, h = sizes[(idx * 7 + c) % len(sizes)]
                jobs.append((os.path.join(d, f"{i:05d}.jpg"), seed, idx, w, h))
    if len(jobs) > 64 and (os.cpu_count() or 1) > 1:
        from multiprocessing import Pool
        with Pool(min(16, os.cpu_count() or 1)) as pool:
            pool.map(_jpeg, jobs, chunksize=16)
    else:
        for j in jobs:
            _jpeg(j)
    with open(os.path.join(folder, "DONE"), "w") as f:
        f.write(f"{len(jobs)} images\n")
    return folder


# ------------------------------------------------------------------------------------------- helpers
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


class _TeacherAdapter:
    """Stands in for the timm teacher inside ``benchmarks.steps.StepBench``'s step: ``forward_features``
    returns (f_t, z_t) from ``fn(x)`` and ``forward_head`` picks one."""

    def __init__(self, fn, num_features: int):
        self.fn, self.num_features = fn, num_features

    def forward_features(self, x):
        return self.fn(x)

    def forward_head(self, t, pre_logits: bool = False):
        return t[0] if pre_logits else t[1]


# ------------------------------------------------------------------------------------------------ run
def run(argv: Optional[List[str]] = None) -> dict:
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

    start = time.perf_counter()
    device = parse_device(ap, args.device)
    profile = args.profile or ("gpu" if device.type == "cuda" else "cpu")
    P = dict(PROFILES[profile])
    for key in ("teacher", "batch", "workers", "views"):
        if getattr(args, key) is not None:
            P[key] = getattr(args, key)
            if key == "teacher":
                P["teacher_kwargs"] = {}
    if args.no_compile:
        P["compile"] = False
    policy: Policy = P["policy"]
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", device_tag(device),
                                       "pipeline")
    os.makedirs(out_dir, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    env = environment(device)
    env["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["loadavg_start"] = round(os.getloadavg()[0], 2)
    rows: List[dict] = []
    result = {"schema_version": SCHEMA_VERSION, "suite": "pipeline", "created": env["timestamp"], "complete": False,
              "argv": list(sys.argv[1:] if argv is None else argv), "profile": profile, "env": env,
              "config": {k: v for k, v in P.items() if k != "policy"} | {"student": STUDENT, "policy": vars(policy)},
              "rows": rows}
    json_path = os.path.join(out_dir, "pipeline.json")

    def dump():
        with open(json_path + ".tmp", "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(json_path + ".tmp", json_path)

    def log(msg):
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    def record(name: str, fn: Callable[[], Dict[str, float]], **info) -> Optional[dict]:
        row = {"component": name, "status": "ok", "reason": None, **info}
        rows.append(row)
        try:
            row.update(fn())
            log(f"{name:<24} {row['images_per_s']:9.1f} img/s  ({row.get('median_ms', float('nan')):.1f} ms)")
        except Exception as exc:  # one failing component must not end the run
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:600])
            traceback.print_exception(type(exc), exc, exc.__traceback__, limit=4)
            log(f"{name:<24} error: {row['reason']}")
        dump()
        return row if row["status"] == "ok" else None

    def time_group(entries) -> Dict[str, Callable[[], object]]:
        """Build each entry's callable and time its first call (compilation, cuDNN search), then time them
        all with ``measure_group`` (round-robin on the CPU: load changes hit every row alike)."""
        fns, by_name = {}, {}
        for name, factory, info in entries:
            if factory is None:
                skip(name, info["reason"])
                continue
            row = {"component": name, "status": "ok", "reason": None, **info}
            rows.append(row)
            by_name[name] = row
            try:
                fn = factory()
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                row["first_call_s"] = time.perf_counter() - t0
                fns[name] = fn
            except Exception as exc:  # one failing component must not end the run
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:600])
                traceback.print_exception(type(exc), exc, exc.__traceback__, limit=4)
                log(f"{name:<24} error: {row['reason']}")
        log(f"timing {len(fns)} teacher/step rows together ({policy.max_reps} rounds at most)")
        pol = Policy(warmup=max(policy.warmup - 1, 0), min_reps=policy.min_reps, max_reps=policy.max_reps,
                     target_s=policy.target_s, flush_l2=policy.flush_l2)
        calls: Dict[str, List[float]] = {name: [] for name in fns}

        def timed(name, fn):  # each call's ms, in call order: round i of one row pairs with round i of another
            def call():
                t0 = time.perf_counter()
                fn()
                calls[name].append((time.perf_counter() - t0) * 1e3)
            return call
        # rounds exist on the CPU only (measure_group interleaves there; on CUDA each row is timed in turn)
        timing = {n: timed(n, f) for n, f in fns.items()} if device.type == "cpu" else fns
        for name, res in measure_group(timing, device, pol).items():
            row = by_name[name]
            if isinstance(res, BaseException):
                row.update(status="error", reason=f"{type(res).__name__}: {res}"[:600])
                fns.pop(name)
                log(f"{name:<24} error: {row['reason']}")
                continue
            row.update(res)
            if device.type == "cpu":
                row["round_ms"] = calls[name][pol.warmup:]
            row["images_per_s"] = B / (res["median_ms"] * 1e-3)
            log(f"{name:<24} {row['images_per_s']:9.1f} img/s  ({row['median_ms']:.1f} ms, first call "
                f"{row['first_call_s']:.1f} s)")
        dump()
        return fns

    def skip(name: str, reason: str, **info):
        rows.append({"component": name, "status": "skipped", "reason": reason, **info})
        log(f"{name:<24} skipped: {reason}")

    # --- data, teacher, cache ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    root = synthetic_imagefolder(args.data_root, P["classes"], P["per_class"])
    result["data"] = {"root": root, "generate_or_reuse_s": time.perf_counter() - t0,
                      "train_images": P["classes"] * P["per_class"]}
    log(f"synthetic ImageFolder {root} ({result['data']['train_images']} training JPEGs)")

    import timm
    from torch.utils.data import DataLoader

    from benchmarks import steps as ST
    from hcd_fast.distill.data.datasets import DataConfig, build_data
    from hcd_fast.distill.teacher.tap import TeacherTap
    from hcd_fast.distill.config import CacheConfig
    from hcd_fast.distill.teacher.build import build_cache
    from hcd_fast.distill.teacher.cache import CachedViewDataset, RawSource, TeacherCache, run_identity
    from hcd_fast.distill.teacher.speed import TeacherSpeed, apply_teacher_speed, resolve_teacher_speed

    B, img = P["batch"], P["img"]
    cuda = device.type == "cuda"
    amp_ours = "bf16" if cuda else "off"
    data_cfg = DataConfig(interpolation="bicubic")  # the student's input (ImageNet statistics)
    data = build_data("imagefolder", root, img, cfg=data_cfg)
    pin = cuda

    cache_dir = os.path.join(os.path.expanduser(args.data_root), f"pipeline_cache_{os.path.basename(root)}_"
                             f"{P['teacher']}_{img}_k{P['views']}")
    cache_cfg = CacheConfig(
        teacher=P["teacher"], allow_random_teacher=True, teacher_kwargs=P["teacher_kwargs"], dataset="imagefolder",
        data_dir=root, img_size=img, interpolation="bicubic", views=P["views"], output=cache_dir, batch_size=B,
        workers=P["workers"], device=str(device), no_progress=True)
    # The cache's teacher: a seeded random one (the benchmark times, it does not train).
    from hcd_fast.distill.engine.state import seed_everything
    from hcd_fast.distill.models import create_model
    seed_everything(0)  # as build_cache builds its random teacher
    teacher_model = create_model("--teacher", P["teacher"], data.num_classes, P["teacher_kwargs"], img).eval()
    teacher_stats = DataConfig.of_model(P["teacher"]).stats()
    meta_ok = False
    if os.path.isfile(os.path.join(cache_dir, "meta.json")):
        try:
            TeacherCache(cache_dir).check(run_identity(
                RawSource(data.train), dataset="imagefolder", img_size=img, interpolation="bicubic", no_aug=False,
                digits_aug=False, val_fraction=cache_cfg.val_fraction, teacher=P["teacher"],
                teacher_kwargs=P["teacher_kwargs"], teacher_model=teacher_model, teacher_stats=teacher_stats))
            meta_ok = True
        except Exception as exc:
            log(f"stale benchmark cache {cache_dir} ({exc}); rebuilding")
            import shutil
            shutil.rmtree(cache_dir)
    if meta_ok:
        with open(os.path.join(cache_dir, "meta.json")) as f:
            m = json.load(f)
        skip("cache/build", f"reused {cache_dir} (built in {m['seconds']:.1f} s: "
             f"{m['num_images'] * m['num_views'] / m['seconds']:.1f} views/s)", views_per_s=None)
    else:
        def build():
            gc.collect()
            meta = build_cache(cache_cfg)
            n = meta["num_images"] * meta["num_views"]
            return {"images_per_s": n / meta["seconds"], "seconds": meta["seconds"], "views": n}
        record("cache/build", build, views=P["views"])

    # --- loaders ------------------------------------------------------------------------------------------
    n_batches = len(data.train) // B - 1

    def timm_loader(persistent=False):
        return DataLoader(data.train, batch_size=B, shuffle=True, num_workers=P["workers"], pin_memory=pin,
                          drop_last=True, generator=torch.Generator().manual_seed(0),
                          persistent_workers=persistent and P["workers"] > 0)

    def cache_loader(persistent=False):
        ds = CachedViewDataset(RawSource(data.train), TeacherCache(cache_dir), seed=0, mean=data_cfg.mean,
                               std=data_cfg.std)
        ds.set_epoch(0)
        return DataLoader(ds, batch_size=B, shuffle=True, num_workers=P["workers"], pin_memory=pin,
                          drop_last=True, generator=torch.Generator().manual_seed(0),
                          persistent_workers=persistent and P["workers"] > 0)

    record("loader/timm", lambda: _loader_rate(timm_loader(persistent=True), device), workers=P["workers"])
    record("loader/cache", lambda: _loader_rate(cache_loader(persistent=True), device), workers=P["workers"])

    from hcd_fast.distill.data.dali import DaliLoader, dali_status
    have_dali, dali_version = dali_status()
    result["env"]["dali"] = dali_version if have_dali else None
    dali_settings = (f"DALI {dali_version}, {'nvJPEG (mixed)' if cuda else 'cpu'} decoder, "
                     f"{max(P['workers'], 1)} threads")

    def dali_loader(persistent=False, cached=False):
        # hcd-distill --loader dali: the trainer's DaliLoader over the same data and order semantics
        if cached:
            ds = CachedViewDataset(RawSource(data.train), TeacherCache(cache_dir), seed=0, mean=data_cfg.mean,
                                   std=data_cfg.std)
        else:
            ds = data.train
        ds.set_epoch(0)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
        return DaliLoader(ds, order, B, device, max(P["workers"], 1), drop_last=True)

    for name, cached in (("loader/dali", False), ("loader/dali_cache", True)):
        if have_dali:
            record(name, lambda cached=cached: _loader_rate(dali_loader(cached=cached), device),
                   workers=P["workers"], settings=dali_settings)
        else:
            skip(name, "DALI not installed", workers=P["workers"])

    # --- teacher forward ----------------------------------------------------------------------------------
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, img, img, generator=g).to(device)
    model_fp32 = teacher_model.to(device)
    published_amp = (lambda: torch.autocast("cuda", dtype=torch.float16)) if cuda else None
    base_amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None

    def teacher_fn(speed: Optional[TeacherSpeed], amp):
        if speed is None:  # as published: no_grad, forward_features + forward_head twice (pre-logits, logits)
            def fwd():
                with torch.no_grad(), (amp() if amp else contextlib.nullcontext()):
                    t = model_fp32.forward_features(x)
                    return model_fp32.forward_head(t, pre_logits=True), model_fp32.forward_head(t)
            return fwd
        tap = apply_teacher_speed(TeacherTap(copy.deepcopy(model_fp32)), speed)

        def fwd():
            if amp:
                with amp():
                    return tap(x)
            return tap(x)
        return fwd

    ours = resolve_teacher_speed(model_fp32, device, amp_ours)
    teacher_rows = [("teacher/published", None, published_amp, "fp16 autocast, no_grad" if cuda else "fp32, no_grad"),
                    ("teacher/ours", ours, base_amp, ("bf16 autocast, " if cuda else "fp32, ") + ours.describe()),
                    ("teacher/bf16_weights", TeacherSpeed(weights_bf16=True), base_amp, "bf16 weights")]
    from hcd_fast.distill.teacher.speed import is_cnn
    if is_cnn(model_fp32):
        teacher_rows.append(("teacher/channels_last", TeacherSpeed(channels_last=True), base_amp, "channels_last"))
    else:
        teacher_rows.append(("teacher/channels_last", None, None, f"{P['teacher']} is not a CNN (channels_last "
                             f"applies to CNN teachers only)"))
    if P["compile"]:
        mode = "reduce-overhead" if cuda else None
        teacher_rows.append(("teacher/compiled", TeacherSpeed(compile=True, compile_mode=mode), base_amp,
                             f"torch.compile ({mode or 'default'})"))
    else:
        teacher_rows.append(("teacher/compiled", None, None, "compile off for this profile (--no-compile or quick)"))
    group = []  # (name, factory, info): teacher rows and step rows, timed together (interleaved on CPU)
    for name, speed, amp, desc in teacher_rows:
        if speed is None and name != "teacher/published":
            group.append((name, None, {"reason": desc}))
            continue
        group.append((name, lambda speed=speed, amp=amp: teacher_fn(speed, amp), {"settings": desc}))

    # --- steps --------------------------------------------------------------------------------------------
    case = ST.StepCase("vit_s", B, img, data.num_classes)  # the teacher is replaced below
    bench = ST.StepBench.__new__(ST.StepBench)
    bench.case, bench.device = case, device
    bench.amp_dtype, bench.channels_last = ST.fast_settings(device)
    torch.manual_seed(0)
    bench.student0 = timm.create_model(STUDENT, num_classes=data.num_classes).to(device)
    bench.teacher = model_fp32
    bench.channels = tuple(bench.student0.feature_info[i]["num_chs"] for i in range(1, 5))
    from hcd_fast import HCDConfig, HCDLoss
    bench.head0 = HCDLoss(bench.channels, model_fp32.num_features, data.num_classes, config=HCDConfig(),
                          backend="reference", validate=False).to(device)
    bench.x = x
    bench.y = torch.randint(0, data.num_classes, (B,), generator=g).to(device)
    tap_ours = apply_teacher_speed(TeacherTap(copy.deepcopy(model_fp32)), ours)
    feat_buf = torch.randn(B, model_fp32.num_features, generator=g).to(device)
    classifier = model_fp32.get_classifier()
    D = model_fp32.num_features

    def cached_teacher(_x):
        return feat_buf.clone(), classifier(feat_buf)

    def bench_with(teacher_obj):
        b = copy.copy(bench)
        b.teacher = teacher_obj
        return b

    step_fns = {"step/ce": (bench, "ce"), "step/kd": (bench_with(_TeacherAdapter(tap_ours, D)), "kd"),
                "step/hcd_published": (bench, "hcd_ref"),
                "step/hcd_ours": (bench_with(_TeacherAdapter(tap_ours, D)), "hcd"),
                "step/hcd_cache": (bench_with(_TeacherAdapter(cached_teacher, D)), "hcd")}
    for name, (b, variant) in step_fns.items():
        group.append((name, lambda b=b, variant=variant: b.fn(variant),
                      {"precision": ST.variant_precision(variant, device)}))
    built = time_group(group)
    gc.collect()

    # --- end to end ---------------------------------------------------------------------------------------
    def e2e(loader_fn, step_fn, feat_at: Optional[int]):
        def go():
            loader = loader_fn()
            it = iter(loader)
            n_steps = min(P["e2e_steps"], n_batches)
            first = next(it)  # worker start excluded, as for the loaders
            bench.x.copy_(first[0].to(device))
            step_fn()
            synchronize(device)
            t0 = time.perf_counter()
            n = 0
            for i, batch in enumerate(it):
                if i >= n_steps:
                    break
                bench.x.copy_(batch[0].to(device, non_blocking=True))
                if feat_at is not None:  # f_t's place in the batch: 2 (DataLoader), 3 (DaliLoader)
                    feat_buf.copy_(batch[feat_at].to(device, non_blocking=True))
                step_fn()
                n += batch[0].shape[0]
            synchronize(device)
            dt = time.perf_counter() - t0
            del it
            return {"images_per_s": n / dt, "median_ms": dt * 1e3 / max(n // B, 1), "steps": n // B}
        return go

    for name, loader_fn, step_name, feat_at in (
            ("e2e/published", timm_loader, "step/hcd_published", None),
            ("e2e/ours", timm_loader, "step/hcd_ours", None),
            ("e2e/cache", cache_loader, "step/hcd_cache", 2),
            ("e2e/ours_dali", dali_loader, "step/hcd_ours", None),
            ("e2e/cache_dali", lambda: dali_loader(cached=True), "step/hcd_cache", 3)):
        info = {"workers": P["workers"]}
        if name.endswith("_dali"):
            if not have_dali:
                skip(name, "DALI not installed", **info)
                continue
            info["settings"] = dali_settings
        if step_name not in built:
            skip(name, f"{step_name} failed")
            continue
        record(name, e2e(loader_fn, built[step_name], feat_at), **info)

    # --- summary ------------------------------------------------------------------------------------------
    ok = {r["component"]: r for r in rows if r["status"] == "ok"}

    def ratio(a, b):
        return ok[a]["images_per_s"] / ok[b]["images_per_s"] if a in ok and b in ok else None
    result["ratios"] = {
        "hcd_ours_vs_published": ratio("step/hcd_ours", "step/hcd_published"),
        "hcd_cache_vs_ours": ratio("step/hcd_cache", "step/hcd_ours"),
        "hcd_cache_vs_published": ratio("step/hcd_cache", "step/hcd_published"),
        "e2e_ours_vs_published": ratio("e2e/ours", "e2e/published"),
        "e2e_cache_vs_published": ratio("e2e/cache", "e2e/published"),
        "loader_dali_vs_timm": ratio("loader/dali", "loader/timm"),
        "loader_dali_cache_vs_cache": ratio("loader/dali_cache", "loader/cache"),
        "e2e_ours_dali_vs_ours": ratio("e2e/ours_dali", "e2e/ours"),
        "e2e_cache_dali_vs_published": ratio("e2e/cache_dali", "e2e/published"),
        "teacher_ours_vs_published": ratio("teacher/ours", "teacher/published"),
        # the median over rounds of the ratio within each round (rows interleaved on the CPU; a load change
        # between rounds cancels out): the steadier reading on a shared machine
        "hcd_ours_vs_published_per_round": paired_ratio(ok, "step/hcd_ours", "step/hcd_published"),
        "hcd_cache_vs_ours_per_round": paired_ratio(ok, "step/hcd_cache", "step/hcd_ours"),
    }
    result["breakdown"] = breakdown(ok)
    result["complete"] = True
    result["loadavg_end"] = round(os.getloadavg()[0], 2)
    result["elapsed_s"] = time.perf_counter() - start
    result["plots"] = [] if args.no_plots else safe_plot(result, out_dir)
    dump()
    md = markdown(result)
    with open(os.path.join(out_dir, "pipeline.md"), "w") as f:
        f.write(md + "\n")
    print("\n" + md, flush=True)
    print(f"wrote {json_path}, pipeline.md" + (" and pipeline.png" if result["plots"] else "")
          + f" ({result['elapsed_s']:.0f} s)", flush=True)
    return result


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
        lines += ["", f"CPU targets (issue 14; read, never asserted): hcd_cache >= 1.5x hcd_ours: "
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


def main(argv: Optional[List[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
