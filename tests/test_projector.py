"""The fused projector ops (projector_dwconv, projector_pwconv; hcd_fast/ops/projector.py) against
hcd_fast.reference and against the nn modules of a SepConv block: every output, every gradient (input, dw weight,
pw weight, BN weight/bias), running statistics and num_batches_tracked after several steps, train and eval,
momentum None, odd channel counts and map sizes, stride 1 and 2, NCHW / channels_last / strided maps, every dtype
and autocast.

Only the triton backend has fused projector kernels (interpreted on the CPU, compiled on a GPU); the cpu and cuda
backends run the blocks as nn modules (tests/test_hcd_loss.py covers that path), so their projector ops are the
reference and are not compared with themselves here. Truth is the reference in float64 on the same values.
"""
import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hcd_fast
from hcd_fast import reference as R
from hcd_fast.modules import SepConv
from hcd_fast.ops.dispatch import op_table
from helpers import (ALL_DTYPES, assert_close, interpreter_rounding, layout, over_backends, single_rounding_rtol,
                     within_twice)

pytestmark = pytest.mark.usefixtures("poison_uninitialized")
TRITON = ["triton"]


def _ops(backend):
    return op_table(backend.name, torch.device(backend.device))


def _rand(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------- dwconv
def dw_run(fn, device, t, stride, prologue, kind, dtype):
    """fn(x, weight, scale, shift, stride) and its gradients, inputs cast to dtype (scale/shift to the accumulation
    dtype, as projector_pwconv gives them); the map in layout ``kind``."""
    cast = lambda v, dt: v.to(device=device, dtype=dt).clone()  # noqa: E731  (never t's own tensors)
    x = layout(cast(t["x"], dtype), kind).requires_grad_()
    w = cast(t["w"], dtype).requires_grad_()
    sc = cast(t["scale"], _acc(dtype)).requires_grad_() if prologue else None
    sh = cast(t["shift"], _acc(dtype)).requires_grad_() if prologue else None
    out = fn(x, w, sc, sh, stride)
    out.backward(t["gout"](out.shape).to(device=device, dtype=out.dtype))
    grads = [x.grad, w.grad] + ([sc.grad, sh.grad] if prologue else [])
    return [out.detach()] + grads, x


def dw_inputs(B, C, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    t = {"x": _rand(g, B, C, H, W, scale=1.5, shift=0.3), "w": _rand(g, C, 1, 3, 3, scale=0.5),
         "scale": _rand(g, C, scale=0.8), "shift": _rand(g, C, scale=0.5)}
    gout_seed = seed + 1
    t["gout"] = lambda shape: torch.randn(*shape, generator=torch.Generator().manual_seed(gout_seed),
                                          dtype=torch.float64)
    return t


DW_NAMES = ("out", "d x", "d weight", "d scale", "d shift")
# B, C, H, W, stride, prologue, layout: odd channel counts (3, 5, 37: several channel tiles), odd maps (7, 13),
# stride 1 and 2, a projector's first block (no prologue) and later ones.
DW_CASES = [(2, 3, 7, 7, 2, False, "nchw"), (2, 5, 7, 7, 1, True, "nhwc"), (1, 37, 13, 13, 2, True, "nhwc"),
            (3, 5, 13, 7, 2, True, "strided"), (2, 3, 13, 13, 1, False, "sliced"), (1, 70, 7, 5, 1, True, "nhwc"),
            (4, 6, 2, 2, 2, True, "nhwc"), (4, 6, 1, 1, 1, True, "nchw")]  # the last blocks of a small map: 2 -> 1


@pytest.mark.parametrize("backend,B,C,H,W,stride,prologue,kind", over_backends(DW_CASES, names=TRITON))
def test_projector_dwconv_matches_reference_fp32(backend, B, C, H, W, stride, prologue, kind):
    t = dw_inputs(B, C, H, W, seed=B * C + H)
    got, x = dw_run(_ops(backend).projector_dwconv, backend.device, t, stride, prologue, kind, torch.float32)
    want, _ = dw_run(R.projector_dwconv, backend.device, t, stride, prologue, "nchw", torch.float64)
    ho, wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    assert got[0].shape == (B, C, ho, wo) and got[0].dtype == torch.float32
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].stride() == hcd_fast.ops.library.dense_like(x).stride()  # d x dense in the map's layout
    for name, g, w in zip(DW_NAMES, got, want):
        assert_close(name, g, w, 1e-5, atol=1e-7)


DW_DTYPE_CASES = [(2, 5, 7, 7, 2, True, kind, dtype) for kind, dtype in itertools.product(["nchw", "nhwc"], ALL_DTYPES)]


@pytest.mark.parametrize("backend,B,C,H,W,stride,prologue,kind,dtype", over_backends(DW_DTYPE_CASES, names=TRITON))
def test_projector_dwconv_dtypes(backend, B, C, H, W, stride, prologue, kind, dtype):
    """Outputs in the map's dtype (d scale/d shift in the accumulation dtype), within twice the reference's own
    low-precision error of the float64 truth."""
    t = dw_inputs(B, C, H, W, seed=7)
    t = {k: (v.to(dtype).double() if torch.is_tensor(v) else v) for k, v in t.items()}  # exact in dtype
    got, _ = dw_run(_ops(backend).projector_dwconv, backend.device, t, stride, prologue, kind, dtype)
    want, _ = dw_run(R.projector_dwconv, backend.device, t, stride, prologue, "nchw", torch.float64)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    assert got[3].dtype == _acc(dtype)
    if dtype in (torch.float32, torch.float64):
        for name, g, w in zip(DW_NAMES, got, want):
            assert_close(name, g, w, single_rounding_rtol(dtype), atol=1e-12)
        return
    ref, _ = dw_run(R.projector_dwconv, backend.device, t, stride, prologue, kind, dtype)
    floor = 1e-3 + interpreter_rounding(backend, dtype)
    for name, g, r, w in zip(DW_NAMES, got, ref, want):
        within_twice(name, g, r, w, floor)


# --------------------------------------------------------------------------------------------- pwconv
def pw_inputs(B, Ci, Co, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": _rand(g, B, Ci, H, W, scale=1.2, shift=0.4), "w": _rand(g, Co, Ci, 1, 1, scale=0.6),
            "bw": _rand(g, Co, scale=0.3, shift=1.0), "bb": _rand(g, Co, scale=0.5), "rm": _rand(g, Co),
            "rv": _rand(g, Co).abs() + 0.5, "seed": seed}


def pw_run(fn, device, t, steps, training, momentum, kind, dtype):
    """``steps`` calls of fn (the running statistics accumulate), then the gradients of
    sum(y gy) + sum(scale gs) + sum(shift gh) of the last call: [y, scale, shift, d a, d w, d bn_weight,
    d bn_bias, running_mean, running_var, num_batches_tracked]."""
    acc = _acc(dtype)
    cast = lambda v, dt: v.to(device=device, dtype=dt).clone()  # noqa: E731  (never t's own tensors)
    a = layout(cast(t["a"], dtype), kind).requires_grad_()
    w = cast(t["w"], dtype).requires_grad_()
    bw = cast(t["bw"], acc).requires_grad_()
    bb = cast(t["bb"], acc).requires_grad_()
    rm, rv = cast(t["rm"], acc), cast(t["rv"], acc)
    nbt = torch.tensor(3, device=device)
    for _ in range(steps):
        y, scale, shift = fn(a, w, bw, bb, rm, rv, nbt, training, momentum, 1e-5)
    g = torch.Generator().manual_seed(t["seed"] + 1)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=device, dtype=y.dtype)
    gs = torch.randn(scale.shape, generator=g, dtype=torch.float64).to(device=device, dtype=scale.dtype)
    gh = torch.randn(shift.shape, generator=g, dtype=torch.float64).to(device=device, dtype=shift.dtype)
    ((y * gy).sum() + (scale * gs).sum() + (shift * gh).sum()).backward()
    return [y.detach(), scale.detach(), shift.detach(), a.grad, w.grad, bw.grad, bb.grad, rm, rv, nbt.double()], y


