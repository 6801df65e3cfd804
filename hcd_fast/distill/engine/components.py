"""Everything a run builds from its ``TrainConfig``: data, models, task, loaders, optimiser and the step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from hcd_fast.distill import onednn_amx
from hcd_fast.distill.config import TrainConfig
from hcd_fast.distill.data.datasets import DataBundle, DataConfig, build_data
from hcd_fast.distill.data.loaders import LOADERS
from hcd_fast.distill.data.samplers import ResumableDistributedSampler, ShardSampler
from hcd_fast.distill.distiller import Distiller, DistillTask
from hcd_fast.distill.engine.distributed import DistContext
from hcd_fast.distill.engine.evaluate import has_batch_norm
from hcd_fast.distill.engine.state import seed_everything
from hcd_fast.distill.engine.step import TrainStep
from hcd_fast.distill.errors import UserError
from hcd_fast.distill.methods import build_criterion, get_method
from hcd_fast.distill.models import build_student, build_teacher
from hcd_fast.distill.taps import StudentTap
from hcd_fast.distill.teacher.tap import TeacherTap

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Components:
    data_cfg: DataConfig
    data: DataBundle
    num_classes: int
    channels: Tuple[int, ...]
    part_names: Tuple[str, ...]
    distiller: nn.Module  # the Distiller (SyncBatchNorm-converted under --sync-bn)
    task: DistillTask
    channels_last: bool
    local_bs: int
    steps_per_epoch: int
    sampler: ResumableDistributedSampler
    loader_gen: torch.Generator
    train_loader: object
    val_loader: object
    optimizer: torch.optim.Optimizer
    scheduler: Optional[object]
    scaler: Optional[torch.amp.GradScaler]
    step: TrainStep
    amx_note: Optional[str] = None  # why a non-finite loss may not be the run's fault (onednn_amx)


def build_run_data(cfg: TrainConfig) -> Tuple[DataConfig, DataBundle]:
    """The student's data config and the datasets, checked against --num-classes and the loader."""
    crop = cfg.crop_pct if cfg.crop_pct is not None else (1.0 if cfg.dataset == "cifar100" else None)
    data_cfg = DataConfig.of_model(cfg.student, cfg.interpolation, crop)
    data = build_data(cfg.dataset, cfg.data_dir, cfg.img_size, val_fraction=cfg.val_fraction, aa=cfg.aa,
                      reprob=cfg.reprob, no_aug=cfg.no_aug, cfg=data_cfg, train_split=cfg.train_split,
                      val_split=cfg.val_split, seed=cfg.seed)
    # Before the models: e.g. DALI needs an ImageFolder of JPEGs and no option it cannot apply.
    LOADERS[cfg.loader].check_data((data.train, data.val), dataset=cfg.dataset, aa=cfg.aa, reprob=cfg.reprob,
                                   digits_aug=cfg.digits_aug)
    if cfg.num_classes is not None and cfg.num_classes != data.num_classes:
        raise UserError(f"--num-classes {cfg.num_classes}: the {cfg.dataset} dataset has {data.num_classes} classes")
    return data_cfg, data


def build_models(cfg: TrainConfig, num_classes: int, device: torch.device, data_cfg: DataConfig, input_size
                 ) -> Tuple[Optional[TeacherTap], int, Distiller, Tuple[int, ...]]:
    """(teacher tap or None, D_t, Distiller, student channels C_s)."""
    teacher, teacher_dim = None, 1  # D_t unused without a teacher (ce)
    if get_method(cfg.method).needs_teacher:
        teacher, teacher_dim = build_teacher(cfg.teacher, num_classes, device, data_cfg.stats(), input_size,
                                             kwargs=cfg.teacher_kwargs, checkpoint=cfg.teacher_checkpoint,
                                             pretrained=cfg.teacher_pretrained)
    student, channels = build_student(cfg.student, num_classes, device, input_size, cfg.indices,
                                      kwargs=cfg.student_kwargs, drop_path=cfg.drop_path,
                                      pretrained=cfg.student_pretrained)
    try:
        criterion = build_criterion(cfg.method, channels, teacher_dim, num_classes, cfg.loss, backend=cfg.backend,
                                    options=cfg.method_config())
    except (ValueError, TypeError) as exc:
        raise UserError(f"loss options: {exc}") from None
    return teacher, teacher_dim, Distiller(StudentTap(student, cfg.indices), criterion).to(device), channels


def training_set(cfg: TrainConfig, data: DataBundle, data_cfg: DataConfig, teacher: Optional[TeacherTap],
                 teacher_dim: int):
    """The training set: replayed from --teacher-cache, fresh --digits-aug views, or the dataset's own."""
    from hcd_fast.distill.teacher import cache
    if cfg.teacher_cache:  # stored views and f_t: no teacher forward
        cache.check_replayable(cfg.aa, cfg.reprob)
        return cache.open_for_training(cfg.teacher_cache, data.train, teacher, teacher_dim, data_cfg, seed=cfg.seed,
                                       dataset=cfg.dataset, img_size=cfg.img_size, no_aug=cfg.no_aug,
                                       digits_aug=cfg.digits_aug, val_fraction=cfg.val_fraction,
                                       teacher_name=cfg.teacher, teacher_kwargs=cfg.teacher_kwargs)
    if cfg.digits_aug:  # digits through fresh crop + flip views (the cache's online twin)
        return cache.online_views(data.train, data_cfg, dataset=cfg.dataset, img_size=cfg.img_size,
                                  no_aug=cfg.no_aug, seed=cfg.seed)
    return data.train


