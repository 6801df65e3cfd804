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


def test_backends_report_the_projector_path(capsys):
    """python -m hcd_fast says which backends run the SepConv blocks as modules and which fuse them (cuda with the
    triton backend's kernels where triton is available)."""
    from hcd_fast.__main__ import main
    from hcd_fast.ops.dispatch import fused_projector_backends

    status = hcd_fast.backends()
    if status["cpu"].available:
        assert "projector blocks: grouped nn.Conv2d/BatchNorm2d modules" in status["cpu"].reason
    if status["cuda"].available:
        want = "the triton backend's fused kernels" if status["triton"].available else "grouped nn.Conv2d"
        assert want in status["cuda"].reason
    fused = fused_projector_backends()
    assert ("triton" in fused) == status["triton"].available and "cpu" not in fused and "reference" not in fused
    table = op_table("reference", torch.device("cpu"))
    assert not table.fused_projector
    main()
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fused projector blocks:")]
    assert len(line) == 1 and (("triton" in line[0]) == status["triton"].available)


@pytest.mark.parametrize("backend", over_backends([()], names=["cpu"]))
def test_projector_ops_borrowed_from_a_donor_backend(backend, monkeypatch):
    """The mechanism that gives the cuda backend the Triton projector ops (dispatch.PROJECTOR_FROM), exercised on
    the CPU: the cpu backend with triton as its donor runs its grouped blocks through the fused ops (interpreted)
    and matches the per-member reference."""
    from hcd_fast.modules import StageProjectors
    from hcd_fast.ops import dispatch

    if not hcd_fast.backends()["triton"].available:
        pytest.skip("triton backend not available here")
    monkeypatch.setattr(dispatch, "PROJECTOR_FROM", {"cpu": "triton"})
    monkeypatch.setattr(dispatch, "_TABLES", {})
    table = op_table("cpu", torch.device("cpu"))
    triton_table = op_table("triton", torch.device("cpu"))
    assert table.fused_projector and table.projector_pwconv is triton_table.projector_pwconv
    assert table.bn_relu_pool is not triton_table.bn_relu_pool and table.backend == "cpu"
    assert dispatch.fused_projector_backends()["cpu"] == "triton"
    torch.manual_seed(3)
    truth = StageProjectors((3, 6, 12), 12, "reference").double()
    fast = copy.deepcopy(truth).float()
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, c, m, m, generator=g, dtype=torch.float64) for c, m in zip((3, 6, 12), (7, 4, 2))]
    gout = torch.randn(3, 2, 12, generator=g, dtype=torch.float64)
    want = proj_step(truth, feats, gout, op_table("reference", torch.device("cpu")))
    got = proj_step(fast, [f.float() for f in feats], gout, table)
    for name, gt, wt in zip(proj_names(truth, 3), got, want):
        assert_close(name, gt, wt, 1e-4, atol=2e-6)


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


# ------------------------------------------------------------------- grouped pointwise conv, partial prologue
GROUPED_PW_CASES = [(2, 3, 3, 5, 7, 2, True, 0.1, "nhwc"), (3, 2, 5, 37, 5, 3, True, None, "nchw"),
                    (2, 3, 37, 3, 4, 1, False, 0.1, "nhwc"), (1, 4, 6, 130, 3, 2, True, 0.2, "strided")]


@pytest.mark.parametrize("backend,B,G,Ci,Co,H,steps,training,momentum,kind",
                         over_backends(GROUPED_PW_CASES, names=TRITON))
