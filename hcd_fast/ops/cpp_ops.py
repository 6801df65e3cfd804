"""C++/CUDA backends ("cpu" and "cuda"): autograd and fake (meta) kernels over the ``torch.ops.hcd_fast`` ops
of the compiled extension ``hcd_fast._C`` (csrc/), exposed under the four op names of
``hcd_fast.reference``.

- ``sub_logit_loss``: the op returns the loss, its parts and the gradients with respect to the sub-logits
  and the student logits, computed in the forward pass (the loss is the last node); backward only scales
  them by grad_output (``torch.library.register_autograd``).
- ``bn_relu_pool``: forward/backward op pair; the forward mutates the running statistics (schema
  ``Tensor(a!)``), so autograd is a ``torch.autograd.Function`` around it.
- ``pool_linear`` and ``cfm``: the forward is one op each; the backward is a handful of GEMMs written with
  torch ops (``register_autograd``), which run on the same BLAS the kernels use.

Fake kernels make every op traceable, so ``torch.compile(HCDLoss(backend="cpu"), fullgraph=True)`` works.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from hcd_fast.config import HCDConfig
from hcd_fast.reference import PART_NAMES

try:
    from hcd_fast import _C  # noqa: F401  (loads the library and registers torch.ops.hcd_fast)
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # the extension is optional: report why it is missing
    _C = None
    _IMPORT_ERROR = f"compiled extension hcd_fast._C not importable ({type(exc).__name__}: {exc})"

_GT_MASK = {"none": 0, "zero": 1, "large_negative": 2}


def status(name: str) -> Tuple[bool, str]:
    """(available, reason) of backend ``name`` ("cpu" or "cuda")."""
    if _C is None:
        return False, _IMPORT_ERROR
    if name == "cpu":
        return True, f"compiled C++ kernels ({_C.cpu_capability()} vectorisation, at::parallel_for)"
    if name == "cuda":
        if not _C.with_cuda():
            return False, "extension built without CUDA"
        if not torch.cuda.is_available():
            return False, "built with CUDA kernels, but no CUDA device is visible"
        return True, "compiled CUDA kernels"
    return False, f"unknown backend {name!r}"


def devices(name: str) -> tuple:
    return {"cpu": ("cpu",), "cuda": ("cuda",)}.get(name, ())


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """What the kernels compute in: fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------
# Fake kernels and autograd, registered once when the extension is present.
# --------------------------------------------------------------------------------------------------
if _C is not None:

    @torch.library.register_fake("hcd_fast::sub_logit_loss")
    def _sub_logit_loss_fake(sub_logits, student_logits, teacher_logits, target, temperature,
                             label_smoothing, ortho_threshold, ortho_eps, gt_mask, detach_sub_targets,
                             w_gt, w_kd, w_kl, w_ol, compute_grad):
        dt = _compute_dtype(sub_logits, student_logits, teacher_logits)
        loss = sub_logits.new_empty((), dtype=dt)
        parts = sub_logits.new_empty((5,), dtype=dt)
        if compute_grad:
            return (loss, parts, sub_logits.new_empty(sub_logits.shape, dtype=dt),
                    student_logits.new_empty(student_logits.shape, dtype=dt))
        return loss, parts, sub_logits.new_empty((0,), dtype=dt), student_logits.new_empty((0,), dtype=dt)

    def _sub_logit_loss_setup(ctx, inputs, output):
        _, _, grad_sub, grad_student = output
        ctx.save_for_backward(grad_sub, grad_student)
        ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
        ctx.compute_grad = inputs[-1]

    def _sub_logit_loss_backward(ctx, grad_loss, grad_parts, grad_gs, grad_gz):
        # d/d inputs = grad_output * (gradients computed in the forward); one rounding to the input dtype.
        if not ctx.compute_grad:
            raise RuntimeError("hcd_fast::sub_logit_loss was called with compute_grad=False; "
                               "call it with compute_grad=True to differentiate it")
        grad_sub, grad_student = ctx.saved_tensors
        gs = gz = None
        if ctx.needs_input_grad[0]:
            gs = (grad_sub * grad_loss).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gz = (grad_student * grad_loss).to(ctx.dtypes[1])
        return (gs, gz) + (None,) * 13

    torch.library.register_autograd("hcd_fast::sub_logit_loss", _sub_logit_loss_backward,
                                    setup_context=_sub_logit_loss_setup)

    @torch.library.register_fake("hcd_fast::bn_relu_pool_fwd")
    def _bn_relu_pool_fwd_fake(x, weight, bias, running_mean, running_var, training, momentum, eps):
        dt = _compute_dtype(x, weight, bias)
        channels = x.shape[1]
        return (x.new_empty((x.shape[0], channels)), x.new_empty((channels,), dtype=dt),
                x.new_empty((channels,), dtype=dt))

    @torch.library.register_fake("hcd_fast::bn_relu_pool_bwd")
    def _bn_relu_pool_bwd_fake(grad_out, x, weight, bias, save_mean, save_invstd, training):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)

    @torch.library.register_fake("hcd_fast::pool_linear")
    def _pool_linear_fake(x, weight, bias):
        dt = _compute_dtype(x, weight, bias)
        return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], x.shape[1]), dtype=dt)

    def _pool_linear_setup(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(weight, output[1])
        ctx.x_shape = x.shape
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)

    def _pool_linear_backward(ctx, grad_out, grad_pooled):
        # out = pooled W^T + b, pooled = mean_hw x:  dx = (g W) / HW broadcast over (h, w), dW = g^T pooled.
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

    torch.library.register_autograd("hcd_fast::pool_linear", _pool_linear_backward,
                                    setup_context=_pool_linear_setup)

    def _cfm_out_dtype(student_feat, teacher_feat, weight1, teacher_logits):
        dt = torch.promote_types(student_feat.dtype, teacher_feat.dtype)
        return torch.promote_types(dt, torch.promote_types(weight1.dtype, teacher_logits.dtype))

    @torch.library.register_fake("hcd_fast::cfm")
    def _cfm_fake(student_feat, teacher_feat, weight1, bias1, weight2, bias2, teacher_logits,
                  num_sub_logits, lambda_student, lambda_teacher):
        out_dtype = _cfm_out_dtype(student_feat, teacher_feat, weight1, teacher_logits)
        batch, num_classes = teacher_logits.shape
        zf = student_feat.new_empty((batch, num_sub_logits, num_classes), dtype=out_dtype)
        if weight2 is None:
            hidden = student_feat.new_empty((0,), dtype=out_dtype)
        else:
            hidden = student_feat.new_empty((batch, weight1.shape[0]), dtype=out_dtype)
        return zf, hidden

    def _cfm_setup(ctx, inputs, output):
        student_feat, teacher_feat, weight1, bias1, weight2, bias2 = inputs[:6]
        ctx.lambda_student = inputs[8]
        ctx.has_hidden = weight2 is not None
        ctx.save_for_backward(student_feat, teacher_feat, weight1, weight2, output[1])
        ctx.dtypes = (student_feat.dtype, weight1.dtype, bias1.dtype,
                      None if weight2 is None else weight2.dtype, None if bias2 is None else bias2.dtype)

    def _cfm_backward(ctx, grad_zf, grad_hidden):
        # zf = ls * z + lt * z_t;  z = relu(a) W2^T + b2 (or z = a);  a = [h ; f_t] W1^T + b1.
        student_feat, teacher_feat, weight1, weight2, hidden = ctx.saved_tensors
        dt = _compute_dtype(student_feat, teacher_feat, weight1)
        # GEMMs in the activation's dtype when it is bf16/fp16 (as in the forward), reductions in dt.
        gemm = student_feat.dtype if student_feat.dtype in (torch.bfloat16, torch.float16) else dt
        batch = student_feat.shape[0]
        dim = student_feat.shape[1]
        gz = grad_zf.reshape(batch, -1).to(dt) * ctx.lambda_student
        gw2 = gb2 = None
        needs = ctx.needs_input_grad
        if ctx.has_hidden:
            hid = hidden.to(gemm)
            if needs[4]:
                gw2 = (gz.to(gemm).t() @ hid).to(ctx.dtypes[3])
            if needs[5]:
                gb2 = gz.sum(0).to(ctx.dtypes[4])
            ga = (gz.to(gemm) @ weight2.to(gemm)).to(dt)
            ga = torch.ops.aten.threshold_backward(ga, hidden.to(dt), 0.0)  # ReLU mask, one pass
        else:
            ga = gz
        w1 = weight1.to(gemm)
        ga_g = ga.to(gemm)
        gh = gw1 = gb1 = None
        if needs[0]:
            gh = (ga_g @ w1[:, :dim]).to(ctx.dtypes[0])
        if needs[2]:
            u = torch.cat([student_feat.to(gemm), teacher_feat.to(gemm)], dim=1)
            gw1 = (ga_g.t() @ u).to(ctx.dtypes[1])
        if needs[3]:
            gb1 = ga.sum(0).to(ctx.dtypes[2])
        return gh, None, gw1, gb1, gw2, gb2, None, None, None, None

    torch.library.register_autograd("hcd_fast::cfm", _cfm_backward, setup_context=_cfm_setup)