PW_NAMES = ("y", "scale", "shift", "d a", "d weight", "d bn_weight", "d bn_bias", "running_mean", "running_var",
            "num_batches_tracked")
# B, C_in, C_out, H, W, steps, training, momentum, layout: odd channels, C_out > one GEMM tile (130), M not a
# multiple of the row tile, momentum None (cumulative average from num_batches_tracked), eval.
PW_CASES = [(2, 3, 5, 7, 7, 2, True, 0.1, "nhwc"), (3, 5, 37, 7, 5, 3, True, None, "nchw"),
            (2, 37, 3, 13, 13, 1, True, 0.3, "strided"), (2, 5, 37, 7, 7, 1, False, 0.1, "nhwc"),
            (1, 20, 130, 5, 7, 2, True, None, "nhwc"), (2, 5, 3, 4, 4, 2, False, None, "sliced"),
            (5, 6, 7, 1, 1, 2, True, 0.1, "nchw"), (5, 6, 7, 1, 1, 1, True, 0.1, "nhwc")]  # 1x1 maps, any strides


@pytest.mark.parametrize("backend,B,Ci,Co,H,W,steps,training,momentum,kind", over_backends(PW_CASES, names=TRITON))
def test_projector_pwconv_matches_reference_fp32(backend, B, Ci, Co, H, W, steps, training, momentum, kind):
    t = pw_inputs(B, Ci, Co, H, W, seed=B * Ci + Co)
    got, y = pw_run(_ops(backend).projector_pwconv, backend.device, t, steps, training, momentum, kind,
                    torch.float32)
    want, _ = pw_run(R.projector_pwconv, backend.device, t, steps, training, momentum, "nchw", torch.float64)
    assert y.shape == (B, Co, H, W) and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    for name, g, w in zip(PW_NAMES, got, want):
        assert_close(name, g, w, 2e-5, atol=1e-7)
    assert got[-1].item() == 3 + (steps if training else 0)


