"""Thin nn.Module wrappers: the projectors and the CFM (SPEC section 2), computing through the fused ops.

Parameters live in ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` submodules so checkpoints
look like the published code's; the hot tails (BN+ReLU+GAP, conv1x1+GAP, the CFM), and on the triton backend the
SepConv blocks (projector_dwconv, projector_pwconv), go through the fused ops. Called on their own, the modules
validate their input through ``hcd_fast.functional``; ``HCDLoss`` validates once and calls ``run(..., ops)`` with
its op table.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hcd_fast import functional as HF
from hcd_fast.ops.dispatch import OpTable


def init_weights(module: nn.Module) -> None:
    """Convs kaiming_normal(fan_out, relu); BN weight 1, bias 0; linears trunc_normal(std 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SepConv(nn.Module):
    """dw3x3(stride 2) -> pw1x1 -> BN -> ReLU -> dw3x3 -> pw1x1(c_in -> c_out) -> BN -> ReLU, bias-free."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.dw1 = nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False)
        self.pw1 = nn.Conv2d(c_in, c_in, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.dw2 = nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False)
        self.pw2 = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward_pre_bn(self, x: torch.Tensor) -> torch.Tensor:
        """Everything up to the last pw conv; the last BN+ReLU is applied by the caller."""
        x = F.relu(self.bn1(self.pw1(self.dw1(x))))
        return self.pw2(self.dw2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.forward_pre_bn(x)))


def count_batch_momentum(bn: nn.BatchNorm2d) -> float:
    """What nn.BatchNorm2d does before normalising: in training, count the batch (num_batches_tracked += 1),
    and return the momentum of this step's running-stat update (momentum None: a cumulative average)."""
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def _bn_args(bn: nn.BatchNorm2d) -> tuple:
    """The BatchNorm's arguments of projector_pwconv: parameters, running statistics and num_batches_tracked
    (counted on the device by the op in training), mode, momentum (None: cumulative average), eps."""
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.training, bn.momentum,
            bn.eps)


class ConvProjector(nn.Module):
    """Projector of a non-deepest stage: ``num_blocks`` SepConv blocks (channels doubling, the last one
    emitting ``out_dim``), then global average pooling. The last BN+ReLU+GAP is the ``bn_relu_pool`` op. On a
    backend with fused projector ops (``OpTable.fused_projector``: triton) the blocks run through them; elsewhere
    through their nn modules (cuDNN/ATen). The parameters and buffers are the modules' either way."""

    def __init__(self, in_channels: int, num_blocks: int, out_dim: int, backend: str = "auto"):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks: expected >= 1, got {num_blocks}")
        chans = [in_channels * 2 ** j for j in range(num_blocks)] + [out_dim]
        self.blocks = nn.ModuleList(SepConv(chans[j], chans[j + 1]) for j in range(num_blocks))
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, None)

    def fusable(self) -> bool:
        """Whether the fused projector ops compute exactly what the blocks' modules would: plain affine
        nn.BatchNorm2d with running statistics (SyncBatchNorm's statistics are global across ranks: module path)."""
        return all(type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
                   for block in self.blocks for bn in (block.bn1, block.bn2))

    def run_fused_blocks(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        """Every SepConv block through projector_dwconv / projector_pwconv; returns the last pointwise conv's
        output (the input of the last BN, which bn_relu_pool applies). A BN's apply+ReLU is the prologue of the
        dwconv that reads its output; its statistics are the epilogue of the pwconv that writes its input."""
        scale = shift = None  # the raw stage map: no BN in front of the first dwconv
        last = len(self.blocks) - 1
        for j, block in enumerate(self.blocks):
            a = ops.projector_dwconv(x, block.dw1.weight, scale, shift, 2)
            y, scale, shift = ops.projector_pwconv(a, block.pw1.weight, *_bn_args(block.bn1))
            a = ops.projector_dwconv(y, block.dw2.weight, scale, shift, 1)
            if j < last:
                x, scale, shift = ops.projector_pwconv(a, block.pw2.weight, *_bn_args(block.bn2))
            else:  # a plain GEMM: bn_relu_pool computes the last BN's statistics with its pooling
                x = F.conv2d(a, block.pw2.weight.to(a.dtype))
        return x

    def run(self, x: torch.Tensor, ops: Optional[OpTable]) -> torch.Tensor:
        """forward with a resolved op table (inputs already validated), or None: through hcd_fast.functional."""
        last = self.blocks[-1]
        if ops is not None and ops.fused_projector and self.fusable():
            x = self.run_fused_blocks(x, ops)
        else:
            for block in self.blocks[:-1]:
                x = block(x)
            x = last.forward_pre_bn(x)
        bn = last.bn2
        if isinstance(bn, nn.SyncBatchNorm):
            # After convert_sync_batchnorm the statistics are global across ranks: the module computes
            # them (the fused op's statistics would be per process).
            return F.relu(bn(x)).mean(dim=(2, 3))
        # The BatchNorm's own mode decides batch vs running statistics, as it would in bn(x).
        momentum = count_batch_momentum(bn)
        args = (x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.training, momentum, bn.eps)
        if ops is None:
            return HF.bn_relu_pool(*args, backend=self.backend)
        return ops.bn_relu_pool(*args)


class LinearProjector(nn.Module):
    """Projector of the deepest stage: conv1x1(C -> D, with bias) then GAP, computed as
    ``W @ GAP(x) + b`` (the ``pool_linear`` op; exact because both maps are linear)."""

    def __init__(self, in_channels: int, out_dim: int, backend: str = "auto"):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_dim, 1, bias=True)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, None)

    def run(self, x: torch.Tensor, ops: Optional[OpTable]) -> torch.Tensor:
        """forward with a resolved op table (inputs already validated), or None: through hcd_fast.functional."""
        if ops is None:
            return HF.pool_linear(x, self.proj.weight.flatten(1), self.proj.bias, backend=self.backend)
        return ops.pool_linear(x, self.proj.weight.flatten(1), self.proj.bias)


class CFM(nn.Module):
    """Complementary Feature Mapper: [h_s ; f_t] -> MLP -> n*K shared logits, fused with the teacher's.

    ``hidden=None`` gives one linear layer ``D + D_t -> n*K``; otherwise Linear -> ReLU -> Linear.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_classes: int, num_sub_logits: int,
                 hidden: Optional[int], lambda_student: float = 1.0, lambda_teacher: float = 1.0,
                 backend: str = "auto"):
        super().__init__()
        out_dim = num_sub_logits * num_classes
        self.num_sub_logits = num_sub_logits
        self.lambda_student = lambda_student
        self.lambda_teacher = lambda_teacher
        self.fc1 = nn.Linear(student_dim + teacher_dim, out_dim if hidden is None else hidden)
        self.fc2 = None if hidden is None else nn.Linear(hidden, out_dim)
        self.backend = backend

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.run(student_feat, teacher_feat, teacher_logits, None)

    def run(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, teacher_logits: torch.Tensor,
            ops: Optional[OpTable]) -> torch.Tensor:
        """forward with a resolved op table (inputs validated, teacher detached), or None: through
        hcd_fast.functional."""
        fc2_w = None if self.fc2 is None else self.fc2.weight
        fc2_b = None if self.fc2 is None else self.fc2.bias
        args = (student_feat, teacher_feat, self.fc1.weight, self.fc1.bias, fc2_w, fc2_b, teacher_logits,
                self.num_sub_logits, self.lambda_student, self.lambda_teacher)
        if ops is None:
            return HF.cfm(*args, backend=self.backend)
        return ops.cfm(*args)