def test_projector_pwconv_groups_matches_reference(backend, B, G, Ci, Co, H, steps, training, momentum, kind):
    """groups = G: a grouped 1x1 conv (weight (G C_out, C_in, 1, 1)), the BatchNorm per output channel: every output,
    gradient and running statistic against the reference (F.conv2d(groups=G)) in float64; the groups differ (a
    kernel that mixed them or read one group's weights for all would fail)."""
    t = pw_inputs(B, G * Ci, G * Co, H, H + 2, seed=G * Ci + Co)
    t["w"] = torch.randn(G * Co, Ci, 1, 1, generator=torch.Generator().manual_seed(G), dtype=torch.float64)
    fn = lambda *a: _ops(backend).projector_pwconv(*a, groups=G)  # noqa: E731
    ref = lambda *a: R.projector_pwconv(*a, groups=G)  # noqa: E731
    got, y = pw_run(fn, backend.device, t, steps, training, momentum, kind, torch.float32)
    want, _ = pw_run(ref, backend.device, t, steps, training, momentum, "nchw", torch.float64)
    assert y.shape == (B, G * Co, H, H + 2) and got[4].shape == (G * Co, Ci, 1, 1)
    for name, g, w in zip(PW_NAMES, got, want):
        assert_close(name, g, w, 2e-5, atol=1e-7)
    # The truth itself: each group alone is the plain conv on its channels.
    a = t["a"].to(backend.device)
    for g_ in range(G):
        yg = F.conv2d(a[:, g_ * Ci:(g_ + 1) * Ci], t["w"][g_ * Co:(g_ + 1) * Co].to(backend.device))
        assert_close(f"group {g_}", want[0][:, g_ * Co:(g_ + 1) * Co], yg, 1e-12)


