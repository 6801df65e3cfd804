"""Thin nn.Module wrappers: the projectors and the CFM (SPEC section 2), computing through the fused ops.

Parameters live in ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` submodules so checkpoints
look like the published code's; the hot tails (BN+ReLU+GAP, conv1x1+GAP, the CFM), and on the triton backend the
SepConv blocks (projector_dwconv, projector_pwconv), go through the fused ops. The S projectors of ``HCDLoss`` are
one ``StageProjectors`` module that runs the same-shape SepConv blocks of different stages as one
``GroupedSepConv`` (group-stacked parameters, grouped pointwise convs), and the S CFMs one ``StageCFMs`` module with
stage-stacked weights (one batched GEMM per layer for all stages); both state_dicts keep the per-stage keys
(``projectors.<s>.blocks.<j>.dw1.weight``, ``cfms.<s>.fc1.weight``, ...). Called on their own, the modules validate
their input through ``hcd_fast.functional``; ``HCDLoss`` validates once and calls ``run(..., ops)`` with its op
table.
"""
from __future__ import annotations

import threading
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hcd_fast import functional as HF
from hcd_fast import reference as R
from hcd_fast.ops.dispatch import OpTable, op_table
from hcd_fast.ops.library import autocast_cast, autocast_dtype


def init_weights(module: nn.Module) -> None:
    """Convs kaiming_normal(fan_out, relu); BN weight 1, bias 0; linears trunc_normal(std 0.02), bias 0. Grouped
    projector blocks initialise each member's slice as its own conv (``StageProjectors.reset_parameters``)."""
    grouped = set()
    for m in module.modules():
        if id(m) in grouped:
            continue
        if isinstance(m, StageProjectors):
            m.reset_parameters()
            grouped.update(id(sub) for sub in m.modules())
        elif isinstance(m, nn.Conv2d):
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


# ------------------------------------------------------------------------------------ grouped projectors
class Piece(NamedTuple):
    """A stage's current map inside ``StageProjectors.run``: channels [lo, hi) of ``t``, with the (scale, shift) of
    the BatchNorm whose apply and ReLU are still to be done (the fused path's prologue; None: ``t`` is final)."""
    t: torch.Tensor
    lo: int
    hi: int
    scale: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None

    def view(self) -> torch.Tensor:
        return self.t if self.lo == 0 and self.hi == self.t.shape[1] else self.t[:, self.lo:self.hi]

    def affine(self):
        if self.scale is None:
            return None, None
        if self.lo == 0 and self.hi == self.scale.shape[0]:
            return self.scale, self.shift
        return self.scale[self.lo:self.hi], self.shift[self.lo:self.hi]


def _member_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, sl: slice, factor: float) -> torch.Tensor:
    """What ``nn.BatchNorm2d.forward`` computes for channels ``sl`` of the grouped ``bn`` alone (its running
    statistics are views: updated in place); ``factor``: this step's momentum, counted once for the group by
    ``count_batch_momentum``. A SyncBatchNorm that would synchronise statistics across ranks cannot run per member
    (the caller runs the group whole)."""
    running = not bn.training or bn.track_running_stats
    rm = bn.running_mean[sl] if running and bn.running_mean is not None else None
    rv = bn.running_var[sl] if running and bn.running_var is not None else None
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    w = bn.weight[sl] if bn.weight is not None else None
    b = bn.bias[sl] if bn.bias is not None else None
    return F.batch_norm(x, rm, rv, w, b, batch_stats, factor, bn.eps)


def _needs_sync(bn: nn.Module) -> bool:
    """Whether a SyncBatchNorm would reduce its statistics across processes in this forward."""
    return (isinstance(bn, nn.SyncBatchNorm) and bn.training and torch.distributed.is_available()
            and torch.distributed.is_initialized())


