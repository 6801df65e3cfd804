"""The ``pool_linear`` op: out = W mean_hw(x) + b, the exact form of GAP(conv1x1(x) + b) (both maps are linear).

Kernel contract: x (B, C, H, W) any strides, weight (D, C), bias (D,) -> (out (B, D) in x's dtype,
pooled (B, C) = mean_hw x in ``acc_dtype(x, weight, bias)``). pooled is saved for the backward:
    dx = (g W) / HW broadcast over (h, w),  dW = g^T pooled,  db = sum_b g.
Under autocast the arguments are cast to its dtype first, as ``F.conv2d`` is by the reference.
"""
from __future__ import annotations

from typing import Callable

import torch

from hcd_fast.ops.library import OpDef, acc_dtype, autocast_cast, autocast_dtype

SCHEMA = "(Tensor x, Tensor weight, Tensor bias) -> (Tensor out, Tensor pooled)"


def _fake(x, weight, bias):
    dt = acc_dtype(x.dtype, weight.dtype, bias.dtype)
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], x.shape[1]), dtype=dt)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(weight, output[1])
    ctx.x_shape = x.shape
    ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)


def _backward(ctx, grad_out, grad_pooled):
    weight, pooled = ctx.saved_tensors
    g = grad_out.to(pooled.dtype)
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        batch, channels, height, width = ctx.x_shape
        gx = (g @ weight.to(pooled.dtype)).div_(height * width).to(ctx.dtypes[0])
        gx = gx[:, :, None, None].expand(batch, channels, height, width)
    if ctx.needs_input_grad[1]:
        gw = (g.t() @ pooled).to(ctx.dtypes[1])
    if ctx.needs_input_grad[2]:
        gb = g.sum(0).to(ctx.dtypes[2])
    return gx, gw, gb


OP = OpDef("pool_linear", SCHEMA, _fake, _setup_context, _backward)


def bind(op) -> Callable:
    """The public form of a backend's ``pool_linear`` torch op: x (B, C, H, W), W (D, C), b (D,) -> (B, D)."""

    def pool_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        cast = autocast_dtype(x.device.type)
        if cast is not None:
            x, weight, bias = autocast_cast(cast, x), autocast_cast(cast, weight), autocast_cast(cast, bias)
        return op(x, weight, bias)[0]

    return pool_linear
