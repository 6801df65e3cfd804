"""How each provider runs the head case: one forward + backward of the whole ``HCDLoss`` per call.

The inputs are what hcd-distill feeds the head: the student's stage maps and logits in the case dtype (the
output dtype of the student's layers under autocast), in channels_last on CUDA (``--channels-last auto``,
which converts the head's conv weights too);
f_t and z_t in fp32 on CUDA under bf16 (the teacher's bf16 weights return fp32, ``teacher_speed``), else in
the case dtype. Low precision = autocast over fp32 parameters, as in mixed-precision training.

Providers (``benchmarks/providers.py``): ``eager`` (reference backend), ``compile`` and ``compile-ro``
(``torch.compile`` of the reference head, default and reduce-overhead mode), a backend name,
``<backend>+compile`` (``torch.compile`` over ``HCDLoss`` with that backend inside) and ``<backend>+graph``
(forward + backward captured in one CUDA graph after warm-up; each call copies new inputs into the static
buffers and replays it). Every provider gets the same parameters (``load_state_dict``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, List

import torch

from benchmarks.cases import Case, stage_maps
from benchmarks.ops import Inputs, leaf
from benchmarks.providers import split
from hcd_fast import HCDConfig, HCDLoss

RESNET18_CHANNELS = (64, 128, 256, 512)
GRAPH_WARMUP = 3  # eager calls on a side stream before capture (Triton JIT, cuBLASLt heuristics, BN buffers)


class HeadRunner(Inputs):
    """The head case's inputs and parameters, and one fwd+bwd callable per provider."""

    def __init__(self, case: Case, device: torch.device, seed: int = 0):
        super().__init__(case, device, seed)
        s = case.shape
        self.channels = tuple(c * s.get("channels", 64) // 64 for c in RESNET18_CHANNELS)
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=self.g)))
        self.config = HCDConfig(num_sub_logits=s["n"])
        self.ref_head = self.make_head("reference")
        self.channels_last = device.type == "cuda"
        self.teacher_dtype = torch.float32 if device.type == "cuda" and self.dtype == torch.bfloat16 else self.dtype
        self.inputs = self.new_inputs()
        self.feats, self.zs, self.ft, self.zt, self.y = self.inputs
        self.leaves = [*self.feats, self.zs]

    def describe_inputs(self) -> str:
        layout = "channels_last" if self.channels_last else "contiguous"
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return (f"stage maps {name[self.dtype]} {layout}, z_s {name[self.dtype]}, "
                f"f_t/z_t {name[self.teacher_dtype]}")

    def new_inputs(self) -> list:
        """[stage maps (leaves), z_s (leaf), f_t, z_t, y] as hcd-distill feeds them (module docstring)."""
        s = self.case.shape
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        feats = [leaf(self.randn(s["B"], c, m, m).contiguous(memory_format=fmt), True)
                 for c, m in zip(self.channels, stage_maps(s["img"]))]
        zs = leaf(self.randn(s["B"], s["K"], scale=3.0), True)
        ft = self.randn(s["B"], s["Dt"], dtype=self.teacher_dtype)
        zt = self.randn(s["B"], s["K"], scale=3.0, dtype=self.teacher_dtype)
        return [feats, zs, ft, zt, self.targets(s["B"], s["K"])]

    def make_head(self, backend: str) -> HCDLoss:
        s = self.case.shape
        # validate=False: reading the targets is a host sync and a graph break under torch.compile; it is
        # the same cost for every provider, so it is left out of all of them.
        head = HCDLoss(self.channels, s["Dt"], s["K"], config=self.config, backend=backend,
                       validate=False).to(self.device)
        if self.device.type == "cuda":  # hcd-distill converts the whole Distiller, head included
            head = head.to(memory_format=torch.channels_last)
        if hasattr(self, "ref_head"):
            head.load_state_dict(self.ref_head.state_dict())
        return head.train()

    def autocast(self, cache: bool = True):
        """Autocast to the case dtype (none for fp32). ``cache=False`` for a CUDA-graph capture, which must
        not keep weight casts made outside it (PyTorch's CUDA-graph notes)."""
        if self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=cache)
        return contextlib.nullcontext()

    def fn(self, provider: str) -> Callable[[], torch.Tensor]:
        """One fwd+bwd of the head by ``provider``; returns the loss."""
        base, suffix = split(provider)
        if suffix == "+graph":
            return self._graph_fn(self.make_head(base))
        if provider == "eager":
            head = call = self.ref_head
        elif provider in ("compile", "compile-ro"):
            head = self.make_head("reference")
            call = torch.compile(head, mode="reduce-overhead" if provider == "compile-ro" else None)
        else:
            head = self.make_head(base)
            call = torch.compile(head) if suffix == "+compile" else head
        params = list(head.parameters())
        mark_step = provider == "compile-ro"

        def run():
            if mark_step:  # a new iteration for CUDA-graph trees (no output of the last replay is kept)
                torch.compiler.cudagraph_mark_step_begin()
            for t in self.leaves + params:
                t.grad = None
            with self.autocast():
                loss = call(self.feats, self.zs, self.ft, self.zt, self.y)
            loss.backward()
            return loss
        return run

    def _graph_fn(self, head: HCDLoss) -> Callable[[], torch.Tensor]:
        """Capture one fwd+bwd of ``head`` on static inputs in a CUDA graph (PyTorch's whole-network
        capture recipe: warm-up on a side stream, gradients set to None so backward allocates them in the
        graph's pool); each call copies this case's inputs into the static ones and replays it."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        static = self.new_inputs()
        feats, zs, ft, zt, y = static
        leaves: List[torch.Tensor] = [*feats, zs] + list(head.parameters())

        def fwd_bwd():
            with self.autocast(cache=False):
                loss = head(feats, zs, ft, zt, y)
            loss.backward()
            return loss
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):
                for t in leaves:
                    t.grad = None
                fwd_bwd()
        torch.cuda.current_stream().wait_stream(side)
        for t in leaves:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = fwd_bwd()
        sources = [*self.feats, self.zs, self.ft, self.zt, self.y]
        targets = [*feats, zs, ft, zt, y]

        def run():
            with torch.no_grad():
                for dst, src in zip(targets, sources):
                    dst.copy_(src)
            graph.replay()
            return static_loss
        return run
