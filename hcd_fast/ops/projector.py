"""The projector ops: one SepConv block of a ConvProjector,
    dw3x3(stride 2) -> pw1x1 -> BN -> ReLU -> dw3x3(stride 1) -> pw1x1 -> BN -> ReLU,
as ``projector_dwconv`` (a BatchNorm's apply and ReLU in the depthwise conv's prologue) and ``projector_pwconv``
(the pointwise conv as a GEMM with the next BatchNorm's batch statistics in its epilogue). A block is
dwconv(stride 2) -> pwconv(bn1) -> dwconv(bn1 prologue, stride 1) -> pwconv(bn2); the next block's first dwconv
(or ``bn_relu_pool``) applies bn2. No BatchNorm or ReLU output is ever materialised.

Kernel contracts (every map any strides; outputs dense channels_last; acc = ``acc_dtype`` of the inputs):

projector_dwconv: x (B, C, H, W), weight (C, 1, 3, 3) in x's dtype, scale/shift (P,) in acc with P <= C, or both
    None, stride -> a (B, C, HO, WO) in x's dtype, HO = (H - 1) // stride + 1:
        a = conv3x3(z, weight, stride, padding 1, groups C), z = ReLU(x scale + shift) on the first P channels and
        z = x on the others (without scale: z = x). P < C is a grouped projector block whose input is the
        previous blocks' BN output (P channels) followed by a raw stage map.
projector_dwconv_backward: grad (B, C, HO, WO), x, weight, scale, shift, stride -> grad_x (dense in x's memory
    format), grad_weight (weight's dtype), grad_scale, grad_shift ((P,) in scale's dtype; (0,) without scale):
        gz = conv_transpose(grad), m = [x scale + shift > 0] (1 on the raw channels), grad_x = scale m gz
        (gz on the raw channels), grad_scale = sum m gz x, grad_shift = sum m gz,
        grad_weight[c, k] = sum_o grad[o] z[o s - 1 + k].
projector_pwconv (mutates running_mean, running_var, num_batches_tracked): a (B, C_in, H, W), weight
    (C_out, C_in / groups) in a's dtype (a grouped 1x1 conv's: group g maps input channels [g C_in / groups, ...)
    to output channels [g C_out / groups, ...); groups = 1 is the plain conv), bn_weight/bn_bias/running stats (C_out,), num_batches_tracked (0-d int64; training
    adds 1 on the device, before the running-statistics update, as nn.BatchNorm2d does),
    training, momentum, cumulative, eps, groups -> y (B, C_out, H, W) in a's dtype, scale, shift, save_mean,
    save_invstd (C_out,) in acc:
        y = conv1x1(a, weight, groups); the BatchNorm is per output channel, as for groups = 1; training: mean/var = the batch mean and biased variance of y (as rounded to its
        dtype), r <- (1 - f) r + f s with the unbiased variance, f = momentum, or 1 / num_batches_tracked (after
        the count) when cumulative (nn.BatchNorm2d's momentum=None); eval: mean/var = the running statistics;
        save_invstd = 1 / sqrt(var + eps), scale = bn_weight save_invstd, shift = bn_bias - mean scale.
projector_pwconv_backward: grad_y, grad_scale, grad_shift, a, weight, y, bn_weight, save_mean, save_invstd,
    training, groups -> grad_a (dense in a's memory format), grad_weight, grad_bn_weight, grad_bn_bias:
        grad_bn_bias = grad_shift, grad_bn_weight = invstd (grad_scale - grad_shift mean);
        training: g' = grad_y + d mean / N + 2 d var (y - mean) / N with d mean = -grad_shift scale,
        d var = -1/2 bn_weight (grad_scale - grad_shift mean) invstd^3 (N = B H W); eval: g' = grad_y;
        grad_a = conv1x1(g', weight^T), grad_weight = sum over positions of g' a^T (per group).

``projector_dwconv`` has a backward op (``register_autograd``); ``projector_pwconv`` mutates the running
statistics, so its autograd is one ``torch.autograd.Function`` over the (forward, backward) pair, shared by every
backend (as ``bn_relu_pool``). Precision policy: as ``F.conv2d`` under autocast, the map and the conv weights go
to the autocast dtype; the conv weights are cast to the map's dtype (a differentiable cast), the BatchNorm
parameters and statistics stay in their own dtypes (fp32 accumulation; fp64 for fp64).

``bind`` returns the public pair (signatures of ``hcd_fast.reference.projector_dwconv`` / ``projector_pwconv``);
the public ``projector_pwconv`` passes ``momentum=None`` as the cumulative average and refuses training on one
value per channel (nn.BatchNorm2d's ValueError).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from hcd_fast.ops.library import OpDef, acc_dtype, autocast_cast, autocast_dtype, dense_like

DWCONV_SCHEMA = "(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int stride) -> Tensor"
DWCONV_BWD_SCHEMA = ("(Tensor grad, Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int stride) -> "
                     "(Tensor grad_x, Tensor grad_weight, Tensor grad_scale, Tensor grad_shift)")
PWCONV_SCHEMA = ("(Tensor a, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor(a!) running_mean, "
                 "Tensor(b!) running_var, Tensor(c!) num_batches_tracked, bool training, float momentum, "
                 "bool cumulative, float eps, int groups) -> (Tensor y, Tensor scale, Tensor shift, Tensor save_mean, Tensor save_invstd)")
PWCONV_BWD_SCHEMA = ("(Tensor grad_y, Tensor grad_scale, Tensor grad_shift, Tensor a, Tensor weight, Tensor y, "
                     "Tensor bn_weight, Tensor save_mean, Tensor save_invstd, bool training, int groups) -> "
                     "(Tensor grad_a, Tensor grad_weight, Tensor grad_bn_weight, Tensor grad_bn_bias)")


def out_size(size: int, stride: int) -> int:
    """Output size of a 3x3 conv with padding 1."""
    return (size - 1) // stride + 1


def _dw_fake(x, weight, scale, shift, stride):
    batch, channels, height, width = x.shape
    return torch.empty((batch, channels, out_size(height, stride), out_size(width, stride)), dtype=x.dtype,
                       device=x.device, memory_format=torch.channels_last)


def _dw_bwd_fake(grad, x, weight, scale, shift, stride):
    n = scale.shape[0] if scale is not None else 0
    dt = scale.dtype if scale is not None else acc_dtype(x.dtype)
    return (dense_like(x), weight.new_empty(weight.shape), x.new_empty((n,), dtype=dt), x.new_empty((n,), dtype=dt))


def _dw_setup_context(ctx, inputs, output):
    x, weight, scale, shift, stride = inputs
    ctx.save_for_backward(x, weight, scale, shift)
    ctx.stride = stride


def _dw_backward(backward_op, ctx, grad):
    x, weight, scale, shift = ctx.saved_tensors
    gx, gw, gs, gh = backward_op(grad, x, weight, scale, shift, ctx.stride)
    need = ctx.needs_input_grad
    has = scale is not None
    return (gx if need[0] else None, gw if need[1] else None, gs if has and need[2] else None,
            gh if has and need[3] else None, None)


def _pw_fake(a, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum,
             cumulative, eps, groups):
    batch, _, height, width = a.shape
    c_out = weight.shape[0]
    dt = acc_dtype(a.dtype, bn_weight.dtype)
    y = torch.empty((batch, c_out, height, width), dtype=a.dtype, device=a.device,
                    memory_format=torch.channels_last)
    return (y,) + tuple(a.new_empty((c_out,), dtype=dt) for _ in range(4))


def _pw_bwd_fake(grad_y, grad_scale, grad_shift, a, weight, y, bn_weight, save_mean, save_invstd, training,
                 groups):
    return dense_like(a), weight.new_empty(weight.shape), bn_weight.new_empty(bn_weight.shape), \
        bn_weight.new_empty(bn_weight.shape)


DWCONV_BACKWARD = OpDef("projector_dwconv_backward", DWCONV_BWD_SCHEMA, _dw_bwd_fake)
DWCONV = OpDef("projector_dwconv", DWCONV_SCHEMA, _dw_fake, _dw_setup_context, _dw_backward,
               backward_op=DWCONV_BACKWARD)
PWCONV = OpDef("projector_pwconv", PWCONV_SCHEMA, _pw_fake)
PWCONV_BACKWARD = OpDef("projector_pwconv_backward", PWCONV_BWD_SCHEMA, _pw_bwd_fake)


def bind(dwconv, pwconv, pwconv_backward) -> Tuple[Callable, Callable]:
    """The public ``(projector_dwconv, projector_pwconv)`` of a backend's torch ops."""

    class ProjectorPwconvFunction(torch.autograd.Function):
        """Autograd over (projector_pwconv, projector_pwconv_backward): saves a, y and the per-channel statistics;
        the backward recomputes the batch-statistics gradient from y inside its GEMMs."""

        @staticmethod
        def forward(ctx, a, weight, bn_weight, bn_bias, running_mean, running_var, nbt, training, momentum,
                    cumulative, eps, groups):
            y, scale, shift, mean, invstd = pwconv(a, weight, bn_weight, bn_bias, running_mean, running_var, nbt,
                                                   training, momentum, cumulative, eps, groups)
            ctx.save_for_backward(a, weight, y, bn_weight, mean, invstd)
            ctx.training, ctx.groups = training, groups
            return y, scale, shift

        @staticmethod
        def backward(ctx, grad_y, grad_scale, grad_shift):
            a, weight, y, bn_weight, mean, invstd = ctx.saved_tensors
            ga, gw, gbw, gbb = pwconv_backward(grad_y, grad_scale, grad_shift, a, weight, y, bn_weight, mean,
                                               invstd, ctx.training, ctx.groups)
            need = ctx.needs_input_grad
            return (ga if need[0] else None, gw if need[1] else None, gbw if need[2] else None,
                    gbb if need[3] else None) + (None,) * 8

    def projector_dwconv(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None,
                         shift: Optional[torch.Tensor] = None, stride: int = 1) -> torch.Tensor:
        x = autocast_cast(autocast_dtype(x.device.type), x)
        return dwconv(x, weight.to(x.dtype), scale, shift, int(stride))

    def projector_pwconv(a: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                         running_mean: torch.Tensor, running_var: torch.Tensor, num_batches_tracked: torch.Tensor,
                         training: bool, momentum: Optional[float] = 0.1, eps: float = 1e-5, groups: int = 1
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = autocast_cast(autocast_dtype(a.device.type), a)
        groups = int(groups)
        if groups < 1 or weight.shape[0] % groups or weight.shape[1] * groups != a.shape[1]:
            raise ValueError(f"groups: expected a divisor of the {a.shape[1]} input and {weight.shape[0]} output "
                             f"channels with weight (C_out, C_in / groups), got groups={groups} and weight "
                             f"{tuple(weight.shape)}")
        if training and a.shape[0] * a.shape[2] * a.shape[3] <= 1:
            # nn.BatchNorm2d's own error: the unbiased variance of one value is undefined.
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(a.shape)}")
        cumulative = momentum is None
        return ProjectorPwconvFunction.apply(a, weight.flatten(1).to(a.dtype), bn_weight, bn_bias, running_mean,
                                             running_var, num_batches_tracked, bool(training),
                                             0.0 if cumulative else float(momentum), cumulative, float(eps),
                                             groups)

    return projector_dwconv, projector_pwconv
