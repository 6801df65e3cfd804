"""Triton kernels of the fused projector ops (hcd_fast/ops/projector.py): one SepConv block in channels_last,
    dw3x3(stride 2) -> pw1x1 -> BN -> ReLU -> dw3x3 -> pw1x1 -> BN -> ReLU,
as two op kinds that never materialise a BatchNorm or ReLU output:

- ``projector_dwconv``: a[b, c, o] = sum_k w[c, k] z[b, c, o*s - 1 + k] (3x3, zero padding 1, stride s), where
  z = ReLU(x * scale_c + shift_c) is the previous BatchNorm's apply and ReLU done in the prologue (or z = x for a
  projector's first block). The padding is on z (the conv pads its input, the ReLU'd BN output).
- ``projector_pwconv``: y = a W^T as a GEMM over (B*H*W, C_in) x (C_in, C_out) on tensor cores (bf16/fp16;
  fp32 in IEEE precision, no TF32), with the next BatchNorm's batch statistics in its epilogue: each (row tile,
  channel) writes the tile's sum and M2 (sum of squared deviations from the tile mean) of the rounded y; a
  per-channel pass combines them in a fixed order (Chan: M2 = sum M2_t + sum n_t (mean_t - mean)^2, no
  E[y^2] - E[y]^2 cancellation), updates the running statistics like nn.BatchNorm2d (unbiased variance; momentum,
  or the cumulative average 1 / num_batches_tracked read on the device) and writes scale = w rstd and
  shift = b - mean scale for the next dwconv's prologue. No atomics: every reduction is per tile + a second pass.

Grouped blocks (hcd_fast.modules.StageProjectors runs the same-shape blocks of several stages as one): the
depthwise convs and BatchNorms are per channel and run on the members' concatenated channels as they are; the
dwconv prologue may cover only the first P channels (the continuing members' BN output; the rest is a stage's raw
map, read as it is); the pwconv is a grouped 1x1 conv, the group the third grid axis of its forward and d a GEMMs
(folded into the first of the d W GEMM's), each group's base pointers moved once so its loops are the ungrouped
ones. The concatenation of a group's input is one copy of it per group (forward; about 0.36 GB at B=256, bf16,
ResNet18 maps, against 2.76 GB for the fused blocks): the price of 3 grouped blocks instead of 6.

Backward, recomputing instead of storing:
- dwconv: one pass over input positions recomputes z and the ReLU mask from x, gathers the output gradient of
  the (at most 9) outputs each input feeds (transposed depthwise conv), and writes dx = scale * mask * gz plus
  per-tile partials of d w[c, k] = sum z g, d scale = sum mask gz x, d shift = sum mask gz; a second pass reduces
  the partials in a fixed order.
- pwconv: (d scale, d shift) give d bn_weight, d bn_bias and the batch-statistics gradient,
  g_y' = g_y + c1 + c2 y (c2 = 2 d var / N, c1 = d mean / N - c2 mean); the two GEMMs d a = g_y' W and
  d W = g_y'^T a recompute c1, c2 and g_y' in their prologues from g_y, y and the per-channel values instead of
  storing g_y' (the d a GEMM's first program writes d bn_weight, d bn_bias); d W is split over rows into
  per-split partials and reduced in a fixed order (one split: written directly).

Design bytes (benchmarks/head_model.py; X = B c H W input, N1 = B c h w, N2 = B o h w), one block's training
fwd+bwd, maps only: forward X + 6 N1 + N2 (dwconv X->N1, pwconv N1->N1, dwconv N1->N1, pwconv N1->N2), backward
2X + 12 N1 + 4 N2 (pwconv dgrad (g, y)->N1 and wgrad (g, y, a) per GEMM, dwconv backward (g, x)->N1 or X);
in all 3X + 18 N1 + 5 N2 against 3X + 26 N1 + 12 N2 for the op split that materialises every output. At B=256,
bf16, ResNet18 maps, that is 2.76 GB against 3.97 GB for the five projectors (0.69x).

Every kernel takes its maps through four strides (NCHW, channels_last and sliced maps are read in place) and
uses 64-bit offsets. fp64 inputs accumulate in fp64 (momentum/eps then come from an fp64 tensor).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hcd_fast.kernels import fp64_scalars


# --------------------------------------------------------------------------------------------- dwconv
@triton.jit
def projector_dwconv_fwd_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr,
    P, C, PC, H, W, HO, WO,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    STRIDE: tl.constexpr, PROLOGUE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(B*HO*WO, BLOCK_P), cdiv(C, BLOCK_C)): a tile of output positions x channels; each of the 9
    taps is a (BLOCK_P, BLOCK_C) gather, contiguous along channels in channels_last. With PROLOGUE the first PC
    channels get the BN apply + ReLU, the others (a raw stage map grouped after them) are read as they are."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    ow = p % WO
    t = p // WO
    oh = t % HO
    b = t // HO
    if PROLOGUE:
        bn_c = c < PC
        scale = tl.load(scale_ptr + c, mask=c_ok & bn_c, other=1.0).to(ACC)
        shift = tl.load(shift_ptr + c, mask=c_ok & bn_c, other=0.0).to(ACC)
    xb = x_ptr + b[:, None] * stride_xb + c[None, :].to(tl.int64) * stride_xc
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for kh in tl.static_range(3):
        ih = oh * STRIDE - 1 + kh
        h_ok = (ih >= 0) & (ih < H)
        for kw in tl.static_range(3):
            iw = ow * STRIDE - 1 + kw
            ok = p_ok & h_ok & (iw >= 0) & (iw < W)
            m = ok[:, None] & c_ok[None, :]
            v = tl.load(xb + (ih * stride_xh + iw * stride_xw)[:, None], mask=m, other=0.0).to(ACC)
            if PROLOGUE:  # the previous BN's apply + ReLU; padded positions stay 0
                v = tl.where(m & bn_c[None, :], tl.maximum(v * scale[None, :] + shift[None, :], 0.0), v)
            wk = tl.load(w_ptr + c * 9 + (kh * 3 + kw), mask=c_ok, other=0.0).to(ACC)
            acc += v * wk[None, :]
    m = p_ok[:, None] & c_ok[None, :]
    offs = (b * stride_ob + oh * stride_oh + ow * stride_ow)[:, None] + c[None, :].to(tl.int64) * stride_oc
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def projector_dwconv_bwd_kernel(
    g_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, dx_ptr, part_ptr,
    Q, C, PC, H, W, HO, WO, ITERS,
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_db, stride_dc, stride_dh, stride_dw,
    STRIDE: tl.constexpr, PROLOGUE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (T, cdiv(C, BLOCK_C)) over input positions, ITERS tiles of BLOCK_P per program: gz = sum over the
    outputs o with o*s - 1 + k = i of w[c, k] g[o]; dx = scale * [BN output > 0] * gz on the first PC channels,
    dx = gz on the others (and without a prologue). Per-program partials, row ``tile`` of part (T, 9 C + 2 PC):
    [9 c + k] = sum z g_k, [9 C + c] = d scale, [9 C + PC + c] = d shift (c < PC)."""
    tile = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c[None, :].to(tl.int64)
    if PROLOGUE:
        bn_c = c < PC
        scale = tl.load(scale_ptr + c, mask=c_ok & bn_c, other=1.0).to(ACC)
        shift = tl.load(shift_ptr + c, mask=c_ok & bn_c, other=0.0).to(ACC)
    part = part_ptr + tile * (9 * C + 2 * PC)
    taps = tl.arange(0, 16)
    acc_w = tl.zeros([16, BLOCK_C], ACC)  # row k: sum z g of tap k (rows 9..15 unused)
    acc_s = tl.zeros([BLOCK_C], ACC)
    acc_h = tl.zeros([BLOCK_C], ACC)
    for it in range(0, ITERS):
        q = (tile * ITERS + it) * BLOCK_P + tl.arange(0, BLOCK_P)
        q_ok = q < Q
        m = q_ok[:, None] & c_ok[None, :]
        iw = q % W
        t = q // W
        ih = t % H
        b = t // H
        v = tl.load(x_ptr + (b * stride_xb + ih * stride_xh + iw * stride_xw)[:, None] + c64 * stride_xc,
                    mask=m, other=0.0).to(ACC)
        if PROLOGUE:  # raw channels (c >= PC): z = x, the gradient passes (scale 1)
            pre = v * scale[None, :] + shift[None, :]
            pos = m & ((pre > 0.0) | (c[None, :] >= PC))
            z = tl.where(pos, tl.where(c[None, :] < PC, pre, v), 0.0)
        else:
            z = v
        gb = g_ptr + b[:, None] * stride_gb + c64 * stride_gc
        gz = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        for kh in tl.static_range(3):
            hn = ih + 1 - kh  # = oh * STRIDE for the output this tap feeds
            oh = tl.where(hn >= 0, hn, 0) // STRIDE
            h_ok = (hn >= 0) & (oh * STRIDE == hn) & (oh < HO)
            for kw in tl.static_range(3):
                wn = iw + 1 - kw
                ow = tl.where(wn >= 0, wn, 0) // STRIDE
                ok = q_ok & h_ok & (wn >= 0) & (ow * STRIDE == wn) & (ow < WO)
                g = tl.load(gb + (oh * stride_gh + ow * stride_gw)[:, None], mask=ok[:, None] & c_ok[None, :],
                            other=0.0).to(ACC)
                wk = tl.load(w_ptr + c * 9 + (kh * 3 + kw), mask=c_ok, other=0.0).to(ACC)
                gz += g * wk[None, :]
                acc_w += tl.where(taps[:, None] == kh * 3 + kw, tl.sum(z * g, 0)[None, :], 0.0)
        if PROLOGUE:
            gm = tl.where(pos, gz, 0.0)
            acc_s += tl.sum(gm * v, 0)
            acc_h += tl.sum(gm, 0)
            dx = gm * scale[None, :]
        else:
            dx = gz
        tl.store(dx_ptr + (b * stride_db + ih * stride_dh + iw * stride_dw)[:, None] + c64 * stride_dc,
                 dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(part + c[None, :] * 9 + taps[:, None], acc_w, mask=(taps < 9)[:, None] & c_ok[None, :])
    if PROLOGUE:
        tl.store(part + 9 * C + c, acc_s, mask=c_ok & bn_c)
        tl.store(part + 9 * C + PC + c, acc_h, mask=c_ok & bn_c)


@triton.jit
def projector_partials_reduce_kernel(
    part_ptr, out0_ptr, out1_ptr, out2_ptr,
    T, N0, N1, N2, stride_t,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid cdiv(N0 + N1 + N2, BLOCK_N): column sums of part (T, >= N0 + N1 + N2; row stride stride_t) over the T
    tiles in a fixed order, split into three outputs (each in its own dtype): out0[:N0], out1[:N1], out2[:N2]."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    total = N0 + N1 + N2
    n_ok = n < total
    rows = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T, BLOCK_N], ACC)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + rows).to(tl.int64)
        acc += tl.load(part_ptr + t[:, None] * stride_t + n[None, :], mask=(t < T)[:, None] & n_ok[None, :],
                       other=0.0).to(ACC)
    s = tl.sum(acc, 0)
    tl.store(out0_ptr + n, s.to(out0_ptr.dtype.element_ty), mask=n < N0)
    n1 = n - N0
    tl.store(out1_ptr + n1, s.to(out1_ptr.dtype.element_ty), mask=(n1 >= 0) & (n1 < N1))
    n2 = n - N0 - N1
    tl.store(out2_ptr + n2, s.to(out2_ptr.dtype.element_ty), mask=(n2 >= 0) & (n2 < N2))