PW_DTYPE_CASES = [(3, 5, 37, 7, 7, training, dtype) for training, dtype in itertools.product([True, False], ALL_DTYPES)]


@pytest.mark.parametrize("backend,B,Ci,Co,H,W,training,dtype", over_backends(PW_DTYPE_CASES, names=TRITON))
def test_projector_pwconv_dtypes(backend, B, Ci, Co, H, W, training, dtype):
    t = pw_inputs(B, Ci, Co, H, W, seed=11)
    t = {k: (v.to(dtype).double() if torch.is_tensor(v) and k in ("a", "w") else v) for k, v in t.items()}
    got, y = pw_run(_ops(backend).projector_pwconv, backend.device, t, 2, training, 0.1, "nhwc", dtype)
    want, _ = pw_run(R.projector_pwconv, backend.device, t, 2, training, 0.1, "nchw", torch.float64)
    assert y.dtype == dtype and got[3].dtype == dtype and got[4].dtype == dtype
    assert got[1].dtype == _acc(dtype) and got[5].dtype == _acc(dtype)
    if dtype in (torch.float32, torch.float64):
        for name, g, w in zip(PW_NAMES, got, want):
            assert_close(name, g, w, 2e-5 if dtype == torch.float32 else 1e-10, atol=1e-12)
        return
    ref, _ = pw_run(R.projector_pwconv, backend.device, t, 2, training, 0.1, "nhwc", dtype)
    floor = 1e-3 + interpreter_rounding(backend, dtype)
    for name, g, r, w in zip(PW_NAMES, got, ref, want):
        within_twice(name, g, r, w, floor)


@pytest.mark.parametrize("backend", over_backends([()], names=TRITON))
def test_projector_backward_with_few_programs(backend, monkeypatch):
    """With few programs each dwconv-backward program loops over several position tiles and each pointwise
    weight-gradient split over several row tiles (the H100 program counts give one tile each at test shapes)."""
    from hcd_fast.kernels import projector as kp

    monkeypatch.setattr(kp, "_DW_BWD_PROGRAMS", 2)
    monkeypatch.setattr(kp, "_WGRAD_PROGRAMS", 2)
    t = dw_inputs(2, 5, 13, 11, seed=21)
    got, _ = dw_run(_ops(backend).projector_dwconv, backend.device, t, 1, True, "nhwc", torch.float32)
    want, _ = dw_run(R.projector_dwconv, backend.device, t, 1, True, "nchw", torch.float64)
    for name, g, w in zip(DW_NAMES, got, want):
        assert_close(name, g, w, 1e-5, atol=1e-7)
    t = pw_inputs(3, 5, 6, 13, 11, seed=22)
    got, _ = pw_run(_ops(backend).projector_pwconv, backend.device, t, 1, True, 0.1, "nhwc", torch.float32)
    want, _ = pw_run(R.projector_pwconv, backend.device, t, 1, True, 0.1, "nchw", torch.float64)
    for name, g, w in zip(PW_NAMES, got, want):
        assert_close(name, g, w, 2e-5, atol=1e-7)