class GroupedSepConv(nn.Module):
    """G SepConv blocks of the same shape (c_in -> c_out), one per member ``(stage, block)``, as one block with
    group-stacked parameters: member i owns channels [i c_in, (i + 1) c_in) of dw1/pw1/bn1/dw2 and
    [i c_out, (i + 1) c_out) of pw2/bn2. Depthwise convs and BatchNorms are per channel, so they run on the members'
    concatenated channels unchanged; the pointwise convs are grouped convs (groups = G). Every module is a plain
    ``nn.Conv2d`` / ``nn.BatchNorm2d`` (``convert_sync_batchnorm`` converts the BatchNorms). ``last``: the members'
    last blocks (the caller applies bn2 with the pooling)."""

    def __init__(self, members: Sequence[Tuple[int, int]], c_in: int, c_out: int, last: bool):
        super().__init__()
        g = len(members)
        self.members, self.c_in, self.c_out, self.last = tuple(members), c_in, c_out, last
        self.dw1 = nn.Conv2d(g * c_in, g * c_in, 3, stride=2, padding=1, groups=g * c_in, bias=False)
        self.pw1 = nn.Conv2d(g * c_in, g * c_in, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(g * c_in)
        self.dw2 = nn.Conv2d(g * c_in, g * c_in, 3, stride=1, padding=1, groups=g * c_in, bias=False)
        self.pw2 = nn.Conv2d(g * c_in, g * c_out, 1, groups=g, bias=False)
        self.bn2 = nn.BatchNorm2d(g * c_out)

    @property
    def num_members(self) -> int:
        return len(self.members)

    def extra_repr(self) -> str:
        return f"members={self.members}, c_in={self.c_in}, c_out={self.c_out}"

    def reset_parameters(self) -> None:
        """Each member's slice as its own SepConv's: kaiming_normal(fan_out, relu) with the member conv's fan_out
        (the grouped conv's would be G times larger), BatchNorm weight 1, bias 0."""
        g = self.num_members
        with torch.no_grad():
            for conv in (self.dw1, self.pw1, self.dw2, self.pw2):
                rows = conv.weight.shape[0] // g
                for i in range(g):
                    nn.init.kaiming_normal_(conv.weight[i * rows:(i + 1) * rows], mode="fan_out",
                                            nonlinearity="relu")
            for bn in (self.bn1, self.bn2):
                nn.init.ones_(bn.weight)
                nn.init.zeros_(bn.bias)

    def fusable(self) -> bool:
        """As ``ConvProjector.fusable``: plain affine nn.BatchNorm2d with running statistics."""
        return all(type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats for bn in (self.bn1, self.bn2))

    def run_modules(self, x: torch.Tensor) -> torch.Tensor:
        """All members at once through the nn modules (cuDNN/ATen grouped convs); the last block stops before bn2."""
        x = F.relu(self.bn1(self.pw1(self.dw1(x))))
        x = self.pw2(self.dw2(x))
        return x if self.last else F.relu(self.bn2(x))

    def run_fused(self, x: torch.Tensor, scale, shift, ops: OpTable) -> Piece:
        """All members at once through projector_dwconv / projector_pwconv (groups = G); ``scale``/``shift`` cover
        the first channels of x (the continuing members), the rest is raw. Returns the last pw conv's output, with
        its BatchNorm's (scale, shift) unless ``last`` (bn_relu_pool applies it)."""
        g = self.num_members
        a = ops.projector_dwconv(x, self.dw1.weight, scale, shift, 2)
        y, scale, shift = ops.projector_pwconv(a, self.pw1.weight, *_bn_args(self.bn1), groups=g)
        a = ops.projector_dwconv(y, self.dw2.weight, scale, shift, 1)
        if self.last:  # a plain grouped GEMM: bn_relu_pool computes the last BN's statistics with its pooling
            return Piece(F.conv2d(a, self.pw2.weight.to(a.dtype), groups=g), 0, g * self.c_out)
        y, scale, shift = ops.projector_pwconv(a, self.pw2.weight, *_bn_args(self.bn2), groups=g)
        return Piece(y, 0, g * self.c_out, scale, shift)

    def run_members(self, pieces: Sequence[Piece], ops: OpTable, fused: bool) -> List[Piece]:
        """Each member alone on slices (views) of the group's parameters: exactly the per-stage SepConv blocks
        (the reference backend, and maps whose sizes differ)."""
        g, ci, co = self.num_members, self.c_in, self.c_out
        outs = []
        bns = (self.bn1,) if self.last else (self.bn1, self.bn2)  # the last bn2 is the caller's (_pool)
        if fused:  # one num_batches_tracked per grouped BN: member 0 counts it, the others count copies of it
            counters = {bn: [bn.num_batches_tracked] + [bn.num_batches_tracked.clone() if bn.training else
                                                        bn.num_batches_tracked for _ in range(g - 1)] for bn in bns}
        else:
            factors = {bn: count_batch_momentum(bn) for bn in bns}
        for i, piece in enumerate(pieces):
            sin, sout = slice(i * ci, (i + 1) * ci), slice(i * co, (i + 1) * co)
            x = piece.view()
            if fused:
                scale, shift = piece.affine()
                a = ops.projector_dwconv(x, self.dw1.weight[sin], scale, shift, 2)
                y, scale, shift = ops.projector_pwconv(a, self.pw1.weight[sin], *_member_bn_args(
                    self.bn1, sin, counters[self.bn1][i]))
                a = ops.projector_dwconv(y, self.dw2.weight[sin], scale, shift, 1)
                if self.last:
                    outs.append(Piece(F.conv2d(a, self.pw2.weight[sout].to(a.dtype)), 0, co))
                else:
                    y, scale, shift = ops.projector_pwconv(a, self.pw2.weight[sout], *_member_bn_args(
                        self.bn2, sout, counters[self.bn2][i]))
                    outs.append(Piece(y, 0, co, scale, shift))
                continue
            x = F.conv2d(x, self.dw1.weight[sin], stride=2, padding=1, groups=ci)
            x = F.conv2d(x, self.pw1.weight[sin])
            x = F.relu(_member_batch_norm(self.bn1, x, sin, factors[self.bn1]))
            x = F.conv2d(F.conv2d(x, self.dw2.weight[sin], padding=1, groups=ci), self.pw2.weight[sout])
            if not self.last:
                x = F.relu(_member_batch_norm(self.bn2, x, sout, factors[self.bn2]))
            outs.append(Piece(x, 0, co))
        return outs


def _member_bn_args(bn: nn.BatchNorm2d, sl: slice, counter: torch.Tensor) -> tuple:
    """``_bn_args`` of channels ``sl`` of a grouped BatchNorm (views: the op updates them in place), counting
    ``counter``."""
    return (bn.weight[sl], bn.bias[sl], bn.running_mean[sl], bn.running_var[sl], counter, bn.training, bn.momentum,
            bn.eps)


class StageProjectors(nn.Module):
    """The S projectors of ``HCDLoss`` (SPEC section 2): stage s < S-1 a ``ConvProjector`` of S-1-s SepConv blocks,
    the deepest stage a ``LinearProjector``, with the same-shape SepConv blocks of different stages run as one
    ``GroupedSepConv``.

    Grouping plan (from the channels, at construction): the blocks at the same distance from the end of their
    projector with equal (c_in, c_out) form a group, members in stage order; groups run from the farthest from the
    end to the last blocks. For a ResNet-like student (C_s = C_0 2^s) that is S-1 groups instead of
    (S-1) S / 2 blocks: all last blocks are one group, all second-to-last blocks another, ... For other widths
    (MobileNet-like) most groups have one member. A group's input is the channel concatenation of its members'
    inputs: the previous group's output (already the continuing members' channels, contiguous) and the raw map of
    the stage whose first block is in the group (one ``torch.cat`` per group). The last group's output goes through
    ``bn_relu_pool`` over its G*D channels.

    The reference backend runs every member on its own (slices of the group's parameters): exactly the published
    per-stage SepConv blocks, which the tests compare the grouped backends with. Maps whose sizes or dtypes differ
    between members (a student whose stages do not halve the map) run per member too.

    Its state_dict has the layout of the per-stage modules, ``<s>.blocks.<j>.dw1.weight``, ...,
    ``<s>.blocks.<j>.bn2.num_batches_tracked``, ``<S-1>.proj.weight``, ``<S-1>.proj.bias`` (what checkpoints of earlier
    versions hold; they load). A grouped BatchNorm counts one ``num_batches_tracked`` for its members; the state_dict
    writes it under every member's key, and loading takes the largest of the members' values (they are equal unless
    the checkpoint was edited). ``stage(s)`` returns a standalone ``ConvProjector`` / ``LinearProjector`` with a copy
    of stage s's weights; ``group_of(s, j)`` the group holding block j of stage s and its member index.
    """

    def __init__(self, channels: Sequence[int], embed_dim: int, backend: str = "auto"):
        super().__init__()
        self.channels, self.embed_dim, self.backend = tuple(channels), embed_dim, backend
        num_stages = len(self.channels)
        self.num_stages = num_stages
        groups = []
        for d in range(num_stages - 2, -1, -1):  # distance from the end of the projector
            by_shape: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
            for s, c in enumerate(self.channels[:-1]):
                n = num_stages - 1 - s  # blocks of stage s
                if n > d:
                    j = n - 1 - d
                    shape = (c * 2 ** j, embed_dim if d == 0 else c * 2 ** (j + 1))
                    by_shape.setdefault(shape, []).append((s, j))
            groups += [GroupedSepConv(members, c_in, c_out, d == 0) for (c_in, c_out), members in by_shape.items()]
        self.groups = nn.ModuleList(groups)
        self._where = {m: (gi, i) for gi, group in enumerate(groups) for i, m in enumerate(group.members)}
        # The deepest stage's projector under its stage index: its keys are <S-1>.proj.weight as before.
        self.add_module(str(num_stages - 1), LinearProjector(self.channels[-1], embed_dim, backend))
        self.reset_parameters()
        self._register_state_dict_hook(_stage_projectors_state_dict)
        self._register_load_state_dict_pre_hook(_stage_projectors_load_pre_hook, with_module=True)

    @property
    def linear(self) -> LinearProjector:
        return self._modules[str(self.num_stages - 1)]

    def __len__(self) -> int:
        return self.num_stages

    def extra_repr(self) -> str:
        return f"channels={self.channels}, embed_dim={self.embed_dim}"

    def reset_parameters(self) -> None:
        """As ``init_weights`` on the per-stage modules: convs kaiming_normal(fan_out) of each member's own conv,
        BatchNorm 1/0, the linear projector's bias 0."""
        for group in self.groups:
            group.reset_parameters()
        nn.init.kaiming_normal_(self.linear.proj.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.linear.proj.bias)

    def group_of(self, stage: int, block: int) -> Tuple[GroupedSepConv, int]:
        """The group that runs block ``block`` of stage ``stage``, and the member index of that block in it."""
        if (stage, block) not in self._where:
            raise ValueError(f"stage, block: no SepConv block {block} in stage {stage} "
                             f"(stage s < {self.num_stages - 1} has {self.num_stages - 1} - s blocks)")
        gi, i = self._where[(stage, block)]
        return self.groups[gi], i

    def stage(self, s: int) -> nn.Module:
        """Stage s as a standalone ``ConvProjector`` (or ``LinearProjector`` for the deepest stage) holding a copy of
        its weights and running statistics (BatchNorm momentum, eps and modes copied too)."""
        if not 0 <= s < self.num_stages:
            raise ValueError(f"s: expected a stage in [0, {self.num_stages}), got {s}")
        ref = self.linear.proj.weight
        if s == self.num_stages - 1:
            proj = LinearProjector(self.channels[-1], self.embed_dim, self.backend)
        else:
            proj = ConvProjector(self.channels[s], self.num_stages - 1 - s, self.embed_dim, self.backend)
            for j, block in enumerate(proj.blocks):
                group, _ = self.group_of(s, j)
                for name in ("bn1", "bn2"):
                    src, dst = getattr(group, name), getattr(block, name)
                    dst.momentum, dst.eps = src.momentum, src.eps
        proj = proj.to(device=ref.device, dtype=ref.dtype)
        own = {k[len(f"{s}."):]: v for k, v in self.state_dict().items() if k.startswith(f"{s}.")}
        proj.load_state_dict(own)
        proj.train(self.training)
        if s < self.num_stages - 1:  # modes of the BatchNorms as the group's (a frozen BN stays frozen)
            for j, block in enumerate(proj.blocks):
                group, _ = self.group_of(s, j)
                block.bn1.train(group.bn1.training)
                block.bn2.train(group.bn2.training)
        return proj

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.run(feats, op_table(self.backend, feats[0].device))

    def run(self, feats: Sequence[torch.Tensor], ops: OpTable) -> torch.Tensor:
        """The S stage maps (validated) -> h (S, B, D), stage s's projector output in row s."""
        per_member = ops.backend == "reference"
        cast = autocast_dtype(feats[0].device.type)
        state: Dict[int, Piece] = {}  # stage -> its current map
        pooled: Dict[int, Tuple[torch.Tensor, int, int]] = {}  # stage -> (h (G, B, D) of its last group, index, G)
        for group in self.groups:
            fused = ops.fused_projector and group.fusable()
            pieces = [state[s] if j > 0 else Piece(autocast_cast(cast, feats[s]), 0, feats[s].shape[1])
                      for s, j in group.members]
            grouped = len(pieces) == 1 or (not per_member and _groupable(pieces, fused))
            if not grouped and any(_needs_sync(bn) for bn in (group.bn1, group.bn2)):
                if per_member and _groupable(pieces, False):
                    grouped, fused = True, False  # SyncBatchNorm statistics need the group whole
                else:
                    raise RuntimeError(
                        f"SyncBatchNorm projector blocks {group.members} (stage, block) run as one grouped block, "
                        f"but their maps differ: {[tuple(p.t.shape[2:]) for p in pieces]} (sizes), "
                        f"{[p.t.dtype for p in pieces]} (dtypes); use BatchNorm2d (no --sync-bn) for this student")
            if grouped:
                x, scale, shift = _concat(pieces)
                if fused:
                    outs = [group.run_fused(x, scale, shift, ops)]
                else:
                    outs = [Piece(group.run_modules(x), 0, group.num_members * group.c_out)]
            else:
                outs = group.run_members(pieces, ops, fused)
            if not group.last:
                if len(outs) == 1:
                    out = outs[0]
                    outs = [out._replace(lo=i * group.c_out, hi=(i + 1) * group.c_out)
                            for i in range(group.num_members)]
                state.update((s, out) for (s, _), out in zip(group.members, outs))
                continue
            h = self._pool(group, [o.t for o in outs], ops)  # (G, B, D)
            pooled.update((s, (h, i, group.num_members)) for i, (s, _) in enumerate(group.members))
        last = self.num_stages - 1
        linear = self.linear.run(feats[last], ops).unsqueeze(0)
        # Stage order: consecutive stages of one group are one slice of its (G, B, D) output.
        parts, s = [], 0
        while s < last:
            h, i, _ = pooled[s]
            n = 1
            while s + n < last and pooled[s + n][0] is h and pooled[s + n][1] == i + n:
                n += 1
            parts.append(h if n == h.shape[0] else h[i:i + n])
            s += n
        return torch.cat(parts + [linear]) if parts else linear

    def _pool(self, group: GroupedSepConv, ys: List[torch.Tensor], ops: OpTable) -> torch.Tensor:
        """bn2 + ReLU + GAP of a group's last pw conv outputs: one (B, G*D) map, or one (B, D) map per member ->
        (G, B, D)."""
        bn = group.bn2
        if isinstance(bn, nn.SyncBatchNorm) and len(ys) == 1:
            # After convert_sync_batchnorm the statistics are global across ranks: the module computes them.
            h = F.relu(bn(ys[0])).mean(dim=(2, 3))
        else:
            # The BatchNorm's own mode decides batch vs running statistics, as it would in bn(x); one count per
            # grouped BatchNorm.
            momentum = count_batch_momentum(bn)
            if len(ys) == 1:
                h = ops.bn_relu_pool(ys[0], bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.training,
                                     momentum, bn.eps)
            else:
                d = group.c_out
                if isinstance(bn, nn.SyncBatchNorm):  # not synchronising here (_needs_sync refused that above)
                    hs = [F.relu(_member_batch_norm(bn, y, slice(i * d, (i + 1) * d), momentum)).mean(dim=(2, 3))
                          for i, y in enumerate(ys)]
                else:
                    hs = [ops.bn_relu_pool(y, *(None if t is None else t[i * d:(i + 1) * d] for t in (
                        bn.weight, bn.bias, bn.running_mean, bn.running_var)), bn.training, momentum, bn.eps)
                        for i, y in enumerate(ys)]
                return torch.stack(hs)
        batch = h.shape[0]
        return h.view(batch, group.num_members, group.c_out).transpose(0, 1)


def _groupable(pieces: Sequence[Piece], fused: bool) -> bool:
    """Whether the members' maps can be concatenated along channels: same batch, map size, dtype and device; on the
    fused path, the pieces with a pending BatchNorm (continuing members) must precede the raw maps."""
    first = pieces[0].t
    if any(p.t.shape[0] != first.shape[0] or p.t.shape[2:] != first.shape[2:] or p.t.dtype != first.dtype
           or p.t.device != first.device for p in pieces[1:]):
        return False
    if fused:
        flags = [p.scale is not None for p in pieces]
        return flags == sorted(flags, reverse=True)
    return True


def _concat(pieces: Sequence[Piece]):
    """The group's input: the members' channels concatenated (adjacent slices of one tensor merged: no copy when the
    pieces are one whole tensor), and the (scale, shift) of the leading channels with a pending BatchNorm."""
    merged: List[Piece] = []
    for p in pieces:
        q = merged[-1] if merged else None
        if q is not None and q.t is p.t and q.hi == p.lo:
            merged[-1] = q._replace(hi=p.hi)
        else:
            merged.append(p)
    views = [p.view() for p in merged]
    x = views[0] if len(views) == 1 else torch.cat(views, dim=1)
    affine = [p.affine() for p in merged if p.scale is not None]
    if not affine:
        return x, None, None
    if len(affine) == 1:
        return (x,) + affine[0]
    return x, torch.cat([a[0] for a in affine]), torch.cat([a[1] for a in affine])


def _stage_projectors_state_dict(module: StageProjectors, state_dict, prefix: str, local_metadata) -> None:
    """state_dict hook: the grouped blocks' parameters and buffers as the per-stage keys
    ``<s>.blocks.<j>.<name>`` (member slices; num_batches_tracked under every member), in the per-stage order."""
    grouped = []
    for gi, group in enumerate(module.groups):
        head = f"{prefix}groups.{gi}."
        grouped.append({k[len(head):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(head)]})
    deepest = f"{prefix}{module.num_stages - 1}."
    linear = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(deepest)]}
    for s in range(module.num_stages - 1):
        for j in range(module.num_stages - 1 - s):
            gi, i = module._where[(s, j)]
            g = module.groups[gi].num_members
            for name, value in grouped[gi].items():
                rows = value.shape[0] // g if value.dim() else 0
                state_dict[f"{prefix}{s}.blocks.{j}.{name}"] = value[i * rows:(i + 1) * rows] if value.dim() else value
    state_dict.update(linear)