# --------------------------------------------------------------------------------------------- pwconv
@triton.jit
def projector_pwconv_fwd_kernel(
    a_ptr, w_ptr, y_ptr, psum_ptr, pm2_ptr, nbt_ptr,
    M, N, K, G,
    stride_am, stride_ak, stride_wn, stride_wk, stride_ym, stride_yn,
    STATS: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), G): y = a W^T as a grouped 1x1 conv of G groups, group g mapping
    the columns [g K, (g + 1) K) of the (M, G K) row-major view of the channels_last map to the columns
    [g N, (g + 1) N) of y through the rows [g N, (g + 1) N) of W (G N, K); with STATS (training), per-tile sum and
    M2 of the rounded y over the tile's rows, psum/pm2 (T, G N), and program (0, 0, 0) counts the batch:
    num_batches_tracked += 1 (read by the statistics kernel, the next launch on the stream, for momentum None)."""
    pid_m = tl.program_id(0)
    g = tl.program_id(2)
    # The group's operands: base pointers moved once (the loops below are the ungrouped GEMM's).
    a_ptr += g * K * stride_ak
    w_ptr += g * N * stride_wn
    y_ptr += g * N * stride_yn
    psum_ptr += g * N
    pm2_ptr += g * N
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    m = m_ok[:, None] & n_ok[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, y, mask=m)
    if STATS:  # the statistics of the values the next op reads: y after rounding to its dtype
        if (pid_m == 0) & (tl.program_id(1) == 0) & (g == 0):
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
        v = tl.where(m, y.to(ACC), 0.0)
        cnt = tl.minimum(M - pid_m.to(tl.int64) * BLOCK_M, BLOCK_M).to(ACC)
        s = tl.sum(v, 0)
        d = tl.where(m, v - (s / cnt)[None, :], 0.0)
        tl.store(psum_ptr + pid_m * (G * N) + rn, s, mask=n_ok)
        tl.store(pm2_ptr + pid_m * (G * N) + rn, tl.sum(d * d, 0), mask=n_ok)


@triton.jit
def projector_bn_stats_kernel(
    psum_ptr, pm2_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr, nbt_ptr,
    save_mean_ptr, save_rstd_ptr, scale_ptr, shift_ptr,
    T, C, M, TILE_M,
    momentum, eps, scalars_ptr,
    SCALARS_FP64: tl.constexpr, TRAINING: tl.constexpr, CUMULATIVE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid cdiv(C, BLOCK_C): batch statistics from the T tile partials (Chan, fixed order), running-statistics
    update (training), and scale = w rstd, shift = b - mean scale of the BatchNorm's apply. (M = 0 in training is
    refused before the launch: the GEMM that counts the batch has no program then.)"""
    if SCALARS_FP64:
        momentum = tl.load(scalars_ptr)
        eps = tl.load(scalars_ptr + 1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    rows = tl.arange(0, BLOCK_T)
    if TRAINING:
        acc = tl.zeros([BLOCK_T, BLOCK_C], ACC)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + rows
            msk = (t < T)[:, None] & c_ok[None, :]
            acc += tl.load(psum_ptr + t[:, None] * C + c[None, :], mask=msk, other=0.0)
        mean = tl.sum(acc, 0) / M
        acc = tl.zeros([BLOCK_T, BLOCK_C], ACC)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + rows
            msk = (t < T)[:, None] & c_ok[None, :]
            cnt = tl.minimum(M - t.to(tl.int64) * TILE_M, TILE_M).to(ACC)
            cnt = tl.where(t < T, cnt, 1.0)
            s = tl.load(psum_ptr + t[:, None] * C + c[None, :], mask=msk, other=0.0)
            m2 = tl.load(pm2_ptr + t[:, None] * C + c[None, :], mask=msk, other=0.0)
            d = tl.where(msk, s / cnt[:, None] - mean[None, :], 0.0)
            acc += m2 + cnt[:, None] * d * d
        m2 = tl.sum(acc, 0)
        var = m2 / M
        if CUMULATIVE:  # momentum None: cumulative average, factor 1 / num_batches_tracked (counted by the GEMM)
            factor = 1.0 / tl.load(nbt_ptr).to(ACC)
        else:
            factor = momentum
        rm = tl.load(running_mean_ptr + c, mask=c_ok, other=0.0)
        rv = tl.load(running_var_ptr + c, mask=c_ok, other=0.0)
        new_rm = (1.0 - factor) * rm.to(ACC) + factor * mean
        new_rv = (1.0 - factor) * rv.to(ACC) + factor * (m2 / (M - 1))
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
def _bn_grads(gscale_ptr, gshift_ptr, bnw_ptr, mean_ptr, rstd_ptr, n, n_ok, ACC: tl.constexpr):
    """Per channel, with scale = w rstd, shift = b - mean scale: (d b, d w, d mean, d var) =
    (d shift, rstd (d scale - d shift mean), -d shift scale, -1/2 w (d scale - d shift mean) rstd^3)."""
    gs = tl.load(gscale_ptr + n, mask=n_ok, other=0.0).to(ACC)
    gh = tl.load(gshift_ptr + n, mask=n_ok, other=0.0).to(ACC)
    w = tl.load(bnw_ptr + n, mask=n_ok, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + n, mask=n_ok, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + n, mask=n_ok, other=0.0).to(ACC)
    inner = gs - gh * mean
    return gh, rstd * inner, -gh * w * rstd, -0.5 * w * inner * rstd * rstd * rstd, mean


@triton.jit
def _grad_y(g_ptr, y_ptr, gscale_ptr, gshift_ptr, bnw_ptr, mean_ptr, rstd_ptr, rm, rn, m_ok, n_ok, M,
            stride_gm, stride_gn, stride_ym, stride_yn, RECOMPUTE: tl.constexpr, ACC: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) tile of g_y' = g_y + c1 + c2 y, c2 = 2 d var / M, c1 = d mean / M - c2 mean (the
    batch-statistics gradient, recomputed from the per-channel values), in g_y's dtype; just g_y in eval."""
    msk = m_ok[:, None] & n_ok[None, :]
    g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn, mask=msk, other=0.0)
    if RECOMPUTE:
        _, _, gmean, gvar, mean = _bn_grads(gscale_ptr, gshift_ptr, bnw_ptr, mean_ptr, rstd_ptr, rn, n_ok, ACC)
        c2 = 2.0 * gvar / M
        c1 = gmean / M - c2 * mean
        y = tl.load(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, mask=msk, other=0.0).to(ACC)
        g = tl.where(msk, g.to(ACC) + c1[None, :] + c2[None, :] * y, 0.0).to(g_ptr.dtype.element_ty)
    return g


