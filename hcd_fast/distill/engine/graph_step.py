"""``hcd-distill --cuda-graph``: the whole training step captured in one CUDA graph and replayed.

On a GPU the step of a small student is launch-bound: hundreds of kernels, each a few microseconds of work, each
costing the host more than that to launch. PyTorch's whole-network capture removes the host from the loop. The
recipe (torch.cuda.graph's documentation, "Whole-network capture"):

- a capture-ready optimizer (``build_optimizer_options``): PyTorch's fused SGD / Adam / AdamW (``fused=True``,
  and ``capturable=True`` for Adam, whose step checks it under capture). Their kernels read the learning rate
  from a device tensor, and take GradScaler's ``grad_scale`` / ``found_inf`` as device tensors and skip the
  update there on an overflow, so neither the schedule nor fp16 needs the host. The update math is the eager
  optimizer's (weight decay, momentum, Nesterov), up to float rounding;
- ``DeviceLR``: each param group's lr lives in a float32 device tensor that the captured step reads at every
  replay. timm's schedulers keep writing a Python float into the group after each update; before each step the
  float is written into the tensor (``fill_``: a scalar kernel argument, no host sync) and the tensor is put
  back in the group;
- warm-up: the first ``warmup`` steps run eagerly on a side stream (they are real updates), so lazily created
  state exists before the capture (cuBLAS/cuDNN handles and workspaces, Triton kernels, optimizer state, the
  GradScaler's scale, the autocast dtypes);
- capture: the teacher forward (unless its features come from the cache), the student and head forward, the
  loss, its parts and the top-1 count, the backward (``scaler.scale(loss).backward()`` with fp16), gradient
  clipping (``clip_grad_norm_``'s foreach path, after ``scaler.unscale_``), the optimizer step
  (``scaler.step``) and ``scaler.update()`` (``torch._amp_update_scale_``, on the device), on static input
  buffers, with autocast inside (its weight-cast cache off, so the casts are part of the graph). The gradients
  were set to None before the capture, so the captured backward writes them (it does not accumulate): every
  replay overwrites the static gradients and the optimizer reads them in the same graph;
- each step: the batch is copied into the static buffers, the lr tensors are synced, the graph replays.

Two exactness details. Fused SGD's first step (``is_first_step``: buffer = gradient) is decided on the host,
and on an fp16 overflow it leaves its new momentum buffers unwritten, so ``prepare_optimizer`` creates them as
zeros up front: with dampening 0 the first update ``mu * 0 + g`` is the eager ``g``, and an overflowed first step
leaves zeros, as the eager step that was skipped leaves none. A criterion whose loss reads a host value that
changes between epochs (DKD's ramp ``min(epoch / warmup, 1)``) is recaptured when the value changes.

What cannot be captured is refused before the run starts (``problems``: the CLI exits 2 naming the reason):
no CUDA device, DDP (torchrun), ``--skip-nonfinite`` (a host sync inside the step), ``--compile`` and a compiled
teacher (their own CUDA graphs), an ``--opt`` without a capturable step. A batch of another size after the
capture (unreadable images shrink a batch; the loader drops the last partial batch) stops the run with the same
kind of error. hcd-distill keeps no EMA of the student, so there is none to capture.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch

from hcd_fast.distill.distiller import unwrap
from hcd_fast.distill.engine.step import StepOutput, TrainStep
from hcd_fast.distill.errors import UserError

# The --opt names whose step a CUDA graph can hold, and the constructor options that make it capture-ready:
# PyTorch's fused kernels (lr read from a device tensor; GradScaler's grad_scale / found_inf taken on the device).
# Adam's step also refuses a capture unless ``capturable``; SGD has no such flag.
CAPTURE_READY: Dict[str, dict] = {
    "sgd": {"fused": True}, "nesterov": {"fused": True}, "momentum": {"fused": True},
    "adam": {"fused": True, "capturable": True}, "adamw": {"fused": True, "capturable": True},
}
_READY_TYPES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
# Param-group keys that say how a step runs, not what it computes: a loaded state_dict keeps this run's.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")
_CAPTURABLE_WARNING = "This instance was constructed with capturable=True"


def build_optimizer_options(opt: str) -> dict:
    """The extra ``create_optimizer_v2`` options that build ``--opt`` capture-ready (ValueError if it cannot)."""
    try:
        return dict(CAPTURE_READY[opt.lower()])
    except KeyError:
        raise ValueError(f"--opt {opt}: its step cannot be captured in a CUDA graph (capturable: "
                         f"{', '.join(CAPTURE_READY)})") from None


def problems(device: torch.device, distributed: bool, skip_nonfinite: int, compile: bool,
             teacher_compiled: bool, opt: str = "sgd") -> List[str]:
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
    if opt.lower() not in CAPTURE_READY:
        out.append(f"--opt {opt} has no capturable step (PyTorch's fused optimizers: {', '.join(CAPTURE_READY)})")
    return out


def not_capture_ready(optimizer: torch.optim.Optimizer) -> Optional[str]:
    """Why ``optimizer.step()`` cannot run inside a CUDA graph as built (None: it can)."""
    name = type(optimizer).__name__
    if type(optimizer) not in _READY_TYPES:
        return f"{name} has no capturable step (torch.optim.SGD, Adam or AdamW with fused=True can)"
    for group in optimizer.param_groups:
        if not group.get("fused"):
            return f"{name} was built without fused=True"
        if type(optimizer) is not torch.optim.SGD and not group.get("capturable"):
            return f"{name} was built without capturable=True"
    return None


def prepare_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers for a fused SGD with momentum (module docstring): its first step is then a regular
    one, ``b = mu * 0 + (1 - dampening) * g``, the eager first step ``b = g`` when dampening is 0 (timm's SGD)."""
    if type(optimizer) is not torch.optim.SGD:
        return
    for group in optimizer.param_groups:
        if group["momentum"] == 0 or group["dampening"] != 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def keep_own_implementation(optimizer: torch.optim.Optimizer) -> None:
    """A loaded state_dict (``--resume``, possibly written by a run with or without ``--cuda-graph``) brings
    its hyper-parameters, but this optimizer keeps its own ``IMPLEMENTATION_KEYS`` (so Adam's step counters are
    placed where this run's step reads them) and a float lr (``DeviceLR`` puts its tensor back). Only the
    optimizers --cuda-graph can build capture-ready need it (others, e.g. timm's Lookahead, lack torch's hooks)."""
    if type(optimizer) not in _READY_TYPES:
        return

    def pre_hook(opt: torch.optim.Optimizer, state_dict: dict):
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(opt.param_groups):
            return None  # torch's own check reports it
        groups = []
        for own, saved in zip(opt.param_groups, saved_groups):
            group = dict(saved)
            group.update({k: own[k] for k in IMPLEMENTATION_KEYS if k in own})
            if isinstance(group.get("lr"), torch.Tensor):
                group["lr"] = float(group["lr"])
            groups.append(group)
        return {**state_dict, "param_groups": groups}
    optimizer.register_load_state_dict_pre_hook(pre_hook)