# ------------------------------------------------------------------------------ a block against nn modules
def block_step(block, x, gout, ops):
    """One SepConv block through the fused ops (ops given) or its nn modules (ops None): relu(bn2(...)) and the
    gradients of sum(out * gout) w.r.t. the map and every parameter."""
    x = x.clone().requires_grad_()
    if ops is None:
        out = block(x)
    else:
        a = ops.projector_dwconv(x, block.dw1.weight, None, None, 2)
        bn1, bn2 = block.bn1, block.bn2
        y, s, h = ops.projector_pwconv(a, block.pw1.weight, bn1.weight, bn1.bias, bn1.running_mean,
                                       bn1.running_var, bn1.num_batches_tracked, bn1.training, bn1.momentum, bn1.eps)
        a = ops.projector_dwconv(y, block.dw2.weight, s, h, 1)
        y, s, h = ops.projector_pwconv(a, block.pw2.weight, bn2.weight, bn2.bias, bn2.running_mean,
                                       bn2.running_var, bn2.num_batches_tracked, bn2.training, bn2.momentum, bn2.eps)
        out = F.relu(y * s[:, None, None] + h[:, None, None]).to(y.dtype)
    block.zero_grad()
    out.backward(gout.to(out.dtype))
    return [out.detach(), x.grad] + [p.grad for p in block.parameters()] + [b.clone() for b in block.buffers()]


BLOCK_CASES = [(2, 3, 5, 7, 0.1, "nhwc"), (2, 5, 3, 13, None, "nchw"), (1, 37, 40, 9, 0.2, "strided")]


@pytest.mark.parametrize("backend,B,Ci,Co,H,momentum,kind", over_backends(BLOCK_CASES, names=TRITON))
def test_projector_block_matches_sepconv_modules(backend, B, Ci, Co, H, momentum, kind):
    """Two training steps, then eval: the fused block in fp32 against SepConv's nn.Conv2d/nn.BatchNorm2d in
    float64: output, every gradient, running statistics and num_batches_tracked."""
    torch.manual_seed(B + Ci)
    truth = SepConv(Ci, Co).double().to(backend.device)
    for bn in (truth.bn1, truth.bn2):
        bn.momentum = momentum
        nn.init.normal_(bn.weight, 1.0, 0.3)
        nn.init.normal_(bn.bias, 0.0, 0.3)
    fast = copy.deepcopy(truth).float()
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        training = step < 2
        truth.train(training)
        fast.train(training)
        x = torch.randn(B, Ci, H, H, generator=g, dtype=torch.float64) * 1.5 + 0.2
        ho = (H - 1) // 2 + 1
        gout = torch.randn(B, Co, ho, ho, generator=g, dtype=torch.float64)
        want = block_step(truth, x.to(backend.device), gout.to(backend.device), None)
        got = block_step(fast, layout(x.float().to(backend.device), kind), gout.to(backend.device), _ops(backend))
        names = ["out", "d x"] + [f"d {n}" for n, _ in truth.named_parameters()] + [n for n, _ in truth.named_buffers()]
        for name, gt, wt in zip(names, got, want):
            assert_close(f"step {step} {name}", gt, wt, 5e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", over_backends([()], names=TRITON))
def test_projector_block_at_map_56(backend):
    """The first block of stage 0 at its real map size (56, stride 2), small B and C."""
    torch.manual_seed(0)
    truth = SepConv(3, 6).double().to(backend.device)
    fast = copy.deepcopy(truth).float()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 3, 56, 56, generator=g, dtype=torch.float64)
    gout = torch.randn(1, 6, 28, 28, generator=g, dtype=torch.float64)
    want = block_step(truth, x.to(backend.device), gout.to(backend.device), None)
    got = block_step(fast, layout(x.float().to(backend.device), "nhwc"), gout.to(backend.device), _ops(backend))
    for i, (gt, wt) in enumerate(zip(got, want)):
        assert_close(f"value {i}", gt, wt, 5e-5, atol=1e-6)


