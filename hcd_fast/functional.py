"""Functional API of the four fused ops: the public boundary, where inputs are validated (once) and the
backend's op table is looked up (resolved once per backend and device type, ``hcd_fast.ops.op_table``).

Every function takes ``backend`` ("auto", "reference", "triton", "cuda" or "cpu"; see
``hcd_fast.backends()``) and computes exactly what ``hcd_fast.reference`` defines, with the dtypes of the
README's dtype contract on every backend.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from hcd_fast.config import HCDConfig
from hcd_fast.ops.dispatch import op_table
from hcd_fast.validation import (check_float, check_logits_and_target, check_same_device, check_shape,
                                 check_target_range, resolve_validate)


def teacher_input(t: torch.Tensor) -> torch.Tensor:
    """The teacher's feature/logits as a constant: detached, and copied out of inference mode when they were
    made under ``torch.inference_mode()`` (such tensors cannot be saved for backward by the fused ops).

    Under torch.compile dynamo cannot read ``is_inference()``, and the partitioner would save the graph input
    rather than a copy, so there teacher tensors must be ordinary ones (made under ``torch.no_grad()``, or
    cloned after leaving inference mode, as ``hcd_fast.distill``'s teacher tap does).
    """
    if torch.compiler.is_compiling():
        return t.detach()
    return t.clone() if t.is_inference() else t.detach()


def sub_logit_loss(
    sub_logits: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    config: HCDConfig = HCDConfig(),
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """HCD loss from the fused sub-logits of all stages.

    Args:
        sub_logits: zf, (S, B, n, K), fused sub-logits ``lambda_s * z + lambda_t * z_t`` of every stage.
        student_logits: z_s, (B, K).
        teacher_logits: z_t, (B, K); receives no gradient.
        target: y, (B,) integer class indices in [0, K).
        config: HCDConfig; n must equal ``config.num_sub_logits``.
        backend: which implementation computes it.
        validate: check target values are in range (reads them: a device sync on CUDA). None means on for
            CPU tensors and off for CUDA tensors.

    Returns:
        (loss, parts): loss a 0-d fp32 tensor (fp64 for fp64 inputs); parts a dict of detached 0-d
        tensors "ce", "sub_ce", "kd", "sub_kl", "ortho" (unweighted; stage terms summed over stages), with
        ``loss = w_gt*(ce + sub_ce) + w_kd*kd + w_kl*sub_kl + w_ol*ortho``.
    """
    if not isinstance(config, HCDConfig):
        raise TypeError(f"config: expected an HCDConfig, got {type(config).__name__}")
    batch, num_classes = check_logits_and_target(student_logits, teacher_logits, target)
    check_float("sub_logits", sub_logits, 4)
    check_shape("sub_logits", sub_logits, (None, batch, config.num_sub_logits, num_classes),
                "(S, B, n, K) with n = config.num_sub_logits")
    check_same_device(student_logits=student_logits, sub_logits=sub_logits)
    if resolve_validate(validate, target.device):
        check_target_range(target, num_classes)
    ops = op_table(backend, student_logits.device)
    return ops.sub_logit_loss(sub_logits, student_logits, teacher_input(teacher_logits), target, config)


def cfm(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    weight1: torch.Tensor,
    bias1: torch.Tensor,
    weight2: Optional[torch.Tensor],
    bias2: Optional[torch.Tensor],
    teacher_logits: torch.Tensor,
    num_sub_logits: int,
    lambda_student: float = 1.0,
    lambda_teacher: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Complementary Feature Mapper + teacher fusion -> fused sub-logits (B, n, K), in
    promote(student_feat, teacher_feat, weight1, teacher_logits) (under autocast: promote(autocast dtype,
    teacher_logits)).

    Args:
        student_feat: h_s, (B, D); or (S, B, D), the S stages of ``HCDLoss`` stacked, with every weight and bias
            stacked too ((S, ...) below) and output (S, B, n, K): one batched GEMM per layer for all stages.
        teacher_feat: f_t, (B, D_t); receives no gradient.
        weight1, bias1: (H, D + D_t), (H,); with ``weight2`` None, H = n*K and z = W1 u + b1.
        weight2, bias2: (n*K, H), (n*K,), or both None.
        teacher_logits: z_t, (B, K); receives no gradient.
        num_sub_logits: n.
        lambda_student, lambda_teacher: zf = lambda_student * z + lambda_teacher * z_t.
    """
    check_float("student_feat", student_feat)
    if student_feat.dim() not in (2, 3):
        raise ValueError(f"student_feat: expected a 2-d (B, D) or 3-d (S, B, D) tensor, got shape "
                         f"{tuple(student_feat.shape)}")
    stages = tuple(student_feat.shape[:-2])  # (S,) stacked, () for one stage
    batch, dim = student_feat.shape[-2:]
    check_float("teacher_feat", teacher_feat, 2)
    check_float("teacher_logits", teacher_logits, 2)
    check_shape("teacher_feat", teacher_feat, (batch, None), "batch of student_feat")
    num_classes = teacher_logits.shape[1]
    check_shape("teacher_logits", teacher_logits, (batch, None), "batch of student_feat")
    in_dim = dim + teacher_feat.shape[1]
    what = "(S, " if stages else "("
    check_float("weight1", weight1, 2 + len(stages))
    check_shape("weight1", weight1, stages + (None, in_dim), what + "hidden, D + D_t)")
    hidden = weight1.shape[-2]
    check_float("bias1", bias1, 1 + len(stages))
    check_shape("bias1", bias1, stages + (hidden,))
    if (weight2 is None) != (bias2 is None):
        raise ValueError("weight2, bias2: expected both tensors or both None")
    out_dim = num_sub_logits * num_classes
    if weight2 is None:
        check_shape("weight1", weight1, stages + (out_dim, in_dim), what + "n*K, D + D_t) without a hidden layer")
    else:
        check_float("weight2", weight2, 2 + len(stages))
        check_shape("weight2", weight2, stages + (out_dim, hidden), what + "n*K, hidden)")
        check_float("bias2", bias2, 1 + len(stages))
        check_shape("bias2", bias2, stages + (out_dim,))
    check_same_device(student_feat=student_feat, teacher_feat=teacher_feat, weight1=weight1, bias1=bias1,
                      weight2=weight2, bias2=bias2, teacher_logits=teacher_logits)
    ops = op_table(backend, student_feat.device)
    return ops.cfm(student_feat, teacher_input(teacher_feat), weight1, bias1, weight2, bias2,
              teacher_input(teacher_logits), num_sub_logits, lambda_student, lambda_teacher)


def bn_relu_pool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """mean_{h,w} ReLU(BatchNorm2d(x)): x (B, C, H, W), weight/bias/running stats (C,) -> (B, C) in x's dtype.

    Training mode normalises with batch statistics and updates ``running_mean``/``running_var`` in
    place like ``nn.BatchNorm2d(momentum=momentum)``; eval mode uses the running statistics.
    """
    check_float("x", x, 4)
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_float(name, t, 1)
        check_shape(name, t, (channels,), "the channels of x")
    check_same_device(x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    batch, _, height, width = x.shape
    if training and batch * height * width <= 1:
        # nn.BatchNorm2d's own error: the unbiased variance of one value is undefined.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    ops = op_table(backend, x.device)
    return ops.bn_relu_pool(x, weight, bias, running_mean, running_var, training, momentum, eps)


def pool_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """mean_{h,w} (W x + b) = W mean_{h,w}(x) + b: x (B, C, H, W), W (D, C), b (D,) -> (B, D) in x's dtype
    (under autocast: the autocast dtype)."""
    check_float("x", x, 4)
    check_float("weight", weight, 2)
    check_shape("weight", weight, (None, x.shape[1]), "(D, C) with C the channels of x")
    check_float("bias", bias, 1)
    check_shape("bias", bias, (weight.shape[0],))
    check_same_device(x=x, weight=weight, bias=bias)
    return op_table(backend, x.device).pool_linear(x, weight, bias)