def _stage_projectors_load_pre_hook(module: StageProjectors, state_dict, prefix: str, local_metadata, strict,
                                    missing_keys, unexpected_keys, error_msgs) -> None:
    """load_state_dict hook: per-stage keys (this module's state_dict, and checkpoints of earlier versions) are
    concatenated into the grouped parameters and buffers. A member key that is absent is reported missing under its
    per-stage name (its slice keeps its value); a member tensor of the wrong shape is a size-mismatch error under its
    name; num_batches_tracked takes the largest of the members' values."""
    for gi, group in enumerate(module.groups):
        g = group.num_members
        for name, current in group.state_dict(keep_vars=True).items():
            key = f"{prefix}groups.{gi}.{name}"
            if key in state_dict:
                continue
            rows = current.shape[0] // g if current.dim() else 0
            values = []
            for i, (s, j) in enumerate(group.members):
                member_key = f"{prefix}{s}.blocks.{j}.{name}"
                mine = current[i * rows:(i + 1) * rows] if current.dim() else current
                value = state_dict.pop(member_key, None)
                if value is None:
                    missing_keys.append(member_key)
                    value = mine
                elif not torch.is_tensor(value) or value.shape != mine.shape:
                    shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    error_msgs.append(f"size mismatch for {member_key}: copying a param with shape {shape} from "
                                      f"checkpoint, the shape in current model is {tuple(mine.shape)}.")
                    value = mine
                values.append(value.detach().to(current.device))
            if current.dim():
                state_dict[key] = torch.cat([v.to(current.dtype) for v in values])
            else:  # num_batches_tracked: one counter for the group
                state_dict[key] = torch.stack([v.to(current.dtype) for v in values]).max()
