"""The hcd-distill training loop: one device or many (torchrun / DDP), resumable, no per-step host sync.

``run(args)`` takes the namespace of ``hcd_fast.distill.cli.parse_args`` and returns a summary dict.

What is checked before the first step (``UserError``, exit code 2, the flag or file named): every flag's
value, model names, the teacher/student pair at the input size (one dry run each), class counts,
checkpoint files (read with ``weights_only=True``, see ``checkpoint.safe_load``), the data (each split
exists, every class folder has images, the first image of each split reads), the output folder (writable,
not holding another run's results unless resumed or ``--overwrite``, not used by a live run: lock file),
and, on resume, that the checkpoint is an hcd-distill one of the same models and hyper-parameters.

During training: an image file that cannot be read is skipped with a warning naming it and counted in the
summary; a non-finite loss stops the run (``TrainingError``, exit code 1) with the step and loss parts
named, ``last.pt`` keeping the last finite state (``--skip-nonfinite N`` skips up to N such steps instead,
at one host sync per step). Non-finite losses are detected on the device and read at the log interval, so
the hot path has no host sync.

State: ``OUTPUT/last.pt`` (every ``--ckpt-minutes`` of wall time, every ``--ckpt-interval`` steps, and at
each epoch end) holds everything needed to continue bit-for-bit (``TrainState``, student + heads,
optimizer, scheduler, grad scaler, the RNG states of every rank). The data order is a function of (seed,
epoch), each image's augmentation a function of (seed, epoch, index) whatever ``--workers``, and the
sampler skips what was already seen. Files are written to a temporary name and moved with os.replace.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hcd_fast.distill import onednn_amx
from hcd_fast.distill.baselines import METHODS
from hcd_fast.distill.checkpoint import (CKPT_FORMAT, RunFolder, atomic_copy, atomic_save, atomic_write_bytes,
                                         atomic_write_text, classifier_classes, load_weights, safe_load)
from hcd_fast.distill.data import (DataConfig, ResumableDistributedSampler, ShardSampler, build_data,
                                   collate_skip_bad)
from hcd_fast.distill.distiller import Distiller, DistillTask, LossOptions, build_criterion, unwrap
from hcd_fast.distill.errors import TrainingError, UserError
from hcd_fast.distill.taps import StudentTap, TeacherTap, probe_student, probe_teacher
from hcd_fast.modules import ConvProjector
from hcd_fast.reference import PART_NAMES

# Flags that do not change what a run computes: they may differ on resume and do not name the run folder.
OPERATIONAL_ARGS = frozenset({
    "output", "resume", "overwrite", "allow_changed_args", "workers", "threads", "device", "channels_last",
    "compile", "backend", "log_interval", "ckpt_interval", "ckpt_minutes", "stop_after_steps", "no_progress",
    "no_plots", "find_unused_parameters", "skip_nonfinite", "preset"})
IDENTITY_ARGS = ("method", "teacher", "student")  # a resume with other values is always refused


# ----------------------------------------------------------------------------------------- distributed
class DistContext:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process when absent."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.owns_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(t, dist.ReduceOp.MAX) if self.enabled else t

    def gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def raise_any(self, error: Optional[UserError]) -> None:
        """Raise on every rank when any rank met ``error`` (no rank is left waiting in a collective)."""
        errors = [e for e in self.gather_object(None if error is None else str(error)) if e]
        if errors:
            raise UserError(errors[0])

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BN running statistics) to every rank, so evaluation agrees everywhere."""
        if self.enabled:
            for buf in module.buffers():
                dist.broadcast(buf, 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def warn(text: str) -> None:
    print(f"hcd-distill: warning: {text}", file=sys.stderr, flush=True)


def info(ctx: DistContext, text: str) -> None:
    if ctx.is_main:
        print(f"hcd-distill: {text}", flush=True)


# ------------------------------------------------------------------------------------------- checks
def _check_model_name(flag: str, name: Optional[str]) -> None:
    import timm
    if not name:
        raise UserError(f"{flag}: a timm model name is required")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"{flag} {name!r}: not a timm model (see timm.list_models()){hint}")


def _check_numbers(args: argparse.Namespace) -> None:
    for key, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{key.replace('_', '-')} {value}: expected a finite number")
    for flag, v in (("--epochs", args.epochs), ("--log-interval", args.log_interval), ("--img-size", args.img_size)):
        if v < 1:
            raise UserError(f"{flag}: expected an int >= 1, got {v}")
    for flag, v in (("--lr", args.lr), ("--ckpt-minutes", args.ckpt_minutes), ("--ckpt-interval", args.ckpt_interval),
                    ("--skip-nonfinite", args.skip_nonfinite), ("--workers", args.workers),
                    ("--weight-decay", args.weight_decay), ("--min-lr", args.min_lr)):
        if v < 0:
            raise UserError(f"{flag}: expected a value >= 0, got {v}")
    if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
        raise UserError(f"--crop-pct {args.crop_pct}: expected a fraction in (0, 1]")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction {args.val_fraction}: expected a fraction in [0, 1) (0: no validation)")


