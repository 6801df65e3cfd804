"""benchmarks/head_model.py against a brute-force count at a tiny shape: the map tensors (numel >= the smallest map)
that every dispatched ATen op touches (today's op split: a SepConv block through its nn modules) or every launched
Triton kernel touches (the fused design: the projector ops on the triton backend, in the interpreter), summed.
The model is written from the design; this counts what the code does."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import head_model as HM
from hcd_fast.modules import SepConv
from hcd_fast.ops.dispatch import op_table
from helpers import backend_marks, select

B, C_IN, C_OUT, H = 2, 3, 5, 8  # X = 384, N1 = 96, N2 = 160 map elements; parameters and partials < 96


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


class MapCounter(TorchDispatchMode):
    """Sum over dispatched ATen ops of the numel of each distinct map tensor among its inputs and outputs; ops
    whose output aliases an input (views, detach) move nothing and are skipped; custom ops are left to the
    kernel-launch count."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold, self.elems, self.ops = threshold, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace != "aten":
            return out
        ins = {t.untyped_storage().data_ptr(): t for t in _tensors(list(args) + list((kwargs or {}).values()))}
        outs = list(_tensors(out))
        if any(t.untyped_storage().data_ptr() in ins for t in outs):
            return out
        touched = list(ins.values()) + outs
        n = sum(t.numel() for t in touched if t.numel() >= self.threshold)
        if n:
            self.elems += n
            self.ops.append((str(func), n))
        return out


def _block(last):
    return HM.Block(0, 0, C_IN, C_OUT, H, H, first=True, last=last)


@pytest.mark.parametrize("last", [False, True])
def test_unfused_model_matches_dispatched_aten_ops(last):
    """Today's split: a SepConv block in training (forward, then backward from its output) through nn modules."""
    torch.manual_seed(0)
    block = SepConv(C_IN, C_OUT).train()
    x = torch.randn(B, C_IN, H, H, requires_grad=True)
    threshold = min(_block(last).sizes(B)[1:])
    gout = torch.randn(B, C_OUT, H // 2, H // 2)
    with MapCounter(threshold) as counter:
        out = block.forward_pre_bn(x) if last else block(x)
        out.backward(gout)
    assert counter.elems == HM.block_map_elems(_block(last), B, fused=False), counter.ops


@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("backend", [pytest.param(b, id=b.id, marks=backend_marks(b))
                                     for b in select(["triton"]) if b.device == "cpu"])
def test_fused_model_matches_kernel_launches(backend, last, monkeypatch):
    """The fused design: every Triton launch's map arguments, plus the ATen ops of the last block's plain 1x1 conv
    (the projector's last BN is bn_relu_pool's, outside the block)."""
    from triton.runtime.interpreter import InterpretedFunction

    ops = op_table("triton", torch.device("cpu"))
    threshold = min(_block(last).sizes(B)[1:])
    launched = {"elems": 0, "kernels": []}
    original = InterpretedFunction.__getitem__

    def getitem(self, grid):
        run = original(self, grid)

        def record(*args, **kwargs):
            ts = {t.data_ptr(): t for t in _tensors(list(args))}
            n = sum(t.numel() for t in ts.values() if t.numel() >= threshold)
            launched["elems"] += n
            launched["kernels"].append((self.fn.__name__, n))
            return run(*args, **kwargs)
        return record

    monkeypatch.setattr(InterpretedFunction, "__getitem__", getitem)
    torch.manual_seed(0)
    block = copy.deepcopy(SepConv(C_IN, C_OUT)).train()
    x = torch.randn(B, C_IN, H, H).contiguous(memory_format=torch.channels_last).requires_grad_()
    gy = torch.randn(B, C_OUT, H // 2, H // 2).contiguous(memory_format=torch.channels_last)
    gs, gh = torch.randn(C_OUT), torch.randn(C_OUT)
    with MapCounter(threshold) as counter:
        a = ops.projector_dwconv(x, block.dw1.weight, None, None, 2)
        bn1, bn2 = block.bn1, block.bn2
        y, s, h = ops.projector_pwconv(a, block.pw1.weight, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var,
                                       bn1.num_batches_tracked, True, bn1.momentum, bn1.eps)
        a = ops.projector_dwconv(y, block.dw2.weight, s, h, 1)
        if last:
            y2 = torch.nn.functional.conv2d(a, block.pw2.weight)
            torch.autograd.backward([y2], [gy])
        else:
            y2, s2, h2 = ops.projector_pwconv(a, block.pw2.weight, bn2.weight, bn2.bias, bn2.running_mean,
                                              bn2.running_var, bn2.num_batches_tracked, True, bn2.momentum, bn2.eps)
            torch.autograd.backward([y2, s2, h2], [gy, gs, gh])
    assert x.grad is not None
    total = launched["elems"] + counter.elems
    assert total == HM.block_map_elems(_block(last), B, fused=True), (launched["kernels"], counter.ops)


def test_head_blocks_follow_hcd_loss():
    """The model's blocks are HCDLoss's projectors: same channels per block, same count."""
    from hcd_fast import HCDLoss

    crit = HCDLoss(HM.RESNET18_CHANNELS, HM.TEACHER_DIM, 10)
    want = [(blk.dw1.in_channels, blk.pw2.out_channels) for s in range(len(crit.projectors) - 1)
            for blk in crit.projectors.stage(s).blocks]
    assert [(b.c_in, b.c_out) for b in HM.head_blocks()] == want
    assert [b.height for b in HM.head_blocks()] == [56, 28, 14, 28, 14, 14]


def test_fused_design_moves_fewer_bytes():
    t = HM.head_table(256)
    for row in t["blocks"]:
        assert row["fused_bytes"] < row["unfused_bytes"]
    assert t["head_fused_bytes"] < t["head_unfused_bytes"]
