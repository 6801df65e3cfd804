"""``hcd-distill --cuda-graph``: the training step captured in one CUDA graph and replayed.

On a GPU the step of a small student is launch-bound: hundreds of kernels, each a few microseconds of work, each
costing the host more than that to launch. PyTorch's whole-network capture removes the host from the loop. The
recipe (torch.cuda.graph's documentation):

- warm-up: the first ``warmup`` steps run eagerly on a side stream (they are real updates), so lazily created
  state exists before the capture (cuBLAS/cuDNN handles and workspaces, Triton kernels, optimizer state, the
  autocast dtypes);
- capture: the teacher forward (unless its features come from the cache), the student and head forward, the
  loss, its parts and the top-1 count, and the backward, on static input buffers, with autocast inside (its
  weight-cast cache off, so the casts are part of the graph) and, with fp16, ``scaler.scale(loss).backward()``;
  the gradients are static tensors written by every replay;
- each step: the batch is copied into the static buffers, the graph replays, and the optimizer step runs eagerly
  after it (with fp16 ``scaler.step`` and ``scaler.update``, which read the inf check on the host): the learning
  rate schedule changes the learning rate every step, which a captured optimizer step would freeze (timm's
  schedulers write a Python float), and a foreach optimizer step is a handful of launches.

What cannot be captured is refused before the run starts (``problems``: the CLI exits 2 naming the reason):
no CUDA device, DDP (torchrun), ``--skip-nonfinite`` (a host sync inside the step), ``--compile`` and a compiled
teacher (their own CUDA graphs). A batch of another size after the capture (unreadable images shrink a batch;
the loader drops the last partial batch) stops the run with the same kind of error.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from hcd_fast.distill.engine.step import StepOutput, TrainStep
from hcd_fast.distill.errors import UserError


def problems(device: torch.device, distributed: bool, skip_nonfinite: int, compile: bool,
             teacher_compiled: bool) -> List[str]:
    """Why the step cannot be captured with these settings (empty: it can)."""
    out = []
    if device.type != "cuda":
        out.append(f"it needs a CUDA device (the run is on {device})")
    if distributed:
        out.append("DDP (torchrun) is not supported: its gradient all-reduce runs outside the captured graph")
    if skip_nonfinite:
        out.append("--skip-nonfinite reads the loss on the host inside the step (a sync, which capture forbids)")
    if compile:
        out.append("--compile brings its own CUDA graphs; use one of the two")
    if teacher_compiled:
        out.append("the compiled teacher (--teacher-compile) brings its own CUDA graphs; use --teacher-compile off")
    return out


class GraphedTrainStep:
    """A ``TrainStep`` whose forward and backward replay one CUDA graph after ``warmup`` eager steps (module
    docstring); ``step(x, y, cached_feat)`` -> ``StepOutput`` as ``TrainStep``'s (fresh tensors each call)."""

    def __init__(self, step: TrainStep, warmup: int = 3):
        if step.skip_nonfinite or step.sync_loss:
            raise UserError("--cuda-graph: the step reads the loss on the host (--skip-nonfinite), which a CUDA "
                            "graph cannot capture")
        self.step, self.warmup, self.calls = step, max(1, int(warmup)), 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_in = self.static_out = None
        self.side = None

    # What the loop and the evaluation read from the step.
    @property
    def part_names(self):
        return self.step.part_names

    def autocast(self):
        return self.step.autocast()

    def forward(self, *args, **kwargs):
        return self.step.forward(*args, **kwargs)

    def _inputs(self, x, y, cached_feat):
        s = self.step
        x = x.to(s.device, non_blocking=True)
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(s.device, non_blocking=True)
        if cached_feat is not None:
            cached_feat = cached_feat.to(s.device, non_blocking=True)
        return x, y, cached_feat

    def _captured(self, x, y, cached_feat):
        """What the graph records: forward, loss, parts, top-1 count, backward (the gradients)."""
        s = self.step
        autocast = (torch.autocast(s.device.type, dtype=s.amp_dtype, cache_enabled=False)
                    if s.amp_dtype is not None else torch.autocast(s.device.type, enabled=False))
        with autocast:
            result = s.task(x, y, cached_feat)
        loss = result["loss"]
        vals = torch.stack([loss.detach().double()] + [result[k].detach().double() for k in s.part_names])
        nonfinite = ~torch.isfinite(vals[0])
        correct = (result["output"].detach().argmax(-1) == y).sum()
        if s.scaler is not None:
            s.scaler.scale(loss).backward()
        else:
            loss.backward()
        return vals, correct, nonfinite

    def _update(self) -> None:
        """The eager optimizer step after a replay (TrainStep.backward_and_update without the backward)."""
        s = self.step
        params = s.task.trainable_module.parameters
        if s.scaler is not None:
            if s.clip_grad:
                s.scaler.unscale_(s.optimizer)
                torch.nn.utils.clip_grad_norm_(params(), s.clip_grad)
            s.scaler.step(s.optimizer)
            s.scaler.update()
        else:
            if s.clip_grad:
                torch.nn.utils.clip_grad_norm_(params(), s.clip_grad)
            s.optimizer.step()

    def _capture(self, x, y, cached_feat) -> None:
        self.static_in = (x.clone(), y.clone(), None if cached_feat is None else cached_feat.clone())
        torch.cuda.current_stream().wait_stream(self.side)
        self.step.optimizer.zero_grad(set_to_none=True)  # the backward in the graph allocates static gradients
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.static_out = self._captured(*self.static_in)
        except RuntimeError as exc:
            raise UserError(f"--cuda-graph: the step could not be captured ({str(exc).splitlines()[0][:300]}); "
                            f"run without --cuda-graph") from None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, cached_feat: Optional[torch.Tensor] = None) -> StepOutput:
        x, y, cached_feat = self._inputs(x, y, cached_feat)
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            if self.side is None:
                self.side = torch.cuda.Stream(device=x.device)
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.step(x, y, cached_feat)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            self._capture(x, y, cached_feat)
        else:
            sx, sy, sc = self.static_in
            if x.shape != sx.shape or (cached_feat is None) != (sc is None) or \
                    (cached_feat is not None and cached_feat.shape != sc.shape):
                raise UserError(f"--cuda-graph: a batch of shape {tuple(x.shape)} after the capture at "
                                f"{tuple(sx.shape)} (a variable batch: unreadable images shrink batches); run "
                                f"without --cuda-graph")
            sx.copy_(x)
            sy.copy_(y)
            if sc is not None:
                sc.copy_(cached_feat)
        self.graph.replay()
        self._update()
        vals, correct, nonfinite = self.static_out
        # Fresh tensors: the next replay overwrites the static ones, and the loop keeps these across steps.
        return StepOutput(vals.clone(), correct.clone(), nonfinite.clone())
