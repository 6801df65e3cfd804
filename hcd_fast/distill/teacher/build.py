"""``build_cache``: run the teacher once over K augmented views of every training image and store the views
and its features (the format: ``teacher.cache``). Under torchrun each rank builds its share and the files
equal a single-process build."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from hcd_fast.distill.teacher.files import check_output, remove_partials
from hcd_fast.distill.config import CacheConfig
from hcd_fast.distill.data.datasets import DataBundle, DataConfig, build_data
from hcd_fast.distill.engine.distributed import DistContext
from hcd_fast.distill.engine.state import seed_everything
from hcd_fast.distill.errors import UserError
from hcd_fast.distill.models import check_model_name, load_teacher
from hcd_fast.distill.teacher.cache import FORMAT, AllViews, RawSource, make_views, run_identity, transform_spec
from hcd_fast.distill.teacher.speed import apply_teacher_speed, resolve_teacher_speed
from hcd_fast.distill.teacher.tap import TeacherTap, probe_teacher


def build_cache(cfg: CacheConfig) -> dict:
    """Build the cache ``cfg.output``; returns its metadata (also ``cfg.output/meta.json``)."""
    cfg.check()  # the flags' ranges, before any of them is used
    ctx = DistContext()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if device.type == "cuda" and ctx.enabled and device.index is None:
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    ctx.init(device)
    try:
        prepared, error = None, None
        try:
            prepared = _prepare(cfg, device)
        except UserError as exc:  # raised on every rank: none is left waiting at a barrier
            error = exc
        ctx.raise_any(error)
        created = not os.path.isdir(cfg.output)
        try:
            return _build(cfg, ctx, device, prepared)
        except BaseException:
            if ctx.is_main:  # a refused or failed build leaves no *.partial file behind
                remove_partials(cfg.output, created)
            raise
    finally:
        ctx.close()


@dataclass
class _Prepared:
    data: DataBundle
    source: RawSource
    spec: dict
    num_views: int
    tap: TeacherTap
    feat_dim: int
    teacher_cfg: DataConfig
    meta: dict


def _check(cfg: CacheConfig) -> None:
    cfg.check()
    if not cfg.output:
        raise UserError("--output: the cache folder is required")
    check_model_name("--teacher", cfg.teacher)
    if cfg.teacher_checkpoint is None and not cfg.allow_random_teacher:
        raise UserError("cache-teacher needs a trained teacher: give --teacher-checkpoint PATH (or "
                        "--allow-random-teacher for a smoke test)")
    if cfg.teacher_checkpoint is not None and not os.path.isfile(cfg.teacher_checkpoint):
        raise UserError(f"--teacher-checkpoint {cfg.teacher_checkpoint!r}: no such file")
    check_output(cfg.output, cfg.overwrite)  # a file, a cache or other files: refused without --overwrite


def _prepare(cfg: CacheConfig, device: torch.device) -> _Prepared:
    """The checks before the first teacher forward, the teacher (probed) and the metadata."""
    _check(cfg)

    def load_data(data_cfg: DataConfig) -> DataBundle:
        return build_data(cfg.dataset, cfg.data_dir, cfg.img_size, val_fraction=cfg.val_fraction, no_aug=cfg.no_aug,
                          cfg=data_cfg, train_split=cfg.train_split, val_split=cfg.val_split, seed=cfg.seed)

    # The teacher sees every view normalised with its own statistics, as hcd-distill's online teacher does
    # (TeacherTap converts the student's input): its timm data config, or its checkpoint's.
    data = load_data(DataConfig.of_model(cfg.teacher, cfg.interpolation))
    seed_everything(cfg.seed)  # the same initialisation as a training run with this seed (random teachers)
    model, teacher_cfg = load_teacher(cfg.teacher, data.num_classes, cfg.teacher_kwargs, cfg.img_size,
                                      cfg.teacher_checkpoint, interpolation=cfg.interpolation)
    if data.in_memory and teacher_cfg.stats() != DataConfig.of_model(cfg.teacher).stats():
        data = load_data(teacher_cfg)  # digits are normalised when built
    source = RawSource(data.train)
    spec = transform_spec(cfg.dataset, cfg.img_size, cfg.interpolation, cfg.no_aug, cfg.digits_aug)
    num_views = cfg.views if spec["aug"] == "rrc_flip" else 1
    # No conversion inside the tap: its input is already normalised with the teacher's statistics.
    tap = TeacherTap(model.to(device), teacher_cfg.stats(), teacher_cfg.stats())
    feat_dim, k_out = probe_teacher(tap, data.input_size)
    if k_out != data.num_classes:
        raise UserError(f"--teacher {cfg.teacher!r} outputs {k_out} classes, the dataset has {data.num_classes}")
    if not tap.uses_classifier:
        raise UserError(f"--teacher {cfg.teacher!r}: its logits are not classifier(pre_logits) (checked "
                        f"against forward_head), so its features cannot be cached; train online")
    identity = run_identity(source, dataset=cfg.dataset, img_size=cfg.img_size, interpolation=cfg.interpolation,
                            no_aug=cfg.no_aug, digits_aug=cfg.digits_aug, val_fraction=cfg.val_fraction,
                            teacher=cfg.teacher, teacher_kwargs=cfg.teacher_kwargs, teacher_model=model,
                            teacher_stats=teacher_cfg.stats())
    meta = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **identity,
            "num_views": num_views, "feat_dim": feat_dim, "dtype": cfg.cache_dtype, "seed": cfg.seed,
            "num_classes": data.num_classes}
    amp = "bf16" if device.type == "cuda" else "off"
    speed = resolve_teacher_speed(model, device, amp, cfg.teacher_bf16, cfg.teacher_channels_last, "off")
    apply_teacher_speed(tap, speed)
    meta["teacher_speed"] = speed.describe()
    return _Prepared(data, source, spec, num_views, tap, feat_dim, teacher_cfg, meta)


def _build(cfg: CacheConfig, ctx: DistContext, device: torch.device, p: _Prepared) -> dict:
    """Views and teacher features into ``cfg.output``, then meta.json."""
    from tqdm import tqdm

    # Sharded under torchrun: rank 0 makes the two memory-mapped files; each rank fills the views of its
    # slice of images, then (after a barrier: every view is needed before any batch is built) the teacher
    # features of its share of the batches, the very batches of a single-process build (batch b goes to
    # rank b mod world), so the result is the same file; rank 0 writes meta.json once every rank is done.
    # The ranks must share the output folder (one node, or a shared file system).
    data, source, spec, num_views, tap, meta = p.data, p.source, p.spec, p.num_views, p.tap, p.meta
    t0 = time.perf_counter()
    views_tmp = os.path.join(cfg.output, "views.npy.partial")
    feats_tmp = os.path.join(cfg.output, "feats.npy.partial")
    n_img, n_items = len(source), len(source) * num_views
    if ctx.is_main:
        os.makedirs(cfg.output, exist_ok=True)
        np.lib.format.open_memmap(views_tmp, mode="w+", dtype=np.int32, shape=(n_img, num_views, 5)).flush()
        np.lib.format.open_memmap(feats_tmp, mode="w+", dtype=np.float16 if cfg.cache_dtype == "fp16"
                                  else np.float32, shape=(n_img, num_views, p.feat_dim)).flush()
    ctx.barrier()
    views = np.load(views_tmp, mmap_mode="r+")
    error = None
    try:
        make_views(source, spec, num_views, cfg.seed, out=views,
                   images=range(ctx.rank * n_img // ctx.world, (ctx.rank + 1) * n_img // ctx.world))
        views.flush()
    except UserError as exc:
        error = exc
    ctx.raise_any(error)
    del views
    views = np.load(views_tmp, mmap_mode="r")  # reopened after the barrier: every rank's rows
    feats = np.load(feats_tmp, mmap_mode="r+")
    workers = 0 if data.in_memory else cfg.workers
    batches = [list(range(b * cfg.batch_size, min((b + 1) * cfg.batch_size, n_items)))
               for b in range(ctx.rank, math.ceil(n_items / cfg.batch_size), ctx.world)]
    loader = DataLoader(AllViews(source, spec, views, *p.teacher_cfg.stats()), batch_sampler=batches,
                        num_workers=workers, pin_memory=device.type == "cuda")
    for x, n, k in tqdm(loader, disable=cfg.no_progress or not ctx.is_main, desc="cache-teacher",
                        dynamic_ncols=True):
        f, _ = tap(x.to(device, non_blocking=True))
        if not torch.isfinite(f).all():
            error = UserError("cache-teacher: the teacher produced non-finite features (check the checkpoint)")
            break
        feats[n.numpy(), k.numpy()] = f.float().cpu().numpy().astype(feats.dtype)
    feats.flush()
    del feats, views, loader
    ctx.raise_any(error)  # every rank has flushed its share before rank 0 goes on
    meta["seconds"] = time.perf_counter() - t0
    meta["ranks"] = ctx.world
    if ctx.is_main:
        os.replace(views_tmp, os.path.join(cfg.output, "views.npy"))
        os.replace(feats_tmp, os.path.join(cfg.output, "feats.npy"))
        tmp = os.path.join(cfg.output, "meta.json.partial")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(cfg.output, "meta.json"))  # last: its presence marks a finished cache
    ctx.barrier()  # no rank returns before the cache is finished
    return meta
