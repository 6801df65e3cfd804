"""Triton kernels of ``bn_relu_pool`` and ``pool_linear``: spatial reductions that never materialise a map.

bn_relu_pool: out[b, c] = mean_hw relu(x[b, c, h, w] * scale_c + shift_c), scale = w * rstd,
shift = bias - mean * scale. Training mode uses batch statistics (biased variance to normalise,
unbiased for the running_var update, like nn.BatchNorm2d); eval mode uses the running statistics.
Statistics are a two-level deterministic reduction: per-(b, c) row mean and M2 (sum of squared
deviations), then per channel Chan's combination
    mean = mean_b(mean_bc),  M2 = sum_b M2_bc + HW * sum_b (mean_bc - mean)^2,
which avoids the cancellation of E[x^2] - E[x]^2.

Backward recomputes the mask instead of storing the map: with dy = g[b, c] / HW * [x * scale + shift > 0]
and xhat = (x - mean) * rstd,
    d bias = sum dy,  d weight = sum dy * xhat,
    dx = w rstd (dy - d_bias / N - xhat d_weight / N)   (training; N = B*H*W)
    dx = w rstd dy                                        (eval: the statistics are constants).

pool_linear: W @ mean_hw(x) + b; the mean is the row-mean kernel below, the small GEMM is torch's (its
backward is torch ops, hcd_fast/ops/pool_linear.py).

Every kernel takes x through its four strides, so channels_last and sliced inputs need no copy. A compiled
kernel takes a Python float as an fp32 parameter, so with fp64 accumulation momentum and eps are read from an
fp64 tensor instead (kernels/__init__.py: fp64_scalars).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hcd_fast.kernels import fp64_scalars


@triton.jit
def _tile_offsets(c, hw, W, stride_c, stride_h, stride_w):
    """Element offsets of a (BLOCK_C, BLOCK_HW) tile of one sample's (C, H, W) map."""
    return c[:, None] * stride_c + (hw // W)[None, :] * stride_h + (hw % W)[None, :] * stride_w


@triton.jit
def row_stats_kernel(
    x_ptr, mean_ptr, m2_ptr,
    C, HW, W,
    stride_xb, stride_xc, stride_xh, stride_xw,
    COMPUTE_M2: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Grid (B, cdiv(C, BLOCK_C)): mean[b, c] = mean_hw x and (optionally) M2[b, c] = sum_hw (x - mean)^2,
    two passes over the row (the second one hits the cache)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    offs = tl.arange(0, BLOCK_HW)
    base = x_ptr + b * stride_xb
    acc = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for h0 in range(0, HW, BLOCK_HW):
        hw = h0 + offs
        m = c_ok[:, None] & (hw < HW)[None, :]
        acc += tl.load(base + _tile_offsets(c, hw, W, stride_xc, stride_xh, stride_xw), mask=m, other=0.0).to(ACC)
    mean = tl.sum(acc, 1) / HW
    tl.store(mean_ptr + b * C + c, mean, mask=c_ok)
    if COMPUTE_M2:
        acc = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
        for h0 in range(0, HW, BLOCK_HW):
            hw = h0 + offs
            m = c_ok[:, None] & (hw < HW)[None, :]
            x = tl.load(base + _tile_offsets(c, hw, W, stride_xc, stride_xh, stride_xw), mask=m, other=0.0).to(ACC)
            d = tl.where(m, x - mean[:, None], 0.0)
            acc += d * d
        tl.store(m2_ptr + b * C + c, tl.sum(acc, 1), mask=c_ok)


@triton.jit
def bn_stats_kernel(
    mean_ptr, m2_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
    save_mean_ptr, save_rstd_ptr, scale_ptr, shift_ptr,
    B, C, HW,
    momentum, eps, scalars_ptr,
    SCALARS_FP64: tl.constexpr, TRAINING: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid cdiv(C, BLOCK_C): per-channel statistics (Chan's combination of the row partials in a fixed
    order), the running-stat update (training), and scale/shift of the normalisation."""
    if SCALARS_FP64:  # exact fp64 momentum and eps (a float parameter is fp32)
        momentum = tl.load(scalars_ptr)
        eps = tl.load(scalars_ptr + 1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    offs_b = tl.arange(0, BLOCK_B)
    if TRAINING:
        acc = tl.zeros([BLOCK_B, BLOCK_C], ACC)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b
            m = (rows < B)[:, None] & c_ok[None, :]
            acc += tl.load(mean_ptr + rows[:, None] * C + c[None, :], mask=m, other=0.0)
        mean = tl.sum(acc, 0) / B
        acc = tl.zeros([BLOCK_B, BLOCK_C], ACC)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b
            m = (rows < B)[:, None] & c_ok[None, :]
            mb = tl.load(mean_ptr + rows[:, None] * C + c[None, :], mask=m, other=0.0)
            m2b = tl.load(m2_ptr + rows[:, None] * C + c[None, :], mask=m, other=0.0)
            d = tl.where(m, mb - mean[None, :], 0.0)
            acc += m2b + HW * d * d
        m2 = tl.sum(acc, 0)
        n = B * HW
        var = m2 / n
        rm = tl.load(running_mean_ptr + c, mask=c_ok, other=0.0)
        rv = tl.load(running_var_ptr + c, mask=c_ok, other=0.0)
        new_rm = (1.0 - momentum) * rm.to(ACC) + momentum * mean
        new_rv = (1.0 - momentum) * rv.to(ACC) + momentum * (m2 / (n - 1))
        tl.store(running_mean_ptr + c, new_rm.to(rm.dtype), mask=c_ok)
        tl.store(running_var_ptr + c, new_rv.to(rv.dtype), mask=c_ok)
    else:
        mean = tl.load(running_mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
        var = tl.load(running_var_ptr + c, mask=c_ok, other=1.0).to(ACC)
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(ACC)
    bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(ACC)
    scale = w * rstd
    tl.store(save_mean_ptr + c, mean, mask=c_ok)
    tl.store(save_rstd_ptr + c, rstd, mask=c_ok)
    tl.store(scale_ptr + c, scale, mask=c_ok)
    tl.store(shift_ptr + c, bias - mean * scale, mask=c_ok)


@triton.jit
def bn_relu_pool_fwd_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr,
    C, HW, W,
    stride_xb, stride_xc, stride_xh, stride_xw,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Grid (B, cdiv(C, BLOCK_C)): out[b, c] = mean_hw relu(x * scale_c + shift_c); out is (B, C)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    offs = tl.arange(0, BLOCK_HW)
    scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
    base = x_ptr + b * stride_xb
    acc = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for h0 in range(0, HW, BLOCK_HW):
        hw = h0 + offs
        m = c_ok[:, None] & (hw < HW)[None, :]
        x = tl.load(base + _tile_offsets(c, hw, W, stride_xc, stride_xh, stride_xw), mask=m, other=0.0).to(ACC)
        acc += tl.where(m, tl.maximum(x * scale[:, None] + shift[:, None], 0.0), 0.0)
    out = tl.sum(acc, 1) / HW
    tl.store(out_ptr + b * C + c, out.to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def bn_relu_pool_bwd_partial_kernel(
    x_ptr, grad_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, pdb_ptr, pdw_ptr,
    C, HW, W,
    stride_xb, stride_xc, stride_xh, stride_xw, stride_gb, stride_gc,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Grid (B, cdiv(C, BLOCK_C)): per-row partials of d bias = sum dy and d weight = sum dy * xhat,
    with dy = g / HW on the positive part of the (recomputed) BN output."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    offs = tl.arange(0, BLOCK_HW)
    scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=c_ok, other=0.0)
    g = tl.load(grad_ptr + b * stride_gb + c * stride_gc, mask=c_ok, other=0.0).to(ACC) / HW
    base = x_ptr + b * stride_xb
    cnt = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    sxh = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
    for h0 in range(0, HW, BLOCK_HW):
        hw = h0 + offs
        m = c_ok[:, None] & (hw < HW)[None, :]
        x = tl.load(base + _tile_offsets(c, hw, W, stride_xc, stride_xh, stride_xw), mask=m, other=0.0).to(ACC)
        pos = m & (x * scale[:, None] + shift[:, None] > 0.0)
        cnt += tl.where(pos, 1.0, 0.0)
        sxh += tl.where(pos, (x - mean[:, None]) * rstd[:, None], 0.0)
    tl.store(pdb_ptr + b * C + c, g * tl.sum(cnt, 1), mask=c_ok)
    tl.store(pdw_ptr + b * C + c, g * tl.sum(sxh, 1), mask=c_ok)


@triton.jit
def bn_relu_pool_bwd_reduce_kernel(
    pdb_ptr, pdw_ptr, weight_ptr, rstd_ptr, dweight_ptr, dbias_ptr, coef_ptr,
    B, C, HW,
    TRAINING: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid cdiv(C, BLOCK_C): d weight, d bias (sums over b in a fixed order) and the per-channel
    coefficients of dx = k1 * dy - k2 - k3 * xhat, stored as coef[0:3, c]."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    offs_b = tl.arange(0, BLOCK_B)
    adb = tl.zeros([BLOCK_B, BLOCK_C], ACC)
    adw = tl.zeros([BLOCK_B, BLOCK_C], ACC)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + offs_b
        m = (rows < B)[:, None] & c_ok[None, :]
        adb += tl.load(pdb_ptr + rows[:, None] * C + c[None, :], mask=m, other=0.0)
        adw += tl.load(pdw_ptr + rows[:, None] * C + c[None, :], mask=m, other=0.0)
    db = tl.sum(adb, 0)
    dw = tl.sum(adw, 0)
    tl.store(dbias_ptr + c, db.to(dbias_ptr.dtype.element_ty), mask=c_ok)
    tl.store(dweight_ptr + c, dw.to(dweight_ptr.dtype.element_ty), mask=c_ok)
    k1 = tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(ACC) * tl.load(rstd_ptr + c, mask=c_ok, other=0.0)
    if TRAINING:
        n = B * HW
        k2 = k1 * db / n
        k3 = k1 * dw / n
    else:
        k2 = tl.zeros([BLOCK_C], ACC)
        k3 = tl.zeros([BLOCK_C], ACC)
    tl.store(coef_ptr + c, k1, mask=c_ok)
    tl.store(coef_ptr + C + c, k2, mask=c_ok)
    tl.store(coef_ptr + 2 * C + c, k3, mask=c_ok)


@triton.jit
def bn_relu_pool_bwd_dx_kernel(
    x_ptr, grad_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, coef_ptr, dx_ptr,
    C, HW, W,
    stride_xb, stride_xc, stride_xh, stride_xw, stride_gb, stride_gc,
    stride_db, stride_dc, stride_dh, stride_dw,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Grid (B, cdiv(C, BLOCK_C)): dx = k1 * dy - k2 - k3 * xhat, dy recomputed from x."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    offs = tl.arange(0, BLOCK_HW)
    scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=c_ok, other=0.0)
    k1 = tl.load(coef_ptr + c, mask=c_ok, other=0.0)
    k2 = tl.load(coef_ptr + C + c, mask=c_ok, other=0.0)
    k3 = tl.load(coef_ptr + 2 * C + c, mask=c_ok, other=0.0)
    g = tl.load(grad_ptr + b * stride_gb + c * stride_gc, mask=c_ok, other=0.0).to(ACC) / HW
    base = x_ptr + b * stride_xb
    dbase = dx_ptr + b * stride_db
    for h0 in range(0, HW, BLOCK_HW):
        hw = h0 + offs
        m = c_ok[:, None] & (hw < HW)[None, :]
        x = tl.load(base + _tile_offsets(c, hw, W, stride_xc, stride_xh, stride_xw), mask=m, other=0.0).to(ACC)
        dy = tl.where(x * scale[:, None] + shift[:, None] > 0.0, g[:, None], 0.0)
        dx = k1[:, None] * dy - k2[:, None] - k3[:, None] * ((x - mean[:, None]) * rstd[:, None])
        tl.store(dbase + _tile_offsets(c, hw, W, stride_dc, stride_dh, stride_dw),
                 dx.to(dx_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------ launchers
def _blocks(channels: int, hw: int, block_hw=None):
    """(BLOCK_C, BLOCK_HW): up to 512 spatial positions per tile, 2048 elements per tile in all."""
    if block_hw is None:
        block_hw = min(triton.next_power_of_2(hw), 512)
    block_c = min(triton.next_power_of_2(channels), max(1, 2048 // block_hw))
    return block_c, block_hw


def _reduce_blocks(batch: int, channels: int):
    """(BLOCK_B, BLOCK_C) of the per-channel reductions over the batch."""
    block_c = min(triton.next_power_of_2(channels), 64)
    return min(triton.next_power_of_2(batch), 32), block_c


def _acc(dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def spatial_mean(x: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """x (B, C, H, W), any strides -> mean over (H, W), (B, C) in acc_dtype (float32 or float64)."""
    batch, channels, height, width = x.shape
    acc, _ = _acc(acc_dtype)
    mean = torch.empty((batch, channels), device=x.device, dtype=acc_dtype)
    if mean.numel() == 0:
        return mean
    block_c, block_hw = _blocks(channels, height * width)
    row_stats_kernel[(batch, triton.cdiv(channels, block_c))](
        x, mean, mean, channels, height * width, width, *x.stride(),
        COMPUTE_M2=False, ACC=acc, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=4)
    return mean


def bn_relu_pool_forward(x, weight, bias, running_mean, running_var, training: bool, momentum: float,
                         eps: float):
    """x (B, C, H, W); weight, bias, running stats (C,). Updates the running stats in place (training).

    Returns out (B, C) in x's dtype, save_mean and save_invstd (C,) in fp32 (fp64 if x, weight or bias is)."""
    batch, channels, height, width = x.shape
    hw = height * width
    acc, acc_dtype = _acc(torch.float64 if torch.float64 in (x.dtype, weight.dtype, bias.dtype) else x.dtype)
    dev = x.device
    block_c, block_hw = _blocks(channels, hw)
    grid = (batch, triton.cdiv(channels, block_c))
    save_mean, save_rstd, scale, shift = (torch.empty((channels,), device=dev, dtype=acc_dtype) for _ in range(4))
    block_rb, block_rc = _reduce_blocks(batch, channels)
    if training:
        row_mean = torch.empty((batch, channels), device=dev, dtype=acc_dtype)
        row_m2 = torch.empty((batch, channels), device=dev, dtype=acc_dtype)
        row_stats_kernel[grid](x, row_mean, row_m2, channels, hw, width, *x.stride(),
                               COMPUTE_M2=True, ACC=acc, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=4)
    else:
        row_mean = row_m2 = save_mean  # unread in eval mode
    scalars = fp64_scalars(dev, momentum, eps) if acc_dtype == torch.float64 else None
    bn_stats_kernel[(triton.cdiv(channels, block_rc),)](
        row_mean, row_m2, weight, bias, running_mean, running_var, save_mean, save_rstd, scale, shift,
        batch, channels, hw, float(momentum), float(eps), scalars if scalars is not None else save_mean,
        SCALARS_FP64=scalars is not None, TRAINING=bool(training), ACC=acc, BLOCK_B=block_rb, BLOCK_C=block_rc,
        num_warps=4)
    out = torch.empty((batch, channels), device=dev, dtype=x.dtype)
    bn_relu_pool_fwd_kernel[grid](x, scale, shift, out, channels, hw, width, *x.stride(),
                                  ACC=acc, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=4)
    return out, save_mean, save_rstd


def bn_relu_pool_backward(grad, x, weight, bias, save_mean, save_rstd, training: bool):
    """grad (B, C) -> dx (B, C, H, W) in x's dtype, dense in x's memory format; d weight and d bias (C,) in
    their parameters' dtypes."""
    batch, channels, height, width = x.shape
    hw = height * width
    acc, acc_dtype = _acc(save_mean.dtype)
    dev = x.device
    # The normalisation as one multiply-add per element: y = x * scale + shift.
    scale = weight.to(acc_dtype) * save_rstd
    shift = bias.to(acc_dtype) - save_mean * scale
    block_c, block_hw = _blocks(channels, hw)
    grid = (batch, triton.cdiv(channels, block_c))
    pdb = torch.empty((batch, channels), device=dev, dtype=acc_dtype)
    pdw = torch.empty((batch, channels), device=dev, dtype=acc_dtype)
    bn_relu_pool_bwd_partial_kernel[grid](
        x, grad, scale, shift, save_mean, save_rstd, pdb, pdw, channels, hw, width,
        *x.stride(), *grad.stride(), ACC=acc, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=4)
    dweight = torch.empty((channels,), device=dev, dtype=weight.dtype)
    dbias = torch.empty((channels,), device=dev, dtype=bias.dtype)
    coef = torch.empty((3, channels), device=dev, dtype=acc_dtype)
    block_rb, block_rc = _reduce_blocks(batch, channels)
    bn_relu_pool_bwd_reduce_kernel[(triton.cdiv(channels, block_rc),)](
        pdb, pdw, weight, save_rstd, dweight, dbias, coef, batch, channels, hw,
        TRAINING=bool(training), ACC=acc, BLOCK_B=block_rb, BLOCK_C=block_rc, num_warps=4)
    # Dense in x's layout: channels_last when x is (and is not also contiguous), else contiguous.
    fmt = torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    dx = torch.empty(x.shape, device=dev, dtype=x.dtype, memory_format=fmt)
    bn_relu_pool_bwd_dx_kernel[grid](
        x, grad, scale, shift, save_mean, save_rstd, coef, dx, channels, hw, width,
        *x.stride(), *grad.stride(), *dx.stride(), ACC=acc, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=4)
    return dx, dweight, dbias