def _check_optim(args: argparse.Namespace) -> None:
    """--opt and --sched against timm's factories, on a dummy parameter."""
    import timm.optim
    import timm.scheduler
    try:
        opt = timm.optim.create_optimizer_v2(nn.Linear(1, 1), opt=args.opt, lr=args.lr,
                                             weight_decay=args.weight_decay, momentum=args.momentum)
    except (ValueError, AssertionError, KeyError, TypeError) as exc:
        raise UserError(f"--opt {args.opt!r}: not a timm optimizer ({exc}); see timm.optim.list_optimizers()") from None
    if args.sched != "none":
        try:
            timm.scheduler.create_scheduler_v2(opt, sched=args.sched, num_epochs=args.epochs,
                                               warmup_epochs=args.warmup_epochs, step_on_epochs=False,
                                               updates_per_epoch=1)
        except (ValueError, AssertionError, KeyError, TypeError) as exc:
            raise UserError(f"--sched {args.sched!r}: not a timm scheduler ({exc}); e.g. cosine, step, "
                            f"multistep, plateau, poly, tanh, or 'none'") from None


def check_args(args: argparse.Namespace, world: int) -> None:
    """Everything checkable without building anything."""
    if args.method not in METHODS:
        raise UserError(f"--method: expected one of {METHODS}, got {args.method!r}")
    _check_model_name("--student", args.student)
    if args.method != "ce":
        _check_model_name("--teacher", args.teacher)
        if args.teacher_checkpoint is None and args.teacher_pretrained is None and not args.allow_random_teacher:
            raise UserError(f"--method {args.method} needs a trained teacher: give --teacher-checkpoint PATH or "
                            f"--teacher-pretrained (or --allow-random-teacher for a smoke test)")
    for flag, path in (("--teacher-checkpoint", args.teacher_checkpoint),
                       ("--teacher-pretrained", args.teacher_pretrained),
                       ("--student-pretrained", args.student_pretrained)):
        if path is not None and path != "hub" and not os.path.isfile(path):
            raise UserError(f"{flag} {path!r}: no such file")
    if args.resume not in ("auto", "none") and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume!r}: no such file (use 'auto' to continue OUTPUT/last.pt "
                        f"when it exists)")
    if args.overwrite and args.resume != "none":
        raise UserError("--overwrite starts afresh and --resume continues a run: give one of them")
    if args.batch_size < 1 or args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size}: the global batch must be a positive multiple of "
                        f"the number of processes ({world})")
    _check_numbers(args)
    _check_optim(args)
    if getattr(args, "loader", "timm") == "dali":  # the data checks follow in Trainer (check_dali_run)
        from hcd_fast.distill.dali_loader import INSTALL_HINT, dali_status
        ok, why = dali_status()
        if not ok:
            raise UserError(f"--loader dali: {why}; install it with {INSTALL_HINT}, or use --loader timm")


def resolve_device(args: argparse.Namespace, ctx: DistContext) -> torch.device:
    text = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device {text!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {text!r}: hcd-distill runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {text}: no CUDA device is available")
        index = ctx.local_rank if ctx.enabled else (device.index or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if args.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn: SyncBatchNorm runs on CUDA only (use --freeze-bn on CPU)")
    from hcd_fast.ops.dispatch import resolve
    try:
        resolve(args.backend, device)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"--backend {args.backend!r}: {exc}") from None
    return device


def result_args(args: argparse.Namespace) -> dict:
    """The flags that define what a run computes (everything but OPERATIONAL_ARGS)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in OPERATIONAL_ARGS}


def default_output(args: argparse.Namespace) -> str:
    """runs/<dataset>_<teacher>_to_<student>_<method>_s<seed>_<hash of every result-defining flag>."""
    teacher = args.teacher if args.method != "ce" else "none"
    digest = hashlib.sha1(json.dumps(result_args(args), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return os.path.join("runs", f"{args.dataset}_{teacher}_to_{args.student}_{args.method}_s{args.seed}_{digest}")


def check_resume(ckpt: dict, args: argparse.Namespace, path: str) -> None:
    """The checkpoint must be hcd-distill's, of the same models and method; other changed result-defining
    flags are refused (or, with --allow-changed-args, listed in a warning)."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"--resume {path!r}: not an hcd-distill checkpoint (no format {CKPT_FORMAT!r})")
    old = ckpt.get("args") or {}
    if isinstance(old, argparse.Namespace):
        old = vars(old)
    for key in IDENTITY_ARGS:
        if old.get(key) != getattr(args, key):
            raise UserError(f"--resume {path!r}: the checkpoint is a --{key} {old.get(key)!r} run, this command "
                            f"asks for --{key} {getattr(args, key)!r}; use another --output (or --overwrite)")
    new = result_args(args)
    changed = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {v!r}" for k, v in new.items()
               if k in old and old[k] != v]
    if changed and not args.allow_changed_args:
        raise UserError(f"--resume {path!r}: changed since the checkpoint: {'; '.join(changed)}. Resume with the "
                        f"original values, start afresh (--overwrite or another --output), or pass "
                        f"--allow-changed-args (optimizer and scheduler settings still continue from the checkpoint)")
    if changed:
        warn(f"resuming with changed flags: {'; '.join(changed)} (optimizer and scheduler settings continue "
             f"from the checkpoint)")


