"""Triton backend: one ``torch.autograd.Function`` per fused op over the kernels in ``hcd_fast.kernels``.

Each Function's forward and backward call ``torch.library.custom_op`` ops (namespace ``hcd_triton``) with
fake (meta) implementations, so ``torch.compile(..., fullgraph=True)`` traces through them without a graph
break; the kernels themselves are opaque to the compiler.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before
the kernels are imported, as tests/conftest.py does without a GPU; slow, for tests).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Tuple

import torch

from hcd_fast.config import HCDConfig

try:
    import triton  # noqa: F401

    from hcd_fast.kernels import cfm as _k_cfm
    from hcd_fast.kernels import pool as _k_pool
    from hcd_fast.kernels import sub_logit_loss as _k_sll
    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # reported by status(), never raised at import
    _IMPORT_ERROR = exc

PART_NAMES = ("ce", "sub_ce", "kd", "sub_kl", "ortho")
Tensor = torch.Tensor


def _interpreting() -> bool:
    """Whether the kernels were built for the interpreter (TRITON_INTERPRET=1 when they were imported)."""
    return _IMPORT_ERROR is None and type(_k_sll.sub_logit_loss_fwd_kernel).__name__ == "InterpretedFunction"


def status(name: str) -> Tuple[bool, str]:
    if _IMPORT_ERROR is not None:
        return False, f"triton kernels failed to import: {type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    if _interpreting():
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1; CPU tensors, slow)"
    return False, "no CUDA device, and TRITON_INTERPRET was not 1 when the kernels were imported"


def devices(name: str) -> tuple:
    found = ("cuda",) if torch.cuda.is_available() else ()
    return found + (("cpu",) if _interpreting() else ())


def _guard(t: Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# sub_logit_loss
# ------------------------------------------------------------------------------------------------
if _IMPORT_ERROR is None:

    @torch.library.custom_op("hcd_triton::sub_logit_loss_fwd", mutates_args=())
    def _sub_logit_loss_fwd(
        sub_logits: Tensor, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
        temperature: float, label_smoothing: float, ortho_threshold: float, ortho_eps: float,
        gt_mask: str, detach_sub_targets: bool, w_gt: float, w_kd: float, w_kl: float, w_ol: float,
        compute_grad: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        with _guard(sub_logits):
            return _k_sll.sub_logit_loss_forward(
                sub_logits, student_logits, teacher_logits, target, temperature, label_smoothing,
                ortho_threshold, ortho_eps, gt_mask, detach_sub_targets, w_gt, w_kd, w_kl, w_ol,
                compute_grad)

    @_sub_logit_loss_fwd.register_fake
    def _(sub_logits, student_logits, teacher_logits, target, temperature, label_smoothing,
          ortho_threshold, ortho_eps, gt_mask, detach_sub_targets, w_gt, w_kd, w_kl, w_ol, compute_grad):
        acc = _acc_dtype(sub_logits.dtype)
        loss = sub_logits.new_empty((), dtype=acc)
        parts = sub_logits.new_empty((len(PART_NAMES),), dtype=acc)
        if compute_grad:
            return (loss, parts, sub_logits.new_empty(sub_logits.shape, dtype=acc),
                    sub_logits.new_empty(student_logits.shape, dtype=acc))
        return loss, parts, sub_logits.new_empty((0,), dtype=acc), sub_logits.new_empty((0,), dtype=acc)


def _config_args(config: HCDConfig) -> tuple:
    return (float(config.temperature), float(config.label_smoothing), float(config.ortho_threshold),
            float(config.ortho_eps), config.gt_mask, bool(config.detach_sub_targets), float(config.w_gt),
            float(config.w_kd), float(config.w_kl), float(config.w_ol))


class SubLogitLossFunction(torch.autograd.Function):
    """The HCD loss; the forward kernel also writes d loss / d (sub_logits, student_logits), the backward
    scales them by grad_output (the loss is the last node of the graph)."""

    @staticmethod
    def forward(ctx, sub_logits, student_logits, teacher_logits, target, config_args):
        compute_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        loss, parts, grad_zf, grad_zs = torch.ops.hcd_triton.sub_logit_loss_fwd(
            sub_logits, student_logits, teacher_logits.detach(), target, *config_args, compute_grad)
        ctx.save_for_backward(grad_zf, grad_zs)
        ctx.dtypes = (sub_logits.dtype, student_logits.dtype)
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, grad_parts):
        grad_zf, grad_zs = ctx.saved_tensors
        d_zf = (grad_zf * grad_loss).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        d_zs = (grad_zs * grad_loss).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return d_zf, d_zs, None, None, None


def sub_logit_loss(sub_logits: Tensor, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                   config: HCDConfig) -> Tuple[Tensor, Dict[str, Tensor]]:
    """See ``hcd_fast.reference.sub_logit_loss``: zf (S, B, n, K), z_s (B, K), z_t (B, K), y (B,)."""
    loss, parts = SubLogitLossFunction.apply(sub_logits, student_logits, teacher_logits, target,
                                             _config_args(config))
    return loss, {name: parts[i] for i, name in enumerate(PART_NAMES)}


# ------------------------------------------------------------------------------------------------
# bn_relu_pool
# ------------------------------------------------------------------------------------------------
if _IMPORT_ERROR is None:

    @torch.library.custom_op("hcd_triton::bn_relu_pool_fwd", mutates_args=("running_mean", "running_var"))
    def _bn_relu_pool_fwd(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                          training: bool, momentum: float, eps: float
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        with _guard(x):
            return _k_pool.bn_relu_pool_forward(x, weight, bias, running_mean, running_var, training,
                                                momentum, eps)

    @_bn_relu_pool_fwd.register_fake
    def _(x, weight, bias, running_mean, running_var, training, momentum, eps):
        acc = _acc_dtype(x.dtype)
        return (x.new_empty(x.shape[:2]),) + tuple(x.new_empty((x.shape[1],), dtype=acc) for _ in range(4))

    @torch.library.custom_op("hcd_triton::bn_relu_pool_bwd", mutates_args=())
    def _bn_relu_pool_bwd(grad: Tensor, x: Tensor, weight: Tensor, save_mean: Tensor, save_rstd: Tensor,
                          scale: Tensor, shift: Tensor, training: bool, bias_dtype: torch.dtype
                          ) -> Tuple[Tensor, Tensor, Tensor]:
        with _guard(x):
            return _k_pool.bn_relu_pool_backward(grad, x, weight, save_mean, save_rstd, scale, shift,
                                                 training, bias_dtype=bias_dtype)

    @_bn_relu_pool_bwd.register_fake
    def _(grad, x, weight, save_mean, save_rstd, scale, shift, training, bias_dtype):
        dx = torch.empty_strided(x.shape, _k_pool._dense_strides(x), dtype=x.dtype, device=x.device)
        return dx, weight.new_empty(weight.shape), weight.new_empty(weight.shape, dtype=bias_dtype)


class BNReluPoolFunction(torch.autograd.Function):
    """mean_hw ReLU(BatchNorm(x)); the backward recomputes the BN output from x and the saved stats."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        out, save_mean, save_rstd, scale, shift = torch.ops.hcd_triton.bn_relu_pool_fwd(
            x, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.save_for_backward(x, weight, save_mean, save_rstd, scale, shift)
        ctx.training = training
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, save_mean, save_rstd, scale, shift = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.hcd_triton.bn_relu_pool_bwd(
            grad, x, weight, save_mean, save_rstd, scale, shift, ctx.training, ctx.bias_dtype)
        return (dx if ctx.needs_input_grad[0] else None, dweight if ctx.needs_input_grad[1] else None,
                dbias if ctx.needs_input_grad[2] else None, None, None, None, None, None)