@pytest.mark.parametrize("backend", over_backends([()], names=TRITON))
def test_projector_pwconv_groups_bf16_and_refusal(backend):
    """bf16 grouped pwconv within twice the reference's own bf16 error; a weight that does not fit groups is a
    ValueError naming groups."""
    t = pw_inputs(3, 2 * 5, 2 * 7, 5, 5, seed=31)
    t["w"] = torch.randn(14, 5, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = {k: (v.to(torch.bfloat16).double() if torch.is_tensor(v) and k in ("a", "w") else v) for k, v in t.items()}
    fn = lambda *a: _ops(backend).projector_pwconv(*a, groups=2)  # noqa: E731
    ref = lambda *a: R.projector_pwconv(*a, groups=2)  # noqa: E731
    got, _ = pw_run(fn, backend.device, t, 2, True, 0.1, "nhwc", torch.bfloat16)
    low, _ = pw_run(ref, backend.device, t, 2, True, 0.1, "nhwc", torch.bfloat16)
    want, _ = pw_run(ref, backend.device, t, 2, True, 0.1, "nchw", torch.float64)
    floor = 1e-3 + interpreter_rounding(backend, torch.bfloat16)
    for name, g, r, w in zip(PW_NAMES, got, low, want):
        within_twice(name, g, r, w, floor)
    dev = backend.device
    bn = [torch.ones(6, device=dev), torch.zeros(6, device=dev), torch.zeros(6, device=dev),
          torch.ones(6, device=dev), torch.tensor(0, device=dev)]
    with pytest.raises(ValueError, match="groups"):
        _ops(backend).projector_pwconv(torch.randn(2, 6, 3, 3, device=dev), torch.randn(6, 4, device=dev), *bn,
                                       True, 0.1, 1e-5, groups=2)


PARTIAL_CASES = [(2, 7, 3, 13, 13, 2, "nhwc"), (1, 37, 20, 7, 7, 1, "nchw"), (2, 70, 64, 5, 7, 2, "sliced")]


@pytest.mark.parametrize("backend,B,C,P,H,W,stride,kind", over_backends(PARTIAL_CASES, names=TRITON))
def test_projector_dwconv_partial_prologue(backend, B, C, P, H, W, stride, kind):
    """scale/shift of P < C channels: BN apply + ReLU on the first P channels, the others raw (a grouped block's
    input: the continuing members' BN output, then a stage's raw map). Every output and gradient against the
    reference; the raw channels' gradient passes through negative values (no ReLU there)."""
    t = dw_inputs(B, C, H, W, seed=C + P)
    t["scale"], t["shift"] = t["scale"][:P], t["shift"][:P]
    got, _ = dw_run(_ops(backend).projector_dwconv, backend.device, t, stride, True, kind, torch.float32)
    want, _ = dw_run(R.projector_dwconv, backend.device, t, stride, True, "nchw", torch.float64)
    assert got[3].shape == (P,) and got[4].shape == (P,)
    for name, g, w in zip(DW_NAMES, got, want):
        assert_close(name, g, w, 1e-5, atol=1e-7)
    # The raw channels are a plain depthwise conv of x (negative values included).
    x = t["x"].to(backend.device)
    raw = F.conv2d(x[:, P:], t["w"][P:].to(backend.device), stride=stride, padding=1, groups=C - P)
    assert_close("raw channels", want[0][:, P:], raw, 1e-12)


# ------------------------------------------------------------------------------ grouped stage projectors
FUSED = ["cpu", "triton"]  # cpu: grouped nn modules (ATen grouped convs); triton: grouped fused ops


def proj_step(sp, feats, gout, ops):
    """One forward+backward of StageProjectors: h (S, B, D), every map's and parameter's gradient, every buffer."""
    feats = [f.detach().clone().requires_grad_() for f in feats]  # clone keeps the layout
    h = sp.run(feats, ops)
    sp.zero_grad(set_to_none=True)
    (h * gout.to(h.dtype)).sum().backward()
    return [h.detach()] + [f.grad for f in feats] + [p.grad for p in sp.parameters()] + \
        [b.clone() for b in sp.buffers()]


def proj_names(sp, stages):
    return (["h"] + [f"d feats[{s}]" for s in range(stages)] + [f"d {n}" for n, _ in sp.named_parameters()] +
            [n for n, _ in sp.named_buffers()])


def randomise_bns(sp, momentum, seed):
    g = torch.Generator().manual_seed(seed)
    for m in sp.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


# channels, maps, D, B, momentum, layout, groups (the members of each grouped block; None: a runtime fallback)
STAGE_CASES = [((3, 6, 12), (7, 4, 2), 12, 2, 0.1, "nhwc", 2)]  # ResNet-like: 3 blocks in 2 groups
STAGE_SLOW_CASES = [
    ((3, 6, 12, 24), (13, 7, 4, 2), 24, 2, 0.1, "nhwc", 3),      # odd maps: 6 blocks in 3 groups
    ((5, 10, 20), (14, 7, 4), 13, 3, None, "nchw", 2),           # momentum None, odd D
    ((3, 5, 7, 11), (13, 7, 4, 2), 11, 2, 0.2, "nhwc", 6),       # MobileNet-like widths: no two blocks grouped
    ((3, 6, 12), (8, 8, 8), 12, 2, 0.1, "nhwc", None),           # ResNet widths, maps not halving: per member
]


@pytest.mark.parametrize("backend,channels,maps,D,B,momentum,kind,num_groups",
                         over_backends(STAGE_CASES, names=FUSED, slow_cases=STAGE_SLOW_CASES))
def test_stage_projectors_match_per_stage_reference(backend, channels, maps, D, B, momentum, kind, num_groups,
                                                    monkeypatch):
    """The grouped projectors of a fused backend (fp32) against the reference backend (each member on its own: the
    per-stage SepConv blocks) in float64: h, every map's gradient, every parameter's gradient, running statistics
    and num_batches_tracked after each of 3 training steps, then an eval step."""
    from hcd_fast.modules import GroupedSepConv, StageProjectors

    torch.manual_seed(len(channels) + D)
    truth = StageProjectors(channels, D, "reference").double().to(backend.device)
    randomise_bns(truth, momentum, seed=D)
    fast = copy.deepcopy(truth).float()
    fast.backend = backend.name
    if num_groups is not None:
        assert len(fast.groups) == num_groups
    members = []
    monkeypatch.setattr(GroupedSepConv, "run_members", lambda self, pieces, ops, fused, _f=GroupedSepConv.run_members:
                        members.append(self.members) or _f(self, pieces, ops, fused))
    ref_ops = op_table("reference", torch.device(backend.device))
    g = torch.Generator().manual_seed(9)
    for step in range(4):
        training = step < 3
        truth.train(training)
        fast.train(training)
        feats = [torch.randn(B, c, m, m, generator=g, dtype=torch.float64) * 1.3 + 0.2 for c, m in zip(channels, maps)]
        gout = torch.randn(len(channels), B, D, generator=g, dtype=torch.float64).to(backend.device)
        members.clear()
        want = proj_step(truth, [f.to(backend.device) for f in feats], gout, ref_ops)
        assert len(members) == sum(g_.num_members > 1 for g_ in truth.groups)  # the reference: every member alone
        members.clear()
        got = proj_step(fast, [layout(f.float().to(backend.device), kind) for f in feats], gout, _ops(backend))
        if num_groups is None:
            assert members  # maps of different sizes: members run alone
        else:
            assert not members  # grouped
        for name, gt, wt in zip(proj_names(truth, len(channels)), got, want):
            assert_close(f"step {step} {name}", gt, wt, 1e-4, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", over_backends([()], names=FUSED))
def test_stage_projectors_under_autocast(backend, monkeypatch):
    """bf16 autocast on channels_last fp32 maps: h in bf16, gradients in the parameters' fp32, each value within twice
    the per-member reference's own bf16 error of the float64 truth (BatchNorm over a few values per channel makes
    that error large in the map gradients: ~30% here, for the reference as for the grouped backends)."""
    from hcd_fast.modules import GroupedSepConv, StageProjectors

    torch.manual_seed(2)
    channels, maps, D = (3, 6, 12, 24), (13, 7, 4, 2), 24
    truth = StageProjectors(channels, D, "reference").to(backend.device)
    randomise_bns(truth, 0.1, seed=3)
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(2, c, m, m, generator=g).to(backend.device).contiguous(memory_format=torch.channels_last)
             for c, m in zip(channels, maps)]
    gout = torch.randn(4, 2, D, generator=g).to(backend.device)
    ref_ops = op_table("reference", torch.device(backend.device))
    want = proj_step(copy.deepcopy(truth).double(), [f.double() for f in feats], gout.double(), ref_ops)
    outs = []
    for ops in (ref_ops, _ops(backend)):
        with torch.autocast(backend.device, dtype=torch.bfloat16):
            outs.append(proj_step(copy.deepcopy(truth), feats, gout, ops))
        # The fused backend groups under autocast too (the raw maps are cast to bf16 before the concatenation).
        monkeypatch.setattr(GroupedSepConv, "run_members", lambda *a: pytest.fail("a group ran per member"))
    assert outs[1][0].dtype == torch.bfloat16 and outs[1][1].dtype == torch.float32
    floor = 1e-3 + interpreter_rounding(backend, torch.bfloat16)
    for name, gt, r, w in zip(proj_names(truth, 4), outs[1], outs[0], want):
        within_twice(name, gt, r, w, floor)


@pytest.mark.parametrize("backend", over_backends([()], names=FUSED))
def test_stage_projectors_sync_batchnorm_takes_the_module_path(backend):
    """After convert_sync_batchnorm the grouped BatchNorms are SyncBatchNorm: the groups run through their modules
    (statistics the module computes), never the fused projector ops, and equal the unconverted projectors."""
    from hcd_fast.modules import StageProjectors

    torch.manual_seed(5)
    plain = StageProjectors((3, 6, 12), 12, backend.name).to(backend.device)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert all(isinstance(g_.bn2, nn.SyncBatchNorm) for g_ in synced.groups)

    def boom(*args, **kwargs):
        raise AssertionError("a fused projector op ran on a SyncBatchNorm projector")

    ops = _ops(backend)._replace(projector_dwconv=boom, projector_pwconv=boom)
    feats = [torch.randn(2, c, m, m).to(backend.device) for c, m in zip((3, 6, 12), (9, 5, 3))]
    gout = torch.randn(3, 2, 12).to(backend.device)
    want = proj_step(plain, feats, gout, _ops(backend))
    got = proj_step(synced, feats, gout, ops)
    for name, gt, wt in zip(proj_names(plain, 3), got, want):
        assert_close(name, gt, wt, 1e-5, atol=1e-6)


def _per_stage(channels, D, seed):
    """The per-stage modules of earlier versions (a ModuleList of ConvProjector / LinearProjector), trained a few
    steps so that running statistics and num_batches_tracked are not the defaults."""
    from hcd_fast.modules import ConvProjector, LinearProjector, init_weights

    torch.manual_seed(seed)
    S = len(channels)
    old = nn.ModuleList(ConvProjector(c, S - 1 - s, D, "reference") if s < S - 1 else
                        LinearProjector(c, D, "reference") for s, c in enumerate(channels))
    init_weights(old)
    randomise_bns(old, 0.1, seed)
    return old


def _maps(channels, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, m, m, generator=g) for c, m in zip(channels, sizes)]