# ------------------------------------------------------------------------------------------- models
def _pretrained_kwargs(flag: str, name: str, source: Optional[str]) -> Tuple[dict, Optional[int]]:
    """timm.create_model kwargs for timm's pretrained weights (the hub, or a local file through
    pretrained_cfg_overlay) and the class count of those weights."""
    if source is None:
        return {"pretrained": False}, None
    from timm.models import get_pretrained_cfg
    pcfg = get_pretrained_cfg(name)
    if pcfg is None:
        raise UserError(f"{flag}: timm has no pretrained weights for {name!r}")
    if source == "hub":
        return {"pretrained": True}, pcfg.num_classes
    n = classifier_classes(source, pcfg.classifier if isinstance(pcfg.classifier, str) else "", flag)
    overlay = {"file": source, "num_classes": n if n is not None else pcfg.num_classes}
    return {"pretrained": True, "pretrained_cfg_overlay": overlay}, overlay["num_classes"]


def create_model(flag: str, name: str, num_classes: int, kwargs: dict, img_size: int,
                 pretrained: Optional[str] = None) -> nn.Module:
    """timm.create_model, given ``img_size`` when the model takes one (ViTs, Swins, ...) and the user did not
    set it in the kwargs; pretrained weights from the hub or a local file when asked."""
    import timm
    kw, _ = _pretrained_kwargs(flag + "-pretrained", name, pretrained)
    kw.update(kwargs)
    sized = "img_size" not in kwargs
    try:
        try:
            return timm.create_model(name, num_classes=num_classes, **kw, **({"img_size": img_size} if sized else {}))
        except TypeError as exc:
            if not (sized and "img_size" in str(exc)):
                raise
            return timm.create_model(name, num_classes=num_classes, **kw)
    except TypeError as exc:
        raise UserError(f"{flag} {name!r}: timm.create_model rejected the kwargs {kwargs}: {exc}") from None
    except UserError:
        raise
    except Exception as exc:
        if pretrained is None:
            raise
        raise UserError(f"{flag}-pretrained {pretrained}: cannot load timm's pretrained weights of {name!r} "
                        f"({type(exc).__name__}: {str(exc)[:300]})") from None


