"""The hcd-distill training loop: one device or many (torchrun / DDP), resumable, no per-step host sync.

``run(args)`` takes the namespace of ``hcd_fast.distill.cli.parse_args`` and returns a summary dict.
Everything the user can get wrong (model names, paths, class counts, batch size) is checked before the
first step and raised as ``UserError``.

State: ``OUTPUT/last.pt`` holds everything needed to continue bit-for-bit (Distiller = student + heads,
optimizer, scheduler, grad scaler, epoch, step, the running epoch sums, metrics history, the RNG states
of every rank: torch, CUDA, numpy, python); the data order is a pure function of (seed, epoch) and the
sampler skips what was already seen. Files are written to a temporary name and moved with os.replace.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import json
import os
import random
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hcd_fast.distill.baselines import METHODS
from hcd_fast.distill.data import ResumableDistributedSampler, ShardSampler, build_data
from hcd_fast.distill.distiller import Distiller, DistillTask, LossOptions, build_criterion, unwrap
from hcd_fast.distill.errors import UserError
from hcd_fast.distill.taps import StudentTap, TeacherTap, probe_student, probe_teacher
from hcd_fast.modules import ConvProjector
from hcd_fast.reference import PART_NAMES

CKPT_FORMAT = "hcd-distill/1"


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

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
        return t

    def gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

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


# ------------------------------------------------------------------------------------------- checks
def _check_model_name(flag: str, name: Optional[str]) -> None:
    import timm
    if not name:
        raise UserError(f"{flag}: a timm model name is required")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"{flag} {name!r}: not a timm model (see timm.list_models()){hint}")


def check_args(args: argparse.Namespace, world: int) -> None:
    """Everything checkable without building anything."""
    if args.method not in METHODS:
        raise UserError(f"--method: expected one of {METHODS}, got {args.method!r}")
    _check_model_name("--student", args.student)
    if args.method != "ce":
        _check_model_name("--teacher", args.teacher)
        if args.teacher_checkpoint is None and not args.allow_random_teacher:
            raise UserError(f"--method {args.method} needs a trained teacher: give --teacher-checkpoint PATH "
                            f"(or --allow-random-teacher for a smoke test)")
    if args.teacher_checkpoint is not None and not os.path.isfile(args.teacher_checkpoint):
        raise UserError(f"--teacher-checkpoint {args.teacher_checkpoint!r}: no such file")
    if args.resume not in ("auto", "none") and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume!r}: no such file (use 'auto' to continue OUTPUT/last.pt "
                        f"when it exists)")
    if args.batch_size < 1 or args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size}: the global batch must be a positive multiple of "
                        f"the number of processes ({world})")
    for flag, v in (("--epochs", args.epochs), ("--log-interval", args.log_interval), ("--img-size", args.img_size)):
        if v < 1:
            raise UserError(f"{flag}: expected an int >= 1, got {v}")


def _default_output(args) -> str:
    teacher = args.teacher if args.method != "ce" else "none"
    return os.path.join("runs", f"{args.dataset}_{teacher}_to_{args.student}_{args.method}_s{args.seed}")


def _create_model(flag: str, name: str, num_classes: int, kwargs: dict):
    import timm
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise UserError(f"{flag} {name!r}: timm.create_model rejected the kwargs {kwargs}: {exc}") from None


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state_dict from a plain/timm/hcd-distill checkpoint or a .safetensors file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # timm's train.py stores its argparse namespace next to the weights; that needs full unpickling.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT:
        prefix = "student.model."  # an hcd-distill checkpoint: its student becomes the teacher
        return {k[len(prefix):]: v for k, v in obj["distiller"].items() if k.startswith(prefix)}
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise UserError(f"--teacher-checkpoint {path!r}: expected a state_dict, got {type(obj).__name__}")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_teacher_weights(model: nn.Module, path: str, num_classes: int) -> None:
    state = _read_state_dict(path)
    own = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    for k, got, want in mismatched:
        if want and want[0] == num_classes and got and got[0] != num_classes:
            raise UserError(f"--teacher-checkpoint {path!r}: the teacher was trained for {got[0]} classes "
                            f"({k} has shape {got}) but the dataset has {num_classes}")
    if mismatched:
        raise UserError(f"--teacher-checkpoint {path!r} does not fit the --teacher model: "
                        + "; ".join(f"{k}: checkpoint {g} vs model {w}" for k, g, w in mismatched[:5]))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"--teacher-checkpoint {path!r} does not fit the --teacher model: missing keys "
                        f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                        f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state)


# ------------------------------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace (never a torn file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def set_bn_frozen(module: nn.Module) -> None:
    """BatchNorm layers and HCD/OFA conv projectors (whose fused BN tail follows the projector's own
    training flag) to eval mode: running statistics instead of batch statistics."""
    for m in module.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, ConvProjector)):
            m.eval()


def write_metrics(history: List[dict], out: str) -> None:
    if not history:
        return
    keys = list(history[0].keys())
    for row in history[1:]:
        keys += [k for k in row if k not in keys]
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(buf.getvalue(), os.path.join(out, "metrics.csv"))
    atomic_write_text("".join(json.dumps(r) + "\n" for r in history), os.path.join(out, "metrics.jsonl"))


def write_plots(history: List[dict], part_names, out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in history], label="total", linewidth=2)
    for name in part_names:
        ax.plot(epochs, [r[f"train_{name}"] for r in history], label=name)
    ax.plot(epochs, [r["val_loss"] for r in history], "--", label="val CE")
    ax.set_xlabel("epoch"), ax.set_ylabel("loss (epoch mean)"), ax.set_yscale("log"), ax.legend()
    ax.set_title("loss parts (unweighted)")
    fig.tight_layout(), fig.savefig(os.path.join(out, "loss.png"), dpi=100), plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_top1"] for r in history], label="train top-1")
    ax.plot(epochs, [r["val_top1"] for r in history], label="val top-1", linewidth=2)
    ax.set_xlabel("epoch"), ax.set_ylabel("accuracy (%)"), ax.legend(), ax.set_title("accuracy")
    fig.tight_layout(), fig.savefig(os.path.join(out, "accuracy.png"), dpi=100), plt.close(fig)


def format_summary(summary: dict) -> str:
    rows = [("method", summary["method"]), ("teacher", summary["teacher"]), ("student", summary["student"]),
            ("dataset", summary["dataset"]), ("epochs", summary["epochs"]),
            ("best val top-1 (%)", f"{summary['best_top1']:.2f} (epoch {summary['best_epoch']})"),
            ("final val top-1 (%)", f"{summary['final_top1']:.2f}"),
            ("train wall time (s)", f"{summary['train_seconds']:.1f}"),
            ("train images/s", f"{summary['images_per_s']:.0f}"), ("output", summary["output"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model: nn.Module, loader, device, autocast, channels_last: bool, ctx: DistContext) -> Dict[str, float]:
    """Top-1/top-5 and CE of the bare student over the whole validation set (summed over ranks)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # ce sum, top-1, top-5 correct
    count = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = top == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), hit[:, 0].sum(), hit.any(-1).sum()]).double()
        count += y.shape[0]
    model.train(was_training)
    total = ctx.all_reduce(torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=device)]))
    vals = total.tolist()
    n = max(vals[3], 1.0)
    return {"val_loss": vals[0] / n, "val_top1": 100.0 * vals[1] / n, "val_top5": 100.0 * vals[2] / n}


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