def test_stage_projectors_load_per_stage_checkpoints():
    """A state_dict of the per-stage modules loads (strict) and gives the same outputs and running statistics; the
    new state_dict has exactly the old keys, order and shapes; it round-trips."""
    from hcd_fast.modules import StageProjectors

    channels, sizes, D = (3, 6, 12, 24), (13, 7, 4, 2), 24
    old = _per_stage(channels, D, 0)
    for s in range(3):  # different counts per stage would be an edited checkpoint; equal here (trained together)
        old.train()
        for p, f in zip(old, _maps(channels, sizes, seed=s)):
            p(f)
    old_state = old.state_dict()
    sp = StageProjectors(channels, D, "reference")
    sp.load_state_dict(old_state)  # strict
    state = sp.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == [(k, tuple(v.shape)) for k, v in old_state.items()]
    for k, v in old_state.items():
        assert torch.equal(state[k], v), k
    for mode in (True, False):
        old.train(mode)
        sp.train(mode)
        feats = _maps(channels, sizes, seed=7)
        want = torch.stack([p(f) for p, f in zip(old, feats)])
        assert torch.equal(sp(feats), want)
        for k, v in old.state_dict().items():
            assert torch.equal(sp.state_dict()[k], v), k
    again = StageProjectors(channels, D, "reference")
    again.load_state_dict(sp.state_dict())
    for (k, v), (_, w) in zip(again.state_dict().items(), sp.state_dict().items()):
        assert torch.equal(v, w), k
    for s in range(4):  # stage(s) is a standalone copy of the stage's weights
        stage = sp.stage(s)
        for k, v in stage.state_dict().items():
            assert torch.equal(v, old.state_dict()[f"{s}.{k}"]), (s, k)
    assert sp.stage(0).blocks[0].dw1.weight.data_ptr() != sp.groups[0].dw1.weight.data_ptr()
    group, _ = sp.group_of(1, 1)
    group.bn2.momentum = None
    sp.train()
    group.bn1.eval()  # a frozen BatchNorm stays frozen in the copy
    block = sp.stage(1).blocks[1]
    assert block.bn2.momentum is None and not block.bn1.training and block.bn2.training


