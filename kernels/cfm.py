"""Triton kernel of ``cfm``: the Complementary Feature Mapper GEMMs with fused epilogues.

u = [h_s ; f_t] is never materialised: the first GEMM's K loop runs over two operand segments,
    pre = h_s @ W1[:, :D]^T + f_t @ W1[:, D:]^T + b1,
(W1's second segment is the same matrix at a column offset). Epilogues:
    RELU: a = relu(pre)                                   (hidden layer)
    FUSE: zf[b, o] = lambda_s * (pre[b, o]) + lambda_t * z_t[b, o mod K]   (o = i*K + k, the view (B, n, K))
so the two-layer CFM is GEMM(RELU) then GEMM(FUSE) on the hidden activation, and cfm_hidden=None is one
GEMM(FUSE). The S stages of HCDLoss run in one launch per GEMM: a third grid axis over the stages, with a stage
stride for A1, W, the bias and the output (0 for A2 = f_t and z_t, which the stages share). Accumulation is fp32
(fp64 for fp64 inputs); fp32 operands use IEEE fp32 products (input_precision="ieee"), not TF32, to match torch's
default fp32 matmul. A compiled kernel takes a Python
float as an fp32 parameter, so with fp64 accumulation lambda_s, lambda_t are read from an fp64 tensor instead
(kernels/__init__.py: fp64_scalars).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hcd_fast.kernels import fp64_scalars

EPILOGUE_RELU = 1
EPILOGUE_FUSE = 2
# tl.dot operand dtype per weight dtype (activations are cast to it, as F.linear requires equal dtypes).
_DOT_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
               torch.float16: tl.float16}


@triton.jit
def cfm_gemm_kernel(
    a1_ptr, a2_ptr, w_ptr, bias_ptr, zt_ptr, out_ptr,
    M, N, K1, K2, NUM_CLASSES,
    stride_a1m, stride_a1k, stride_a2m, stride_a2k, stride_wn, stride_wk,
    stride_ztm, stride_ztk, stride_om, stride_on,
    stride_a1s, stride_a2s, stride_ws, stride_bs, stride_os,
    lambda_s, lambda_t, scalars_ptr,
    SCALARS_FP64: tl.constexpr, HAS_A2: tl.constexpr, EPILOGUE: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), S): out[s] = epilogue(A1[s] W[s, :, :K1]^T + A2[s] W[s, :, K1:]^T
    + bias[s])."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    stage = tl.program_id(2).to(tl.int64)
    a1_ptr += stage * stride_a1s
    a2_ptr += stage * stride_a2s
    w_ptr += stage * stride_ws
    bias_ptr += stage * stride_bs
    out_ptr += stage * stride_os
    # 64-bit row/column indices: B * n*K (the output) and n*K * H (W2) reach 2^31 within SPEC's limits.
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    # segment 1: A1 (M, K1) against W[:, 0:K1]
    for k0 in range(0, K1, BLOCK_K):
        k = k0 + rk
        k_ok = k < K1
        a = tl.load(a1_ptr + rm[:, None] * stride_a1m + k[None, :] * stride_a1k,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION, out_dtype=ACC)
    # segment 2: A2 (M, K2) against W[:, K1:K1+K2] (the concat's second half, never copied)
    if HAS_A2:
        for k0 in range(0, K2, BLOCK_K):
            k = k0 + rk
            k_ok = k < K2
            a = tl.load(a2_ptr + rm[:, None] * stride_a2m + k[None, :] * stride_a2k,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + (K1 + k)[:, None] * stride_wk,
                        mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION, out_dtype=ACC)
    acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if EPILOGUE == 1:
        acc = tl.maximum(acc, 0.0)
    else:
        if SCALARS_FP64:  # exact fp64 lambdas (a float parameter is fp32)
            lambda_s = tl.load(scalars_ptr)
            lambda_t = tl.load(scalars_ptr + 1)
        zt = tl.load(zt_ptr + rm[:, None] * stride_ztm + (rn % NUM_CLASSES)[None, :] * stride_ztk,
                     mask=out_mask, other=0.0).to(ACC)
        acc = lambda_s * acc + lambda_t * zt
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _blocks(m: int, n: int):
    """BLOCK_M follows the (small) batch, BLOCK_N = 64, BLOCK_K = 32 (tl.dot needs >= 16 everywhere)."""
    block_m = min(max(triton.next_power_of_2(m), 16), 64)
    return block_m, 64, 32


def cfm_gemm(a1: torch.Tensor, a2, weight: torch.Tensor, bias: torch.Tensor, teacher_logits,
             lambda_s: float, lambda_t: float, epilogue: int, out_dtype: torch.dtype) -> torch.Tensor:
    """epilogue(a1 @ weight[:, :K1]^T + a2 @ weight[:, K1:]^T + bias) -> (M, N) in out_dtype, or per stage with a
    leading stage dimension S on a1, weight, bias and the output ((S, M, N)).

    Args:
        a1: (M, K1) or (S, M, K1); a2: (M, K2) shared by the stages, or None (then weight is (N, K1));
        weight: ([S,] N, K1 + K2); bias: ([S,] N).
        teacher_logits: z_t (M, K) with N = n*K for EPILOGUE_FUSE, else None.
        epilogue: EPILOGUE_RELU or EPILOGUE_FUSE (lambda_s * x + lambda_t * z_t[:, o mod K]).
    """
    stacked = a1.dim() == 3
    stages = a1.shape[0] if stacked else 1
    m, k1 = a1.shape[-2:]
    n = weight.shape[-2]
    k2 = a2.shape[1] if a2 is not None else 0
    acc = tl.float64 if torch.float64 in (a1.dtype, weight.dtype) else tl.float32
    dot_dtype = _DOT_DTYPES[weight.dtype]
    if dot_dtype == tl.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The interpreter's bf16 tl.dot returns garbage (triton 3.8); bf16 -> fp32 is exact and the GPU's
        # bf16 MMA accumulates in fp32 too, so fp32 operands give the same products there.
        dot_dtype = tl.float32
    out = torch.empty((stages, m, n) if stacked else (m, n), device=a1.device, dtype=out_dtype)
    if m == 0 or stages == 0:
        return out
    block_m, block_n, block_k = _blocks(m, n)
    fuse = epilogue == EPILOGUE_FUSE
    zt = teacher_logits if fuse else bias
    num_classes = teacher_logits.shape[1] if fuse else 1
    a2_ = a2 if a2 is not None else a1
    scalars = fp64_scalars(out.device, lambda_s, lambda_t) if fuse and acc == tl.float64 else None
    stage_strides = ((a1.stride(0), 0, weight.stride(0), bias.stride(0), out.stride(0)) if stacked
                     else (0, 0, 0, 0, 0))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), stages)
    cfm_gemm_kernel[grid](
        a1, a2_, weight, bias, zt, out,
        m, n, k1, k2, num_classes,
        *a1.stride()[-2:], *a2_.stride()[-2:], *weight.stride()[-2:],
        *(teacher_logits.stride() if fuse else (0, 0)), *out.stride()[-2:],
        *stage_strides,
        float(lambda_s), float(lambda_t), scalars if scalars is not None else bias,
        SCALARS_FP64=scalars is not None, HAS_A2=a2 is not None, EPILOGUE=epilogue, ACC=acc,
        DOT_PRECISION="ieee" if a1.dtype in (torch.float32, torch.float64) else "tf32", DOT_DTYPE=dot_dtype,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out