def _dry_run(flag: str, name: str, model: nn.Module, input_size) -> None:
    """One eval forward at the training input size: a model that cannot take it fails here."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters(), None)
            model(torch.zeros(1, *input_size, device=p.device if p is not None else "cpu"))
    except Exception as exc:
        raise UserError(f"{flag} {name!r} does not run at --img-size {input_size[-1]} "
                        f"({type(exc).__name__}: {str(exc)[:200]}); set --img-size to a size it takes, or the "
                        f"model's input size through {flag}-kwargs (e.g. '{{\"img_size\": {input_size[-1]}}}')") from None
    finally:
        model.train(was_training)


@dataclass
class Models:
    teacher: Optional[TeacherTap]
    distiller: Distiller
    channels: Tuple[int, ...]
    part_names: Tuple[str, ...]
    teacher_dim: int = 1  # D_t (1, unused, for ce)


def build_teacher(args, K: int, device, data_cfg: DataConfig, input_size) -> Tuple[Optional[TeacherTap], int]:
    """The frozen teacher tap (None for ce) and its feature width D_t."""
    if args.method == "ce":
        return None, 1  # D_t unused: the ce criterion has no parameters
    if args.teacher_pretrained is not None and args.teacher_checkpoint is None:
        _, n = _pretrained_kwargs("--teacher-pretrained", args.teacher, args.teacher_pretrained)
        if n != K:
            raise UserError(f"--teacher-pretrained: timm's {args.teacher!r} weights classify {n} classes, the "
                            f"dataset has {K}, so the teacher's head would be random; give a --teacher-checkpoint "
                            f"trained on this dataset")
    model = create_model("--teacher", args.teacher, K, args.teacher_kwargs, args.img_size, args.teacher_pretrained)
    teacher_cfg = DataConfig.of_model(args.teacher)
    if args.teacher_checkpoint:
        meta = load_weights(model, args.teacher_checkpoint, K, "--teacher-checkpoint")
        if "data_config" in meta:  # an hcd-distill checkpoint knows what its model was trained on
            teacher_cfg = DataConfig(tuple(meta["data_config"]["mean"]), tuple(meta["data_config"]["std"]))
    model = model.to(device)
    _dry_run("--teacher", args.teacher, model, input_size)
    teacher = TeacherTap(model, data_cfg.stats(), teacher_cfg.stats())
    teacher_dim, teacher_k = probe_teacher(teacher, input_size)
    if teacher_k != K:
        raise UserError(f"--teacher {args.teacher!r} outputs {teacher_k} classes, the dataset has {K}")
    return teacher, teacher_dim


def build_student(args, K: int, device, input_size) -> Tuple[nn.Module, Tuple[int, ...]]:
    kwargs = dict(args.student_kwargs)
    if args.drop_path:
        kwargs["drop_path_rate"] = args.drop_path
    student = create_model("--student", args.student, K, kwargs, args.img_size, args.student_pretrained).to(device)
    if not hasattr(student, "forward_intermediates"):
        raise UserError(f"--student {args.student!r}: this timm model has no forward_intermediates, so its "
                        f"stages cannot be tapped; pick another student")
    _dry_run("--student", args.student, student, input_size)
    try:
        channels, student_k = probe_student(student, args.indices, input_size)
    except (IndexError, AssertionError, ValueError, RuntimeError) as exc:
        raise UserError(f"--indices {args.indices!r} for --student {args.student!r}: {exc}") from None
    if student_k != K:
        raise UserError(f"--student {args.student!r} outputs {student_k} classes, the dataset has {K}")
    return student, channels


def loss_options(args) -> LossOptions:
    # Every loss option is a flag of the same name (the HCDConfig ones generated from HCDConfig, cli.py).
    return LossOptions(**{f.name: getattr(args, f.name) for f in fields(LossOptions)})


def build_models(args, K: int, device, data_cfg: DataConfig, input_size) -> Models:
    teacher, teacher_dim = build_teacher(args, K, device, data_cfg, input_size)
    student, channels = build_student(args, K, device, input_size)
    try:
        criterion = build_criterion(args.method, channels, teacher_dim, K, loss_options(args))
    except (ValueError, TypeError) as exc:
        raise UserError(f"loss options: {exc}") from None
    part_names = tuple(getattr(criterion, "part_names", PART_NAMES))
    return Models(teacher, Distiller(StudentTap(student, args.indices), criterion).to(device), channels, part_names,
                  teacher_dim)


# ------------------------------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG state as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_bn_frozen(module: nn.Module) -> None:
    """BatchNorm layers and HCD/OFA conv projectors (whose fused BN tail follows the projector's own
    training flag) to eval mode: running statistics instead of batch statistics."""
    for m in module.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, ConvProjector)):
            m.eval()


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, ConvProjector)) for m in module.modules())


def write_metrics(history: List[dict], out: str) -> None:
    import csv
    import io
    if not history:
        return
    keys = list(history[0].keys())
    for row in history[1:]:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(buf.getvalue(), os.path.join(out, "metrics.csv"))
    atomic_write_text("".join(json.dumps(r) + "\n" for r in history), os.path.join(out, "metrics.jsonl"))


def _save_fig(fig, path: str) -> None:
    import io
    buf = io.BytesIO()
    fig.tight_layout(), fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(buf.getvalue(), path)


def write_plots(history: List[dict], part_names, out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    epochs = [r["epoch"] for r in history]
    has_val = all(r.get("val_top1") is not None for r in history)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in history], label="total", linewidth=2)
    for name in part_names:
        ax.plot(epochs, [r[f"train_{name}"] for r in history], label=name)
    if has_val:
        ax.plot(epochs, [r["val_loss"] for r in history], "--", label="val CE")
    ax.set_xlabel("epoch"), ax.set_ylabel("loss (epoch mean)"), ax.set_yscale("log"), ax.legend()
    ax.set_title("loss parts (unweighted)")
    _save_fig(fig, os.path.join(out, "loss.png")), plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_top1"] for r in history], label="train top-1")
    if has_val:
        ax.plot(epochs, [r["val_top1"] for r in history], label="val top-1", linewidth=2)
    ax.set_xlabel("epoch"), ax.set_ylabel("accuracy (%)"), ax.legend(), ax.set_title("accuracy")
    _save_fig(fig, os.path.join(out, "accuracy.png")), plt.close(fig)


def _pct(v: Optional[float]) -> str:
    return "n/a (no validation data)" if v is None else f"{v:.2f}"


def format_summary(summary: dict) -> str:
    best = _pct(summary["best_top1"]) + (f" (epoch {summary['best_epoch']})" if summary["best_top1"] is not None else "")
    rows = [("method", summary["method"]), ("teacher", summary["teacher"]), ("student", summary["student"]),
            ("dataset", summary["dataset"]), ("epochs", summary["epochs"]),
            ("best val top-1 (%)", best), ("final val top-1 (%)", _pct(summary["final_top1"])),
            ("train wall time (s)", f"{summary['train_seconds']:.1f}"),
            ("train images/s", f"{summary['images_per_s']:.0f}"),
            ("skipped images", f"{summary['skipped_images']} files, {summary['skipped_samples']} samples"),
            ("skipped steps", summary["skipped_steps"]), ("output", summary["output"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model: nn.Module, loader, device, autocast, channels_last: bool, ctx: DistContext,
             on_bad=None) -> Dict[str, Optional[float]]:
    """Top-1/top-5 and CE of the bare student over the whole validation set (summed over ranks); None
    values when there is no validation data."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # ce sum, top-1, top-5 correct, count
    for x, y, bad in loader:
        if bad and on_bad is not None:
            on_bad(bad)
        if x is None:
            continue
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        logits = logits.float()
        hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), hit[:, 0].sum(), hit.any(-1).sum(),
                             torch.tensor(y.shape[0], device=device)]).double()
    model.train(was_training)
    vals = ctx.all_reduce(sums).tolist()
    if vals[3] == 0:
        return {"val_loss": None, "val_top1": None, "val_top5": None}
    n = vals[3]
    return {"val_loss": vals[0] / n, "val_top1": 100.0 * vals[1] / n, "val_top5": 100.0 * vals[2] / n}


# -------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Where a run is: saved in last.pt with the model, optimizer, scheduler and RNG states."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps done in the current epoch
    global_step: int = 0
    history: List[dict] = field(default_factory=list)
    best_top1: Optional[float] = None
    best_epoch: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0
    accum: Optional[dict] = None  # mid-epoch running sums {"sums": (2 + P,) float64, "count": int}
    bad_files: Dict[str, str] = field(default_factory=dict)  # unreadable image path -> reason
    skipped_samples: int = 0
    skipped_steps: int = 0  # batches left with < 2 readable images, and --skip-nonfinite steps
    skipped_nonfinite: int = 0  # of which non-finite (at most --skip-nonfinite)
    saved_step: Optional[int] = None  # global step of the last checkpoint (not stored)

    FIELDS = ("epoch", "step_in_epoch", "global_step", "history", "best_top1", "best_epoch", "train_seconds",
              "images_seen", "accum", "bad_files", "skipped_samples", "skipped_steps", "skipped_nonfinite")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        missing = [k for k in cls.FIELDS if k not in d]
        if missing:
            raise UserError(f"--resume: the checkpoint lacks {', '.join(missing)} (written by another version)")
        return cls(**{k: d[k] for k in cls.FIELDS}, saved_step=d["global_step"])