def test_stage_projectors_load_errors_name_the_per_stage_keys():
    from hcd_fast.modules import StageProjectors

    channels, D = (3, 6, 12), 12
    sp = StageProjectors(channels, D, "reference")
    state = sp.state_dict()
    missing = {k: v for k, v in state.items() if k != "1.blocks.0.bn1.running_mean"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"1\.blocks\.0\.bn1\.running_mean\""):
        StageProjectors(channels, D, "reference").load_state_dict(missing)
    other = StageProjectors(channels, D, "reference")
    keep = other.group_of(1, 0)[0].bn1.running_mean.clone()
    with torch.no_grad():
        for v in missing.values():
            if v.is_floating_point():
                v.add_(1.0)
    result = other.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["1.blocks.0.bn1.running_mean"] and result.unexpected_keys == []
    group, i = other.group_of(1, 0)
    assert torch.equal(group.bn1.running_mean[i * 6:(i + 1) * 6], keep[i * 6:(i + 1) * 6])  # kept
    assert torch.equal(group.bn1.running_mean[:6], state["0.blocks.1.bn1.running_mean"])  # the other member loaded
    wrong = dict(state)
    wrong["0.blocks.1.pw2.weight"] = torch.zeros(12, 5, 1, 1)
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.blocks\.1\.pw2\.weight"):
        StageProjectors(channels, D, "reference").load_state_dict(wrong)
    extra = dict(state)
    extra["0.blocks.2.dw1.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"0\.blocks\.2\.dw1\.weight\""):
        StageProjectors(channels, D, "reference").load_state_dict(extra)
    # num_batches_tracked: one counter per grouped BatchNorm; members that disagree load as the largest.
    counts = dict(state)
    counts["0.blocks.1.bn2.num_batches_tracked"] = torch.tensor(3)
    counts["1.blocks.0.bn2.num_batches_tracked"] = torch.tensor(5)
    other.load_state_dict(counts)
    assert int(other.group_of(0, 1)[0].bn2.num_batches_tracked) == 5
    assert int(other.state_dict()["0.blocks.1.bn2.num_batches_tracked"]) == 5


