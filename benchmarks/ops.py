"""How each provider runs a case of the four fused ops: one forward + backward per call.

- ``eager``: ``hcd_fast.functional.<op>(..., backend="reference")``
- ``compile``: ``torch.compile(hcd_fast.reference.<op>)``, compiled once per case (``dynamic=True`` once for
  the whole batch sweep)
- a fused backend name: the public API with ``backend=name``.

Every provider of a case sees the same inputs. The head case is ``benchmarks/head.py``'s. A ``fwd`` case
(sub_logit_loss's forward alone) calls the forward under ``torch.no_grad()``: no graph, no backward.
"""
from __future__ import annotations

from typing import Callable

import torch

from benchmarks.cases import DTYPES, Case
from hcd_fast import HCDConfig
from hcd_fast import functional as HF
from hcd_fast import reference as R


def make_runner(case: Case, device: torch.device, seed: int = 0):
    """The runner of ``case``: ``OpRunner`` for the four ops, ``head.HeadRunner`` for the head."""
    if case.op == "head":
        from benchmarks.head import HeadRunner
        return HeadRunner(case, device, seed)
    return OpRunner(case, device, seed)


def leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


class Inputs:
    """Seeded random tensors on a device, in the case's dtype unless told."""

    def __init__(self, case: Case, device: torch.device, seed: int):
        self.case, self.device = case, device
        self.dtype = DTYPES[case.dtype]
        self.g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(self, *shape, scale: float = 1.0, dtype=None) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.g) * scale
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def targets(self, batch: int, classes: int) -> torch.Tensor:
        return torch.randint(0, classes, (batch,), generator=self.g).to(self.device)


class OpRunner(Inputs):
    """Builds an op case's inputs once and hands out one fwd+bwd callable per provider."""

    def __init__(self, case: Case, device: torch.device, seed: int = 0):
        super().__init__(case, device, seed)
        getattr(self, f"_build_{case.op}")()

    def _build_sub_logit_loss(self) -> None:
        s = self.case.shape
        self.config = HCDConfig(num_sub_logits=s["n"])
        self.zf = leaf(self.randn(s["S"], s["B"], s["n"], s["K"], scale=3.0), True)
        self.zs = leaf(self.randn(s["B"], s["K"], scale=3.0), True)
        self.zt = self.randn(s["B"], s["K"], scale=3.0)
        self.y = self.targets(s["B"], s["K"])
        self.leaves = [self.zf, self.zs]

    def _build_bn_relu_pool(self) -> None:
        s = self.case.shape
        c = s["C"]
        self.x = leaf(self.randn(s["B"], c, s["H"], s["W"]), True)
        self.weight = leaf(1 + 0.1 * self.randn(c), True)
        self.bias = leaf(0.1 * self.randn(c), True)
        self.running_mean = torch.zeros(c, device=self.device, dtype=self.dtype)
        self.running_var = torch.ones(c, device=self.device, dtype=self.dtype)
        self.grad_out = self.randn(s["B"], c)
        self.leaves = [self.x, self.weight, self.bias]

    def _build_pool_linear(self) -> None:
        s = self.case.shape
        self.x = leaf(self.randn(s["B"], s["C"], s["H"], s["W"]), True)
        self.weight = leaf(self.randn(s["D"], s["C"], scale=s["C"] ** -0.5), True)
        self.bias = leaf(0.1 * self.randn(s["D"]), True)
        self.grad_out = self.randn(s["B"], s["D"])
        self.leaves = [self.x, self.weight, self.bias]

    def _build_cfm(self) -> None:
        s = self.case.shape
        d_in, h, out = s["D"] + s["Dt"], s["hidden"], s["n"] * s["K"]
        self.h = leaf(self.randn(s["B"], s["D"]), True)
        self.ft = self.randn(s["B"], s["Dt"])
        self.w1 = leaf(self.randn(h, d_in, scale=d_in ** -0.5), True)
        self.b1 = leaf(0.1 * self.randn(h), True)
        self.w2 = leaf(self.randn(out, h, scale=h ** -0.5), True)
        self.b2 = leaf(0.1 * self.randn(out), True)
        self.zt = self.randn(s["B"], s["K"], scale=3.0)
        self.grad_out = self.randn(s["B"], s["n"], s["K"])
        self.leaves = [self.h, self.w1, self.b1, self.w2, self.b2]

    def _call(self, impl, kw: dict):
        """One forward of the op with ``impl`` and its keyword arguments; returns (output, grad_output)."""
        op = self.case.op
        if op == "sub_logit_loss":
            return impl(self.zf, self.zs, self.zt, self.y, self.config, **kw)[0], None
        if op == "bn_relu_pool":
            return impl(self.x, self.weight, self.bias, self.running_mean, self.running_var, True, 0.1, 1e-5,
                        **kw), self.grad_out
        if op == "pool_linear":
            return impl(self.x, self.weight, self.bias, **kw), self.grad_out
        if op == "cfm":
            return impl(self.h, self.ft, self.w1, self.b1, self.w2, self.b2, self.zt, self.case.shape["n"], 1.0,
                        1.0, **kw), self.grad_out
        raise ValueError(f"unknown op {op!r}")

    def fn(self, provider: str) -> Callable[[], torch.Tensor]:
        """One fwd+bwd (a ``fwd`` case: one forward) of the case by ``provider`` (eager, compile or a backend
        name); returns the output."""
        if provider == "compile":
            impl, kw = torch.compile(getattr(R, self.case.op), dynamic=bool(self.case.dynamic)), {}
        else:
            impl = getattr(HF, self.case.op)
            kw = {"backend": "reference" if provider == "eager" else provider}
            if self.case.op == "sub_logit_loss":
                kw["validate"] = False  # reading targets is a host sync; left out of every provider

        if self.case.mode == "fwd":
            def forward():
                with torch.no_grad():
                    return self._call(impl, kw)[0]
            return forward

        def run():
            for t in self.leaves:
                t.grad = None
            out, grad_out = self._call(impl, kw)
            out.backward(grad_out)
            return out
        return run