@pytest.mark.parametrize("backend", over_backends([()], names=TRITON))
def test_projector_ops_under_autocast(backend):
    """Under autocast the map and the conv weights go to the autocast dtype (as F.conv2d): outputs in bf16,
    parameter gradients in the parameters' fp32, close to the reference under the same autocast."""
    dev = backend.device
    t = pw_inputs(2, 5, 6, 7, 7, seed=3)
    outs = []
    for fn_dw, fn_pw in ((_ops(backend).projector_dwconv, _ops(backend).projector_pwconv),
                         (R.projector_dwconv, R.projector_pwconv)):
        x = t["a"].float().to(dev).requires_grad_()
        wd = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(1)).to(dev).requires_grad_()
        wp = t["w"][:, :5].float().to(dev).requires_grad_()
        bw, bb = t["bw"].float().to(dev).requires_grad_(), t["bb"].float().to(dev).requires_grad_()
        rm, rv = torch.zeros(6, device=dev), torch.ones(6, device=dev)
        nbt = torch.zeros((), dtype=torch.long, device=dev)
        with torch.autocast(dev, dtype=torch.bfloat16):
            a = fn_dw(x, wd, None, None, 2)
            y, s, h = fn_pw(a, wp, bw, bb, rm, rv, nbt, True, 0.1, 1e-5)
        assert a.dtype == torch.bfloat16 and y.dtype == torch.bfloat16 and s.dtype == torch.float32
        (y.float().square().mean() + s.sum() + h.sum()).backward()
        assert x.grad.dtype == torch.float32 and wd.grad.dtype == torch.float32 and wp.grad.dtype == torch.float32
        outs.append([y.detach(), s.detach(), x.grad, wd.grad, wp.grad, bw.grad, bb.grad, rm, rv])
    for i, (g, r) in enumerate(zip(*outs)):
        assert_close(f"value {i}", g, r, 3e-2, atol=1e-4)


@pytest.mark.parametrize("backend", over_backends([()], names=TRITON))
def test_projector_pwconv_refuses_one_value_per_channel_in_training(backend):
    """As nn.BatchNorm2d: training on B*H*W = 1 raises (no unbiased variance); eval is fine."""
    dev = backend.device
    a, w = torch.randn(1, 3, 1, 1, device=dev), torch.randn(4, 3, device=dev)
    bn = [torch.ones(4, device=dev), torch.zeros(4, device=dev), torch.zeros(4, device=dev),
          torch.ones(4, device=dev), torch.tensor(0, device=dev)]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _ops(backend).projector_pwconv(a, w, *bn, True, 0.1, 1e-5)
    y, _, _ = _ops(backend).projector_pwconv(a, w, *bn, False, 0.1, 1e-5)
    assert_close("eval y", y, (w @ a.flatten(1).t()).t().reshape(1, 4, 1, 1), 1e-5)
    assert bn[-1].item() == 0


def test_backends_report_the_projector_path():
    """python -m hcd_fast says which backends run the SepConv blocks as modules."""
    for name in ("cpu", "cuda"):
        status = hcd_fast.backends()[name]
        if status.available:
            assert "projector blocks: nn.Conv2d/BatchNorm2d modules" in status.reason
    table = op_table("reference", torch.device("cpu"))
    assert not table.fused_projector


def _gradcheck_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return r(2, 2, 3, 3), r(2, 1, 3, 3), r(2), r(2), r(3, 2), r(3), r(3)


def _pw_fn(fn, training, momentum):
    """fn's (y, scale, shift) as a pure function of (a, w, bn_weight, bn_bias): fresh running statistics per call."""
    def f(a, w, bw, bb):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        return fn(a, w, bw, bb, rm, rv, torch.tensor(1), training, momentum, 1e-5)
    return f


@pytest.mark.slow
@pytest.mark.parametrize("training,momentum", [(True, 0.1), (True, None), (False, 0.1)])
def test_reference_projector_gradcheck(training, momentum):
    """float64 gradcheck of the reference projector ops (the spec), BatchNorm statistics included."""
    x, wd, sc, sh, wp, bw, bb = _gradcheck_inputs(0)
    assert torch.autograd.gradcheck(lambda *a: R.projector_dwconv(*a, 2), (x, wd, sc, sh))
    assert torch.autograd.gradcheck(lambda *a: R.projector_dwconv(*a, 1), (x, wd, sc, sh))
    a = x.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(_pw_fn(R.projector_pwconv, training, momentum), (a, wp, bw, bb))


@pytest.mark.slow
@pytest.mark.parametrize("backend", over_backends([()], names=TRITON))
def test_triton_projector_gradcheck_float64(backend):
    """float64 gradcheck through the Triton kernels (interpreted: exact fp64 arithmetic, fp64 tl.dot)."""
    if backend.device != "cpu":
        pytest.skip("float64 gradcheck runs through the interpreter")
    ops = _ops(backend)
    x, wd, sc, sh, wp, bw, bb = _gradcheck_inputs(1)
    assert torch.autograd.gradcheck(lambda *a: ops.projector_dwconv(*a, 2), (x, wd, sc, sh))
    assert torch.autograd.gradcheck(lambda *a: ops.projector_dwconv(*a, None, None, 1), (x, wd))
    a = x.detach().clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(_pw_fn(ops.projector_pwconv, True, None), (a, wp, bw, bb))