def apply_speed(cfg: TrainConfig, device: torch.device, distiller: nn.Module, teacher: Optional[TeacherTap],
                amp: str) -> Tuple[nn.Module, bool]:
    """channels_last and SyncBatchNorm of the trainable part; the teacher's own switches (``teacher.speed``)."""
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
    if cfg.sync_bn:
        distiller = nn.SyncBatchNorm.convert_sync_batchnorm(distiller)
    if teacher is not None:
        from hcd_fast.distill.teacher.speed import apply_teacher_speed, resolve_teacher_speed
        apply_teacher_speed(teacher, resolve_teacher_speed(teacher.model, device, amp, cfg.teacher_bf16,
                                                           cfg.teacher_channels_last, cfg.teacher_compile,
                                                           cfg.compile))
    return distiller, channels_last


def build_loaders(cfg: TrainConfig, ctx: DistContext, device: torch.device, data: DataBundle, distiller: nn.Module):
    """(local batch, steps per epoch, sampler, generator, train loader, val loader): the order is a function
    of (seed, epoch), the global batch split over ranks."""
    local_bs = cfg.batch_size // ctx.world
    if local_bs < 2 and not cfg.freeze_bn and has_batch_norm(distiller):
        raise UserError(f"--batch-size {cfg.batch_size}: {local_bs} image per process, but BatchNorm (student or "
                        f"projectors) needs at least 2 in training mode; use a larger --batch-size or --freeze-bn")
    sampler = ResumableDistributedSampler(data.train, ctx.world, ctx.rank, seed=cfg.seed, drop_last=True)
    steps = sampler.num_samples // local_bs
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps < 1:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(data.train)} images)")
    workers = 0 if data.in_memory else cfg.workers
    gen = torch.Generator()
    create = LOADERS[cfg.loader].create
    train = create(data.train, sampler, local_bs, device, workers, drop_last=True, generator=gen)
    val = create(data.val, ShardSampler(data.val, ctx.world, ctx.rank), max(local_bs, 64), device, workers)
    return local_bs, steps, sampler, gen, train, val


def build_optim(cfg: TrainConfig, distiller: nn.Module, steps_per_epoch: int):
    """timm's optimizer and scheduler (stepped every update), or no scheduler for --sched none. Under
    --cuda-graph the optimizer is built capture-ready (PyTorch's fused kernels; graph_step.CAPTURE_READY)."""
    import timm.optim
    import timm.scheduler

    from hcd_fast.distill.engine.graph_step import build_optimizer_options, keep_own_implementation
    extra = build_optimizer_options(cfg.opt) if cfg.cuda_graph else {}
    optimizer = timm.optim.create_optimizer_v2(distiller, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               momentum=cfg.momentum, **extra)
    keep_own_implementation(optimizer)  # a checkpoint of a run with(out) --cuda-graph resumes either way
    scheduler = None
    if cfg.sched != "none":
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
            warmup_epochs=cfg.warmup_epochs, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler


def build_components(cfg: TrainConfig, ctx: DistContext, device: torch.device) -> Components:
    """Every part of a run, checked (UserError) before the first step."""
    if cfg.cuda_graph:
        from hcd_fast.distill.engine.graph_step import problems
        found = problems(device, ctx.enabled, cfg.skip_nonfinite, cfg.compile,
                         cfg.teacher_compile == "on" or (cfg.teacher_compile == "auto" and cfg.compile), cfg.opt)
        if found:
            raise UserError("--cuda-graph: " + "; ".join(found))
    data_cfg, data = build_run_data(cfg)
    seed_everything(cfg.seed)
    teacher, teacher_dim, distiller, channels = build_models(cfg, data.num_classes, device, data_cfg, data.input_size)
    data.train = training_set(cfg, data, data_cfg, teacher, teacher_dim)
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    distiller, channels_last = apply_speed(cfg, device, distiller, teacher, amp)
    task = DistillTask(distiller, teacher, device=device)
    local_bs, steps, sampler, gen, train_loader, val_loader = build_loaders(cfg, ctx, device, data, distiller)
    optimizer, scheduler = build_optim(cfg, distiller, steps)
    amp_dtype = AMP_DTYPES.get(amp)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    # PyTorch's oneDNN bf16 path on AMX CPUs can give NaN gradients: say so once, and in a non-finite error.
    amx_note = onednn_amx.NOTE if onednn_amx.amx_bf16_risk(device, amp_dtype) else None
    if amx_note:
        onednn_amx.warn_amx_bf16_once()
    step = TrainStep(task, optimizer, device=device, amp_dtype=amp_dtype, scaler=scaler, channels_last=channels_last,
                     clip_grad=cfg.clip_grad, skip_nonfinite=bool(cfg.skip_nonfinite), reduce_max=ctx.all_max)
    if cfg.cuda_graph:
        from hcd_fast.distill.engine.graph_step import GraphedTrainStep
        step = GraphedTrainStep(step)
    return Components(data_cfg, data, data.num_classes, channels, step.part_names, distiller, task, channels_last,
                      local_bs, steps, sampler, gen, train_loader, val_loader, optimizer, scheduler, scaler, step,
                      amx_note)
