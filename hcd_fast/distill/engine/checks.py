"""What is checked before anything is built (every flag, file and model name), the run's identity (the
result-defining flags, the default output folder) and whether a checkpoint may continue this run."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch
import torch.nn as nn

from hcd_fast.distill.checkpoint import CKPT_FORMAT, RunFolder, safe_load
from hcd_fast.distill.config import IDENTITY_ARGS, OPERATIONAL_ARGS, TrainConfig
from hcd_fast.distill.data.loaders import LOADERS
from hcd_fast.distill.engine.report import warn
from hcd_fast.distill.errors import UserError
from hcd_fast.distill.methods import METHODS, get_method
from hcd_fast.distill.models import check_model_name


def check_optim(opt: str, sched: str, *, lr: float, weight_decay: float, momentum: float, epochs: int,
                warmup_epochs: int) -> None:
    """--opt and --sched against timm's factories, on a dummy parameter."""
    import timm.optim
    import timm.scheduler
    try:
        optimizer = timm.optim.create_optimizer_v2(nn.Linear(1, 1), opt=opt, lr=lr, weight_decay=weight_decay,
                                                   momentum=momentum)
    except (ValueError, AssertionError, KeyError, TypeError) as exc:
        if "momentum" in str(exc).lower():  # a known optimizer that rejects this momentum (Nesterov needs > 0)
            raise UserError(f"--momentum {momentum}: --opt {opt!r} rejects it ({exc}); give a --momentum in (0, 1), "
                            f"or --opt momentum for SGD without Nesterov") from None
        raise UserError(f"--opt {opt!r}: not a timm optimizer ({exc}); see timm.optim.list_optimizers()") from None
    if sched != "none":
        try:
            timm.scheduler.create_scheduler_v2(optimizer, sched=sched, num_epochs=epochs, warmup_epochs=warmup_epochs,
                                               step_on_epochs=False, updates_per_epoch=1)
        except (ValueError, AssertionError, KeyError, TypeError) as exc:
            raise UserError(f"--sched {sched!r}: not a timm scheduler ({exc}); e.g. cosine, step, multistep, "
                            f"plateau, poly, tanh, or 'none'") from None


def check_config(cfg: TrainConfig, world: int) -> None:
    """Everything checkable without building anything (UserError naming the flag or file)."""
    if cfg.method not in METHODS:
        raise UserError(f"--method: expected one of {METHODS}, got {cfg.method!r}")
    cfg.check()
    check_model_name("--student", cfg.student)
    if get_method(cfg.method).needs_teacher:
        check_model_name("--teacher", cfg.teacher)
        if cfg.teacher_checkpoint is None and cfg.teacher_pretrained is None and not cfg.allow_random_teacher:
            raise UserError(f"--method {cfg.method} needs a trained teacher: give --teacher-checkpoint PATH or "
                            f"--teacher-pretrained (or --allow-random-teacher for a smoke test)")
    for flag, path in (("--teacher-checkpoint", cfg.teacher_checkpoint),
                       ("--teacher-pretrained", cfg.teacher_pretrained),
                       ("--student-pretrained", cfg.student_pretrained)):
        if path is not None and path != "hub" and not os.path.isfile(path):
            raise UserError(f"{flag} {path!r}: no such file")
    if cfg.resume not in ("auto", "none") and not os.path.isfile(cfg.resume):
        raise UserError(f"--resume {cfg.resume!r}: no such file (use 'auto' to continue OUTPUT/last.pt when it "
                        f"exists)")
    if cfg.overwrite and cfg.resume != "none":
        raise UserError("--overwrite starts afresh and --resume continues a run: give one of them")
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size}: the global batch must be a positive multiple of the "
                        f"number of processes ({world})")
    check_optim(cfg.opt, cfg.sched, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs)
    if cfg.loader not in LOADERS:
        raise UserError(f"--loader: expected one of {tuple(LOADERS)}, got {cfg.loader!r}")
    LOADERS[cfg.loader].check_available()  # the data checks follow once the data are built


def check_device_options(cfg: TrainConfig, device: torch.device) -> None:
    """The flags that depend on the device: --sync-bn and --backend."""
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn: SyncBatchNorm runs on CUDA only (use --freeze-bn on CPU)")
    from hcd_fast.ops.dispatch import resolve
    try:
        resolve(cfg.backend, device)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"--backend {cfg.backend!r}: {exc}") from None


def result_args(cfg: TrainConfig) -> dict:
    """The flags that define what a run computes (everything but OPERATIONAL_ARGS)."""
    return {k: v for k, v in sorted(cfg.flat().items()) if k not in OPERATIONAL_ARGS}


def default_output(cfg: TrainConfig) -> str:
    """runs/<dataset>_<teacher>_to_<student>_<method>_s<seed>_<hash of every result-defining flag>."""
    teacher = cfg.teacher if get_method(cfg.method).needs_teacher else "none"
    digest = hashlib.sha1(json.dumps(result_args(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return os.path.join("runs", f"{cfg.dataset}_{teacher}_to_{cfg.student}_{cfg.method}_s{cfg.seed}_{digest}")


def check_resume(ckpt: dict, cfg: TrainConfig, path: str) -> None:
    """The checkpoint must be hcd-distill's, of the same models and method; other changed result-defining
    flags are refused (or, with --allow-changed-args, listed in a warning)."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"--resume {path!r}: not an hcd-distill checkpoint (no format {CKPT_FORMAT!r})")
    old = ckpt.get("args") or {}
    if not isinstance(old, dict):  # an argparse.Namespace (older checkpoints)
        old = vars(old)
    for key in IDENTITY_ARGS:
        if old.get(key) != getattr(cfg, key):
            raise UserError(f"--resume {path!r}: the checkpoint is a --{key} {old.get(key)!r} run, this command "
                            f"asks for --{key} {getattr(cfg, key)!r}; use another --output (or --overwrite)")
    changed = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {v!r}" for k, v in result_args(cfg).items()
               if k in old and old[k] != v]
    if changed and not cfg.allow_changed_args:
        raise UserError(f"--resume {path!r}: changed since the checkpoint: {'; '.join(changed)}. Resume with the "
                        f"original values, start afresh (--overwrite or another --output), or pass "
                        f"--allow-changed-args (optimizer and scheduler settings still continue from the checkpoint)")
    if changed:
        warn(f"resuming with changed flags: {'; '.join(changed)} (optimizer and scheduler settings continue "
             f"from the checkpoint)")


def load_checkpoint(path: str, cfg: TrainConfig, folder: Optional[RunFolder] = None) -> dict:
    try:
        ckpt = safe_load(path, "--resume")
    except UserError as exc:  # a damaged last.pt: point to a checkpoint that can continue, never in a loop
        raise UserError(f"{exc}{_resume_advice(path, folder)}") from None
    check_resume(ckpt, cfg, path)
    return ckpt


def _resume_advice(path: str, folder: Optional[RunFolder]) -> str:
    best = os.path.join(folder.path, "best.pt") if folder is not None else None
    if best and folder.holds(path) and os.path.basename(path) == "last.pt" and os.path.isfile(best):
        return f". Continue from the best epoch with --resume {best}, or start afresh with --overwrite"
    return ". Start afresh with --overwrite (or another --output)"
