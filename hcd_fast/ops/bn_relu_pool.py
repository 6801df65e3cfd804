"""The ``bn_relu_pool`` op: out[b, c] = mean_hw ReLU(BatchNorm2d(x))[b, c], with nn.BatchNorm2d's running-stat update.

Two torch ops per backend (the forward mutates running_mean/running_var, so autograd is one
``torch.autograd.Function`` over the pair, shared by every backend):

bn_relu_pool_fwd: x (B, C, H, W) any strides, weight/bias/running stats (C,) -> out (B, C) in x's dtype,
    save_mean and save_invstd (C,) in ``acc_dtype(x, weight, bias)``: the normalising statistics (batch
    statistics in training, running ones in eval). Training updates running_mean and running_var in place:
    r <- (1 - momentum) r + momentum * s, with the unbiased batch variance, rounded once to their dtype.
bn_relu_pool_bwd: grad_out (B, C), x, weight, bias, save_mean, save_invstd -> grad_x (dense in x's memory
    format, x's dtype), grad_weight, grad_bias (their parameters' dtypes). With xhat = (x - mean) invstd and
    dy = g / HW where weight * xhat + bias > 0:
        grad_bias = sum dy,  grad_weight = sum dy xhat,
        grad_x = weight invstd (dy - grad_bias / N - xhat grad_weight / N)  (training, N = B H W),
        grad_x = weight invstd dy                                             (eval).
"""
from __future__ import annotations

from typing import Callable

import torch

from hcd_fast.ops.library import OpDef, acc_dtype, dense_like

FWD_SCHEMA = ("(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
              "bool training, float momentum, float eps) -> (Tensor out, Tensor save_mean, Tensor save_invstd)")
BWD_SCHEMA = ("(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor save_mean, Tensor save_invstd, "
              "bool training) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)")


def _fwd_fake(x, weight, bias, running_mean, running_var, training, momentum, eps):
    dt = acc_dtype(x.dtype, weight.dtype, bias.dtype)
    channels = x.shape[1]
    return (x.new_empty((x.shape[0], channels)), x.new_empty((channels,), dtype=dt),
            x.new_empty((channels,), dtype=dt))


def _bwd_fake(grad_out, x, weight, bias, save_mean, save_invstd, training):
    return dense_like(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


FWD = OpDef("bn_relu_pool_fwd", FWD_SCHEMA, _fwd_fake)
BWD = OpDef("bn_relu_pool_bwd", BWD_SCHEMA, _bwd_fake)


def bind(fwd, bwd) -> Callable:
    """The public form of a backend's op pair (signature of ``hcd_fast.reference.bn_relu_pool``)."""

    class BNReluPoolFunction(torch.autograd.Function):
        """Autograd over the (bn_relu_pool_fwd, bn_relu_pool_bwd) pair; the backward recomputes the ReLU mask
        from x and the saved statistics instead of storing the normalised map."""

        @staticmethod
        def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
            out, mean, invstd = fwd(x, weight, bias, running_mean, running_var, training, momentum, eps)
            ctx.save_for_backward(x, weight, bias, mean, invstd)
            ctx.training = training
            return out

        @staticmethod
        def backward(ctx, grad_out):
            x, weight, bias, mean, invstd = ctx.saved_tensors
            gx, gw, gb = bwd(grad_out, x, weight, bias, mean, invstd, ctx.training)
            need = ctx.needs_input_grad
            return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None,
                    None, None, None, None, None)

    def bn_relu_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                     running_var: torch.Tensor, training: bool, momentum: float = 0.1,
                     eps: float = 1e-5) -> torch.Tensor:
        return BNReluPoolFunction.apply(x, weight, bias, running_mean, running_var, bool(training),
                                        float(momentum), float(eps))

    return bn_relu_pool
