"""``run(config)``: one hcd-distill run, on one device or many (torchrun / DDP), resumable.

Everything is checked before the first step (``UserError``, exit code 2, the flag or file named): flags,
model names, the models at the input size, class counts, checkpoint files, the data, the output folder
(writable, not another run's unless resumed or ``--overwrite``, not in use: lock file) and, on resume, that
the checkpoint is of the same run. A non-finite loss stops the run (``TrainingError``, exit code 1) with
``last.pt`` holding the last finite state. ``last.pt`` holds everything needed to continue bit for bit:
the data order is a function of (seed, epoch), each image's augmentation of (seed, epoch, index).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from hcd_fast.distill.checkpoint import RunFolder
from hcd_fast.distill.config import TrainConfig
from hcd_fast.distill.engine.checks import check_config, check_device_options, default_output, load_checkpoint
from hcd_fast.distill.engine.distributed import DistContext, resolve_device
from hcd_fast.distill.engine.loop import Trainer
from hcd_fast.distill.engine.report import info
from hcd_fast.distill.engine.state import TrainState
from hcd_fast.distill.errors import Interrupted, UserError


def run(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns the summary dict (also written to OUTPUT/summary.json)."""
    ctx = DistContext()
    threads = torch.get_num_threads()
    try:
        return _run(cfg, ctx)
    finally:
        ctx.close()
        torch.set_num_threads(threads)  # --threads must not leak into the caller (tests, the demo)


def resume_path(resume: str, out: str) -> Optional[str]:
    """The checkpoint ``--resume`` names: 'auto' is OUTPUT/last.pt when it exists, 'none' none."""
    if resume == "auto":
        cand = os.path.join(out, "last.pt")
        return cand if os.path.isfile(cand) else None
    return None if resume == "none" else resume


def _run(cfg: TrainConfig, ctx: DistContext) -> dict:
    check_config(cfg, ctx.world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, ctx)
    check_device_options(cfg, device)
    ctx.init(device)
    out = cfg.output or default_output(cfg)
    folder = RunFolder(out)
    ckpt_path = resume_path(cfg.resume, out)
    error = None
    if ctx.is_main:  # lock, then check the results, before anything is built (no window for another run)
        try:
            folder.open(ckpt_path, cfg.overwrite)
        except UserError as exc:
            error = exc
    ctx.raise_any(error)
    state = None
    try:
        ckpt = load_checkpoint(ckpt_path, cfg, folder) if ckpt_path else None
        trainer = Trainer(cfg, ctx, device, out)
        state = trainer.load(ckpt) if ckpt is not None else TrainState()
        del ckpt
        if ctx.is_main:
            folder.prepare(cfg.overwrite)  # only now is anything removed or written
        ctx.barrier()
        if ckpt_path:
            info(ctx.is_main, f"resuming {ckpt_path}: epoch {state.epoch + 1}, step {state.step_in_epoch} of "
                              f"{trainer.parts.steps_per_epoch} (global step {state.global_step})")
        elif cfg.resume == "auto":
            info(ctx.is_main, f"--resume auto: no {os.path.join(out, 'last.pt')} yet, starting from scratch")
        else:
            info(ctx.is_main, f"starting a new run in {out}")
        return trainer.fit(state)
    except KeyboardInterrupt:  # Ctrl-C: the CLI prints one line with the last checkpoint and the resume command
        last = os.path.join(out, "last.pt")
        saved = state is not None and state.saved_step is not None and os.path.isfile(last)
        raise Interrupted(out, last if saved else None, state.saved_step if saved else None) from None
    finally:
        folder.release()
