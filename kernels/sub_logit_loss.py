"""Triton kernels of ``sub_logit_loss``: a statistics forward over (stage, sample) and a recomputing backward over
(sample, K block). The op's contract (schemas, shapes, the gradient formulas) is in ``hcd_fast/ops/sub_logit_loss.py``.

Math (zf_{s,b,i} the fused sub-logits, z_s / z_t the student / teacher logits; P = softmax(./T), p = softmax(.),
lse1 = logsumexp(.), lseT = logsumexp(./T)):

* CE_ls(z, y) = lse1(z) - (1-ls) z_y - ls/K sum_k z_k,    dCE/dz = p - (1-ls) onehot(y) - ls/K.
* KL_T(a || c) = T^2 kl, kl = sum_k P_a,k (a_k/T - c_k/T) - lseT(a) + lseT(c) (sum P_a = 1), accumulated online
  with the row's running max as sum exp(a/T - m) (a - c)/T; dKL/dc = T (P_c - P_a),
  dKL/da = T P_a (log P_a - log P_c - kl)   (a = zf, c = z_s; log-probabilities on both sides).
* Orthogonality: v_i = zf_i - ortho_shift z_t, target entry set to mask_fill when mask_target,
  r_i = max(||v_i||, eps), G_ij = v_i.v_j / (r_i r_j), OL = c sum_{i!=j} relu(G_ij - theta)^2, c = 1/(B n (n-1));
  d(w_ol OL)/dv_i = sum_j M_ij v_j with the n x n matrix M of the op's docstring: the forward needs only the
  Gram of the rows (dot products accumulated over K blocks), the backward applies M to the rows it reloads.

Forward, one program per (stage s, sample b), pid = b S + s (a sample's stages adjacent: its z_s row is read from DRAM
once and from L2 by the S - 1 later programs). ``sub_logit_loss_fwd_kernel`` (n <= 8; fp64 n <= 4) makes ONE pass over K
in (BLOCK_N, LANES, VEC) tiles: each of the LANES = 32 num_warps threads owns VEC consecutive elements of every row per
step (one vector load per row and one for z_s in flight per thread and step; 16-byte fp32 / 8-byte bf16-fp16 vectors at
n <= 4, half that at n = 5..8, where the rows are 16-byte aligned and K is a multiple of VEC, which the launcher tells
the compiler by passing K and the row strides divided by VEC) and keeps its own online state in registers: per row the
max and sum exp at T = 1 and at T, the KL numerator, the row sum, and the n x n Gram products; for z_s the (max, sum) at
T. No block reduction inside the loop: after it ONE ``tl.reduce`` over the lanes (combine ``_merge_rows4``) merges the
row state and the Gram (n = 5..8: the row state, then one ``tl.sum`` per Gram column), one more the z_s pair; the s = 0
program then reads z_s and z_t once more (from L2) for CE, KD and sample_stats. The (n, n) orthogonality tail is a
(BLOCK_N, BLOCK_N) tile, spread over the block's threads. ``sub_logit_loss_fwd_large_n_kernel`` (n > 8, fp64 n > 4: the
n x n Gram lanes would not fit in registers; n = 8 takes ~250 in fp32, and spilled 4.4 KB in fp64) reduces a (BLOCK_N,
BLOCK_K) tile per step. Both write row_stats (S, B, n, 3) and sample_stats (B, 3) in fp64 (max + log-sum: an fp32
log-sum-exp of logits in the hundreds loses the probabilities' fp32 accuracy), ortho_coef (S, B, n, n) and 5 partial
sums per program; a second one-program launch reduces the (B S, 5) partials in a fixed order (deterministic, no
atomics).
Backward, one program per (sample b, K block): loads z_s, z_t of the block and the sample's statistics, then for
every stage s loads the (n, BLOCK_K) zf tile, writes d zf once in zf's dtype and adds the rows' P_zf to a
register accumulator; at the end it writes d z_s once in z_s's dtype. grad_output is read from device memory
(no host sync); every output element has exactly one writer.

Scalars (temperature, weights, ...) are kernel arguments typed fp64 and converted once to the accumulation
dtype: exact for fp64 inputs (Triton passes untyped Python floats as fp32).

A target outside [0, K) (only possible with validate=False) is never used as an index: the sample's 5 partials
and its gradient rows are NaN, so the loss and every part are NaN.

Byte model (``benchmarks.cases.sub_logit_loss_bytes`` computes the same numbers for the benchmark rows).
E = bytes per logit element, R = S B n K (zf elements), Z = B K (one of z_s, z_t), 8 B target bytes per read:
    essential = read zf, z_s, z_t, y once + write dzf, dz_s once          = 2 R E + 3 Z E + 8 B
    design    = fwd: read zf, z_s, z_t, y                                   R E + 2 Z E + 8 B
              + bwd: read zf, z_s, z_t, y; write dzf, dz_s                2 R E + 3 Z E + 8 B
              + statistics, written once and read once: row_stats (S B n 3) and sample_stats (B 3) in fp64,
                ortho_coef (S B n n) and the partial sums (5 S B) in the accumulation dtype
    zf crosses memory 3 times against the essential 2 (1.5x), z_s / z_t 5 times against 3; not counted (L2
    hits): the S - 1 re-reads of a sample's z_s row by its later stage programs, z_t read by every stage
    program with ortho_on="raw", the s = 0 program's second pass over z_s and z_t. S = 4, n = 4 (decimal MB):
      B 4096, K 1000: fp32 essential 573.47, design 874.51 (1.53x); bf16 286.75 / 440.34 (1.54x)
                      forward alone: fp32 294.94 read + 3.05 written (statistics), bf16 147.49 + 3.05
      B  256, K 1000: fp32 essential  35.84, design  54.66 (1.53x); bf16  17.92 /  27.52 (1.54x)
      B  128, K  100: fp32 essential   1.79, design   2.91 (1.62x); bf16   0.90 /   1.55 (1.73x; the statistics
                      dominate the excess at K = 100)
    The forward's target (read against a GPU results file, never asserted): its design bytes (forward alone,
    above) at >= 75% of the measured copy bandwidth at B >= 4096. Unmeasured: these kernels have not run on a GPU.
The previous design wrote an fp32 gradient in the forward and read it back in the backward: at bf16 ~5x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_PARTS = 5  # ce, sub_ce, kd, sub_kl, ortho
NUM_ROW_STATS = 3  # lse1, lseT, kl
NUM_SAMPLE_STATS = 3  # lse1(z_s), lseT(z_s), lseT(z_t)


@triton.jit
def _scalar(x, ACC: tl.constexpr):
    """A float argument in the accumulation dtype (fp64-typed on the GPU, a Python float in the interpreter)."""
    return tl.full([], x, ACC)


@triton.jit
def _f64(x):
    return x.to(tl.float64)


@triton.jit
def _split(lse, ACC: tl.constexpr):
    """An fp64 statistic as hi + lo in ACC: (x - hi) - lo keeps fp32 accuracy where x is near hi (the entries
    with large probability); for fp64, lo = 0."""
    hi = lse.to(ACC)
    return hi, (lse - hi.to(tl.float64)).to(ACC)


@triton.jit
def _cast_out(x, dtype: tl.constexpr):
    """x in the output dtype, rounded to nearest even. For bf16 the rounding is done on the bits: the GPU's
    fptrunc rounds to nearest even, the Triton interpreter (3.8) truncates; this gives both the same bits."""
    if dtype == tl.bfloat16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x32 == x32, out, x32.to(tl.bfloat16))  # NaN stays NaN
    else:
        return x.to(dtype)


@triton.jit
def _extract_row(t, offs_n, j):
    """Row j of a (BLOCK_N, BLOCK_K) tile as a (BLOCK_K,) vector (a masked sum: no dynamic indexing)."""
    return tl.sum(tl.where(offs_n[:, None] == j, t, 0.0), axis=0)


@triton.jit
def _online(m, s, a):
    """One online-logsumexp step over the last axis of ``a`` (-inf where masked): new (max, sum, rescale)."""
    m_new = tl.maximum(m, tl.max(a, -1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(a - tl.expand_dims(m_new, -1))
    return m_new, s * alpha + tl.sum(e, -1), alpha, e


@triton.jit
def _merge_online(ma, sa, mb, sb):
    """Two online log-sum-exp states (max, sum exp(x - max)) as one (the combine of a block reduction)."""
    m = tl.maximum(ma, mb)
    ref = tl.where(m == float("-inf"), 0.0, m)  # both empty: no -inf - -inf
    return m, sa * tl.exp(ma - ref) + sb * tl.exp(mb - ref)


@triton.jit
def _merge_lse2(m1a, s1a, mta, sta, wa, m1b, s1b, mtb, stb, wb):
    """The (max, sum) pairs at T = 1 and at T (with w rescaled like the latter's sum) of two lanes, merged."""
    m1, s1 = _merge_online(m1a, s1a, m1b, s1b)
    mt = tl.maximum(mta, mtb)
    ref = tl.where(mt == float("-inf"), 0.0, mt)
    fa = tl.exp(mta - ref)
    fb = tl.exp(mtb - ref)
    return m1, s1, mt, sta * fa + stb * fb, wa * fa + wb * fb


# Combines of the per-lane state of sub_logit_loss_fwd_kernel for its single block reduction: the two online
# pairs and w (_merge_lse2), then plain sums (row sums, Gram columns); one per Gram width (0 or 4 columns;
# at 8 the Gram columns are summed one by one).
@triton.jit
def _merge_rows0(m1a, s1a, mta, sta, wa, xa, m1b, s1b, mtb, stb, wb, xb):
    m1, s1, mt, st, w = _merge_lse2(m1a, s1a, mta, sta, wa, m1b, s1b, mtb, stb, wb)
    return m1, s1, mt, st, w, xa + xb


@triton.jit
def _merge_rows4(m1a, s1a, mta, sta, wa, xa, g0a, g1a, g2a, g3a,
                 m1b, s1b, mtb, stb, wb, xb, g0b, g1b, g2b, g3b):
    m1, s1, mt, st, w = _merge_lse2(m1a, s1a, mta, sta, wa, m1b, s1b, mtb, stb, wb)
    return m1, s1, mt, st, w, xa + xb, g0a + g0b, g1a + g1b, g2a + g2b, g3a + g3b


@triton.jit
def _gram_column(g, v, vj, offs_n3, j: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gram column j, per lane: g + sum over the lane's VEC elements of v_i * v_j (thread-local sums)."""
    if j < BLOCK_N:
        g += tl.sum(v * vj, 2)
    return g


@triton.jit
def _row(v, offs_n3, j: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row j of the (BLOCK_N, LANES, VEC) tile, (1, LANES, VEC); BLOCK_N sits in every thread's registers, so
    the masked sum over it is thread-local."""
    if j < BLOCK_N:
        return tl.sum(tl.where(offs_n3 == j, v, 0.0), 0)[None, :, :]
    else:
        return tl.zeros_like(v)


@triton.jit
def _gram_entry(gram, col, offs_n, j: tl.constexpr, BLOCK_N: tl.constexpr):
    if j < BLOCK_N:
        gram += tl.where(offs_n[None, :] == j, col[:, None], 0.0)
    return gram


@triton.jit
def sub_logit_loss_fwd_kernel(
    zf_ptr, zs_ptr, zt_ptr, y_ptr,
    partial_ptr, row_stats_ptr, ortho_coef_ptr, sample_stats_ptr,
    S, B, N, K,
    stride_zf_s, stride_zf_b, stride_zf_n, stride_zf_k,
    stride_zs_b, stride_zs_k, stride_zt_b, stride_zt_k, stride_y,
    temperature: tl.float64, label_smoothing: tl.float64, ortho_threshold: tl.float64, ortho_eps: tl.float64,
    mask_fill: tl.float64, ortho_shift: tl.float64, coef_ol: tl.float64, ol_norm: tl.float64,
    MASK_TARGET: tl.constexpr, SHIFT: tl.constexpr, UNIT_T: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program per (stage s, sample b), pid = b max(S, 1) + s, n <= 8 (BLOCK_N <= 8). One pass over K in tiles
    (BLOCK_N, LANES, VEC): every lane (LANES = 32 num_warps threads) owns VEC consecutive elements of each row per step,
    so its loads are VEC-wide vectors when ALIGN = VEC, and it keeps its own online state (no block reduction inside the
    loop): per row the max and sum exp at T = 1 and at T, the KL numerator, the row sum, and the Gram columns v_i.v_j;
    for z_s the (max, sum) at T. After the loop ONE block reduction (``tl.reduce`` over the lanes with ``_merge_rows4``;
    at BLOCK_N = 8 the row state, then the Gram columns one by one) combines the row state and the Gram, one more the
    student's pair. The s = 0 program then makes a second, short pass over z_s and z_t (L2) for CE and KD.
    ALIGN > 1: K and the row strides were passed divided by ALIGN (stride_k == 1, 16-byte aligned rows), so
    the compiler sees them as multiples of ALIGN and vectorises the loads. coef_ol = w_ol / (B n (n-1)),
    ol_norm = 1 / (n (n-1)) (both 0 when n = 1)."""
    if ALIGN > 1:
        K = K * ALIGN
        stride_zf_s = stride_zf_s * ALIGN
        stride_zf_b = stride_zf_b * ALIGN
        stride_zf_n = stride_zf_n * ALIGN
        stride_zs_b = stride_zs_b * ALIGN
        stride_zt_b = stride_zt_b * ALIGN
    BLOCK_K: tl.constexpr = LANES * VEC
    pid = tl.program_id(0).to(tl.int64)
    per_sample = tl.maximum(S, 1)  # S = 0: one program per sample still computes CE and KD
    b = pid // per_sample
    s = pid % per_sample
    first = s == 0
    T = _scalar(temperature, ACC)
    inv_t = 1.0 / T
    ls = _scalar(label_smoothing, ACC)
    fill = _scalar(mask_fill, ACC)
    shift = _scalar(ortho_shift, ACC)
    offs_n = tl.arange(0, BLOCK_N)
    offs_n3 = offs_n[:, None, None]
    lane_k = (tl.arange(0, LANES) * VEC)[None, :, None] + tl.arange(0, VEC)[None, None, :]  # (1, LANES, VEC)
    row_ok = (offs_n < N) & (s < S)
    row_ok3 = row_ok[:, None, None]
    y = tl.load(y_ptr + b * stride_y).to(tl.int64)
    bad = (y < 0) | (y >= K)  # never an index: the sample's partials become NaN below
    y = tl.where(bad, 0, y)
    zf_rows = zf_ptr + s * stride_zf_s + b * stride_zf_b + offs_n.to(tl.int64) * stride_zf_n  # (BLOCK_N,)
    zf_rows3 = zf_rows[:, None, None]
    zs_row = zs_ptr + b * stride_zs_b
    zt_row = zt_ptr + b * stride_zt_b

    neg = float("-inf")
    m1 = tl.full([BLOCK_N, LANES], neg, ACC)   # row max (the T = 1 and the T states share it: T > 0)
    s1 = tl.zeros([BLOCK_N, LANES], ACC)       # sum exp(x - m1)
    st = tl.zeros([BLOCK_N, LANES], ACC)       # sum exp((x - m1) / T)
    w = tl.zeros([BLOCK_N, LANES], ACC)        # sum exp((x - m1) / T) (x - z_s)
    sx = tl.zeros([BLOCK_N, LANES], ACC)       # sum x
    g0 = tl.zeros([BLOCK_N, LANES], ACC)       # Gram column j: sum v_i v_j (j < BLOCK_N <= 8)
    g1 = tl.zeros([BLOCK_N, LANES], ACC)
    g2 = tl.zeros([BLOCK_N, LANES], ACC)
    g3 = tl.zeros([BLOCK_N, LANES], ACC)
    g4 = tl.zeros([BLOCK_N, LANES], ACC)
    g5 = tl.zeros([BLOCK_N, LANES], ACC)
    g6 = tl.zeros([BLOCK_N, LANES], ACC)
    g7 = tl.zeros([BLOCK_N, LANES], ACC)
    ms = tl.full([1, LANES], neg, ACC)         # z_s / T: max and sum exp
    ss = tl.zeros([1, LANES], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + lane_k
        ok = k < K
        m3 = row_ok3 & ok
        x = tl.load(zf_rows3 + k.to(tl.int64) * stride_zf_k, mask=m3, other=0.0).to(ACC)
        zs = tl.load(zs_row + k.to(tl.int64) * stride_zs_k, mask=ok, other=0.0).to(ACC)
        # rows: one max per lane, exps against it at T = 1 and at T
        xm = tl.where(m3, x, neg)
        m_new = tl.maximum(m1, tl.max(xm, 2))
        ref = tl.where(m_new == neg, 0.0, m_new)
        d = xm - ref[:, :, None]
        e1 = tl.exp(d)
        a1 = tl.exp(m1 - ref)
        if UNIT_T:
            et = e1
            at = a1
        else:
            et = tl.exp(d * inv_t)
            at = tl.exp((m1 - ref) * inv_t)
        s1 = s1 * a1 + tl.sum(e1, 2)
        st = st * at + tl.sum(et, 2)
        w = w * at + tl.sum(et * (x - zs), 2)
        sx += tl.sum(x, 2)
        m1 = m_new
        # student at T
        zsm = tl.where(ok, zs * inv_t, neg)
        ms_new = tl.maximum(ms, tl.max(zsm, 2))
        ref_s = tl.where(ms_new == neg, 0.0, ms_new)
        ss = ss * tl.exp(ms - ref_s) + tl.sum(tl.exp(zsm - ref_s[:, :, None]), 2)
        ms = ms_new
        # Gram of the orthogonality rows v (0 outside the row)
        if BLOCK_N > 1:
            v = x
            if SHIFT:
                zt = tl.load(zt_row + k.to(tl.int64) * stride_zt_k, mask=ok, other=0.0).to(ACC)
                v = tl.where(m3, v - shift * zt, 0.0)
            if MASK_TARGET:
                v = tl.where((k == y) & row_ok3, fill, v)
            g0 = _gram_column(g0, v, _row(v, offs_n3, 0, BLOCK_N), offs_n3, 0, BLOCK_N)
            g1 = _gram_column(g1, v, _row(v, offs_n3, 1, BLOCK_N), offs_n3, 1, BLOCK_N)
            g2 = _gram_column(g2, v, _row(v, offs_n3, 2, BLOCK_N), offs_n3, 2, BLOCK_N)
            g3 = _gram_column(g3, v, _row(v, offs_n3, 3, BLOCK_N), offs_n3, 3, BLOCK_N)
            g4 = _gram_column(g4, v, _row(v, offs_n3, 4, BLOCK_N), offs_n3, 4, BLOCK_N)
            g5 = _gram_column(g5, v, _row(v, offs_n3, 5, BLOCK_N), offs_n3, 5, BLOCK_N)
            g6 = _gram_column(g6, v, _row(v, offs_n3, 6, BLOCK_N), offs_n3, 6, BLOCK_N)
            g7 = _gram_column(g7, v, _row(v, offs_n3, 7, BLOCK_N), offs_n3, 7, BLOCK_N)

    # The one block reduction of the row state (a fixed tree: deterministic), and the student's pair.
    if BLOCK_N == 1:
        m1, s1, mt, st, w, sx = tl.reduce((m1, s1, m1 * inv_t, st, w, sx), 1, _merge_rows0)
    elif BLOCK_N <= 4:
        m1, s1, mt, st, w, sx, g0, g1, g2, g3 = tl.reduce(
            (m1, s1, m1 * inv_t, st, w, sx, g0, g1, g2, g3), 1, _merge_rows4)
    else:  # n = 5..8: the row state in one reduction, then one sum per Gram column (no 14-tensor combine)
        m1, s1, mt, st, w, sx = tl.reduce((m1, s1, m1 * inv_t, st, w, sx), 1, _merge_rows0)
        g0 = tl.sum(g0, 1)
        g1 = tl.sum(g1, 1)
        g2 = tl.sum(g2, 1)
        g3 = tl.sum(g3, 1)
        g4 = tl.sum(g4, 1)
        g5 = tl.sum(g5, 1)
        g6 = tl.sum(g6, 1)
        g7 = tl.sum(g7, 1)
    mts, sts = tl.reduce((ms, ss), 1, _merge_online)
    mts = tl.sum(mts, 0)  # (1,) -> scalar
    sts = tl.sum(sts, 0)
    log_s1 = tl.log(s1)
    log_st = tl.log(st)
    log_sts = tl.log(sts)
    lse1 = m1 + log_s1
    kl = (w / st) * inv_t - (mt - mts) - log_st + log_sts
    # fp64 statistics: max + log(sum) rounded to fp32 would be off by up to 2^-24 |lse|.
    stat_rows = row_stats_ptr + ((s * B + b) * N + offs_n) * 3
    tl.store(stat_rows + 0, _f64(m1) + _f64(log_s1), mask=row_ok)
    tl.store(stat_rows + 1, _f64(mt) + _f64(log_st), mask=row_ok)
    tl.store(stat_rows + 2, _f64(kl), mask=row_ok)

    ls_k = ls / K
    zf_y = tl.load(zf_rows + y * stride_zf_k, mask=row_ok, other=0.0).to(ACC)
    ce_rows = lse1 - (1.0 - ls) * zf_y - ls_k * sx
    sub_ce_b = tl.sum(tl.where(row_ok, ce_rows, 0.0)) / tl.maximum(N, 1)
    sub_kl_b = T * T * tl.sum(tl.where(row_ok, kl, 0.0)) / tl.maximum(N, 1)

    # s = 0: CE of z_s, KD, sample_stats (a second pass over z_s and z_t, from L2).
    ce_b = tl.zeros([], ACC)
    kd_b = tl.zeros([], ACC)
    if first:
        m1z = tl.full([1, LANES], neg, ACC)
        s1z = tl.zeros([1, LANES], ACC)
        szs = tl.zeros([1, LANES], ACC)
        mtt = tl.full([1, LANES], neg, ACC)
        stt = tl.zeros([1, LANES], ACC)
        wt = tl.zeros([1, LANES], ACC)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + lane_k
            ok = k < K
            zs = tl.load(zs_row + k.to(tl.int64) * stride_zs_k, mask=ok, other=0.0).to(ACC)
            zt = tl.load(zt_row + k.to(tl.int64) * stride_zt_k, mask=ok, other=0.0).to(ACC)
            zsm = tl.where(ok, zs, neg)
            m_new = tl.maximum(m1z, tl.max(zsm, 2))
            ref = tl.where(m_new == neg, 0.0, m_new)
            s1z = s1z * tl.exp(m1z - ref) + tl.sum(tl.exp(zsm - ref[:, :, None]), 2)
            m1z = m_new
            szs += tl.sum(zs, 2)
            ztm = tl.where(ok, zt * inv_t, neg)
            m_new = tl.maximum(mtt, tl.max(ztm, 2))
            ref = tl.where(m_new == neg, 0.0, m_new)
            at = tl.exp(mtt - ref)
            et = tl.exp(ztm - ref[:, :, None])
            stt = stt * at + tl.sum(et, 2)
            wt = wt * at + tl.sum(et * (zt - zs), 2)
            mtt = m_new
        m1z, s1z, mtt, stt, wt, szs = tl.reduce((m1z, s1z, mtt, stt, wt, szs), 1, _merge_rows0)
        m1z = tl.sum(m1z, 0)
        s1z = tl.sum(s1z, 0)
        mtt = tl.sum(mtt, 0)
        stt = tl.sum(stt, 0)
        wt = tl.sum(wt, 0)
        szs = tl.sum(szs, 0)
        log_stt = tl.log(stt)
        tl.store(sample_stats_ptr + b * 3 + 0, _f64(m1z) + _f64(tl.log(s1z)))
        tl.store(sample_stats_ptr + b * 3 + 1, _f64(mts) + _f64(log_sts))
        tl.store(sample_stats_ptr + b * 3 + 2, _f64(mtt) + _f64(log_stt))
        zs_y = tl.load(zs_row + y * stride_zs_k).to(ACC)
        ce_b = (m1z + tl.log(s1z)) - (1.0 - ls) * zs_y - ls_k * szs
        kd_b = T * T * ((wt / stt) * inv_t - (mtt - mts) - log_stt + log_sts)

    # Orthogonality from the Gram (norms on its diagonal) and the coefficient matrix M of its gradient; the
    # (BLOCK_N, BLOCK_N) tail is spread over the block's threads.
    gram = tl.zeros([BLOCK_N, BLOCK_N], ACC)  # n = 1: no pairs, M = 0
    if BLOCK_N > 1:
        gram = _gram_entry(gram, g0, offs_n, 0, BLOCK_N)
        gram = _gram_entry(gram, g1, offs_n, 1, BLOCK_N)
        gram = _gram_entry(gram, g2, offs_n, 2, BLOCK_N)
        gram = _gram_entry(gram, g3, offs_n, 3, BLOCK_N)
        gram = _gram_entry(gram, g4, offs_n, 4, BLOCK_N)
        gram = _gram_entry(gram, g5, offs_n, 5, BLOCK_N)
        gram = _gram_entry(gram, g6, offs_n, 6, BLOCK_N)
        gram = _gram_entry(gram, g7, offs_n, 7, BLOCK_N)
    ol_b, mmat = _ortho_tail(gram, offs_n, row_ok, ortho_eps, ortho_threshold, coef_ol, ol_norm, ACC)
    coef = ortho_coef_ptr + (s * B + b) * N * N + offs_n[:, None] * N + offs_n[None, :]
    tl.store(coef, mmat, mask=row_ok[:, None] & row_ok[None, :])

    part = partial_ptr + pid * 5
    nan = float("nan")
    tl.store(part + 0, tl.where(bad, nan, ce_b))
    tl.store(part + 1, tl.where(bad, nan, sub_ce_b))
    tl.store(part + 2, tl.where(bad, nan, kd_b))
    tl.store(part + 3, tl.where(bad, nan, sub_kl_b))
    tl.store(part + 4, tl.where(bad, nan, ol_b))


@triton.jit
def _ortho_tail(gram, offs_n, row_ok, ortho_eps, ortho_threshold, coef_ol, ol_norm, ACC: tl.constexpr):
    """From the Gram G (norms on its diagonal): the sample's orthogonality sum and M (hcd_fast/ops/
    sub_logit_loss.py). r = max(||v||, eps); M_ii's norm term is active where ||v|| > eps: at equality r has the
    minimum-norm subgradient 0 in ||v||, as in the reference."""
    eye = offs_n[:, None] == offs_n[None, :]
    pair_ok = row_ok[:, None] & row_ok[None, :] & (offs_n[:, None] != offs_n[None, :])
    eps = _scalar(ortho_eps, ACC)
    norm_i = tl.sqrt(tl.sum(tl.where(eye, gram, 0.0), 1))
    r_i = tl.maximum(norm_i, eps)
    r_j = tl.maximum(tl.sqrt(tl.sum(tl.where(eye, gram, 0.0), 0)), eps)
    rr = r_i[:, None] * r_j[None, :]
    gn = gram / rr
    hinge = tl.where(pair_ok, tl.maximum(gn - _scalar(ortho_threshold, ACC), 0.0), 0.0)
    ol_b = tl.sum(tl.sum(hinge * hinge, 1), 0) * _scalar(ol_norm, ACC)
    amat = (4.0 * _scalar(coef_ol, ACC)) * hinge
    proj = tl.where(norm_i > eps, tl.sum(amat * gn, 1) / (r_i * r_i), 0.0)
    mmat = amat / rr - tl.where(eye, proj[:, None], 0.0)
    return ol_b, mmat


@triton.jit
def sub_logit_loss_fwd_large_n_kernel(
    zf_ptr, zs_ptr, zt_ptr, y_ptr,
    partial_ptr, row_stats_ptr, ortho_coef_ptr, sample_stats_ptr,
    S, B, N, K,
    stride_zf_s, stride_zf_b, stride_zf_n, stride_zf_k,
    stride_zs_b, stride_zs_k, stride_zt_b, stride_zt_k, stride_y,
    temperature: tl.float64, label_smoothing: tl.float64, ortho_threshold: tl.float64, ortho_eps: tl.float64,
    mask_fill: tl.float64, ortho_shift: tl.float64, coef_ol: tl.float64, ol_norm: tl.float64,
    MASK_TARGET: tl.constexpr, SHIFT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program pid = b max(S, 1) + s. coef_ol = w_ol / (B n (n-1)), ol_norm = 1 / (n (n-1)) (both 0 when n = 1)."""
    pid = tl.program_id(0).to(tl.int64)
    per_sample = tl.maximum(S, 1)  # S = 0: one program per sample still computes CE and KD
    b = pid // per_sample
    s = pid % per_sample
    first = s == 0
    T = _scalar(temperature, ACC)
    inv_t = 1.0 / T
    ls = _scalar(label_smoothing, ACC)
    fill = _scalar(mask_fill, ACC)
    shift = _scalar(ortho_shift, ACC)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = (offs_n < N) & (s < S)
    y = tl.load(y_ptr + b * stride_y).to(tl.int64)
    bad = (y < 0) | (y >= K)  # never an index: the sample's partials become NaN below
    y = tl.where(bad, 0, y)
    zf_rows = zf_ptr + s * stride_zf_s + b * stride_zf_b + offs_n[:, None] * stride_zf_n
    zs_row = zs_ptr + b * stride_zs_b
    zt_row = zt_ptr + b * stride_zt_b

    # Online (max, sum) pairs: rows at T = 1 (m1v, s1v) and at T (mtv, stv, with the KL numerator wv), z_s at
    # T = 1 and T, z_t at T (with the KD numerator wt); row sums for the label-smoothing term; the Gram.
    m1v = tl.full([BLOCK_N], float("-inf"), ACC)
    s1v = tl.zeros([BLOCK_N], ACC)
    mtv = tl.full([BLOCK_N], float("-inf"), ACC)
    stv = tl.zeros([BLOCK_N], ACC)
    wv = tl.zeros([BLOCK_N], ACC)
    sum_zf = tl.zeros([BLOCK_N], ACC)
    gram = tl.zeros([BLOCK_N, BLOCK_N], ACC)
    m1s = tl.full([], float("-inf"), ACC)
    s1s = tl.zeros([], ACC)
    mts = tl.full([], float("-inf"), ACC)
    sts = tl.zeros([], ACC)
    sum_zs = tl.zeros([], ACC)
    mtt = tl.full([], float("-inf"), ACC)
    stt = tl.zeros([], ACC)
    wt = tl.zeros([], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        ok = k < K
        m2 = row_ok[:, None] & ok[None, :]
        x = tl.load(zf_rows + k[None, :] * stride_zf_k, mask=m2, other=0.0).to(ACC)
        zs = tl.load(zs_row + k * stride_zs_k, mask=ok, other=0.0).to(ACC)
        if SHIFT:
            zt = tl.load(zt_row + k * stride_zt_k, mask=ok, other=0.0).to(ACC)
        else:  # only the s = 0 program reads z_t (a false mask issues no memory access)
            zt = tl.load(zt_row + k * stride_zt_k, mask=ok & first, other=0.0).to(ACC)
        zs_t = zs * inv_t
        # rows
        m1v, s1v, _, _ = _online(m1v, s1v, tl.where(ok[None, :], x, float("-inf")))
        x_t = x * inv_t
        mtv, stv, alpha, e = _online(mtv, stv, tl.where(ok[None, :], x_t, float("-inf")))
        wv = wv * alpha + tl.sum(e * (x_t - zs_t[None, :]), 1)
        sum_zf += tl.sum(x, 1)
        # student and teacher
        m1s, s1s, _, _ = _online(m1s, s1s, tl.where(ok, zs, float("-inf")))
        mts, sts, _, _ = _online(mts, sts, tl.where(ok, zs_t, float("-inf")))
        sum_zs += tl.sum(zs)
        zt_t = zt * inv_t
        mtt, stt, alpha, e = _online(mtt, stt, tl.where(ok, zt_t, float("-inf")))
        wt = wt * alpha + tl.sum(e * (zt_t - zs_t))
        # Gram of the orthogonality rows v
        if BLOCK_N > 1:
            v = x
            if SHIFT:
                v = tl.where(m2, v - shift * zt[None, :], 0.0)
            if MASK_TARGET:
                v = tl.where((k == y)[None, :] & row_ok[:, None], fill, v)
            for j in tl.static_range(BLOCK_N):
                vj = _extract_row(v, offs_n, j)
                dots = tl.sum(v * vj[None, :], 1)  # G[:, j]
                gram += tl.where(offs_n[None, :] == j, dots[:, None], 0.0)

    # Statistics; log-probabilities stay (x - max) - log(sum) inside this kernel.
    log_s1v = tl.log(s1v)
    log_stv = tl.log(stv)
    log_sts = tl.log(sts)
    log_stt = tl.log(stt)
    lse1 = m1v + log_s1v
    kl = wv / stv - (mtv - mts) - log_stv + log_sts
    # The statistics are stored in fp64: max + log(sum) rounded to fp32 would be off by up to 2^-24 |lse|
    # (1.5e-5 at |lse| ~ 250), and exp(x - lse) in the backward would inherit that relative error.
    stat_rows = row_stats_ptr + ((s * B + b) * N + offs_n) * 3
    tl.store(stat_rows + 0, _f64(m1v) + _f64(log_s1v), mask=row_ok)
    tl.store(stat_rows + 1, _f64(mtv) + _f64(log_stv), mask=row_ok)
    tl.store(stat_rows + 2, _f64(kl), mask=row_ok)
    lse1_s = m1s + tl.log(s1s)
    tl.store(sample_stats_ptr + b * 3 + 0, _f64(m1s) + _f64(tl.log(s1s)), mask=first)
    tl.store(sample_stats_ptr + b * 3 + 1, _f64(mts) + _f64(log_sts), mask=first)
    tl.store(sample_stats_ptr + b * 3 + 2, _f64(mtt) + _f64(log_stt), mask=first)

    # CE of every row and of z_s; KD (s = 0 only); the row KLs.
    ls_k = ls / K
    zf_y = tl.sum(tl.load(zf_rows + y * stride_zf_k, mask=row_ok[:, None], other=0.0).to(ACC), 1)
    ce_rows = lse1 - (1.0 - ls) * zf_y - ls_k * sum_zf
    sub_ce_b = tl.sum(tl.where(row_ok, ce_rows, 0.0)) / tl.maximum(N, 1)
    sub_kl_b = T * T * tl.sum(tl.where(row_ok, kl, 0.0)) / tl.maximum(N, 1)
    zs_y = tl.load(zs_row + y * stride_zs_k).to(ACC)
    ce_b = tl.where(first, lse1_s - (1.0 - ls) * zs_y - ls_k * sum_zs, 0.0)
    kd_b = tl.where(first, T * T * (wt / stt - (mtt - mts) - log_stt + log_sts), 0.0)

    # Orthogonality from the Gram (norms on its diagonal) and the coefficient matrix M of its gradient.
    eye = offs_n[:, None] == offs_n[None, :]
    pair_ok = row_ok[:, None] & row_ok[None, :] & (offs_n[:, None] != offs_n[None, :])
    eps = _scalar(ortho_eps, ACC)
    norm_i = tl.sqrt(tl.sum(tl.where(eye, gram, 0.0), 1))
    r_i = tl.maximum(norm_i, eps)
    r_j = tl.maximum(tl.sqrt(tl.sum(tl.where(eye, gram, 0.0), 0)), eps)
    rr = r_i[:, None] * r_j[None, :]
    gn = gram / rr
    hinge = tl.where(pair_ok, tl.maximum(gn - _scalar(ortho_threshold, ACC), 0.0), 0.0)
    ol_b = tl.sum(tl.sum(hinge * hinge, 1), 0) * _scalar(ol_norm, ACC)
    amat = (4.0 * _scalar(coef_ol, ACC)) * hinge
    proj = tl.where(norm_i > eps, tl.sum(amat * gn, 1) / (r_i * r_i), 0.0)
    mmat = amat / rr - tl.where(eye, proj[:, None], 0.0)
    coef = ortho_coef_ptr + (s * B + b) * N * N + offs_n[:, None] * N + offs_n[None, :]
    tl.store(coef, mmat, mask=row_ok[:, None] & row_ok[None, :])

    part = partial_ptr + pid * 5
    nan = float("nan")
    tl.store(part + 0, tl.where(bad, nan, ce_b))
    tl.store(part + 1, tl.where(bad, nan, sub_ce_b))
    tl.store(part + 2, tl.where(bad, nan, kd_b))
    tl.store(part + 3, tl.where(bad, nan, sub_kl_b))
    tl.store(part + 4, tl.where(bad, nan, ol_b))


@triton.jit
def sub_logit_loss_reduce_kernel(
    partial_ptr, loss_ptr, parts_ptr,
    R, B,
    w_gt: tl.float64, w_kd: tl.float64, w_kl: tl.float64, w_ol: tl.float64,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Single program: parts = column sums of the (R, 5) partials (fixed order) / B, loss = weighted sum."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, 8)
    acc = tl.zeros([BLOCK_R, 8], ACC)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + offs_r
        m = (rows[:, None] < R) & (offs_p[None, :] < 5)
        acc += tl.load(partial_ptr + rows[:, None] * 5 + offs_p[None, :], mask=m, other=0.0)
    parts = tl.sum(acc, 0) / B
    tl.store(parts_ptr + offs_p, parts, mask=offs_p < 5)
    wg = _scalar(w_gt, ACC)
    weights = tl.where(offs_p < 2, wg, tl.where(offs_p == 2, _scalar(w_kd, ACC), tl.where(
        offs_p == 3, _scalar(w_kl, ACC), tl.where(offs_p == 4, _scalar(w_ol, ACC), 0.0))))
    tl.store(loss_ptr, tl.sum(parts * weights, 0))


@triton.jit
def sub_logit_loss_bwd_kernel(
    grad_loss_ptr, zf_ptr, zs_ptr, zt_ptr, y_ptr, row_stats_ptr, ortho_coef_ptr, sample_stats_ptr,
    grad_zf_ptr, grad_zs_ptr,
    S, B, N, K,
    stride_zf_s, stride_zf_b, stride_zf_n, stride_zf_k,
    stride_zs_b, stride_zs_k, stride_zt_b, stride_zt_k, stride_y,
    temperature: tl.float64, label_smoothing: tl.float64, ortho_shift: tl.float64,
    coef_ce: tl.float64, coef_kd: tl.float64, coef_sub_ce: tl.float64, coef_kl: tl.float64,
    MASK_TARGET: tl.constexpr, SHIFT: tl.constexpr, DETACH: tl.constexpr, NEED_SUB: tl.constexpr,
    NEED_STUDENT: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (b, K block). coef_ce = w_gt/B, coef_kd = w_kd/B, coef_sub_ce = w_gt/(B n), coef_kl = w_kl/(B n);
    the gradient formulas are the op's (hcd_fast/ops/sub_logit_loss.py), times grad_loss."""
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    ok = offs_k < K
    row_ok = offs_n < N
    m2 = row_ok[:, None] & ok[None, :]
    T = _scalar(temperature, ACC)
    inv_t = 1.0 / T
    ls = _scalar(label_smoothing, ACC)
    shift = _scalar(ortho_shift, ACC)
    kl_t = _scalar(coef_kl, ACC) * T
    y = tl.load(y_ptr + b * stride_y).to(tl.int64)
    bad = (y < 0) | (y >= K)
    g = tl.where(bad, float("nan"), tl.load(grad_loss_ptr).to(ACC))  # grad_output, on the device
    onehot = tl.where(offs_k == y, 1.0 - ls, 0.0) + ls / K  # (1-ls)[k == y] + ls/K; never true for a bad y
    zs = tl.load(zs_ptr + b * stride_zs_b + offs_k * stride_zs_k, mask=ok, other=0.0).to(ACC)
    if SHIFT or NEED_STUDENT:
        zt = tl.load(zt_ptr + b * stride_zt_b + offs_k * stride_zt_k, mask=ok, other=0.0).to(ACC)
    else:
        zt = tl.zeros([BLOCK_K], ACC)
    hi_s, lo_s = _split(tl.load(sample_stats_ptr + b * 3 + 1), ACC)
    log_ps = (zs * inv_t - hi_s) - lo_s  # log P_s
    sum_p = tl.zeros([BLOCK_K], ACC)
    # Stage s's tile: a 64-bit pointer advanced by stride_zf_s per stage (s * stride_zf_s with the int32 loop
    # counter would wrap past 2^31 elements).
    zf_tile = zf_ptr + b * stride_zf_b + offs_n[:, None].to(tl.int64) * stride_zf_n \
        + offs_k[None, :].to(tl.int64) * stride_zf_k
    for s in range(0, S):
        x = tl.load(zf_tile, mask=m2, other=0.0).to(ACC)
        zf_tile += stride_zf_s
        stats = row_stats_ptr + ((s * B + b) * N + offs_n) * 3
        hi_t, lo_t = _split(tl.load(stats + 1, mask=row_ok, other=0.0), ACC)
        log_p = (x * inv_t - hi_t[:, None]) - lo_t[:, None]
        p = tl.where(m2, tl.exp(log_p), 0.0)
        if NEED_STUDENT:
            sum_p += tl.sum(p, 0)
        if NEED_SUB:
            hi_1, lo_1 = _split(tl.load(stats + 0, mask=row_ok, other=0.0), ACC)
            gz = _scalar(coef_sub_ce, ACC) * (tl.exp((x - hi_1[:, None]) - lo_1[:, None]) - onehot[None, :])
            if not DETACH:
                kl = tl.load(stats + 2, mask=row_ok, other=0.0).to(ACC)
                gz += kl_t * p * (log_p - log_ps[None, :] - kl[:, None])
            if BLOCK_N > 1:
                v = x
                if SHIFT:
                    v = x - shift * zt[None, :]
                mmat = tl.load(ortho_coef_ptr + (s * B + b) * N * N + offs_n[:, None] * N + offs_n[None, :],
                               mask=row_ok[:, None] & row_ok[None, :], other=0.0)
                g_ol = tl.zeros([BLOCK_N, BLOCK_K], ACC)
                for j in tl.static_range(BLOCK_N):
                    vj = _extract_row(v, offs_n, j)
                    mj = tl.sum(tl.where(offs_n[None, :] == j, mmat, 0.0), 1)  # M[:, j]
                    g_ol += mj[:, None] * vj[None, :]
                if MASK_TARGET:  # the masked entry is a constant: no gradient
                    g_ol = tl.where((offs_k == y)[None, :], 0.0, g_ol)
                gz += g_ol
            out = grad_zf_ptr + ((s * B + b) * N + offs_n[:, None]) * K + offs_k[None, :]
            tl.store(out, _cast_out(g * gz, grad_zf_ptr.dtype.element_ty), mask=m2)
    if NEED_STUDENT:
        p_s = tl.exp(log_ps)
        hi_1s, lo_1s = _split(tl.load(sample_stats_ptr + b * 3 + 0), ACC)
        p1 = tl.exp((zs - hi_1s) - lo_1s)
        hi_tt, lo_tt = _split(tl.load(sample_stats_ptr + b * 3 + 2), ACC)
        p_t = tl.exp((zt * inv_t - hi_tt) - lo_tt)
        gs = _scalar(coef_ce, ACC) * (p1 - onehot) + _scalar(coef_kd, ACC) * T * (p_s - p_t)
        gs += kl_t * ((S * N) * p_s - sum_p)
        tl.store(grad_zs_ptr + b * K + offs_k, _cast_out(g * gs, grad_zs_ptr.dtype.element_ty), mask=ok)


def _warps(tile: int, least: int = 2) -> int:
    """About 8 tile elements per thread, ``least`` to 8 warps: the tile's temporaries then stay in registers."""
    return max(least, min(8, tile // 256))


def _fwd_heuristic(n: int, num_classes: int, block_k=None):
    """sub_logit_loss_fwd_large_n_kernel (n > 8; fp64 n > 4): BLOCK_N = n rounded up to a power of two; BLOCK_K bounds
    the (BLOCK_N, BLOCK_K) tile (1024 elements from n = 16 on, where the n x n Gram tiles take registers), so every
    K is looped over; about 8 tile elements per thread (``_warps``). tests/test_triton_compile.py checks with
    ``ptxas -v`` for sm_90 that these sizes do not spill."""
    block_n = triton.next_power_of_2(n)
    if block_k is None:
        budget = min(2048 // block_n, 1024) if block_n <= 8 else 1024 // block_n
        block_k = min(triton.next_power_of_2(num_classes), max(32, budget))
    return block_n, block_k, _warps(block_n * block_k, 2 if block_n == 1 else 4)


# sub_logit_loss_fwd_kernel keeps the n x n Gram lanes in registers up to n = 8 (fp32 accumulation: ~250
# registers at sm_90, no spill under triton 3.6 and 3.8 with 2 elements per lane and row; 4 spilled 104 bytes
# under 3.6) and n = 4 in fp64 (n = 8 spilled 4.4 KB); larger n runs sub_logit_loss_fwd_large_n_kernel.
LANE_MAX_N = 8
LANE_MAX_N_FP64 = 4


def _lane_forward(n: int, fp64: bool) -> bool:
    return n <= (LANE_MAX_N_FP64 if fp64 else LANE_MAX_N)


def _fwd_lane_heuristic(n: int, num_classes: int, elem_bytes: int, block_k=None, fp64: bool = False,
                        scalar: bool = False):
    """sub_logit_loss_fwd_kernel (``_lane_forward``): (BLOCK_N, VEC, num_warps). VEC = 4 elements per lane and
    row: a 16-byte vector of fp32, 8 bytes of bf16/fp16 (8 bf16 elements, a 16-byte vector, need 128 registers
    and spill at sm_90), 2 at n = 5..8 (the 8 x 8 Gram lanes), 1 in fp64 (the fp64 state takes twice the
    registers). 1 to 4 warps, about two vectors per lane and row over K (K = 1000: 4 warps, 2 steps); at n = 5..8
    at least 2 warps, and 1 element per lane where the loads are scalar (``scalar``: the rows are not aligned;
    2 spilled 192 bytes under triton 3.8, a single warp 16 bytes under 3.6). block_k (tests): one warp and
    VEC = block_k // 32 (at least 1), to force the K loop."""
    block_n = triton.next_power_of_2(n)
    vec = 1 if fp64 or scalar else min(4, max(1, 16 // elem_bytes))
    if block_n == 8:
        vec = min(vec, 2)
    if block_k is not None:
        return block_n, max(1, block_k // 32), 1
    num_warps = min(4, max(2 if block_n == 8 else 1, triton.next_power_of_2(triton.cdiv(num_classes, 32 * vec)) // 2))
    return block_n, vec, num_warps


def _alignment(vec: int, num_classes: int, tensors, strides) -> int:
    """vec when every row of zf, z_s and z_t starts on a 16-byte boundary and is contiguous (K a multiple of
    vec, stride_k == 1, the other strides multiples of vec): then the kernel gets K and the strides divided by
    vec and the compiler emits vector loads; else 1."""
    if vec == 1 or num_classes % vec:
        return 1
    if any(t.data_ptr() % 16 for t in tensors):
        return 1
    for t in tensors:
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            return 1
    return vec if all(st % vec == 0 for st in strides) else 1


def _bwd_heuristic(n: int, num_classes: int, block_k=None):
    """The backward's tile (BLOCK_N, BLOCK_K) <= 2048 elements (512 from n = 16 on): small K blocks give
    B * ceil(K / BLOCK_K) programs, enough to fill the GPU at B = 128-256."""
    block_n = triton.next_power_of_2(n)
    if block_k is None:
        budget = min(2048 // block_n, 512) if block_n <= 8 else max(512 // block_n, 16)
        block_k = min(triton.next_power_of_2(num_classes), max(32, budget))
    return block_n, block_k, _warps(block_n * block_k)


def sub_logit_loss_forward(
    sub_logits: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
    target: torch.Tensor, temperature: float, label_smoothing: float, ortho_threshold: float,
    ortho_eps: float, mask_target: bool, mask_fill: float, ortho_shift: float, detach_sub_targets: bool,
    w_gt: float, w_kd: float, w_kl: float, w_ol: float, block_k=None,
):
    """Launch the statistics forward and the reduction (arguments: FWD_SCHEMA of ``hcd_fast.ops.sub_logit_loss``).

    Args:
        sub_logits: zf, (S, B, n, K), any strides, fp16/bf16/fp32/fp64.
        student_logits: z_s, (B, K).  teacher_logits: z_t, (B, K).  target: y, (B,) integer.
        block_k: override of the K block (tests use it to force the K loop).

    Returns:
        loss (), parts (5,), ortho_coef (S, B, n, n) in fp32 (fp64 if any logits are fp64); row_stats
        (S, B, n, 3) and sample_stats (B, 3) in fp64.
    """
    num_stages, batch, n, num_classes = sub_logits.shape
    device = sub_logits.device
    fp64 = torch.float64 in (sub_logits.dtype, student_logits.dtype, teacher_logits.dtype)
    acc_dtype = torch.float64 if fp64 else torch.float32
    acc = tl.float64 if fp64 else tl.float32
    partial = torch.empty((batch * max(num_stages, 1), NUM_PARTS), device=device, dtype=acc_dtype)
    loss = torch.empty((), device=device, dtype=acc_dtype)
    parts = torch.empty((NUM_PARTS,), device=device, dtype=acc_dtype)
    row_stats = torch.empty((num_stages, batch, n, NUM_ROW_STATS), device=device, dtype=torch.float64)
    ortho_coef = torch.empty((num_stages, batch, n, n), device=device, dtype=acc_dtype)
    sample_stats = torch.empty((batch, NUM_SAMPLE_STATS), device=device, dtype=torch.float64)
    pairs = n * (n - 1)
    programs = batch * max(num_stages, 1)
    if batch == 0:  # the means over an empty batch are NaN, as in the reference (and the CUDA backend)
        return loss.fill_(float("nan")), parts.fill_(float("nan")), row_stats, ortho_coef, sample_stats
    scalars = (float(temperature), float(label_smoothing), float(ortho_threshold), float(ortho_eps),
               float(mask_fill), float(ortho_shift), w_ol / (batch * pairs) if pairs else 0.0,
               1.0 / pairs if pairs else 0.0)
    if _lane_forward(n, fp64):
        block_n, vec, num_warps = _fwd_lane_heuristic(n, num_classes, sub_logits.element_size(), block_k, fp64)
        row_strides = (*sub_logits.stride()[:3], student_logits.stride(0), teacher_logits.stride(0))
        align = _alignment(vec, num_classes, (sub_logits, student_logits, teacher_logits), row_strides)
        if block_n == 8 and align == 1 and block_k is None:  # scalar loads: 1 element per lane (2 spilled)
            block_n, vec, num_warps = _fwd_lane_heuristic(n, num_classes, sub_logits.element_size(), None, fp64,
                                                          scalar=True)
        zf_s, zf_b, zf_n, zs_b, zt_b = (st // align for st in row_strides)
        sub_logit_loss_fwd_kernel[(programs,)](
            sub_logits, student_logits, teacher_logits, target,
            partial, row_stats, ortho_coef, sample_stats,
            num_stages, batch, n, num_classes // align,
            zf_s, zf_b, zf_n, sub_logits.stride(3), zs_b, student_logits.stride(1), zt_b,
            teacher_logits.stride(1), target.stride(0), *scalars,
            MASK_TARGET=bool(mask_target), SHIFT=ortho_shift != 0.0, UNIT_T=float(temperature) == 1.0, ACC=acc,
            BLOCK_N=block_n, LANES=32 * num_warps, VEC=vec, ALIGN=align, num_warps=num_warps,
        )
    else:
        block_n, block_k, num_warps = _fwd_heuristic(n, num_classes, block_k)
        sub_logit_loss_fwd_large_n_kernel[(programs,)](
            sub_logits, student_logits, teacher_logits, target,
            partial, row_stats, ortho_coef, sample_stats,
            num_stages, batch, n, num_classes,
            *sub_logits.stride(), *student_logits.stride(), *teacher_logits.stride(), target.stride(0), *scalars,
            MASK_TARGET=bool(mask_target), SHIFT=ortho_shift != 0.0, ACC=acc,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        )
    sub_logit_loss_reduce_kernel[(1,)](
        partial, loss, parts, programs, batch, float(w_gt), float(w_kd), float(w_kl), float(w_ol),
        ACC=acc, BLOCK_R=min(triton.next_power_of_2(programs), 256), num_warps=4,
    )
    return loss, parts, row_stats, ortho_coef, sample_stats


def sub_logit_loss_backward(
    grad_loss: torch.Tensor, sub_logits: torch.Tensor, student_logits: torch.Tensor,
    teacher_logits: torch.Tensor, target: torch.Tensor, row_stats: torch.Tensor, ortho_coef: torch.Tensor,
    sample_stats: torch.Tensor, temperature: float, label_smoothing: float, ortho_shift: float,
    mask_target: bool, detach_sub_targets: bool, w_gt: float, w_kd: float, w_kl: float,
    need_grad_sub: bool, need_grad_student: bool, block_k=None,
):
    """Launch the recomputing backward (arguments: BWD_SCHEMA of ``hcd_fast.ops.sub_logit_loss``).

    Args:
        grad_loss: 0-d, d output / d loss, read by the kernel (no host sync).
        sub_logits, student_logits, teacher_logits, target: the forward's inputs (any strides).
        row_stats (S, B, n, 3), ortho_coef (S, B, n, n), sample_stats (B, 3): the forward's statistics.

    Returns:
        grad_sub_logits (S, B, n, K) in sub_logits' dtype and grad_student_logits (B, K) in student_logits'
        dtype, contiguous; a (0,) tensor for one that is not needed.
    """
    num_stages, batch, n, num_classes = sub_logits.shape
    device = sub_logits.device
    acc = tl.float64 if ortho_coef.dtype == torch.float64 else tl.float32
    grad_zf = torch.empty(sub_logits.shape if need_grad_sub else (0,), device=device, dtype=sub_logits.dtype)
    grad_zs = torch.empty(student_logits.shape if need_grad_student else (0,), device=device,
                          dtype=student_logits.dtype)
    if batch == 0 or num_classes == 0 or not (need_grad_sub or need_grad_student):
        return grad_zf, grad_zs.zero_()
    block_n, block_k, num_warps = _bwd_heuristic(n, num_classes, block_k)
    # Stats and grad_loss are the forward's / autograd's fresh contiguous tensors; make sure of it.
    row_stats, ortho_coef, sample_stats = row_stats.contiguous(), ortho_coef.contiguous(), sample_stats.contiguous()
    sub_logit_loss_bwd_kernel[(batch, triton.cdiv(num_classes, block_k))](
        grad_loss, sub_logits, student_logits, teacher_logits, target, row_stats, ortho_coef, sample_stats,
        grad_zf, grad_zs,
        num_stages, batch, n, num_classes,
        *sub_logits.stride(), *student_logits.stride(), *teacher_logits.stride(), target.stride(0),
        float(temperature), float(label_smoothing), float(ortho_shift),
        w_gt / batch, w_kd / batch, w_gt / (batch * n), w_kl / (batch * n),
        MASK_TARGET=bool(mask_target), SHIFT=ortho_shift != 0.0, DETACH=bool(detach_sub_targets),
        NEED_SUB=bool(need_grad_sub), NEED_STUDENT=bool(need_grad_student), ACC=acc,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return grad_zf, grad_zs
