"""torchrun's process group for hcd-distill: rank and world from the environment, the few collectives the loop
needs, and the device of this rank."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from hcd_fast.distill.errors import UserError


class DistContext:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process when absent."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.owns_group = False
        self.host_group = None  # a gloo group for host-side flags (any_rank), made in init

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        if self.enabled:  # host-side flags (a CPU tensor): no device sync, whatever the backend
            self.host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank: every rank calls this at the same point and gets the same answer
        (one small all-reduce of a CPU tensor over gloo, no device sync), so no rank goes on alone."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

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


def resolve_device(text: Optional[str], ctx: DistContext) -> torch.device:
    """The device of ``--device`` (default: cuda when available); under torchrun, CUDA rank r uses GPU
    LOCAL_RANK. Sets the current CUDA device."""
    text = text or ("cuda" if torch.cuda.is_available() else "cpu")
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
    return device