class DeviceLR:
    """Each param group's lr held in a 0-d float32 tensor on ``device`` (the fused kernels read a float32 lr),
    kept in the group. ``sync()`` before a step: a group whose lr a scheduler (or ``load_state_dict``) replaced
    by a float or another tensor gets that value written into its tensor (``fill_``: no host sync), and the
    tensor back. A captured step therefore uses the schedule's current lr at every replay."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer = optimizer
        self.tensors = [torch.zeros((), dtype=torch.float32, device=device) for _ in optimizer.param_groups]
        self.sync()

    def sync(self) -> None:
        for group, tensor in zip(self.optimizer.param_groups, self.tensors):
            value = group["lr"]
            if value is tensor:
                continue
            if isinstance(value, torch.Tensor):
                tensor.copy_(value.detach(), non_blocking=True)
            else:
                tensor.fill_(float(value))
            group["lr"] = tensor

    def values(self) -> List[float]:
        """The lr each group's next step will use (reads the device: a sync; for tests and logs)."""
        return [float(t) for t in self.tensors]


def host_key(step: TrainStep):
    """A host value the captured loss reads and that changes between epochs: the criterion's epoch (DKD's
    ramp ``min(epoch / warmup, 1)`` is computed on the host), None for a criterion without one."""
    return getattr(unwrap(step.task.trainable_module).criterion, "epoch", None)