def bn_relu_pool(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                 training: bool, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """See ``hcd_fast.reference.bn_relu_pool``: x (B, C, H, W), weight/bias/running stats (C,) -> (B, C)."""
    batch, _, height, width = x.shape
    if training and batch * height * width <= 1:
        # nn.BatchNorm2d's own error: the unbiased variance of one value is undefined.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{list(x.shape)}")
    return BNReluPoolFunction.apply(x, weight, bias, running_mean, running_var, bool(training),
                                    float(momentum), float(eps))


# ------------------------------------------------------------------------------------------------
# pool_linear
# ------------------------------------------------------------------------------------------------
if _IMPORT_ERROR is None:

    @torch.library.custom_op("hcd_triton::spatial_mean", mutates_args=())
    def _spatial_mean(x: Tensor) -> Tensor:
        with _guard(x):
            return _k_pool.spatial_mean(x)

    @_spatial_mean.register_fake
    def _(x):
        return x.new_empty(x.shape[:2], dtype=_acc_dtype(x.dtype))

    @torch.library.custom_op("hcd_triton::spatial_broadcast", mutates_args=())
    def _spatial_broadcast(grad_mean: Tensor, like: Tensor) -> Tensor:
        with _guard(like):
            return _k_pool.spatial_broadcast(grad_mean, like)

    @_spatial_broadcast.register_fake
    def _(grad_mean, like):
        return torch.empty_strided(like.shape, _k_pool._dense_strides(like), dtype=like.dtype,
                                   device=like.device)


class PoolLinearFunction(torch.autograd.Function):
    """W @ mean_hw(x) + b (the conv1x1 + GAP identity); fp32 math, output in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        mean = torch.ops.hcd_triton.spatial_mean(x)
        acc = mean.dtype
        out = torch.addmm(bias.to(acc), mean, weight.to(acc).t())
        # x gives the backward its shape, dtype and layout (the eager conv1x1 would save it too).
        ctx.save_for_backward(x, mean, weight)
        ctx.dtypes = (weight.dtype, bias.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, mean, weight = ctx.saved_tensors
        g = grad.to(mean.dtype)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.hcd_triton.spatial_broadcast(g @ weight.to(mean.dtype), x)
        if ctx.needs_input_grad[1]:
            dweight = (g.t() @ mean).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            dbias = g.sum(0).to(ctx.dtypes[1])
        return dx, dweight, dbias


def pool_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """See ``hcd_fast.reference.pool_linear``: x (B, C, H, W), W (D, C), b (D,) -> (B, D)."""
    return PoolLinearFunction.apply(x, weight, bias)


# ------------------------------------------------------------------------------------------------
# cfm
# ------------------------------------------------------------------------------------------------
if _IMPORT_ERROR is None:

    @torch.library.custom_op("hcd_triton::cfm_gemm", mutates_args=())
    def _cfm_gemm(a1: Tensor, a2: Optional[Tensor], weight: Tensor, bias: Tensor,
                  teacher_logits: Optional[Tensor], lambda_s: float, lambda_t: float, epilogue: int) -> Tensor:
        with _guard(a1):
            return _k_cfm.cfm_gemm(a1, a2, weight, bias, teacher_logits, lambda_s, lambda_t, epilogue)

    @_cfm_gemm.register_fake
    def _(a1, a2, weight, bias, teacher_logits, lambda_s, lambda_t, epilogue):
        return a1.new_empty((a1.shape[0], weight.shape[0]))


class CFMFunction(torch.autograd.Function):
    """Fused CFM forward (two-segment GEMMs with bias/ReLU/fusion epilogues); the backward is torch GEMMs:
    dz = lambda_s * g,  dW2 = dz^T a,  db2 = sum_b dz,  dpre = (dz W2) * [a > 0],  db1 = sum_b dpre,
    dW1 = [dpre^T h_s, dpre^T f_t],  dh_s = dpre W1[:, :D]  (f_t and z_t get no gradient)."""

    @staticmethod
    def forward(ctx, student_feat, teacher_feat, weight1, bias1, weight2, bias2, teacher_logits,
                num_sub_logits, lambda_student, lambda_teacher):
        batch, num_classes = teacher_logits.shape
        fuse = _k_cfm.EPILOGUE_FUSE
        if weight2 is None:
            hidden = None
            z = torch.ops.hcd_triton.cfm_gemm(student_feat, teacher_feat, weight1, bias1, teacher_logits,
                                              lambda_student, lambda_teacher, fuse)
        else:
            hidden = torch.ops.hcd_triton.cfm_gemm(student_feat, teacher_feat, weight1, bias1, None, 1.0,
                                                   0.0, _k_cfm.EPILOGUE_RELU)
            z = torch.ops.hcd_triton.cfm_gemm(hidden, None, weight2, bias2, teacher_logits, lambda_student,
                                              lambda_teacher, fuse)
        ctx.save_for_backward(student_feat, teacher_feat, weight1, weight2, hidden)
        ctx.lambda_student = lambda_student
        return z.view(batch, num_sub_logits, num_classes)

    @staticmethod
    def backward(ctx, grad):
        h, f, w1, w2, hidden = ctx.saved_tensors
        need = ctx.needs_input_grad
        # One compute dtype for the GEMMs: activations and weights may differ under autocast
        # (bf16 activations, fp32 weights); autograd casts each gradient back to its input's dtype.
        ct = torch.promote_types(grad.dtype, w1.dtype)
        dz = grad.reshape(grad.shape[0], -1).to(ct) * ctx.lambda_student
        dw2 = db2 = None
        if w2 is not None:
            if need[4]:
                dw2 = dz.t().mm(hidden.to(ct))
            if need[5]:
                db2 = dz.sum(0)
            dz = dz.mm(w2.to(ct)) * (hidden > 0)
        dim = h.shape[1]
        dh = dz.mm(w1[:, :dim].to(ct)) if need[0] else None
        dw1 = torch.cat([dz.t().mm(h.to(ct)), dz.t().mm(f.to(ct))], 1) if need[2] else None
        db1 = dz.sum(0) if need[3] else None
        return dh, None, dw1, db1, dw2, db2, None, None, None, None


def cfm(student_feat: Tensor, teacher_feat: Tensor, weight1: Tensor, bias1: Tensor, weight2: Optional[Tensor],
        bias2: Optional[Tensor], teacher_logits: Tensor, num_sub_logits: int, lambda_student: float = 1.0,
        lambda_teacher: float = 1.0) -> Tensor:
    """See ``hcd_fast.reference.cfm``: h_s (B, D), f_t (B, D_t), W1 (H, D+D_t), b1 (H,), W2 (n*K, H) or
    None, b2 (n*K,) or None, z_t (B, K) -> zf (B, n, K)."""
    return CFMFunction.apply(student_feat, teacher_feat.detach(), weight1, bias1, weight2, bias2,
                             teacher_logits.detach(), int(num_sub_logits), float(lambda_student),
                             float(lambda_teacher))
