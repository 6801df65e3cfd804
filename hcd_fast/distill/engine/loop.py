"""The epoch loop of hcd-distill over a ``TrainState``: steps (``TrainStep``), the non-finite guard, logging
at the log interval (the loop's only host sync), evaluation, checkpoints and the summary."""
from __future__ import annotations

import json
import os
import time
from typing import Optional, Tuple

import torch

from hcd_fast.distill.checkpoint import CKPT_FORMAT, atomic_copy, atomic_save, atomic_write_text
from hcd_fast.distill.config import TrainConfig
from hcd_fast.distill.distiller import unwrap
from hcd_fast.distill.engine.components import build_components
from hcd_fast.distill.engine.distributed import DistContext
from hcd_fast.distill.engine.evaluate import evaluate, set_bn_frozen
from hcd_fast.distill.engine.report import format_summary, warn, write_metrics, write_plots
from hcd_fast.distill.engine.state import TrainState, rng_state, set_rng_state
from hcd_fast.distill.errors import TrainingError, UserError
from hcd_fast.distill.methods import get_method


class Trainer:
    """A run's components (``build_components``) and the epoch loop over a TrainState."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, device: torch.device, out: str):
        self.cfg, self.ctx, self.device, self.out = cfg, ctx, device, out
        self.parts = build_components(cfg, ctx, device)

    # ---------------------------------------------------------------------------------- checkpoints
    def load(self, ckpt: dict) -> TrainState:
        try:
            self.parts.distiller.load_state_dict(ckpt["distiller"])
            self.parts.optimizer.load_state_dict(ckpt["optimizer"])
            if self.parts.scheduler is not None and ckpt.get("scheduler") is not None:
                self.parts.scheduler.load_state_dict(ckpt["scheduler"])
            if self.parts.scaler is not None and ckpt.get("scaler") is not None:
                self.parts.scaler.load_state_dict(ckpt["scaler"])
            state = TrainState.from_dict(ckpt)
            rngs = ckpt["rng"]
            set_rng_state(rngs[self.ctx.rank] if len(rngs) == self.ctx.world else rngs[0])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise UserError(f"--resume: the checkpoint does not fit this run ({type(exc).__name__}: "
                            f"{str(exc)[:300]})") from None
        return state

    def save(self, state: TrainState, path: str) -> None:
        """Every rank's RNG state and unreadable files gathered; rank 0 writes ``path`` atomically. A failed
        write (full disk) stops every rank with the same error line, none waiting alone."""
        rngs = self.ctx.gather_object(rng_state())
        for files in self.ctx.gather_object(state.bad_files):
            state.bad_files.update(files)
        ckpt = self._checkpoint(state, rngs) if self.ctx.is_main else None
        self.ctx.raise_any(self._main_writes(lambda: atomic_save(ckpt, path)))
        state.saved_step = state.global_step
        self.last_save_time = time.monotonic()

    def _checkpoint(self, state: TrainState, rngs: list) -> dict:
        """What last.pt holds: tensors and plain values only (loadable with weights_only=True)."""
        p = self.parts
        return {"format": CKPT_FORMAT, "args": self.cfg.flat(), "data_config": p.data_cfg.to_dict(),
                **state.to_dict(), "distiller": unwrap(p.task.trainable_module).state_dict(),
                "optimizer": p.optimizer.state_dict(),
                "scheduler": p.scheduler.state_dict() if p.scheduler is not None else None,
                "scaler": p.scaler.state_dict() if p.scaler is not None else None, "rng": rngs,
                "part_names": list(p.part_names), "num_classes": p.num_classes,
                "student_channels": list(p.channels)}

    def _main_writes(self, write) -> Optional[UserError]:
        """Run ``write`` on rank 0; its UserError (a failed write) is returned for ``ctx.raise_any``."""
        if not self.ctx.is_main:
            return None
        try:
            write()
        except UserError as exc:
            return exc
        return None

    def save_mid_epoch(self, state: TrainState, sums: torch.Tensor, count: int, t_epoch: float) -> float:
        self.raise_if_nonfinite(state)
        elapsed = time.perf_counter() - t_epoch
        state.train_seconds += elapsed
        self.epoch_seconds_before += elapsed
        state.accum = {"sums": sums.cpu(), "count": count, "seconds": self.epoch_seconds_before}
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
        parts = ", ".join(f"{k}={v:.4g}" for k, v in zip(("loss",) + self.parts.part_names, vals))
        kept = (f"{os.path.join(self.out, 'last.pt')} holds the last finite state (step {state.saved_step})"
                if state.saved_step else "no checkpoint had been written yet")
        raise TrainingError(f"non-finite loss at step {bad_step} (epoch {state.epoch + 1}): {parts}; training "
                            f"stopped, {kept}. Lower --lr, set --clip-grad, or use --skip-nonfinite N"
                            + (f". Possible cause: {self.parts.amx_note}" if self.parts.amx_note else ""))

    def _record_bad(self, state: TrainState, bad: list) -> None:
        for b in bad:
            if b.path not in state.bad_files:
                warn(f"skipped the unreadable image {b.path!r} ({b.reason})")
            state.bad_files[b.path] = b.reason
        state.skipped_samples += len(bad)

    # ------------------------------------------------------------------------------------- the loop
    def fit(self, state: TrainState) -> dict:
        cfg, ctx, device = self.cfg, self.ctx, self.device
        if cfg.compile:
            self.parts.task.compile(teacher=False)  # the teacher's compile is --teacher-compile's (teacher.speed)
        if ctx.enabled:
            self.parts.task.prepare_distributed(device_ids=[device.index] if device.type == "cuda" else None,
                                                find_unused_parameters=cfg.find_unused_parameters)
        # The first non-finite loss: its global step (-1: none yet) and (loss, parts), kept on the device.
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_vals = torch.zeros(1 + len(self.parts.part_names), dtype=torch.float64, device=device)
        self.last_save_time = time.monotonic()
        stopped = False
        while state.epoch < cfg.epochs:
            result = self.train_one_epoch(state)
            if result is None:
                stopped = True
                break
            self.end_epoch(state, *result)
        return self.finish(state, stopped)

    def _step(self, state: TrainState, x: torch.Tensor, y: torch.Tensor, cached_feat: Optional[torch.Tensor] = None):
        """One update (``TrainStep``); returns (loss and parts (1 + P,) float64, correct count) or None when
        skipped. Records the first non-finite loss on the device (read at the log interval)."""
        out = self.parts.step(x, y, cached_feat)
        if out.skipped:
            state.skipped_nonfinite += 1
            state.skipped_steps += 1
            if state.skipped_nonfinite > self.cfg.skip_nonfinite:
                self.bad_vals = out.vals
                self.raise_if_nonfinite(state, bad_step=state.global_step)
            warn(f"skipped step {state.global_step}: non-finite loss ({state.skipped_nonfinite} of at most "
                 f"{self.cfg.skip_nonfinite})")
            return None
        first = out.nonfinite & (self.bad_step < 0)
        self.bad_step = torch.where(first, state.global_step, self.bad_step)
        self.bad_vals = torch.where(first, out.vals, self.bad_vals)
        return out.vals, out.correct

    def _start_epoch(self, state: TrainState) -> Tuple[torch.Tensor, int]:
        cfg = self.cfg
        self.parts.task.train()
        if cfg.freeze_bn:
            set_bn_frozen(self.parts.task)
        crit = unwrap(self.parts.task.trainable_module).criterion
        if hasattr(crit, "set_epoch"):
            crit.set_epoch(state.epoch + 1)
        self.parts.sampler.set_epoch(state.epoch)
        self.parts.sampler.set_start(state.step_in_epoch * self.parts.local_bs)
        if hasattr(self.parts.data.train, "set_epoch"):
            self.parts.data.train.set_epoch(state.epoch)
        self.parts.loader_gen.manual_seed(cfg.seed * 100003 + state.epoch)
        sums = torch.zeros(2 + len(self.parts.part_names), dtype=torch.float64, device=self.device)
        count = 0
        # The epoch's training seconds before the current stretch (mid-epoch checkpoints and a resume cut the
        # time in stretches; epoch_seconds and the epoch's img/s cover them all).
        self.epoch_seconds_before = 0.0
        if state.accum is not None and state.step_in_epoch > 0:
            sums.copy_(state.accum["sums"].to(self.device))
            count = state.accum["count"]
            self.epoch_seconds_before = float(state.accum.get("seconds", 0.0))
        state.accum = None
        return sums, count

    def train_one_epoch(self, state: TrainState):
        """The rest of the current epoch; returns (sums, count, seconds since the last mid-epoch checkpoint,
        the epoch's seconds before it), or None when --stop-after-steps hit."""
        from tqdm import tqdm
        cfg = self.cfg
        sums, count = self._start_epoch(state)
        bar = tqdm(total=self.parts.steps_per_epoch, initial=state.step_in_epoch, dynamic_ncols=True, leave=False,
                   disable=not self.ctx.is_main or cfg.no_progress,
                   desc=f"{cfg.method} epoch {state.epoch + 1}/{cfg.epochs}")
        t_epoch = time.perf_counter()
        self.t_log, self.seen_log = t_epoch, 0
        for x, y, bad, *cached in self.parts.train_loader:  # cached: [f_t] under --teacher-cache
            if state.step_in_epoch >= self.parts.steps_per_epoch:
                break
            if bad:
                self._record_bad(state, bad)
            state.step_in_epoch += 1
            state.global_step += 1
            out = None
            # Too few readable images for BatchNorm: every rank skips the step when any rank must (a rank that
            # skipped alone would leave the others waiting in DDP's gradient all-reduce).
            too_few = x is None or (x.shape[0] < 2 and self.parts.local_bs >= 2)
            if self.ctx.any_rank(too_few):
                state.skipped_steps += 1
            else:
                out = self._step(state, x, y, cached[0] if cached else None)
            if out is not None:
                b = y.shape[0]
                sums += torch.cat([out[0][:1] * b, out[1].double().view(1), out[0][1:] * b])
                count += b
                self.seen_log += b
            if self.parts.scheduler is not None:
                self.parts.scheduler.step_update(num_updates=state.global_step)
            bar.update(1)
            save = bool(cfg.ckpt_interval) and state.global_step % cfg.ckpt_interval == 0
            if state.step_in_epoch % cfg.log_interval == 0 or state.step_in_epoch == self.parts.steps_per_epoch:
                save = self._log(state, bar, sums, count) or save
            if save and state.step_in_epoch < self.parts.steps_per_epoch:
                t_epoch = self.save_mid_epoch(state, sums, count, t_epoch)
            if cfg.stop_after_steps is not None and state.global_step >= cfg.stop_after_steps:
                bar.close()
                return None
        bar.close()
        return sums, count, time.perf_counter() - t_epoch, self.epoch_seconds_before

    def _log(self, state: TrainState, bar, sums: torch.Tensor, count: int) -> bool:
        """The one host sync per log interval: progress bar, non-finite check, and whether a time-based
        checkpoint is due (every rank agrees: MAX over ranks)."""
        due = self.cfg.ckpt_minutes > 0 and time.monotonic() - self.last_save_time >= 60.0 * self.cfg.ckpt_minutes
        flags = self.ctx.all_max(torch.stack([self.bad_step, torch.tensor(int(due), device=self.device)])).tolist()
        self.raise_if_nonfinite(state, bad_step=int(flags[0]))
        vals = sums.tolist()
        now = time.perf_counter()
        ips = self.seen_log * self.ctx.world / max(now - self.t_log, 1e-9)
        self.t_log, self.seen_log = now, 0
        n = max(count, 1)
        post = {"loss": f"{vals[0] / n:.3f}", "acc": f"{100 * vals[1] / n:.1f}"}
        post.update({k: f"{v / n:.3f}" for k, v in zip(self.parts.part_names, vals[2:])})
        post["img/s"] = f"{ips:.0f}"
        bar.set_postfix(post, refresh=False)
        return bool(flags[1])

    def end_epoch(self, state: TrainState, sums: torch.Tensor, count: int, last_stretch: float,
                  seconds_before: float = 0.0) -> None:
        """Epoch metrics (summed over ranks), validation, last.pt / best.pt, metrics files. ``last_stretch``:
        seconds since the last mid-epoch checkpoint (or the epoch's start); ``seconds_before``: the epoch's
        seconds before it (already in ``state.train_seconds``); epoch_seconds and img/s cover both."""
        cfg, ctx = self.cfg, self.ctx
        self.raise_if_nonfinite(state)
        state.train_seconds += last_stretch
        epoch_seconds = seconds_before + last_stretch
        state.images_seen += count * ctx.world
        totals = ctx.all_reduce(torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=self.device)]))
        totals = totals.tolist()
        n = totals[-1]
        mean = (lambda v: v / n) if n else (lambda v: None)
        lr = float(self.parts.optimizer.param_groups[0]["lr"])  # a device tensor under --cuda-graph (DeviceLR)
        row = {"epoch": state.epoch + 1, "step": state.global_step, "lr": lr,
               "train_loss": mean(totals[0]), "train_top1": mean(100.0 * totals[1])}
        row.update({f"train_{k}": mean(v) for k, v in zip(self.parts.part_names, totals[2:-1])})
        ctx.broadcast_buffers(unwrap(self.parts.task.trainable_module))
        row.update(evaluate(self.parts.task.get_eval_model(), self.parts.val_loader, self.device,
                            self.parts.step.autocast, self.parts.channels_last, ctx,
                            on_bad=lambda bad: self._record_bad(state, bad)))
        row.update({"epoch_seconds": epoch_seconds, "images_per_s": count * ctx.world / max(epoch_seconds, 1e-9)})
        state.history.append(row)
        improved = row["val_top1"] is not None and (state.best_top1 is None or row["val_top1"] > state.best_top1)
        if improved:
            state.best_top1, state.best_epoch = row["val_top1"], state.epoch + 1
        state.epoch += 1
        state.step_in_epoch = 0
        self.save(state, os.path.join(self.out, "last.pt"))

        def write_results():
            if improved:
                atomic_copy(os.path.join(self.out, "last.pt"), os.path.join(self.out, "best.pt"))
            write_metrics(state.history, self.out)
            if not cfg.no_plots and n:
                write_plots(state.history, self.parts.part_names, self.out)
        ctx.raise_any(self._main_writes(write_results))
        if ctx.is_main:
            val = "" if row["val_top1"] is None else f" val top-1 {row['val_top1']:.2f}"
            loss = "n/a" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
            print(f"epoch {state.epoch}/{cfg.epochs} loss {loss}{val} ({epoch_seconds:.1f} s, "
                  f"{row['images_per_s']:.0f} img/s)", flush=True)

    def finish(self, state: TrainState, stopped: bool) -> dict:
        cfg, ctx = self.cfg, self.ctx
        for files in ctx.gather_object(state.bad_files):
            state.bad_files.update(files)
        summary = {
            "method": cfg.method, "teacher": cfg.teacher if get_method(cfg.method).needs_teacher else None,
            "student": cfg.student, "dataset": cfg.dataset, "epochs": state.epoch, "stopped": stopped,
            "global_step": state.global_step, "best_top1": state.best_top1, "best_epoch": state.best_epoch,
            "final_top1": state.history[-1]["val_top1"] if state.history else None,
            "train_seconds": state.train_seconds,
            "images_per_s": state.images_seen / max(state.train_seconds, 1e-9),
            "skipped_images": len(state.bad_files), "skipped_samples": state.skipped_samples,
            "skipped_steps": state.skipped_steps, "bad_files": sorted(state.bad_files),
            "output": self.out, "world_size": ctx.world, "data_config": self.parts.data_cfg.to_dict(),
        }
        if ctx.is_main and not stopped:
            atomic_write_text(json.dumps(summary, indent=2) + "\n", os.path.join(self.out, "summary.json"))
            print("hcd-distill summary\n" + format_summary(summary), flush=True)
        return summary