class GraphedTrainStep:
    """A ``TrainStep`` whose whole update (forward, loss, backward, clipping, optimizer step, fp16 scale update)
    replays one CUDA graph after ``warmup`` eager steps (module docstring); ``step(x, y, cached_feat)`` ->
    ``StepOutput`` as ``TrainStep``'s (fresh tensors each call). The step's optimizer must be capture-ready
    (``build_optimizer_options``); its lr moves into ``DeviceLR`` tensors."""

    def __init__(self, step: TrainStep, warmup: int = 3):
        if step.skip_nonfinite or step.sync_loss:
            raise UserError("--cuda-graph: the step reads the loss on the host (--skip-nonfinite), which a CUDA "
                            "graph cannot capture")
        why = not_capture_ready(step.optimizer)
        if why is not None:
            raise ValueError(f"GraphedTrainStep: the optimizer's step cannot be captured: {why}")
        self.step, self.warmup, self.calls = step, max(1, int(warmup)), 0
        prepare_optimizer(step.optimizer)
        self.lr = DeviceLR(step.optimizer, step.device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_in = self.static_out = None
        self.side = None
        self.key = None
        self.captures = 0

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
        """What the graph records: forward, loss, parts, top-1 count, backward (the gradients) and the update."""
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
        self._update()
        return vals, correct, nonfinite

    def _update(self) -> None:
        """TrainStep.backward_and_update without the backward: clipping (clip_grad_norm_ reads nothing on the
        host unless error_if_nonfinite, which stays off), then the fused step; with fp16 the fused step skips
        itself on the device when ``found_inf`` is set, and ``scaler.update`` moves the scale there."""
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
        # The captured backward allocates the static gradients and writes them at every replay.
        self.step.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.static_out = self._captured(*self.static_in)
        except RuntimeError as exc:
            raise UserError(f"--cuda-graph: the step could not be captured ({str(exc).splitlines()[0][:300]}); "
                            f"run without --cuda-graph") from None
        self.captures += 1

    def _release(self) -> None:
        """Drop the graph (its pool, static inputs, outputs and gradients) before a recapture."""
        torch.cuda.synchronize()  # once per change of the host value: the last replay has finished
        self.graph = self.static_in = self.static_out = None
        self.step.optimizer.zero_grad(set_to_none=True)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, cached_feat: Optional[torch.Tensor] = None) -> StepOutput:
        x, y, cached_feat = self._inputs(x, y, cached_feat)
        self.calls += 1
        self.lr.sync()  # the scheduler's latest float, into the tensor the step reads
        if self.graph is None and self.calls <= self.warmup:
            if self.side is None:
                self.side = torch.cuda.Stream(device=x.device)
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_CAPTURABLE_WARNING)  # eager warm-up, by design
                out = self.step(x, y, cached_feat)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        key = host_key(self.step)
        if self.graph is not None and key != self.key:
            self._release()
        if self.graph is None:
            self._capture(x, y, cached_feat)
            self.key = key
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
        vals, correct, nonfinite = self.static_out
        # Fresh tensors: the next replay overwrites the static ones, and the loop keeps these across steps.
        return StepOutput(vals.clone(), correct.clone(), nonfinite.clone())
