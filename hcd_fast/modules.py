"""Thin nn.Module wrappers: the projectors and the CFM (SPEC section 2), computing through the fused ops.

Parameters live in ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` submodules so checkpoints
look like the published code's; the hot tails (BN+ReLU+GAP, conv1x1+GAP, the CFM), and on the triton backend the
SepConv blocks (projector_dwconv, projector_pwconv), go through the fused ops. The S CFMs of ``HCDLoss`` are one
``StageCFMs`` module with stage-stacked weights (one batched GEMM per layer for all stages), whose state_dict keeps
the per-stage ``nn.Linear`` keys (``cfms.<s>.fc1.weight``, ...). Called on their own, the modules validate their input through ``hcd_fast.functional``; ``HCDLoss`` validates once and calls
``run(..., ops)`` with its op table.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hcd_fast import functional as HF
from hcd_fast import reference as R
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
        elif isinstance(m, StackedLinear):
            m.reset_parameters()


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
            if capturing():
                raise RuntimeError(
                    "BatchNorm2d with momentum=None (a cumulative average) reads num_batches_tracked on the host "
                    "(nn.BatchNorm2d does too), which a CUDA graph cannot capture: give the projector BatchNorms a "
                    "momentum (the default 0.1), or capture in eval mode")
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def _bn_args(bn: nn.BatchNorm2d) -> tuple:
    """The BatchNorm's arguments of projector_pwconv: parameters, running statistics and num_batches_tracked
    (counted on the device by the op in training), mode, momentum (None: cumulative average, read on the device),
    eps."""
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.training, bn.momentum,
            bn.eps)


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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


class WeightCastCache:
    """Autocast casts of parameters, made once per parameter version instead of once per call.

    Under autocast a fused op runs its GEMMs in the autocast dtype, so fp32 weights are cast to it. The cast is
    kept and reused while the parameter is unchanged: every in-place update (``optimizer.step()``,
    ``load_state_dict``, ``p.copy_``, ...) bumps ``p._version`` and the next call casts again, so a cast is never
    stale. Several forwards per optimizer step (gradient accumulation, evaluation) cast once; the cast keeps its
    autograd edge to the parameter, so gradients still reach it. Changes made through ``p.data`` are invisible
    to version counters: call ``clear()`` after such a change. Bypassed (a plain cast) under torch.compile and
    while a CUDA graph is captured (the cast is then part of the graph and replays with the current weights),
    and for non-leaf tensors.
    """

    def __init__(self):
        self._entries: Dict[tuple, tuple] = {}
        self._lock = threading.Lock()

    def __call__(self, dtype: Optional[torch.dtype], t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if dtype is None or t is None or t.dtype == dtype or t.dtype == torch.float64:
            return t
        if not t.is_leaf or torch.compiler.is_compiling() or capturing():
            return t.to(dtype)
        mode = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        key = (id(t), dtype)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] is t and hit[1] == t._version and hit[2] == mode:
                return hit[3]
        out = t.to(dtype)
        with self._lock:
            self._entries[key] = (t, t._version, mode, out)
        return out

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    # The cache is derived state: copies and pickles of a module start empty (a cast with an autograd history
    # cannot be deep-copied).
    def __deepcopy__(self, memo) -> "WeightCastCache":
        return WeightCastCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state) -> None:
        self.__init__()


class StackedLinear(nn.Module):
    """S linear layers stacked: ``weight (S, out, in)``, ``bias (S, out)``. A parameter container for the ``cfm``
    op (its names end in ``.weight`` / ``.bias`` as nn.Linear's, so optimizers' no-weight-decay-on-bias rules,
    which match the ``.bias`` suffix, still apply)."""

    def __init__(self, num_stages: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_stages, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_stages, out_features))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.trunc_normal_(self.weight, std=0.02)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"stages={self.weight.shape[0]}, in_features={self.in_features}, out_features={self.out_features}"


class StageCFMs(nn.Module):
    """The S CFMs of ``HCDLoss`` (one per tapped stage), with stage-stacked weights: ``fc1.weight (S, H, D + D_t)``,
    ``fc1.bias (S, H)``, ``fc2.weight (S, n*K, H)``, ``fc2.bias (S, n*K)`` (``hidden=None``: no fc2, H = n*K), so
    the ``cfm`` op runs every stage in one batched GEMM per layer and writes the fused sub-logits (S, B, n, K)
    directly.

    Its state_dict has the layout of S separate ``CFM`` modules, ``<s>.fc1.weight``, ``<s>.fc1.bias``,
    ``<s>.fc2.weight``, ``<s>.fc2.bias`` (what checkpoints of earlier versions hold; both layouts load), not the
    stacked one. Init as ``init_weights`` (trunc_normal std 0.02, zero biases). ``stage(s)`` returns a standalone
    ``CFM`` holding a copy of stage s's weights.
    """

    def __init__(self, num_stages: int, student_dim: int, teacher_dim: int, num_classes: int, num_sub_logits: int,
                 hidden: Optional[int], lambda_student: float = 1.0, lambda_teacher: float = 1.0,
                 backend: str = "auto"):
        super().__init__()
        out_dim = num_sub_logits * num_classes
        self.num_stages, self.num_sub_logits = num_stages, num_sub_logits
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.num_classes, self.hidden = num_classes, hidden
        self.lambda_student, self.lambda_teacher, self.backend = lambda_student, lambda_teacher, backend
        self.fc1 = StackedLinear(num_stages, student_dim + teacher_dim, out_dim if hidden is None else hidden)
        self.fc2 = None if hidden is None else StackedLinear(num_stages, hidden, out_dim)
        self.casts = WeightCastCache()
        self.reset_parameters()
        self._register_state_dict_hook(_stage_cfms_state_dict)
        self._register_load_state_dict_pre_hook(_stage_cfms_load_pre_hook, with_module=True)

    _KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")  # the same under the stacked and per-stage layout

    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2):
            if fc is not None:
                fc.reset_parameters()

    def __len__(self) -> int:
        return self.num_stages

    def extra_repr(self) -> str:
        return f"num_stages={self.num_stages}, num_sub_logits={self.num_sub_logits}, num_classes={self.num_classes}"

    def stage(self, s: int) -> CFM:
        """Stage s as a standalone ``CFM`` module (a copy of its weights)."""
        cfm = CFM(self.student_dim, self.teacher_dim, self.num_classes, self.num_sub_logits, self.hidden,
                  self.lambda_student, self.lambda_teacher, self.backend)
        own = {f"{name}.{kind}": getattr(fc, kind)[s] for name, fc in (("fc1", self.fc1), ("fc2", self.fc2))
               if fc is not None for kind in ("weight", "bias")}
        cfm.load_state_dict(own)
        return cfm.to(self.fc1.weight.device)

    def run(self, student_feats: torch.Tensor, teacher_feat: torch.Tensor, teacher_logits: torch.Tensor,
            ops: OpTable) -> torch.Tensor:
        """h (S, B, D) stacked over the stages (inputs validated, teacher detached) -> zf (S, B, n, K)."""
        fc2_w = None if self.fc2 is None else self.fc2.weight
        fc2_b = None if self.fc2 is None else self.fc2.bias
        args = (student_feats, teacher_feat, self.fc1.weight, self.fc1.bias, fc2_w, fc2_b, teacher_logits,
                self.num_sub_logits, self.lambda_student, self.lambda_teacher)
        if ops.cfm is R.cfm:
            return ops.cfm(*args)  # the eager spec, stage by stage (autocast casts inside F.linear)
        return ops.cfm(*args, weight_cast=self.casts)


def _stage_cfms_state_dict(module: StageCFMs, state_dict, prefix: str, local_metadata) -> None:
    """state_dict hook: the stacked parameters as the per-stage CFM keys of earlier versions."""
    stacked = {key: state_dict.pop(prefix + key) for key in StageCFMs._KEYS if prefix + key in state_dict}
    for s in range(module.num_stages):  # the order of a ModuleList of CFMs: stage by stage
        for key, value in stacked.items():
            state_dict[f"{prefix}{s}.{key}"] = value[s]


def _stage_cfms_load_pre_hook(module: StageCFMs, state_dict, prefix: str, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
    """load_state_dict hook: per-stage CFM keys (this module's state_dict, and checkpoints of earlier versions)
    are stacked into the parameters; stacked keys load as they are. Incomplete per-stage sets are left alone
    (the load then reports the missing and unexpected keys)."""
    for key in StageCFMs._KEYS:
        keys = [f"{prefix}{s}.{key}" for s in range(module.num_stages)]
        if prefix + key not in state_dict and all(k in state_dict for k in keys):
            state_dict[prefix + key] = torch.stack([state_dict.pop(k) for k in keys])