def _run(args: argparse.Namespace, ctx: DistContext) -> dict:
    import timm.optim
    import timm.scheduler
    from tqdm import tqdm

    check_args(args, ctx.world)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        device = torch.device("cuda", ctx.local_rank if ctx.enabled else (device.index or 0))
        torch.cuda.set_device(device)
    ctx.init(device)
    if args.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn: SyncBatchNorm runs on CUDA only (use --freeze-bn on CPU)")
    out = args.output or _default_output(args)

    # Data first: a bad path fails before any model is built.
    data = build_data(args.dataset, args.data_dir, args.img_size, val_fraction=args.val_fraction, aa=args.aa,
                      reprob=args.reprob, no_aug=args.no_aug, interpolation=args.interpolation,
                      train_split=args.train_split, val_split=args.val_split)
    K = data.num_classes
    if args.num_classes is not None and args.num_classes != K:
        raise UserError(f"--num-classes {args.num_classes}: the {args.dataset} dataset has {K} classes")

    seed_everything(args.seed)
    teacher = None
    if args.method != "ce":
        teacher_model = _create_model("--teacher", args.teacher, K, args.teacher_kwargs)
        if args.teacher_checkpoint:
            load_teacher_weights(teacher_model, args.teacher_checkpoint, K)
        teacher = TeacherTap(teacher_model.to(device))
        teacher_dim, teacher_k = probe_teacher(teacher, data.input_size)
        if teacher_k != K:
            raise UserError(f"--teacher {args.teacher!r} outputs {teacher_k} classes, the dataset has {K}")
    student_kwargs = dict(args.student_kwargs)
    if args.drop_path:
        student_kwargs["drop_path_rate"] = args.drop_path
    student = _create_model("--student", args.student, K, student_kwargs).to(device)
    if not hasattr(student, "forward_intermediates"):
        raise UserError(f"--student {args.student!r}: this timm model has no forward_intermediates, so its "
                        f"stages cannot be tapped; pick another student")
    try:
        channels, student_k = probe_student(student, args.indices, data.input_size)
    except (IndexError, AssertionError, ValueError) as exc:
        raise UserError(f"--indices {args.indices!r} for --student {args.student!r}: {exc}") from None
    if student_k != K:
        raise UserError(f"--student {args.student!r} outputs {student_k} classes, the dataset has {K}")
    if args.method == "ce":
        teacher_dim = 1  # unused: the ce criterion has no parameters
    if getattr(args, "teacher_cache", None):  # replay stored views and f_t (hcd_fast.distill.teacher_cache)
        from hcd_fast.distill.teacher_cache import open_for_training
        data.train = open_for_training(args, data.train, teacher, teacher_dim if teacher is not None else None)
    elif getattr(args, "digits_aug", False):  # digits through fresh crop + flip views (the cache's online twin)
        from hcd_fast.distill.teacher_cache import online_views
        data.train = online_views(args, data.train)

    opts = LossOptions(temperature=args.temperature, label_smoothing=args.label_smoothing, w_gt=args.w_gt,
                       w_kd=args.w_kd, w_kl=args.w_kl, w_ol=args.w_ol, num_sub_logits=args.num_sub_logits,
                       ortho_threshold=args.ortho_threshold, ortho_eps=args.ortho_eps,
                       gt_mask=args.gt_mask, detach_sub_targets=args.detach_sub_targets,
                       lambda_student=args.lambda_student, lambda_teacher=args.lambda_teacher,
                       cfm_hidden=args.cfm_hidden, embed_dim=args.embed_dim, dkd_alpha=args.dkd_alpha,
                       dkd_beta=args.dkd_beta, dkd_warmup=args.dkd_warmup, ofa_eps=args.ofa_eps,
                       w_ofa=args.w_ofa, backend=args.backend)
    try:
        criterion = build_criterion(args.method, channels, teacher_dim, K, opts)
    except (ValueError, TypeError) as exc:
        raise UserError(f"loss options: {exc}") from None
    part_names = tuple(getattr(criterion, "part_names", PART_NAMES))
    distiller = Distiller(StudentTap(student, args.indices), criterion).to(device)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
    if args.sync_bn:
        distiller = nn.SyncBatchNorm.convert_sync_batchnorm(distiller)
    task = DistillTask(distiller, teacher, device=device)

    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    if teacher is not None:  # bf16 weights / channels_last / compiled forward (hcd_fast.distill.teacher_speed)
        from hcd_fast.distill.teacher_speed import apply_teacher_speed, resolve_teacher_speed
        apply_teacher_speed(teacher, resolve_teacher_speed(
            teacher.model, device, amp, getattr(args, "teacher_bf16", "auto"),
            getattr(args, "teacher_channels_last", "auto"), getattr(args, "teacher_compile", "auto"), args.compile))

    # Loaders: deterministic order from (seed, epoch); the global batch is split over ranks.
    local_bs = args.batch_size // ctx.world
    sampler = ResumableDistributedSampler(data.train, ctx.world, ctx.rank, seed=args.seed, drop_last=True)
    steps_per_epoch = sampler.num_samples // local_bs
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set "
                        f"({len(data.train)} images)")
    workers = 0 if data.in_memory else args.workers
    pin = device.type == "cuda"
    loader_gen = torch.Generator()
    train_loader = DataLoader(data.train, batch_size=local_bs, sampler=sampler, num_workers=workers,
                              pin_memory=pin, drop_last=True, generator=loader_gen,
                              persistent_workers=False)
    val_loader = DataLoader(data.val, batch_size=max(local_bs, 64), sampler=ShardSampler(data.val, ctx.world, ctx.rank),
                            num_workers=workers, pin_memory=pin)

    optimizer = timm.optim.create_optimizer_v2(distiller, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                               momentum=args.momentum)
    scheduler = None
    if args.sched != "none":
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
            warmup_epochs=args.warmup_epochs, step_on_epochs=False, updates_per_epoch=steps_per_epoch)

    # Resume.
    ckpt_path = None
    if args.resume == "auto":
        cand = os.path.join(out, "last.pt")
        ckpt_path = cand if os.path.isfile(cand) else None
    elif args.resume != "none":
        ckpt_path = args.resume
    epoch, step_in_epoch, global_step = 0, 0, 0
    history: List[dict] = []
    best_top1, best_epoch, train_seconds, images_seen = -1.0, 0, 0.0, 0
    acc_state = None
    if ckpt_path:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state.get("format") != CKPT_FORMAT:
            raise UserError(f"--resume {ckpt_path!r}: not an hcd-distill checkpoint")
        distiller.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        history, best_top1, best_epoch = state["history"], state["best_top1"], state["best_epoch"]
        train_seconds, images_seen = state["train_seconds"], state["images_seen"]
        rngs = state["rng"]
        set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world else rngs[0])
        acc_state = state.get("accum")
        if ctx.is_main:
            print(f"hcd-distill: resumed {ckpt_path} at epoch {epoch + 1}, step {step_in_epoch}")

    if ctx.is_main:
        os.makedirs(out, exist_ok=True)  # only now: a run that fails its checks leaves nothing behind
    if args.compile:
        task.compile(teacher=False)  # the teacher's compile is --teacher-compile's (teacher_speed)
    if ctx.enabled:
        task.prepare_distributed(device_ids=[device.index] if device.type == "cuda" else None,
                                 find_unused_parameters=args.find_unused_parameters)

    def save_checkpoint(path: str, epoch_: int, step_: int, accum) -> None:
        rngs_ = ctx.gather_object(rng_state())
        if ctx.is_main:
            atomic_save({
                "format": CKPT_FORMAT, "args": vars(args), "epoch": epoch_, "step_in_epoch": step_,
                "global_step": global_step, "distiller": unwrap(task.trainable_module).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rngs_,
                "history": history, "best_top1": best_top1, "best_epoch": best_epoch,
                "train_seconds": train_seconds, "images_seen": images_seen,
                "accum": None if accum is None else {"sums": accum[0].cpu(), "count": accum[1]},
                "part_names": part_names, "num_classes": K, "student_channels": channels,
            }, path)
        ctx.barrier()

    num_stats = 2 + len(part_names)  # loss sum, correct, parts sums (weighted by batch size)
    stopped = False
    while epoch < args.epochs and not stopped:
        task.train()
        if args.freeze_bn:
            set_bn_frozen(task)
        crit = unwrap(task.trainable_module).criterion
        if hasattr(crit, "set_epoch"):
            crit.set_epoch(epoch + 1)
        sampler.set_epoch(epoch)
        sampler.set_start(step_in_epoch * local_bs)
        loader_gen.manual_seed(args.seed * 100003 + epoch)
        sums = torch.zeros(num_stats, dtype=torch.float64, device=device)
        count = 0
        if acc_state is not None and step_in_epoch > 0:
            sums.copy_(acc_state["sums"].to(device))
            count = acc_state["count"]
        acc_state = None
        bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, disable=not ctx.is_main or args.no_progress,
                   desc=f"{args.method} epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True, leave=False)
        t_epoch = time.perf_counter()
        t_log, seen_log = t_epoch, 0
        step = step_in_epoch
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(epoch)  # the teacher cache's view choice
        for batch in train_loader:
            if step >= steps_per_epoch:
                break
            x = batch[0].to(device, non_blocking=True)
            y = batch[1].to(device, non_blocking=True)
            cached_feat = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                result = task(x, y, cached_feat)
            loss = result["loss"]
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if args.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(distiller.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if args.clip_grad:
                    nn.utils.clip_grad_norm_(distiller.parameters(), args.clip_grad)
                optimizer.step()
            global_step += 1
            step += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=global_step)
            # Metrics stay on the device: no host synchronisation here.
            with torch.no_grad():
                b = y.shape[0]
                correct = (result["output"].argmax(-1) == y).sum()
                sums += torch.stack([loss.detach().double() * b, correct.double()]
                                    + [result[k].detach().double() * b for k in part_names])
            count += b
            seen_log += b
            bar.update(1)
            if step % args.log_interval == 0 or step == steps_per_epoch:
                vals = sums.tolist()  # the one sync per log interval
                now = time.perf_counter()
                ips = seen_log * ctx.world / max(now - t_log, 1e-9)
                t_log, seen_log = now, 0
                post = {"loss": f"{vals[0] / count:.3f}", "acc": f"{100 * vals[1] / count:.1f}"}
                post.update({k: f"{v / count:.3f}" for k, v in zip(part_names, vals[2:])})
                post["img/s"] = f"{ips:.0f}"
                bar.set_postfix(post, refresh=False)
            if args.ckpt_interval and global_step % args.ckpt_interval == 0 and step < steps_per_epoch:
                train_seconds += time.perf_counter() - t_epoch
                t_epoch = time.perf_counter()
                save_checkpoint(os.path.join(out, "last.pt"), epoch, step, (sums, count))
            if args.stop_after_steps is not None and global_step >= args.stop_after_steps:
                stopped = True
                break
        bar.close()
        if stopped:
            break
        epoch_seconds = time.perf_counter() - t_epoch
        train_seconds += epoch_seconds
        images_seen += count * ctx.world
        # Epoch metrics: sums over ranks, then the validation pass.
        totals = ctx.all_reduce(torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=device)])).tolist()
        n = totals[-1]
        row = {"epoch": epoch + 1, "step": global_step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": totals[0] / n, "train_top1": 100.0 * totals[1] / n}
        row.update({f"train_{k}": v / n for k, v in zip(part_names, totals[2:-1])})
        ctx.broadcast_buffers(unwrap(task.trainable_module))
        row.update(evaluate(task.get_eval_model(), val_loader, device, autocast, channels_last, ctx))
        row.update({"epoch_seconds": epoch_seconds, "images_per_s": count * ctx.world / max(epoch_seconds, 1e-9)})
        history.append(row)
        improved = row["val_top1"] > best_top1
        if improved:
            best_top1, best_epoch = row["val_top1"], epoch + 1
        epoch += 1
        step_in_epoch = 0
        save_checkpoint(os.path.join(out, "last.pt"), epoch, 0, None)
        if ctx.is_main:
            if improved:
                import shutil
                shutil.copyfile(os.path.join(out, "last.pt"), os.path.join(out, "best.pt.tmp"))
                os.replace(os.path.join(out, "best.pt.tmp"), os.path.join(out, "best.pt"))
            write_metrics(history, out)
            if not args.no_plots:
                write_plots(history, part_names, out)
            print(f"epoch {epoch}/{args.epochs} loss {row['train_loss']:.4f} val top-1 {row['val_top1']:.2f} "
                  f"({epoch_seconds:.1f} s, {row['images_per_s']:.0f} img/s)", flush=True)

    summary = {
        "method": args.method, "teacher": args.teacher if args.method != "ce" else None,
        "student": args.student, "dataset": args.dataset, "epochs": epoch, "stopped": stopped,
        "global_step": global_step, "best_top1": best_top1, "best_epoch": best_epoch,
        "final_top1": history[-1]["val_top1"] if history else float("nan"),
        "train_seconds": train_seconds, "images_per_s": images_seen / max(train_seconds, 1e-9),
        "output": out, "world_size": ctx.world,
    }
    if ctx.is_main and not stopped:
        atomic_write_text(json.dumps(summary, indent=2) + "\n", os.path.join(out, "summary.json"))
        print("hcd-distill summary\n" + format_summary(summary), flush=True)
    return summary
