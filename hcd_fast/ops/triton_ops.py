"""Triton backend: registers the kernels of ``hcd_fast.kernels`` (kernels/) against each op's contract.

Every op's schema, fake kernel and autograd come from its op file (``hcd_fast/ops/<op>.py``); this module only
defines them under the namespace ``hcd_triton`` with a Python kernel that launches the Triton kernels.
Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before the
kernels are imported, as tests/conftest.py does without a GPU; slow, for tests).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from hcd_fast.ops import bn_relu_pool as _bn_relu_pool
from hcd_fast.ops import cfm as _cfm
from hcd_fast.ops import pool_linear as _pool_linear
from hcd_fast.ops import projector as _projector
from hcd_fast.ops import sub_logit_loss as _sub_logit_loss
from hcd_fast.ops.library import acc_dtype

try:
    import triton

    from hcd_fast.kernels import cfm as _k_cfm
    from hcd_fast.kernels import pool as _k_pool
    from hcd_fast.kernels import projector as _k_proj
    from hcd_fast.kernels import sub_logit_loss as _k_sub_logit_loss
    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # reported by status(), never raised at import
    _IMPORT_ERROR = exc


def _interpreting() -> bool:
    """Whether the kernels were built for the interpreter (TRITON_INTERPRET=1 when they were imported)."""
    return _IMPORT_ERROR is None and type(_k_sub_logit_loss.sub_logit_loss_fwd_kernel).__name__ == "InterpretedFunction"


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


def _guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# Kernels: each adapts a kernels/ launcher to its op's contract (hcd_fast/ops/<op>.py).
def _sub_logit_loss_kernel(sub_logits, student_logits, teacher_logits, target, *args):
    with _guard(sub_logits):
        return _k_sub_logit_loss.sub_logit_loss_forward(sub_logits, student_logits, teacher_logits, target, *args)


def _sub_logit_loss_backward_kernel(grad_loss, sub_logits, *args):
    with _guard(sub_logits):
        return _k_sub_logit_loss.sub_logit_loss_backward(grad_loss, sub_logits, *args)


def _bn_relu_pool_fwd_kernel(x, weight, bias, running_mean, running_var, training, momentum, eps):
    with _guard(x):
        return _k_pool.bn_relu_pool_forward(x, weight, bias, running_mean, running_var, training, momentum, eps)


def _bn_relu_pool_bwd_kernel(grad_out, x, weight, bias, save_mean, save_invstd, training):
    with _guard(x):
        return _k_pool.bn_relu_pool_backward(grad_out, x, weight, bias, save_mean, save_invstd, training)


def _projector_dwconv_kernel(x, weight, scale, shift, stride):
    with _guard(x):
        return _k_proj.projector_dwconv_forward(x, weight, scale, shift, stride)


def _projector_dwconv_backward_kernel(grad, x, weight, scale, shift, stride):
    with _guard(x):
        return _k_proj.projector_dwconv_backward(grad, x, weight, scale, shift, stride)


def _projector_pwconv_kernel(a, weight, *args):
    with _guard(a):
        return _k_proj.projector_pwconv_forward(a, weight, *args)


def _projector_pwconv_backward_kernel(grad_y, *args):
    with _guard(grad_y):
        return _k_proj.projector_pwconv_backward(grad_y, *args)


def _pool_linear_kernel(x, weight, bias):
    with _guard(x):
        pooled = _k_pool.spatial_mean(x, acc_dtype(x.dtype, weight.dtype, bias.dtype))
    # The small GEMM is torch's; the result is a fresh tensor (never pooled, never an input).
    out = torch.addmm(bias.to(pooled.dtype), pooled, weight.to(pooled.dtype).t())
    return out.to(x.dtype), pooled


def _cfm_kernel(student_feat, teacher_feat, weight1, bias1, weight2, bias2, teacher_logits, num_sub_logits,
                lambda_student, lambda_teacher):
    """One stage (B, D), or the S stages stacked (S, B, D): one launch per GEMM for all of them."""
    dt = _cfm.out_dtype(student_feat, teacher_feat, weight1, teacher_logits)
    batch, num_classes = teacher_logits.shape
    stages = tuple(student_feat.shape[:-2])
    with _guard(student_feat):
        if weight2 is None:
            hidden = student_feat.new_empty((0,), dtype=dt)
            zf = _k_cfm.cfm_gemm(student_feat, teacher_feat, weight1, bias1, teacher_logits, lambda_student,
                                 lambda_teacher, _k_cfm.EPILOGUE_FUSE, dt)
        else:
            hidden = _k_cfm.cfm_gemm(student_feat, teacher_feat, weight1, bias1, None, 1.0, 0.0,
                                     _k_cfm.EPILOGUE_RELU, dt)
            zf = _k_cfm.cfm_gemm(hidden, None, weight2, bias2, teacher_logits, lambda_student, lambda_teacher,
                                 _k_cfm.EPILOGUE_FUSE, dt)
    return zf.view(stages + (batch, num_sub_logits, num_classes)), hidden


if _IMPORT_ERROR is None:
    sub_logit_loss = _sub_logit_loss.bind(_sub_logit_loss.OP.define("hcd_triton", _sub_logit_loss_kernel,
                                                                    _sub_logit_loss_backward_kernel))
    bn_relu_pool = _bn_relu_pool.bind(_bn_relu_pool.FWD.define("hcd_triton", _bn_relu_pool_fwd_kernel),
                                      _bn_relu_pool.BWD.define("hcd_triton", _bn_relu_pool_bwd_kernel))
    pool_linear = _pool_linear.bind(_pool_linear.OP.define("hcd_triton", _pool_linear_kernel))
    cfm = _cfm.bind(_cfm.OP.define("hcd_triton", _cfm_kernel))
    projector_dwconv, projector_pwconv = _projector.bind(
        _projector.DWCONV.define("hcd_triton", _projector_dwconv_kernel, _projector_dwconv_backward_kernel),
        _projector.PWCONV.define("hcd_triton", _projector_pwconv_kernel),
        _projector.PWCONV_BACKWARD.define("hcd_triton", _projector_pwconv_backward_kernel))
# The projectors run their (grouped) SepConv blocks through projector_dwconv / projector_pwconv (not the module path).
FUSED_PROJECTOR = True
PROJECTOR_NOTE = "projector blocks: fused kernels (projector_dwconv, projector_pwconv)"