@triton.jit
def projector_pwconv_dgrad_kernel(
    g_ptr, y_ptr, gscale_ptr, gshift_ptr, bnw_ptr, mean_ptr, rstd_ptr, w_ptr, da_ptr, gbnw_ptr, gbnb_ptr,
    M, N, K, G,
    stride_gm, stride_gn, stride_ym, stride_yn, stride_wn, stride_wk, stride_dm, stride_dk,
    RECOMPUTE: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K), G): d a = g_y' W per group (group g: the columns [g K, (g + 1) K)
    of d a from the columns [g N, (g + 1) N) of g_y' and the rows of W), g_y' recomputed per tile (_grad_y);
    program (0, 0, 0) also writes the BatchNorm parameter gradients d bn_weight, d bn_bias (_bn_grads) of all G N
    channels."""
    g = tl.program_id(2)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn0 = tl.arange(0, BLOCK_N)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0) & (g == 0):
        for n0 in range(0, G * N, BLOCK_N):
            rn = n0 + rn0
            n_ok = rn < G * N
            gb, gw, _, _, _ = _bn_grads(gscale_ptr, gshift_ptr, bnw_ptr, mean_ptr, rstd_ptr, rn, n_ok, ACC)
            tl.store(gbnb_ptr + rn, gb.to(gbnb_ptr.dtype.element_ty), mask=n_ok)
            tl.store(gbnw_ptr + rn, gw.to(gbnw_ptr.dtype.element_ty), mask=n_ok)
    # The group's operands: base pointers moved once (the loop below is the ungrouped GEMM's).
    g_ptr += g * N * stride_gn
    y_ptr += g * N * stride_yn
    gscale_ptr += g * N
    gshift_ptr += g * N
    bnw_ptr += g * N
    mean_ptr += g * N
    rstd_ptr += g * N
    w_ptr += g * N * stride_wn
    da_ptr += g * K * stride_dk
    m_ok = rm < M
    k_ok = rk < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], ACC)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + rn0
        n_ok = rn < N
        gy = _grad_y(g_ptr, y_ptr, gscale_ptr, gshift_ptr, bnw_ptr, mean_ptr, rstd_ptr, rm, rn, m_ok, n_ok, M,
                     stride_gm, stride_gn, stride_ym, stride_yn, RECOMPUTE, ACC)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.dot(gy.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    tl.store(da_ptr + rm[:, None] * stride_dm + rk[None, :] * stride_dk, acc.to(da_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def projector_pwconv_wgrad_kernel(
    g_ptr, y_ptr, gscale_ptr, gshift_ptr, bnw_ptr, mean_ptr, rstd_ptr, a_ptr, part_ptr,
    M, N, K, G, ROWS_PER_SPLIT,
    stride_gm, stride_gn, stride_ym, stride_yn, stride_am, stride_ak,
    RECOMPUTE: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (G * cdiv(N, BLOCK_N), cdiv(K, BLOCK_K), splits): part[split] (G N, K) = g_y'^T a over the split's rows
    (ROWS_PER_SPLIT, a multiple of BLOCK_M), group g's rows from its columns of g_y' and a; the splits are summed
    by projector_partials_reduce_kernel (one split: part is d W itself, in its dtype)."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    g = tl.program_id(0) // n_tiles
    rn = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2).to(tl.int64)
    rm0 = tl.arange(0, BLOCK_M)
    # The group's operands: base pointers moved once (the loop below is the ungrouped GEMM's).
    g_ptr += g * N * stride_gn
    y_ptr += g * N * stride_yn
    gscale_ptr += g * N
    gshift_ptr += g * N
    bnw_ptr += g * N
    mean_ptr += g * N
    rstd_ptr += g * N
    a_ptr += g * K * stride_ak
    part_ptr += g * N * K
    n_ok = rn < N
    k_ok = rk < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], ACC)
    start = split * ROWS_PER_SPLIT
    for m0 in range(0, ROWS_PER_SPLIT, BLOCK_M):
        rm = start + m0 + rm0
        m_ok = rm < M
        gy = _grad_y(g_ptr, y_ptr, gscale_ptr, gshift_ptr, bnw_ptr, mean_ptr, rstd_ptr, rm, rn, m_ok, n_ok, M,
                     stride_gm, stride_gn, stride_ym, stride_yn, RECOMPUTE, ACC)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.dot(tl.trans(gy).to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC)
    tl.store(part_ptr + split * (G * N) * K + rn[:, None] * K + rk[None, :], acc.to(part_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])


# ------------------------------------------------------------------------------------------ launchers
def _acc(dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _dot_precision(dtype) -> str:
    """fp32 operands in full precision (no TF32): the op must match the reference's fp32 conv."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


