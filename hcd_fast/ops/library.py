"""What every op file shares: ``OpDef`` (one schema, fake kernel and autograd, defined once per backend
namespace) and the precision rules.

An op file (``hcd_fast/ops/<op>.py``) builds one ``OpDef`` per torch op. A backend calls
``OpDef.define(namespace, kernel)``: the schema, fake kernel and autograd of the op file are registered under
``<namespace>::<name>`` and ``kernel`` (a Python function) becomes its CPU and CUDA implementation. The C++
backend passes ``kernel=None``: its kernels are registered by ``hcd_fast._C`` (csrc/hcd_fast.cpp,
``TORCH_LIBRARY_IMPL`` only, no schema there).

An op whose backward is a torch op of its own (``sub_logit_loss``: the backward recomputes the gradient from the
inputs and small saved statistics) names that op's ``OpDef`` as ``backward_op``: ``define`` registers both in
the namespace (``backward_kernel`` is the backward op's kernel) and ``backward`` receives the backward op's
OpOverload as its first argument.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional

import torch

# Libraries stay alive as long as the process: dropping a Library object unregisters its ops.
_LIBRARIES: Dict[str, torch.library.Library] = {}


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype every kernel accumulates in: float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(dtype: Optional[torch.dtype], t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """What autocast does to an argument of a linear/conv op: float tensors other than float64 go to its dtype."""
    if dtype is None or t is None or t.dtype == torch.float64 or t.dtype == dtype:
        return t
    return t.to(dtype)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a dense channels_last (B, C, H, W) tensor that is not also contiguous, else contiguous
    (C++: ``x.is_contiguous(ChannelsLast) && !x.is_contiguous()``)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense_like(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An empty tensor of x's shape, dense in ``memory_format(x)`` (channels_last stays channels_last): the
    layout contract of every gradient with respect to a (B, C, H, W) input."""
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=memory_format(x))


class OpDef:
    """One torch op of the project: ``name`` + ``schema`` + ``fake``, and optionally autograd
    (``setup_context``/``backward`` as for ``torch.library.register_autograd``; with ``backward_op``,
    ``backward(backward_op_overload, ctx, *grads)``)."""

    def __init__(self, name: str, schema: str, fake: Callable, setup_context: Optional[Callable] = None,
                 backward: Optional[Callable] = None, backward_op: Optional["OpDef"] = None):
        self.name, self.schema, self.fake = name, schema, fake
        self.setup_context, self.backward, self.backward_op = setup_context, backward, backward_op

    def define(self, namespace: str, kernel: Optional[Callable] = None,
               backward_kernel: Optional[Callable] = None):
        """Register the op (and its ``backward_op``, with ``backward_kernel``) as ``namespace::name`` and
        return the forward's OpOverload."""
        backward = self.backward
        if self.backward_op is not None:
            backward = functools.partial(backward, self.backward_op.define(namespace, backward_kernel))
        lib = _library(namespace)
        qualname = f"{namespace}::{self.name}"
        lib.define(self.name + self.schema)
        torch.library.register_fake(qualname, self.fake, lib=lib)
        if kernel is not None:
            lib.impl(self.name, kernel, "CPU")
            lib.impl(self.name, kernel, "CUDA")
        if backward is not None:
            torch.library.register_autograd(qualname, backward, setup_context=self.setup_context, lib=lib)
        return getattr(getattr(torch.ops, namespace), self.name).default
