"""The eager PyTorch specification of HCD (SPEC section 2). Every fast path is tested against this file.

One function per fused op, under the op's name in every backend:

- ``projector_dwconv``, ``projector_pwconv``: one SepConv projector block as depthwise conv (with the previous
  BatchNorm's apply + ReLU in front) and pointwise conv (with the next BatchNorm's statistics after it).
- ``bn_relu_pool``: GAP(ReLU(BN(x))), the tail of a SepConv projector.
- ``pool_linear``: GAP(conv1x1(x) + b), the deepest-stage projector, computed literally.
- ``cfm``: the Complementary Feature Mapper and the teacher fusion, -> fused sub-logits (B, n, K).
- ``sub_logit_loss``: CE, KD, sub-logit CE, sub-logit KL and orthogonality terms -> (loss, parts).

Low-precision inputs (fp16/bf16) are computed in fp32 here, as the kernels do; float64 stays float64 so
``torch.autograd.gradcheck`` can run on every piece. The teacher never receives gradient: its feature and
logits are detached inside each op.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from hcd_fast.config import LARGE_NEGATIVE, HCDConfig

PART_NAMES = ("ce", "sub_ce", "kd", "sub_kl", "ortho")


def _compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (the loss is always computed and returned in fp32 or better)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def bn_relu_pool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """mean_{h,w} ReLU(BatchNorm2d(x)): (B, C, H, W) -> (B, C).

    In training mode the batch statistics normalise and the running statistics are updated in place
    exactly as ``nn.BatchNorm2d`` does (momentum update, unbiased variance).
    """
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.relu(y).mean(dim=(2, 3))


def projector_dwconv(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None,
                     shift: Optional[torch.Tensor] = None, stride: int = 1) -> torch.Tensor:
    """conv3x3(z, weight, stride, padding 1, groups C), z = ReLU(x * scale + shift) (a BatchNorm's apply with
    scale = w / sqrt(var + eps), shift = b - mean * scale) or z = x when scale is None. x (B, C, H, W), weight
    (C, 1, 3, 3), scale/shift (P,) with P <= C -> (B, C, HO, WO) in x's dtype (conv weight cast to it, as under
    autocast). With P < C only the first P channels get the BN apply and ReLU; the others are taken as they are
    (a grouped projector block: the previous blocks' BN output followed by a raw stage map)."""
    if scale is not None:
        p = scale.shape[0]
        z = F.relu(x[:, :p] * scale[:, None, None] + shift[:, None, None]).to(x.dtype)
        x = z if p == x.shape[1] else torch.cat([z, x[:, p:]], dim=1)
    return F.conv2d(x, weight.to(x.dtype), stride=stride, padding=1, groups=x.shape[1])


def projector_pwconv(a: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                     running_mean: torch.Tensor, running_var: torch.Tensor, num_batches_tracked: torch.Tensor,
                     training: bool, momentum: Optional[float] = 0.1, eps: float = 1e-5, groups: int = 1
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = conv1x1(a, weight, groups) and the (scale, shift) of the BatchNorm2d that follows it: (B, C_in, H, W),
    weight (C_out, C_in / groups[, 1, 1]) -> y (B, C_out, H, W) in a's dtype, scale, shift (C_out,).

    Exactly nn.BatchNorm2d's statistics: in training the batch mean and biased variance of y normalise,
    num_batches_tracked += 1, and the running statistics move by the momentum (None: the cumulative average,
    factor 1 / num_batches_tracked) with the unbiased variance; in eval the running statistics normalise.
    BN(y) = y * scale + shift with scale = bn_weight / sqrt(var + eps), shift = bn_bias - mean * scale.
    """
    y = F.conv2d(a, weight.reshape(weight.shape[0], -1, 1, 1).to(a.dtype), groups=groups)
    stats_dtype = torch.float64 if torch.float64 in (a.dtype, bn_weight.dtype) else torch.float32
    if training:
        num_batches_tracked.add_(1)
        yc = y.to(stats_dtype)
        mean = yc.mean(dim=(0, 2, 3))
        var = yc.var(dim=(0, 2, 3), unbiased=False)
        n = y.numel() // y.shape[1]
        with torch.no_grad():
            f = 1.0 / num_batches_tracked.to(stats_dtype) if momentum is None else momentum
            running_mean.copy_((1 - f) * running_mean.to(stats_dtype) + f * mean)
            running_var.copy_((1 - f) * running_var.to(stats_dtype) + f * var * (n / (n - 1)))
    else:
        mean, var = running_mean.to(stats_dtype), running_var.to(stats_dtype)
    scale = bn_weight.to(stats_dtype) * torch.rsqrt(var + eps)
    return y, scale, bn_bias.to(stats_dtype) - mean * scale


def pool_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """mean_{h,w} (W @ x[:, :, h, w] + b): (B, C, H, W), W (D, C), b (D,) -> (B, D).

    The literal form of the deepest-stage projector (conv1x1 then global average pooling). Because both
    maps are linear it equals ``W @ mean_{h,w} x + b``, the identity the fused backends use.
    """
    return F.conv2d(x, weight[:, :, None, None], bias).mean(dim=(2, 3))


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
) -> torch.Tensor:
    """Complementary Feature Mapper with the teacher fusion -> fused sub-logits (B, n, K).

    u = [h_s ; f_t] (student part first); z = W2 relu(W1 u + b1) + b2, or z = W1 u + b1 when
    ``weight2`` is None; zf_i = lambda_student * z.view(B, n, K)_i + lambda_teacher * z_t.

    Args:
        student_feat: h_s, (B, D).
        teacher_feat: f_t, (B, D_t); detached.
        weight1, bias1: (H, D + D_t), (H,); H = n*K when ``weight2`` is None.
        weight2, bias2: (n*K, H), (n*K,), or both None.
        teacher_logits: z_t, (B, K); detached.

    Stacked stages (``HCDLoss``'s layout): student_feat (S, B, D), weight1 (S, H, D + D_t), bias1 (S, H), weight2
    (S, n*K, H), bias2 (S, n*K) -> (S, B, n, K), each stage computed as above.
    """
    if student_feat.dim() == 3:
        # unbind (not indexing): its backward is one stack of the stage gradients, not S zero-filled copies.
        stages = [t.unbind(0) if t is not None else [None] * len(student_feat)
                  for t in (student_feat, weight1, bias1, weight2, bias2)]
        return torch.stack([cfm(h, teacher_feat, w1, b1, w2, b2, teacher_logits, num_sub_logits, lambda_student,
                                lambda_teacher) for h, w1, b1, w2, b2 in zip(*stages)])
    u = torch.cat([student_feat, teacher_feat.detach()], dim=1)
    z = F.linear(u, weight1, bias1)
    if weight2 is not None:
        z = F.linear(F.relu(z), weight2, bias2)
    batch, num_classes = teacher_logits.shape
    z = z.view(batch, num_sub_logits, num_classes)
    return lambda_student * z + lambda_teacher * teacher_logits.detach()[:, None, :]


def _kl_rows(target_logits: torch.Tensor, input_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(target/T) || softmax(input/T)) per row, from log-probabilities on both sides."""
    log_p = F.log_softmax(target_logits / temperature, dim=-1)
    log_q = F.log_softmax(input_logits / temperature, dim=-1)
    return temperature * temperature * (log_p.exp() * (log_p - log_q)).sum(-1)


def orthogonality(sub_logits: torch.Tensor, target: torch.Tensor, config: HCDConfig) -> torch.Tensor:
    """Orthogonality loss of one stage's sub-logits (B, n, K) -> 0-d.

    v_i = sub_logits_i with the target entry masked (config.gt_mask), v_i <- v_i / max(||v_i||, eps),
    G = V V^T per sample, OL = mean over b and i != j of relu(G_ij - theta)^2; 0 when n == 1.
    """
    batch, n, num_classes = sub_logits.shape
    if n == 1:
        return sub_logits.sum() * 0.0
    v = sub_logits
    if config.gt_mask != "none":
        fill = 0.0 if config.gt_mask == "zero" else LARGE_NEGATIVE
        is_target = F.one_hot(target, num_classes).bool()[:, None, :]
        v = v.masked_fill(is_target, fill)
    # max(||v||, eps) with the minimum-norm subgradient: no gradient through ||v|| at ||v|| == eps. Written
    # out because clamp_min's subgradient there changed between torch releases (1 up to 2.13, 0 from 2.14).
    norm = v.norm(dim=-1, keepdim=True)
    v = v / torch.where(norm > config.ortho_eps, norm, config.ortho_eps)
    gram = v @ v.transpose(1, 2)
    off_diagonal = 1.0 - torch.eye(n, dtype=v.dtype, device=v.device)
    hinge = F.relu(gram - config.ortho_threshold).pow(2) * off_diagonal
    return hinge.sum() / (batch * n * (n - 1))


def sub_logit_loss(
    sub_logits: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    config: HCDConfig,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The HCD loss from the fused sub-logits of every stage.

    Args:
        sub_logits: zf, (S, B, n, K), fused sub-logits of all tapped stages.
        student_logits: z_s, (B, K).
        teacher_logits: z_t, (B, K); detached.
        target: y, (B,) integer class indices.
        config: the HCDConfig (temperature, label smoothing, weights, gt_mask, ortho_on, ...); with
            ortho_on="raw" the orthogonality term sees zf - lambda_teacher * z_t.

    Returns:
        loss: 0-d fp32 (fp64 for fp64 input), w_gt*(ce + sub_ce) + w_kd*kd + w_kl*sub_kl + w_ol*ortho.
        parts: {"ce", "sub_ce", "kd", "sub_kl", "ortho"}, unweighted, detached; the stage terms are
            summed over stages.
    """
    T, ls = config.temperature, config.label_smoothing
    zf = _compute_dtype(sub_logits)
    z_s = _compute_dtype(student_logits)
    z_t = _compute_dtype(teacher_logits).detach()
    num_stages, batch, n, num_classes = zf.shape

    ce = F.cross_entropy(z_s, target, label_smoothing=ls)
    kd = _kl_rows(z_t, z_s, T).mean()

    # Sub-logit CE: mean over (b, i) of CE_ls(zf_i, y), per stage, summed over stages.
    rows = zf.reshape(num_stages, batch * n, num_classes)
    row_target = target.repeat_interleave(n)
    sub_ce = zf.new_zeros(())
    sub_kl = zf.new_zeros(())
    ortho = zf.new_zeros(())
    kl_target = zf.detach() if config.detach_sub_targets else zf
    # ortho_on="raw": the orthogonality loss sees the CFM's own sub-logits lambda_s z = zf - lambda_t z_t (the
    # cosines do not depend on the scale lambda_s); "fused": the fused zf.
    ortho_rows = zf - config.lambda_teacher * z_t[None, :, None, :] if config.ortho_on == "raw" else zf
    for s in range(num_stages):
        sub_ce = sub_ce + F.cross_entropy(rows[s], row_target, label_smoothing=ls)
        # Sub-logit KL: T^2 KL(softmax(zf_i/T) || softmax(z_s/T)), mean over (b, i).
        sub_kl = sub_kl + _kl_rows(kl_target[s], z_s[:, None, :].expand(batch, n, num_classes), T).mean()
        ortho = ortho + orthogonality(ortho_rows[s], target, config)

    loss = (config.w_gt * (ce + sub_ce) + config.w_kd * kd + config.w_kl * sub_kl
             + config.w_ol * ortho)
    parts = {"ce": ce, "sub_ce": sub_ce, "kd": kd, "sub_kl": sub_kl, "ortho": ortho}
    return loss, {k: v.detach() for k, v in parts.items()}