class _BnReluPool(torch.autograd.Function):
    """Autograd over the mutating bn_relu_pool_fwd op and its bn_relu_pool_bwd partner."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        out, mean, invstd = torch.ops.hcd_fast.bn_relu_pool_fwd(x, weight, bias, running_mean, running_var,
                                                                training, momentum, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.training = training
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        gx, gw, gb = torch.ops.hcd_fast.bn_relu_pool_bwd(grad_out, x, weight, bias, mean, invstd, ctx.training)
        return gx, gw, gb, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# The four ops, with the signatures of hcd_fast.reference.
# --------------------------------------------------------------------------------------------------
def sub_logit_loss(sub_logits: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   target: torch.Tensor, config: HCDConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """HCD loss from the fused sub-logits: sub_logits (S, B, n, K), student_logits (B, K), teacher_logits
    (B, K) (no gradient), target (B,) -> (loss 0-d fp32/fp64, parts dict of detached 0-d tensors)."""
    c = config
    compute_grad = torch.is_grad_enabled() and (sub_logits.requires_grad or student_logits.requires_grad)
    loss, parts, _, _ = torch.ops.hcd_fast.sub_logit_loss(
        sub_logits, student_logits, teacher_logits.detach(), target, float(c.temperature),
        float(c.label_smoothing), float(c.ortho_threshold), float(c.ortho_eps), _GT_MASK[c.gt_mask],
        bool(c.detach_sub_targets), float(c.w_gt), float(c.w_kd), float(c.w_kl), float(c.w_ol), compute_grad)
    parts = parts.detach()
    return loss, {name: parts[i] for i, name in enumerate(PART_NAMES)}


def bn_relu_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                 running_var: torch.Tensor, training: bool, momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """mean_hw ReLU(BN(x)): x (B, C, H, W), weight/bias/running stats (C,) -> (B, C); training mode updates
    the running statistics in place like nn.BatchNorm2d."""
    return _BnReluPool.apply(x, weight, bias, running_mean, running_var, bool(training), float(momentum),
                             float(eps))


def pool_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """W mean_hw(x) + b: x (B, C, H, W), weight (D, C), bias (D,) -> (B, D)."""
    return torch.ops.hcd_fast.pool_linear(x, weight, bias)[0]


def cfm(student_feat: torch.Tensor, teacher_feat: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor,
        weight2: Optional[torch.Tensor], bias2: Optional[torch.Tensor], teacher_logits: torch.Tensor,
        num_sub_logits: int, lambda_student: float = 1.0, lambda_teacher: float = 1.0) -> torch.Tensor:
    """Fused sub-logits (B, n, K) from student_feat (B, D), teacher_feat (B, D_t) (no gradient), weight1
    (H, D + D_t), bias1 (H,), weight2 (n*K, H) / bias2 (n*K,) or None, teacher_logits (B, K) (no gradient)."""
    return torch.ops.hcd_fast.cfm(student_feat, teacher_feat.detach(), weight1, bias1, weight2, bias2,
                                  teacher_logits.detach(), int(num_sub_logits), float(lambda_student),
                                  float(lambda_teacher))[0]