_DOT_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
               torch.float16: tl.float16}


def _dot_dtype(dtype):
    """tl.dot operand dtype: the map's. The interpreter's bf16 tl.dot returns garbage (triton 3.8); bf16 -> fp32
    is exact and the GPU's bf16 MMA accumulates in fp32 too, so there fp32 operands give the same products."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return tl.float32
    return _DOT_DTYPES[dtype]


def _channels_last_2d(t: torch.Tensor):
    """A (B, C, H, W) map as (B*H*W, C) with its row and column strides, read in place when its channels are
    contiguous and its positions equally spaced (dense channels_last, or a channel slice of a channels_last map:
    a grouped block's members, whose gradients come back as slices of the concatenated input's), else copied to
    channels_last. (The strides of size-1 dims say nothing: they are not checked.)"""
    b, c, h, w = t.shape
    sb, sc, sh, sw = t.stride()
    row = sw if w > 1 else (sh if h > 1 else sb)
    if ((c == 1 or sc == 1) and (h == 1 or sh == w * row) and (b == 1 or sb == h * w * row)
            and (b * h * w == 1 or row >= c)):
        return t, row, 1
    t = t.contiguous(memory_format=torch.channels_last)
    return t, t.shape[1], 1


def _dw_blocks(channels: int, elements: int = 1024):
    """(BLOCK_P, BLOCK_C): tiles of ``elements`` (1024 forward, 512 backward: its 9 gathers and recomputed mask
    need more registers), up to 64 channels wide (one 128-byte bf16 row per position)."""
    block_c = min(triton.next_power_of_2(channels), 64)
    return max(8, elements // block_c), block_c


# Programs of the dwconv backward: about 8 per H100 SM (132) over (position tiles, channel blocks); each writes
# one row of weight/scale/shift partials, so the partials stay ~1056 x 11 x 64 values whatever the map size.
_DW_BWD_PROGRAMS = 1056
# Programs of the pointwise weight gradient: ~2 per H100 SM over (C_out tiles, C_in tiles, row splits); each split
# writes one (C_out, C_in) fp32 partial. Both counts are functions of the shape only (deterministic results).
_WGRAD_PROGRAMS = 264


def _reduce(part: torch.Tensor, outs, acc):
    """Column sums of part (T, >= sum of numels of outs) in a fixed order, into outs (flat views of fresh tensors)."""
    t = part.shape[0]
    total = sum(o.numel() for o in outs)
    sizes = [o.numel() for o in outs] + [0] * (3 - len(outs))
    outs = list(outs) + [outs[0]] * (3 - len(outs))
    block_n = min(triton.next_power_of_2(max(total, 1)), 1024)
    block_t = min(triton.next_power_of_2(t), 4096 // block_n)  # tiles of at most 4096 values
    projector_partials_reduce_kernel[(triton.cdiv(total, block_n),)](
        part, outs[0], outs[1], outs[2], t, sizes[0], sizes[1], sizes[2], part.stride(0),
        ACC=acc, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4)


def projector_dwconv_forward(x, weight, scale, shift, stride: int):
    """x (B, C, H, W) any strides, weight (C, 1, 3, 3), scale/shift (PC,) with PC <= C (the prologue's channels,
    the first PC) or None -> (B, C, HO, WO) in x's dtype, dense channels_last."""
    batch, channels, height, width = x.shape
    ho, wo = (height - 1) // stride + 1, (width - 1) // stride + 1
    acc, _ = _acc(x.dtype)
    out = torch.empty((batch, channels, ho, wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    p = batch * ho * wo
    if out.numel() == 0:
        return out
    w = weight.reshape(channels, 9).contiguous()
    prologue = scale is not None
    pc = scale.shape[0] if prologue else 0
    if prologue:
        scale, shift = scale.contiguous(), shift.contiguous()
    block_p, block_c = _dw_blocks(channels)
    projector_dwconv_fwd_kernel[(triton.cdiv(p, block_p), triton.cdiv(channels, block_c))](
        x, w, scale if prologue else w, shift if prologue else w, out, p, channels, pc, height, width, ho, wo,
        *x.stride(), *out.stride(), STRIDE=stride, PROLOGUE=prologue, ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=8)  # 4 warps: 255 registers and a spill under triton 3.6 at fp16, stride 2, 37 channels
    return out


def projector_dwconv_backward(grad, x, weight, scale, shift, stride: int):
    """-> (d x dense in x's memory format and dtype, d weight (C, 1, 3, 3) in weight's dtype, d scale and d shift
    (PC,) in scale's dtype, or (0,) tensors without a prologue)."""
    batch, channels, height, width = x.shape
    ho, wo = grad.shape[2], grad.shape[3]
    acc, acc_dtype = _acc(x.dtype)
    prologue = scale is not None
    pc = scale.shape[0] if prologue else 0
    fmt = torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    dweight = torch.empty(weight.shape, device=x.device, dtype=weight.dtype)
    pdt = scale.dtype if prologue else acc_dtype
    dscale = torch.empty((pc,), device=x.device, dtype=pdt)
    dshift = torch.empty((pc,), device=x.device, dtype=pdt)
    q = batch * height * width
    if q == 0 or channels == 0:
        return dx, dweight.zero_(), dscale.zero_(), dshift.zero_()
    w = weight.reshape(channels, 9).contiguous()
    if prologue:
        scale, shift = scale.contiguous(), shift.contiguous()
    block_p, block_c = _dw_blocks(channels, 512)
    c_blocks = triton.cdiv(channels, block_c)
    p_tiles = triton.cdiv(q, block_p)
    iters = triton.cdiv(p_tiles, max(1, min(p_tiles, triton.cdiv(_DW_BWD_PROGRAMS, c_blocks))))
    tiles = triton.cdiv(p_tiles, iters)
    part = torch.empty((tiles, 9 * channels + 2 * pc), device=x.device, dtype=acc_dtype)
    projector_dwconv_bwd_kernel[(tiles, c_blocks)](
        grad, x, w, scale if prologue else w, shift if prologue else w, dx, part, q, channels, pc, height, width,
        ho, wo, iters, *grad.stride(), *x.stride(), *dx.stride(), STRIDE=stride, PROLOGUE=prologue, ACC=acc,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8)
    _reduce(part, [dweight, dscale, dshift] if pc else [dweight], acc)
    return dx, dweight, dscale, dshift


def _gemm_blocks(dtype, rows: int, cols: int, red: int):
    """(BLOCK_rows, BLOCK_cols, BLOCK_red, num_warps) of a GEMM tile: rows x cols outputs, red the reduction
    chunk; tl.dot needs every dimension >= 16. bf16/fp16: 64 x up to 128 outputs, chunks of 32; fp32/fp64 (no
    tensor-core inputs, IEEE products): 64 x up to 64, chunks of 16. Sized to stay within 255 registers per
    thread without spilling (tests/test_triton_compile.py)."""
    wide = dtype in (torch.bfloat16, torch.float16)
    block_r = 64
    block_c = max(16, min(128 if wide else 64, triton.next_power_of_2(cols)))
    block_k = max(16, min(32 if wide else 16, triton.next_power_of_2(red)))
    return block_r, block_c, block_k, 8 if block_r * block_c >= 64 * 128 else 4


def projector_pwconv_forward(a, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                             training: bool, momentum: float, cumulative: bool, eps: float, groups: int):
    """a (B, C_in, H, W) any strides, weight (C_out, C_in / groups) (a grouped 1x1 conv's), BN weight/bias/running
    stats (C_out,), num_batches_tracked (0-d int64, += 1 in training) -> y (B, C_out, H, W) dense channels_last in
    a's dtype, scale, shift, save_mean, save_invstd (C_out,) in acc dtype. Updates the running statistics in place
    in training."""
    batch, c_in, height, width = a.shape
    c_out = weight.shape[0]
    n_g, k_g = c_out // groups, c_in // groups  # per group
    acc, acc_dtype = _acc(torch.float64 if torch.float64 in (a.dtype, bn_weight.dtype) else a.dtype)
    dev = a.device
    a2, sam, sak = _channels_last_2d(a)
    m = batch * height * width
    y = torch.empty((batch, c_out, height, width), device=dev, dtype=a.dtype, memory_format=torch.channels_last)
    block_m, block_n, block_k, warps = _gemm_blocks(a.dtype, m, n_g, k_g)
    tiles = triton.cdiv(m, block_m)
    psum = torch.empty((tiles if training else 0, c_out), device=dev, dtype=acc_dtype)
    pm2 = torch.empty_like(psum)
    if m > 0:
        projector_pwconv_fwd_kernel[(tiles, triton.cdiv(n_g, block_n), groups)](
            a2, weight, y, psum if training else y, pm2 if training else y, num_batches_tracked, m, n_g, k_g, groups,
            sam, sak,
            *weight.stride(), c_out, 1, STATS=bool(training), ACC=acc,
            DOT_PRECISION=_dot_precision(a.dtype), DOT_DTYPE=_dot_dtype(a.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=warps)
    save_mean, save_rstd, scale, shift = (torch.empty((c_out,), device=dev, dtype=acc_dtype) for _ in range(4))
    scalars = fp64_scalars(dev, momentum, eps) if acc_dtype == torch.float64 else None
    block_c = min(triton.next_power_of_2(c_out), 64)
    projector_bn_stats_kernel[(triton.cdiv(c_out, block_c),)](
        psum, pm2, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, save_mean, save_rstd,
        scale, shift, tiles, c_out, m, block_m, float(momentum), float(eps),
        scalars if scalars is not None else save_mean, SCALARS_FP64=scalars is not None, TRAINING=bool(training),
        CUMULATIVE=bool(cumulative), ACC=acc, BLOCK_T=min(triton.next_power_of_2(max(tiles, 1)), 32),
        BLOCK_C=block_c, num_warps=4)
    return y, scale, shift, save_mean, save_rstd


def projector_pwconv_backward(grad_y, grad_scale, grad_shift, a, weight, y, bn_weight, save_mean, save_rstd,
                              training: bool, groups: int):
    """-> d a (dense in a's memory format, a's dtype), d weight (C_out, C_in / groups), d bn_weight, d bn_bias."""
    batch, c_in, height, width = a.shape
    c_out = weight.shape[0]
    n_g, k_g = c_out // groups, c_in // groups  # per group
    acc, acc_dtype = _acc(save_mean.dtype)
    dev = a.device
    m = batch * height * width
    # (C,) gradients may come expanded from a sum (stride 0): the kernels read them densely.
    grad_scale, grad_shift = grad_scale.contiguous(), grad_shift.contiguous()
    gweight = torch.empty(bn_weight.shape, device=dev, dtype=bn_weight.dtype)
    gbias = torch.empty(bn_weight.shape, device=dev, dtype=bn_weight.dtype)
    stats = (grad_scale, grad_shift, bn_weight, save_mean, save_rstd)
    fmt = torch.channels_last if not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    da = torch.empty(a.shape, device=dev, dtype=a.dtype, memory_format=fmt)
    dweight = torch.empty(weight.shape, device=dev, dtype=weight.dtype)
    if m == 0:  # no GEMM program to write the BatchNorm gradients: d b = d shift, d w = rstd (d scale - d shift mean)
        gbias.copy_(grad_shift)
        gweight.copy_(save_rstd * (grad_scale - grad_shift * save_mean))
        return da, dweight.zero_(), gweight, gbias
    a2, sam, sak = _channels_last_2d(a)
    g2, sgm, sgn = _channels_last_2d(grad_y)
    y2, sym, syn = _channels_last_2d(y)
    prec = _dot_precision(a.dtype)
    block_m, block_k, block_n, warps = _gemm_blocks(a.dtype, m, k_g, n_g)  # d a: (M, C_in) tiles over C_out
    da_cl = da if da.is_contiguous(memory_format=torch.channels_last) else \
        torch.empty(a.shape, device=dev, dtype=a.dtype, memory_format=torch.channels_last)
    projector_pwconv_dgrad_kernel[(triton.cdiv(m, block_m), triton.cdiv(k_g, block_k), groups)](
        g2, y2, *stats, weight, da_cl, gweight, gbias, m, n_g, k_g, groups, sgm, sgn, sym, syn, *weight.stride(),
        c_in, 1,
        RECOMPUTE=bool(training), ACC=acc, DOT_PRECISION=prec, DOT_DTYPE=_dot_dtype(a.dtype), BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    if da_cl is not da:
        da.copy_(da_cl)
    block_n, block_k, block_m, warps = _gemm_blocks(a.dtype, n_g, k_g, m)  # d W: (C_out, C_in/G) tiles over M
    block_n = min(block_n, 64)
    block_m = max(block_m, 32)
    warps = 8 if block_n * block_k >= 64 * 128 else 4
    tiles_nk = groups * triton.cdiv(n_g, block_n) * triton.cdiv(k_g, block_k)
    row_tiles = triton.cdiv(m, block_m)
    splits = max(1, min(row_tiles, _WGRAD_PROGRAMS // tiles_nk))
    rows_per_split = triton.cdiv(row_tiles, splits) * block_m
    splits = triton.cdiv(m, rows_per_split)
    part = dweight if splits == 1 else torch.empty((splits, c_out * k_g), device=dev, dtype=acc_dtype)
    projector_pwconv_wgrad_kernel[(groups * triton.cdiv(n_g, block_n), triton.cdiv(k_g, block_k), splits)](
        g2, y2, *stats, a2, part, m, n_g, k_g, groups, rows_per_split, sgm, sgn, sym, syn, sam, sak,
        RECOMPUTE=bool(training), ACC=acc, DOT_PRECISION=prec, DOT_DTYPE=_dot_dtype(a.dtype), BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    if splits > 1:
        _reduce(part, [dweight], acc)
    return da, dweight, gweight, gbias