def load_checkpoint(path: str, args) -> dict:
    ckpt = safe_load(path, "--resume")
    check_resume(ckpt, args, path)
    return ckpt


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Everything a run builds (data, models, loaders, optimiser) and the epoch loop over a TrainState."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext, device: torch.device, out: str):
        self.args, self.ctx, self.device, self.out = args, ctx, device, out
        self.data_cfg = DataConfig.of_model(args.student, args.interpolation,
                                            args.crop_pct if args.crop_pct is not None
                                            else (1.0 if args.dataset == "cifar100" else None))
        self.data = build_data(args.dataset, args.data_dir, args.img_size, val_fraction=args.val_fraction,
                               aa=args.aa, reprob=args.reprob, no_aug=args.no_aug, cfg=self.data_cfg,
                               train_split=args.train_split, val_split=args.val_split, seed=args.seed)
        self.K = K = self.data.num_classes
        self.dali = getattr(args, "loader", "timm") == "dali"
        if self.dali:  # an ImageFolder of JPEGs, no option DALI cannot apply: checked before the models
            from hcd_fast.distill.dali_loader import check_dali_run
            check_dali_run(args, (self.data.train, self.data.val))
        if args.num_classes is not None and args.num_classes != K:
            raise UserError(f"--num-classes {args.num_classes}: the {args.dataset} dataset has {K} classes")
        seed_everything(args.seed)
        m = build_models(args, K, device, self.data_cfg, self.data.input_size)
        self.distiller, self.part_names, self.channels = m.distiller, m.part_names, m.channels
        if getattr(args, "teacher_cache", None):  # replay stored views and f_t (hcd_fast.distill.teacher_cache)
            from hcd_fast.distill.teacher_cache import open_for_training
            self.data.train = open_for_training(args, self.data.train, m.teacher, m.teacher_dim, self.data_cfg)
        elif getattr(args, "digits_aug", False):  # digits through fresh crop + flip views (the cache's online twin)
            from hcd_fast.distill.teacher_cache import online_views
            self.data.train = online_views(args, self.data.train, self.data_cfg)
        self.channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
        if self.channels_last:  # the teacher's memory format is --teacher-channels-last's (teacher_speed)
            self.distiller.to(memory_format=torch.channels_last)
        if args.sync_bn:
            self.distiller = nn.SyncBatchNorm.convert_sync_batchnorm(self.distiller)
        self.task = DistillTask(self.distiller, m.teacher, device=device)
        amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        # PyTorch's oneDNN bf16 path on AMX CPUs can give NaN gradients: say so once, and in a non-finite error.
        self.amx_note = onednn_amx.NOTE if onednn_amx.amx_bf16_risk(device, amp_dtype) else None
        if self.amx_note:
            onednn_amx.warn_amx_bf16_once()
        if m.teacher is not None:  # bf16 weights / channels_last / compiled forward (hcd_fast.distill.teacher_speed)
            from hcd_fast.distill.teacher_speed import apply_teacher_speed, resolve_teacher_speed
            apply_teacher_speed(m.teacher, resolve_teacher_speed(
                m.teacher.model, device, amp, getattr(args, "teacher_bf16", "auto"),
                getattr(args, "teacher_channels_last", "auto"), getattr(args, "teacher_compile", "auto"),
                args.compile))
        self._build_loaders()
        self._build_optim()

    def _build_loaders(self) -> None:
        """Deterministic order from (seed, epoch); the global batch is split over ranks."""
        args, ctx, data = self.args, self.ctx, self.data
        self.local_bs = args.batch_size // ctx.world
        if self.local_bs < 2 and not args.freeze_bn and has_batch_norm(self.distiller):
            raise UserError(f"--batch-size {args.batch_size}: {self.local_bs} image per process, but BatchNorm "
                            f"(student or projectors) needs at least 2 in training mode; use a larger "
                            f"--batch-size or --freeze-bn")
        self.sampler = ResumableDistributedSampler(data.train, ctx.world, ctx.rank, seed=args.seed, drop_last=True)
        self.steps_per_epoch = self.sampler.num_samples // self.local_bs
        if args.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, args.max_steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise UserError(f"--batch-size {args.batch_size} is larger than the training set "
                            f"({len(data.train)} images)")
        workers = 0 if data.in_memory else args.workers
        pin = self.device.type == "cuda"
        self.loader_gen = torch.Generator()
        if self.dali:  # the same samplers: order, sharding and resume as below (hcd_fast.distill.dali_loader)
            from hcd_fast.distill.dali_loader import DaliLoader
            self.train_loader = DaliLoader(data.train, self.sampler, self.local_bs, self.device, max(workers, 1),
                                           drop_last=True)
            self.val_loader = DaliLoader(data.val, ShardSampler(data.val, ctx.world, ctx.rank), max(self.local_bs, 64),
                                         self.device, max(workers, 1))
            return
        self.train_loader = DataLoader(data.train, batch_size=self.local_bs, sampler=self.sampler,
                                       num_workers=workers, pin_memory=pin, drop_last=True,
                                       generator=self.loader_gen, collate_fn=collate_skip_bad)
        self.val_loader = DataLoader(data.val, batch_size=max(self.local_bs, 64), num_workers=workers,
                                     sampler=ShardSampler(data.val, ctx.world, ctx.rank), pin_memory=pin,
                                     collate_fn=collate_skip_bad)

    def _build_optim(self) -> None:
        import timm.optim
        import timm.scheduler
        args = self.args
        self.optimizer = timm.optim.create_optimizer_v2(self.distiller, opt=args.opt, lr=args.lr,
                                                        weight_decay=args.weight_decay, momentum=args.momentum)
        self.scheduler = None
        if args.sched != "none":
            self.scheduler, _ = timm.scheduler.create_scheduler_v2(
                self.optimizer, sched=args.sched, num_epochs=args.epochs, min_lr=args.min_lr,
                warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, step_on_epochs=False,
                updates_per_epoch=self.steps_per_epoch)

    # ---------------------------------------------------------------------------------- checkpoints
    def load(self, ckpt: dict) -> TrainState:
        try:
            self.distiller.load_state_dict(ckpt["distiller"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt.get("scheduler") is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler") is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
            state = TrainState.from_dict(ckpt)
            rngs = ckpt["rng"]
            set_rng_state(rngs[self.ctx.rank] if len(rngs) == self.ctx.world else rngs[0])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise UserError(f"--resume: the checkpoint does not fit this run ({type(exc).__name__}: "
                            f"{str(exc)[:300]})") from None
        return state

    def save(self, state: TrainState, path: str) -> None:
        """Every rank's RNG state and unreadable files gathered; rank 0 writes ``path`` atomically."""
        rngs = self.ctx.gather_object(rng_state())
        for files in self.ctx.gather_object(state.bad_files):
            state.bad_files.update(files)
        if self.ctx.is_main:
            atomic_save({"format": CKPT_FORMAT, "args": vars(self.args), "data_config": self.data_cfg.to_dict(),
                         **state.to_dict(), "distiller": unwrap(self.task.trainable_module).state_dict(),
                         "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                         "scaler": self.scaler.state_dict() if self.scaler is not None else None, "rng": rngs,
                         "part_names": list(self.part_names), "num_classes": self.K,
                         "student_channels": list(self.channels)}, path)
        state.saved_step = state.global_step
        self.last_save_time = time.monotonic()
        self.ctx.barrier()

    def save_mid_epoch(self, state: TrainState, sums: torch.Tensor, count: int, t_epoch: float) -> float:
        self.raise_if_nonfinite(state)
        state.train_seconds += time.perf_counter() - t_epoch
        state.accum = {"sums": sums.cpu(), "count": count}
        self.save(state, os.path.join(self.out, "last.pt"))
        state.accum = None
        return time.perf_counter()

    # ----------------------------------------------------------------------------- non-finite guard
    def raise_if_nonfinite(self, state: TrainState, bad_step: Optional[int] = None) -> None:
        """Stop the run if any rank met a non-finite loss (one small sync; all ranks agree)."""
        if bad_step is None:
            bad_step = int(self.ctx.all_max(self.bad_step.clone()).item())
        if bad_step < 0:
            return
        vals = self.bad_vals.tolist()
        parts = ", ".join(f"{k}={v:.4g}" for k, v in zip(("loss",) + self.part_names, vals))
        kept = (f"{os.path.join(self.out, 'last.pt')} holds the last finite state (step {state.saved_step})"
                if state.saved_step else "no checkpoint had been written yet")
        raise TrainingError(f"non-finite loss at step {bad_step} (epoch {state.epoch + 1}): {parts}; training "
                            f"stopped, {kept}. Lower --lr, set --clip-grad, or use --skip-nonfinite N"
                            + (f". Possible cause: {self.amx_note}" if self.amx_note else ""))

    def _record_bad(self, state: TrainState, bad: list) -> None:
        for b in bad:
            if b.path not in state.bad_files:
                warn(f"skipped the unreadable image {b.path!r} ({b.reason})")
            state.bad_files[b.path] = b.reason
        state.skipped_samples += len(bad)

    # ------------------------------------------------------------------------------------- the loop
    def fit(self, state: TrainState) -> dict:
        args, ctx, device = self.args, self.ctx, self.device
        if args.compile:
            self.task.compile(teacher=False)  # the teacher's compile is --teacher-compile's (teacher_speed)
        if ctx.enabled:
            self.task.prepare_distributed(device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=args.find_unused_parameters)
        # The first non-finite loss: its global step (-1: none yet) and (loss, parts), kept on the device.
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_vals = torch.zeros(1 + len(self.part_names), dtype=torch.float64, device=device)
        self.last_save_time = time.monotonic()
        stopped = False
        while state.epoch < args.epochs:
            result = self.train_one_epoch(state)
            if result is None:
                stopped = True
                break
            self.end_epoch(state, *result)
        return self.finish(state, stopped)

    def _step(self, state: TrainState, x: torch.Tensor, y: torch.Tensor, cached_feat: Optional[torch.Tensor] = None):
        """One update; returns (loss and parts (1 + P,) float64, correct count) or None when skipped.
        ``cached_feat``: the teacher cache's f_t (B, D_t) of these views (no teacher forward), or None."""
        args = self.args
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if cached_feat is not None:
            cached_feat = cached_feat.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            result = self.task(x, y, cached_feat)
        loss = result["loss"]
        vals = torch.stack([loss.detach().double()] + [result[k].detach().double() for k in self.part_names])
        nonfinite = ~torch.isfinite(vals[0])
        self.optimizer.zero_grad(set_to_none=True)
        if args.skip_nonfinite and self.ctx.all_max(nonfinite.to(torch.int32)).item():  # a sync, by request
            state.skipped_nonfinite += 1
            state.skipped_steps += 1
            if state.skipped_nonfinite > args.skip_nonfinite:
                self.bad_vals = vals
                self.raise_if_nonfinite(state, bad_step=state.global_step)
            warn(f"skipped step {state.global_step}: non-finite loss ({state.skipped_nonfinite} of at most "
                 f"{args.skip_nonfinite})")
            return None
        first = nonfinite & (self.bad_step < 0)
        self.bad_step = torch.where(first, state.global_step, self.bad_step)
        self.bad_vals = torch.where(first, vals, self.bad_vals)
        params = self.distiller.parameters
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(params(), args.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if args.clip_grad:
                nn.utils.clip_grad_norm_(params(), args.clip_grad)
            self.optimizer.step()
        return vals, (result["output"].detach().argmax(-1) == y).sum()

    def _start_epoch(self, state: TrainState) -> Tuple[torch.Tensor, int]:
        args = self.args
        self.task.train()
        if args.freeze_bn:
            set_bn_frozen(self.task)
        crit = unwrap(self.task.trainable_module).criterion
        if hasattr(crit, "set_epoch"):
            crit.set_epoch(state.epoch + 1)
        self.sampler.set_epoch(state.epoch)
        self.sampler.set_start(state.step_in_epoch * self.local_bs)
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(state.epoch)
        self.loader_gen.manual_seed(args.seed * 100003 + state.epoch)
        sums = torch.zeros(2 + len(self.part_names), dtype=torch.float64, device=self.device)
        count = 0
        if state.accum is not None and state.step_in_epoch > 0:
            sums.copy_(state.accum["sums"].to(self.device))
            count = state.accum["count"]
        state.accum = None
        return sums, count

    def train_one_epoch(self, state: TrainState):
        """The rest of the current epoch; returns (sums, count, seconds), or None when --stop-after-steps hit."""
        from tqdm import tqdm
        args = self.args
        sums, count = self._start_epoch(state)
        bar = tqdm(total=self.steps_per_epoch, initial=state.step_in_epoch, dynamic_ncols=True, leave=False,
                   disable=not self.ctx.is_main or args.no_progress,
                   desc=f"{args.method} epoch {state.epoch + 1}/{args.epochs}")
        t_epoch = time.perf_counter()
        self.t_log, self.seen_log = t_epoch, 0
        for x, y, bad, *cached in self.train_loader:  # cached: [f_t] under --teacher-cache
            if state.step_in_epoch >= self.steps_per_epoch:
                break
            if bad:
                self._record_bad(state, bad)
            state.step_in_epoch += 1
            state.global_step += 1
            out = None
            if x is not None and (x.shape[0] >= 2 or self.local_bs < 2):
                out = self._step(state, x, y, cached[0] if cached else None)
            elif x is None or x.shape[0] < 2:
                state.skipped_steps += 1  # too few readable images for BatchNorm
            if out is not None:
                b = y.shape[0]
                sums += torch.cat([out[0][:1] * b, out[1].double().view(1), out[0][1:] * b])
                count += b
                self.seen_log += b
            if self.scheduler is not None:
                self.scheduler.step_update(num_updates=state.global_step)
            bar.update(1)
            save = bool(args.ckpt_interval) and state.global_step % args.ckpt_interval == 0
            if state.step_in_epoch % args.log_interval == 0 or state.step_in_epoch == self.steps_per_epoch:
                save = self._log(state, bar, sums, count) or save
            if save and state.step_in_epoch < self.steps_per_epoch:
                t_epoch = self.save_mid_epoch(state, sums, count, t_epoch)
            if args.stop_after_steps is not None and state.global_step >= args.stop_after_steps:
                bar.close()
                return None
        bar.close()
        return sums, count, time.perf_counter() - t_epoch

    def _log(self, state: TrainState, bar, sums: torch.Tensor, count: int) -> bool:
        """The one host sync per log interval: progress bar, non-finite check, and whether a time-based
        checkpoint is due (every rank agrees: MAX over ranks)."""
        due = self.args.ckpt_minutes > 0 and time.monotonic() - self.last_save_time >= 60.0 * self.args.ckpt_minutes
        flags = self.ctx.all_max(torch.stack([self.bad_step, torch.tensor(int(due), device=self.device)])).tolist()
        self.raise_if_nonfinite(state, bad_step=int(flags[0]))
        vals = sums.tolist()
        now = time.perf_counter()
        ips = self.seen_log * self.ctx.world / max(now - self.t_log, 1e-9)
        self.t_log, self.seen_log = now, 0
        n = max(count, 1)
        post = {"loss": f"{vals[0] / n:.3f}", "acc": f"{100 * vals[1] / n:.1f}"}
        post.update({k: f"{v / n:.3f}" for k, v in zip(self.part_names, vals[2:])})
        post["img/s"] = f"{ips:.0f}"
        bar.set_postfix(post, refresh=False)
        return bool(flags[1])

    def end_epoch(self, state: TrainState, sums: torch.Tensor, count: int, epoch_seconds: float) -> None:
        """Epoch metrics (summed over ranks), validation, last.pt / best.pt, metrics files."""
        args, ctx = self.args, self.ctx
        self.raise_if_nonfinite(state)
        state.train_seconds += epoch_seconds
        state.images_seen += count * ctx.world
        totals = ctx.all_reduce(torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=self.device)]))
        totals = totals.tolist()
        n = totals[-1]
        mean = (lambda v: v / n) if n else (lambda v: None)
        row = {"epoch": state.epoch + 1, "step": state.global_step, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": mean(totals[0]), "train_top1": mean(100.0 * totals[1])}
        row.update({f"train_{k}": mean(v) for k, v in zip(self.part_names, totals[2:-1])})
        ctx.broadcast_buffers(unwrap(self.task.trainable_module))
        row.update(evaluate(self.task.get_eval_model(), self.val_loader, self.device, self.autocast,
                            self.channels_last, ctx, on_bad=lambda bad: self._record_bad(state, bad)))
        row.update({"epoch_seconds": epoch_seconds, "images_per_s": count * ctx.world / max(epoch_seconds, 1e-9)})
        state.history.append(row)
        improved = row["val_top1"] is not None and (state.best_top1 is None or row["val_top1"] > state.best_top1)
        if improved:
            state.best_top1, state.best_epoch = row["val_top1"], state.epoch + 1
        state.epoch += 1
        state.step_in_epoch = 0
        self.save(state, os.path.join(self.out, "last.pt"))
        if ctx.is_main:
            if improved:
                atomic_copy(os.path.join(self.out, "last.pt"), os.path.join(self.out, "best.pt"))
            write_metrics(state.history, self.out)
            if not args.no_plots and n:
                write_plots(state.history, self.part_names, self.out)
            val = "" if row["val_top1"] is None else f" val top-1 {row['val_top1']:.2f}"
            loss = "n/a" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
            print(f"epoch {state.epoch}/{args.epochs} loss {loss}{val} ({epoch_seconds:.1f} s, "
                  f"{row['images_per_s']:.0f} img/s)", flush=True)

    def finish(self, state: TrainState, stopped: bool) -> dict:
        args, ctx = self.args, self.ctx
        for files in ctx.gather_object(state.bad_files):
            state.bad_files.update(files)
        summary = {
            "method": args.method, "teacher": args.teacher if args.method != "ce" else None,
            "student": args.student, "dataset": args.dataset, "epochs": state.epoch, "stopped": stopped,
            "global_step": state.global_step, "best_top1": state.best_top1, "best_epoch": state.best_epoch,
            "final_top1": state.history[-1]["val_top1"] if state.history else None,
            "train_seconds": state.train_seconds,
            "images_per_s": state.images_seen / max(state.train_seconds, 1e-9),
            "skipped_images": len(state.bad_files), "skipped_samples": state.skipped_samples,
            "skipped_steps": state.skipped_steps, "bad_files": sorted(state.bad_files),
            "output": self.out, "world_size": ctx.world, "data_config": self.data_cfg.to_dict(),
        }
        if ctx.is_main and not stopped:
            atomic_write_text(json.dumps(summary, indent=2) + "\n", os.path.join(self.out, "summary.json"))
            print("hcd-distill summary\n" + format_summary(summary), flush=True)
        return summary


# ---------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` say; returns the summary dict (also written to OUTPUT/summary.json)."""
    ctx = DistContext()
    threads = torch.get_num_threads()
    try:
        return _run(args, ctx)
    finally:
        ctx.close()
        torch.set_num_threads(threads)  # --threads must not leak into the caller (tests, the demo)


def _resume_path(args: argparse.Namespace, out: str) -> Optional[str]:
    if args.resume == "auto":
        cand = os.path.join(out, "last.pt")
        return cand if os.path.isfile(cand) else None
    return None if args.resume == "none" else args.resume


def _run(args: argparse.Namespace, ctx: DistContext) -> dict:
    check_args(args, ctx.world)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args, ctx)
    ctx.init(device)
    out = args.output or default_output(args)
    folder = RunFolder(out)
    ckpt_path = _resume_path(args, out)
    here = ckpt_path is not None and os.path.abspath(ckpt_path) == os.path.abspath(os.path.join(out, "last.pt"))
    folder.check(resuming_here=here, overwrite=args.overwrite)
    ckpt = load_checkpoint(ckpt_path, args) if ckpt_path else None
    trainer = Trainer(args, ctx, device, out)
    state = trainer.load(ckpt) if ckpt is not None else TrainState()
    del ckpt
    error = None
    if ctx.is_main:  # the lock proves the folder writable; only now is anything written
        try:
            folder.acquire(args.overwrite)
        except UserError as exc:
            error = exc
    ctx.raise_any(error)
    try:
        if ckpt_path:
            info(ctx, f"resuming {ckpt_path}: epoch {state.epoch + 1}, step {state.step_in_epoch} of "
                      f"{trainer.steps_per_epoch} (global step {state.global_step})")
        elif args.resume == "auto":
            info(ctx, f"--resume auto: no {os.path.join(out, 'last.pt')} yet, starting from scratch")
        else:
            info(ctx, f"starting a new run in {out}")
        return trainer.fit(state)
    finally:
        folder.release()
