"""Triton kernels of ``sub_logit_loss``: the whole HCD loss and its gradients in one pass per sample.

Math (per sample b; zf_{s,i} the fused sub-logits of stage s, row i; z_s, z_t the student/teacher logits;
P = softmax(./T), p = softmax(.) at T = 1, lse = logsumexp):

* CE_ls(z, y) = lse(z) - (1-ls) z_y - ls/K sum_k z_k,     dCE/dz = p - (1-ls) onehot(y) - ls/K.
* KL_T(a || c) = T^2 sum_k P_a (log P_a - log P_c) (log-probabilities on both sides: stable for large
  logits),  dKL/dc = T (P_c - P_a),  dKL/da = T P_a (log P_a - log P_c - KL/T^2)   (a = zf, c = z_s).
* Orthogonality: v_i = zf_i - ortho_shift z_t (ortho_shift = 0 unless ortho_on="raw"), its target entry set
  to mask_fill when mask_target, r_i = max(||v_i||, eps), G_ij = v_i.v_j / (r_i r_j),
  OL = c sum_{i!=j} relu(G_ij - theta)^2 with c = 1 / (B n (n-1)). With A = 4 c relu(G - theta) (off
  diagonal), dOL/dv_i = sum_j M_ij v_j, M_ij = A_ij / (r_i r_j) and
  M_ii = -[||v_i|| > eps] sum_j A_ij G_ij / r_i^2 (the normalisation's projection), so the orthogonality
  gradient is the small n x n matrix M applied to the rows: only norms and dot products are needed,
  accumulated over K blocks.

The loss is the last node of the graph, so the forward writes d loss / d zf and d loss / d z_s directly
(fp32, or fp64 for fp64 inputs); the backward only scales them by grad_output. One program per sample
loops over the stages, so every gradient element has exactly one writer (d/dz_s is accumulated over the
stages in place by its own program, with a CTA barrier between write and read-back); per-sample partial
sums go to a (B, 5) buffer that a second one-program launch reduces in a fixed order (deterministic, no
atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_PARTS = 5  # ce, sub_ce, kd, sub_kl, ortho


@triton.jit
def _extract_row(t, offs_n, j):
    """Row j of a (BLOCK_N, BLOCK_K) tile as a (BLOCK_K,) vector (a masked sum: no dynamic indexing)."""
    return tl.sum(tl.where(offs_n[:, None] == j, t, 0.0), axis=0)


@triton.jit
def _ortho_rows(x, zt, k, y, row_ok, mask_fill, ortho_shift, MASK_TARGET: tl.constexpr, SHIFT: tl.constexpr):
    """v = zf - ortho_shift * z_t (SHIFT: ortho_on="raw"), with the target entry replaced by mask_fill
    (MASK_TARGET); padding rows stay 0."""
    if SHIFT:
        x = tl.where(row_ok[:, None], x - ortho_shift * zt[None, :], 0.0)
    if MASK_TARGET:
        x = tl.where((k == y)[None, :] & row_ok[:, None], mask_fill, x)
    return x


@triton.jit
def sub_logit_loss_fwd_kernel(
    zf_ptr, zs_ptr, zt_ptr, y_ptr,
    partial_ptr, grad_zf_ptr, grad_zs_ptr,
    S, N, K,
    stride_zf_s, stride_zf_b, stride_zf_n, stride_zf_k,
    stride_zs_b, stride_zs_k, stride_zt_b, stride_zt_k, stride_y,
    temperature, label_smoothing, ortho_threshold, ortho_eps, mask_fill, ortho_shift,
    coef_ce, coef_kd, coef_sub_ce, coef_kl, coef_ol, ol_norm,
    MASK_TARGET: tl.constexpr, SHIFT: tl.constexpr, DETACH: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per sample b. coef_* are the loss weights divided by the means' counts
    (coef_ce = w_gt/B, coef_kd = w_kd/B, coef_sub_ce = w_gt/(B n), coef_kl = w_kl/(B n),
    coef_ol = w_ol/(B n (n-1)), ol_norm = 1/(n (n-1)); both 0 when n = 1)."""
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    inv_t = 1.0 / temperature
    y = tl.load(y_ptr + b * stride_y).to(tl.int64)
    # Targets are range-checked at the public boundary; an unchecked bad one must still not read out of
    # bounds, so it is clamped here (its loss is then wrong, never a crash or a stray read).
    y = tl.minimum(tl.maximum(y, 0), K - 1)
    zs_row = zs_ptr + b * stride_zs_b
    zt_row = zt_ptr + b * stride_zt_b
    gzs_row = grad_zs_ptr + b * K
    ls_k = label_smoothing / K

    # ---- student / teacher: online logsumexp of z_s, z_s/T, z_t/T and sum(z_s) ----
    m1 = tl.full([], float("-inf"), ACC)
    s1 = tl.zeros([], ACC)
    ms = tl.full([], float("-inf"), ACC)
    ss = tl.zeros([], ACC)
    mt = tl.full([], float("-inf"), ACC)
    st = tl.zeros([], ACC)
    sum_zs = tl.zeros([], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        ok = k < K
        zs = tl.load(zs_row + k * stride_zs_k, mask=ok, other=0.0).to(ACC)
        zt = tl.load(zt_row + k * stride_zt_k, mask=ok, other=0.0).to(ACC)
        sum_zs += tl.sum(zs)
        a = tl.where(ok, zs, float("-inf"))
        m_new = tl.maximum(m1, tl.max(a, 0))
        s1 = s1 * tl.exp(m1 - m_new) + tl.sum(tl.exp(a - m_new))
        m1 = m_new
        a = tl.where(ok, zs * inv_t, float("-inf"))
        m_new = tl.maximum(ms, tl.max(a, 0))
        ss = ss * tl.exp(ms - m_new) + tl.sum(tl.exp(a - m_new))
        ms = m_new
        a = tl.where(ok, zt * inv_t, float("-inf"))
        m_new = tl.maximum(mt, tl.max(a, 0))
        st = st * tl.exp(mt - m_new) + tl.sum(tl.exp(a - m_new))
        mt = m_new
    # logsumexp kept as (max, log-sum) pairs: x - max is exact-ish, so log-probabilities of logits in the
    # hundreds keep fp32 accuracy ((x - m) - log s, not x - (m + log s)).
    log_s1 = tl.log(s1)
    log_ss = tl.log(ss)
    log_st = tl.log(st)
    lse1_s = m1 + log_s1
    zs_y = tl.load(zs_row + y * stride_zs_k).to(ACC)
    ce_b = lse1_s - (1.0 - label_smoothing) * zs_y - ls_k * sum_zs

    # ---- KD value; the stage-independent part of d loss / d z_s ----
    # Each of the S*n sub-logit KLs adds coef_kl * T * (Q - P_i) to d/dz_s: the Q part is written here,
    # the -P_i parts are subtracted stage by stage below (same program, same addresses: no race).
    kd_b = tl.zeros([], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        ok = k < K
        zs = tl.load(zs_row + k * stride_zs_k, mask=ok, other=0.0).to(ACC)
        zt = tl.load(zt_row + k * stride_zt_k, mask=ok, other=0.0).to(ACC)
        log_q = (zs * inv_t - ms) - log_ss
        log_pt = (zt * inv_t - mt) - log_st
        pt = tl.exp(log_pt)
        kd_b += tl.sum(tl.where(ok, pt * (log_pt - log_q), 0.0))
        if COMPUTE_GRAD:
            q = tl.exp(log_q)
            p1 = tl.exp((zs - m1) - log_s1)
            g = coef_ce * (p1 - ls_k - tl.where(k == y, 1.0 - label_smoothing, 0.0))
            g += coef_kd * temperature * (q - pt) + (S * N) * coef_kl * temperature * q
            tl.store(gzs_row + k, g, mask=ok)
    kd_b = kd_b * temperature * temperature
    # grad_zs is read back below by threads that may not be the ones that wrote it: a CTA barrier orders
    # those global writes before the reads (bar.sync has CTA-wide memory-ordering semantics).
    if COMPUTE_GRAD:
        tl.debug_barrier()

    sub_ce_b = tl.zeros([], ACC)
    sub_kl_b = tl.zeros([], ACC)
    ol_b = tl.zeros([], ACC)
    eye = offs_n[:, None] == offs_n[None, :]
    pair_ok = row_ok[:, None] & row_ok[None, :] & (offs_n[:, None] != offs_n[None, :])
    # Stage bases advance as 64-bit pointers: s * stride in int32 overflows once (S-1) B n K >= 2^31.
    zf_stage = zf_ptr + b * stride_zf_b
    gzf_stage = grad_zf_ptr + b * N * K
    gzf_step = tl.num_programs(0).to(tl.int64) * N * K
    for s in range(0, S):
        zf_rows = zf_stage + offs_n[:, None] * stride_zf_n
        gzf_rows = gzf_stage + offs_n[:, None] * K
        zf_stage += stride_zf_s
        gzf_stage += gzf_step

        # pass 1: per-row logsumexp at T = 1 and at T, row sums, Gram of the masked rows
        m1v = tl.full([BLOCK_N], float("-inf"), ACC)
        s1v = tl.zeros([BLOCK_N], ACC)
        mtv = tl.full([BLOCK_N], float("-inf"), ACC)
        stv = tl.zeros([BLOCK_N], ACC)
        sum_zf = tl.zeros([BLOCK_N], ACC)
        gram = tl.zeros([BLOCK_N, BLOCK_N], ACC)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            ok = k < K
            m2 = row_ok[:, None] & ok[None, :]
            x = tl.load(zf_rows + k[None, :] * stride_zf_k, mask=m2, other=0.0).to(ACC)
            sum_zf += tl.sum(x, 1)
            a = tl.where(ok[None, :], x, float("-inf"))
            m_new = tl.maximum(m1v, tl.max(a, 1))
            s1v = s1v * tl.exp(m1v - m_new) + tl.sum(tl.exp(a - m_new[:, None]), 1)
            m1v = m_new
            a = tl.where(ok[None, :], x * inv_t, float("-inf"))
            m_new = tl.maximum(mtv, tl.max(a, 1))
            stv = stv * tl.exp(mtv - m_new) + tl.sum(tl.exp(a - m_new[:, None]), 1)
            mtv = m_new
            if SHIFT:
                zt = tl.load(zt_row + k * stride_zt_k, mask=ok, other=0.0).to(ACC)
            else:
                zt = tl.zeros([BLOCK_K], ACC)
            v = _ortho_rows(x, zt, k, y, row_ok, mask_fill, ortho_shift, MASK_TARGET, SHIFT)
            for j in tl.static_range(BLOCK_N):
                vj = _extract_row(v, offs_n, j)
                dots = tl.sum(v * vj[None, :], 1)  # G[:, j]
                gram += tl.where(offs_n[None, :] == j, dots[:, None], 0.0)
        log_s1v = tl.log(s1v)
        log_stv = tl.log(stv)
        lse1 = m1v + log_s1v
        zf_y = tl.load(zf_rows + y * stride_zf_k, mask=row_ok[:, None], other=0.0).to(ACC)
        zf_y = tl.sum(zf_y, 1)
        ce_rows = lse1 - (1.0 - label_smoothing) * zf_y - ls_k * sum_zf
        sub_ce_b += tl.sum(tl.where(row_ok, ce_rows, 0.0)) / N

        # pass 2: KL(P_i || Q) per row (unscaled by T^2)
        kl = tl.zeros([BLOCK_N], ACC)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            ok = k < K
            m2 = row_ok[:, None] & ok[None, :]
            x = tl.load(zf_rows + k[None, :] * stride_zf_k, mask=m2, other=0.0).to(ACC)
            zs = tl.load(zs_row + k * stride_zs_k, mask=ok, other=0.0).to(ACC)
            log_p = (x * inv_t - mtv[:, None]) - log_stv[:, None]
            log_q = (zs * inv_t - ms) - log_ss
            kl += tl.sum(tl.where(m2, tl.exp(log_p) * (log_p - log_q[None, :]), 0.0), 1)
        sub_kl_b += temperature * temperature * tl.sum(tl.where(row_ok, kl, 0.0)) / N

        # orthogonality from the Gram: norms on the diagonal
        sq_i = tl.sum(tl.where(eye, gram, 0.0), 1)
        sq_j = tl.sum(tl.where(eye, gram, 0.0), 0)
        norm_i = tl.sqrt(sq_i)
        r_i = tl.maximum(norm_i, ortho_eps)
        r_j = tl.maximum(tl.sqrt(sq_j), ortho_eps)
        rr = r_i[:, None] * r_j[None, :]
        gn = gram / rr
        hinge = tl.where(pair_ok, tl.maximum(gn - ortho_threshold, 0.0), 0.0)
        ol_b += tl.sum(tl.sum(hinge * hinge, 1), 0) * ol_norm

        if COMPUTE_GRAD:
            amat = (4.0 * coef_ol) * hinge
            proj = tl.where(norm_i > ortho_eps, tl.sum(amat * gn, 1) / (r_i * r_i), 0.0)
            mmat = amat / rr - tl.where(eye, proj[:, None], 0.0)
            # pass 3: d loss / d zf, and the -P_i parts of d loss / d z_s
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k
                ok = k < K
                m2 = row_ok[:, None] & ok[None, :]
                x = tl.load(zf_rows + k[None, :] * stride_zf_k, mask=m2, other=0.0).to(ACC)
                zs = tl.load(zs_row + k * stride_zs_k, mask=ok, other=0.0).to(ACC)
                is_y = (k == y)[None, :]
                p1 = tl.exp((x - m1v[:, None]) - log_s1v[:, None])
                g = coef_sub_ce * (p1 - ls_k - tl.where(is_y, 1.0 - label_smoothing, 0.0))
                log_p = (x * inv_t - mtv[:, None]) - log_stv[:, None]
                p = tl.where(m2, tl.exp(log_p), 0.0)
                if not DETACH:
                    log_q = (zs * inv_t - ms) - log_ss
                    g += (coef_kl * temperature) * p * (log_p - log_q[None, :] - kl[:, None])
                if SHIFT:
                    zt = tl.load(zt_row + k * stride_zt_k, mask=ok, other=0.0).to(ACC)
                else:
                    zt = tl.zeros([BLOCK_K], ACC)
                v = _ortho_rows(x, zt, k, y, row_ok, mask_fill, ortho_shift, MASK_TARGET, SHIFT)
                g_ol = tl.zeros([BLOCK_N, BLOCK_K], ACC)
                for j in tl.static_range(BLOCK_N):
                    vj = _extract_row(v, offs_n, j)
                    mj = tl.sum(tl.where(offs_n[None, :] == j, mmat, 0.0), 1)  # M[:, j]
                    g_ol += mj[:, None] * vj[None, :]
                if MASK_TARGET:
                    g_ol = tl.where(is_y, 0.0, g_ol)
                tl.store(gzf_rows + k[None, :], g + g_ol, mask=m2)
                gzs = tl.load(gzs_row + k, mask=ok, other=0.0)
                gzs -= (coef_kl * temperature) * tl.sum(p, 0)
                tl.store(gzs_row + k, gzs, mask=ok)
            tl.debug_barrier()  # this stage's grad_zs writes before the next stage's reads

    part = partial_ptr + b * 5
    tl.store(part + 0, ce_b)
    tl.store(part + 1, sub_ce_b)
    tl.store(part + 2, kd_b)
    tl.store(part + 3, sub_kl_b)
    tl.store(part + 4, ol_b)


@triton.jit
def sub_logit_loss_reduce_kernel(
    partial_ptr, loss_ptr, parts_ptr,
    B,
    w_gt, w_kd, w_kl, w_ol,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Single program: parts = column means of the (B, 5) partials (fixed order), loss = weighted sum."""
    offs_b = tl.arange(0, BLOCK_B)
    offs_p = tl.arange(0, 8)
    acc = tl.zeros([BLOCK_B, 8], ACC)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + offs_b
        m = (rows[:, None] < B) & (offs_p[None, :] < 5)
        acc += tl.load(partial_ptr + rows[:, None] * 5 + offs_p[None, :], mask=m, other=0.0)
    parts = tl.sum(acc, 0) / B
    tl.store(parts_ptr + offs_p, parts, mask=offs_p < 5)
    weights = tl.where(offs_p == 0, w_gt, tl.where(offs_p == 1, w_gt, tl.where(
        offs_p == 2, w_kd, tl.where(offs_p == 3, w_kl, tl.where(offs_p == 4, w_ol, 0.0)))))
    tl.store(loss_ptr, tl.sum(parts * weights, 0))


def _heuristic(n: int, num_classes: int, block_k=None):
    """BLOCK_N = n rounded up to a power of two; BLOCK_K bounds the (BLOCK_N, BLOCK_K) tile (<= 4096
    elements, 1024 from n = 16 on, where the n x n Gram/M tiles take registers) so every K, up to 32768
    and beyond, is looped over. tests/test_triton_compile.py checks with ptxas -v for sm_90 that these
    sizes do not spill registers for n <= 16 (a few bytes of local memory appear at some small tiles)."""
    block_n = triton.next_power_of_2(n)
    if block_k is None:
        budget = min(4096 // block_n, 1024) if block_n <= 8 else 1024 // block_n
        block_k = min(triton.next_power_of_2(num_classes), max(32, budget))
    # n = 1 with a small K: 4 warps spill ~20 bytes under triton 3.6 (make test-compat), 2 do not.
    num_warps = 8 if block_n * block_k >= 1024 else (2 if block_n == 1 else 4)
    return block_n, block_k, num_warps


def sub_logit_loss_forward(
    sub_logits: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
    target: torch.Tensor, temperature: float, label_smoothing: float, ortho_threshold: float,
    ortho_eps: float, mask_target: bool, mask_fill: float, ortho_shift: float, detach_sub_targets: bool,
    w_gt: float, w_kd: float, w_kl: float, w_ol: float, compute_grad: bool, block_k=None,
):
    """Launch the fused forward (+ gradients) and the reduction (arguments: the schema of
    ``hcd_fast.ops.sub_logit_loss``).

    Args:
        sub_logits: zf, (S, B, n, K), any strides, fp16/bf16/fp32/fp64.
        student_logits: z_s, (B, K).  teacher_logits: z_t, (B, K).  target: y, (B,) integer.
        compute_grad: write d loss / d zf and d loss / d z_s (else they are returned empty).
        block_k: override of the K block (tests use it to force the K loop).

    Returns:
        loss (0-d), parts (5,) [ce, sub_ce, kd, sub_kl, ortho] in fp32 (fp64 if any logits are fp64),
        grad_sub_logits (S, B, n, K) and grad_student_logits (B, K) in that dtype (or empty).
    """
    num_stages, batch, n, num_classes = sub_logits.shape
    device = sub_logits.device
    fp64 = torch.float64 in (sub_logits.dtype, student_logits.dtype, teacher_logits.dtype)
    acc_dtype = torch.float64 if fp64 else torch.float32
    acc = tl.float64 if fp64 else tl.float32
    partial = torch.empty((batch, NUM_PARTS), device=device, dtype=acc_dtype)
    loss = torch.empty((), device=device, dtype=acc_dtype)
    parts = torch.empty((NUM_PARTS,), device=device, dtype=acc_dtype)
    if compute_grad:
        grad_zf = torch.empty((num_stages, batch, n, num_classes), device=device, dtype=acc_dtype)
        grad_zs = torch.empty((batch, num_classes), device=device, dtype=acc_dtype)
    else:
        grad_zf = torch.empty((0,), device=device, dtype=acc_dtype)
        grad_zs = torch.empty((0,), device=device, dtype=acc_dtype)
    if batch == 0:
        return loss.zero_(), parts.zero_(), grad_zf, grad_zs
    block_n, block_k, num_warps = _heuristic(n, num_classes, block_k)
    pairs = n * (n - 1)
    sub_logit_loss_fwd_kernel[(batch,)](
        sub_logits, student_logits, teacher_logits, target,
        partial, grad_zf, grad_zs,
        num_stages, n, num_classes,
        *sub_logits.stride(), *student_logits.stride(), *teacher_logits.stride(), target.stride(0),
        float(temperature), float(label_smoothing), float(ortho_threshold), float(ortho_eps),
        float(mask_fill), float(ortho_shift),
        w_gt / batch, w_kd / batch, w_gt / (batch * n), w_kl / (batch * n),
        w_ol / (batch * pairs) if pairs else 0.0, 1.0 / pairs if pairs else 0.0,
        MASK_TARGET=bool(mask_target), SHIFT=ortho_shift != 0.0, DETACH=bool(detach_sub_targets),
        COMPUTE_GRAD=bool(compute_grad), ACC=acc, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    sub_logit_loss_reduce_kernel[(1,)](
        partial, loss, parts, batch, float(w_gt), float(w_kd), float(w_kl), float(w_ol),
        ACC=acc, BLOCK_B=min(triton.next_power_of_2(batch), 256), num_warps=4,
    )
    return loss, parts, grad_zf, grad_zs