def test_stage_projectors_init_per_member():
    """Each member's slice is initialised as its own conv (kaiming fan_out of the member's conv, not of the G times
    larger grouped one), BatchNorm 1/0."""
    from hcd_fast.modules import StageProjectors

    torch.manual_seed(0)
    sp = StageProjectors((16, 32, 64, 128), 128)
    last = sp.groups[-1]
    assert last.num_members == 3 and last.c_in == 64 and last.c_out == 128
    for i in range(3):
        pw2 = last.pw2.weight[i * 128:(i + 1) * 128]  # (128, 64): std sqrt(2 / 128) = 0.125 (grouped: 0.072)
        dw1 = last.dw1.weight[i * 64:(i + 1) * 64]  # (64, 1, 3, 3): std sqrt(2 / 576) = 0.059 (grouped: 0.034)
        assert abs(pw2.std().item() - 0.125) < 0.01 and abs(dw1.std().item() - (2 / 576) ** 0.5) < 0.008
    assert all(torch.all(g_.bn1.weight == 1) and torch.all(g_.bn2.bias == 0) for g_ in sp.groups)
    assert abs(sp.linear.proj.weight.std().item() - (2 / 128) ** 0.5) < 0.01 and torch.all(sp.linear.proj.bias == 0)


@pytest.mark.parametrize("backend", over_backends([()], names=TRITON))
def test_projector_pwconv_reads_channel_slices_in_place(backend):
    """A channel slice of a channels_last map (a grouped block's member, and the gradients that come back as slices
    of a concatenated input) is read in place as a (B*H*W, C) matrix with a longer row stride: same values as the
    reference, no copy."""
    from hcd_fast.kernels import projector as kp

    dev = backend.device
    g = torch.Generator().manual_seed(8)
    big = torch.randn(3, 11, 5, 7, generator=g, dtype=torch.float64)
    t = pw_inputs(3, 6, 5, 5, 7, seed=8)
    t["a"] = big[:, 3:9]
    cl = layout(big.float().to(dev), "nhwc")[:, 3:9]
    view, row, col = kp._channels_last_2d(cl)
    assert view is cl and (row, col) == (11, 1)
    assert kp._channels_last_2d(layout(big.float(), "strided")[:, 3:9])[1] == 6  # not equally spaced: a copy
    got, _ = pw_run(_ops(backend).projector_pwconv, dev, t, 2, True, 0.1, "nhwc", torch.float32)
    want, _ = pw_run(R.projector_pwconv, dev, t, 2, True, 0.1, "nchw", torch.float64)
    for name, gt, wt in zip(PW_NAMES, got, want):
        assert_close(name, gt, wt, 2e-5, atol=1e-7)
    a = cl.clone()  # the op on the slice itself (pw_run copies its input): values equal to the dense map's
    w = torch.randn(5, 6, generator=g).to(dev)
    bn = [torch.ones(5, device=dev), torch.zeros(5, device=dev), torch.zeros(5, device=dev),
          torch.ones(5, device=dev), torch.tensor(0, device=dev)]
    y_slice, _, _ = _ops(backend).projector_pwconv(cl, w, *bn, False, 0.1, 1e-5)
    y_dense, _, _ = _ops(backend).projector_pwconv(a.contiguous(), w, *bn, False, 0.1, 1e-5)
    assert torch.equal(y_slice, y_dense)


def test_stage_projectors_sync_batchnorm_needs_the_group_whole(tmp_path):
    """Under a process group a training SyncBatchNorm reduces statistics across ranks over its channels, so a grouped
    block runs whole; maps that cannot be grouped are a clear error naming the blocks, not a silent per-process
    BatchNorm. (SyncBatchNorm refuses CPU tensors under a process group: the first group, whose BatchNorms would
    synchronise, is put in eval mode here.)"""
    import torch.distributed as dist

    from hcd_fast.modules import StageProjectors

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sp = nn.SyncBatchNorm.convert_sync_batchnorm(StageProjectors((3, 6, 12), 12, "cpu"))
        sp.groups[0].eval()
        feats = [torch.randn(2, c, 8, 8) for c in (3, 6, 12)]  # stage 0's second block sees 4x4, stage 1's first 8x8
        with pytest.raises(RuntimeError, match=r"SyncBatchNorm projector blocks \(\(0, 1\), \(1, 0\)\)"):
            sp.run(feats, op_table("reference", torch.device("cpu")))
    finally:
        dist.destroy_process_group()
