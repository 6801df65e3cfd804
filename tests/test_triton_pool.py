"""Triton bn_relu_pool and pool_linear vs hcd_fast.reference: outputs, running stats, every gradient.

CPU runs go through the Triton interpreter (conftest.py); the ``cuda`` tests repeat them on a GPU.
Truth is the reference in float64.
"""
import pytest
import torch

import hcd_fast
from hcd_fast import functional as HF
from helpers import assert_close_to as assert_close

TRITON = hcd_fast.backends()["triton"]
pytestmark = [pytest.mark.skipif(not TRITON.available, reason=TRITON.reason),
              pytest.mark.usefixtures("triton_cpu_guard")]


def layout(x, kind):
    """Same values, different memory: "contiguous", "channels_last", or "sliced" (a strided view)."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":
        big = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2], x.shape[3] + 3, dtype=x.dtype, device=x.device)
        big[:, ::2, :, 1:x.shape[3] + 1] = x
        return big[:, ::2, :, 1:x.shape[3] + 1]
    return x.contiguous()


def bn_inputs(B, C, H, W, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 2 + 0.3
    w = torch.randn(C, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    rm = torch.randn(C, generator=g, dtype=torch.float64)
    rv = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    gout = torch.randn(B, C, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b, rm, rv, gout)]


def run_bn(backend, x, w, b, rm, rv, gout, training, momentum, kind="contiguous"):
    x = layout(x.detach().clone(), kind).requires_grad_()
    w, b = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    rm, rv = rm.clone(), rv.clone()
    out = HF.bn_relu_pool(x, w, b, rm, rv, training, momentum, 1e-5, backend=backend)
    out.backward(gout)
    return out.detach(), x.grad, w.grad, b.grad, rm, rv


NAMES = ("out", "d x", "d weight", "d bias", "running_mean", "running_var")

BN_CASES = [
    # B, C, H, W, training, momentum, layout
    (1, 3, 2, 2, True, 0.1, "contiguous"),
    (3, 5, 7, 7, True, 0.3, "channels_last"),
    (37, 4, 3, 5, False, 0.1, "contiguous"),
    (4, 70, 5, 3, True, 0.1, "sliced"),
    (3, 6, 1, 1, True, 1.0, "contiguous"),
    (2, 9, 4, 4, False, 0.1, "channels_last"),
]


def check_bn(B, C, H, W, training, momentum, kind, device="cpu", dtype=torch.float32):
    inputs = bn_inputs(B, C, H, W, dtype, device)
    want = run_bn("reference", *[t.double() for t in inputs], training, momentum)
    got = run_bn("triton", *inputs, training, momentum, kind)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[1].shape == (B, C, H, W)
    for g, w, name in zip(got, want, NAMES):
        assert_close(g, w, what=name)
    if not training:
        assert torch.equal(got[4], inputs[3]) and torch.equal(got[5], inputs[4])


@pytest.mark.parametrize("B,C,H,W,training,momentum,kind", BN_CASES)
def test_bn_relu_pool_matches_reference(B, C, H, W, training, momentum, kind):
    check_bn(B, C, H, W, training, momentum, kind)


@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_pool_spatial_loop_and_poisoned_outputs(training, monkeypatch, poison_uninitialized):
    """BLOCK_HW = 4 < H*W = 15 (ragged loop), every output buffer starts as NaN."""
    from hcd_fast.kernels import pool as kmod
    orig = kmod._blocks
    monkeypatch.setattr(kmod, "_blocks", lambda c, hw, bh=None: orig(c, hw, 4))
    check_bn(3, 5, 3, 5, training, 0.1, "sliced")


def test_bn_relu_pool_gradcheck_float64():
    # Full Jacobian on a tiny training-mode shape, a random-projection (fast_mode) check in eval mode.
    for training, shape, fast in ((True, (2, 2, 2, 2), False), (False, (3, 4, 3, 2), True)):
        x, w, b, rm, rv, _ = bn_inputs(*shape, seed=1)
        fn = lambda x_, w_, b_: HF.bn_relu_pool(x_, w_, b_, rm, rv, training, 0.1, 1e-5, backend="triton")
        inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)


def test_bn_relu_pool_one_value_per_channel_is_an_error():
    x, w, b, rm, rv, _ = bn_inputs(1, 3, 1, 1, torch.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        HF.bn_relu_pool(x, w, b, rm, rv, True, backend="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bn_relu_pool_low_precision(dtype):
    inputs = bn_inputs(4, 6, 5, 5, dtype, seed=2)
    want = run_bn("reference", *[t.double() for t in inputs], True, 0.1)
    ref = run_bn("reference", *inputs, True, 0.1)
    got = run_bn("triton", *inputs, True, 0.1)
    for g, r, w, name in zip(got, ref, want, NAMES):
        assert g.dtype == dtype
        ref_err = (r.double() - w).abs().max()
        err = (g.double() - w).abs().max()
        assert err <= 2 * ref_err + 1e-6 * w.abs().max(), f"{name}: {err:.3g} vs reference {ref_err:.3g}"


# ---------------------------------------------------------------------------------------- pool_linear
def pl_inputs(B, C, H, W, D, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(D, C, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    gout = torch.randn(B, D, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b, gout)]


def run_pl(backend, x, w, b, gout, kind="contiguous"):
    x = layout(x.detach().clone(), kind).requires_grad_()
    w, b = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    out = HF.pool_linear(x, w, b, backend=backend)
    out.backward(gout)
    return out.detach(), x.grad, w.grad, b.grad


PL_CASES = [
    # B, C, H, W, D, layout
    (1, 3, 1, 1, 5, "contiguous"),
    (3, 7, 7, 7, 12, "channels_last"),
    (37, 16, 2, 3, 9, "sliced"),
    (2, 33, 9, 5, 40, "contiguous"),
]


def check_pl(B, C, H, W, D, kind, device="cpu", dtype=torch.float32):
    inputs = pl_inputs(B, C, H, W, D, dtype, device)
    want = run_pl("reference", *[t.double() for t in inputs])
    got = run_pl("triton", *inputs, kind=kind)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[1].shape == (B, C, H, W)
    for g, w, name in zip(got, want, ("out", "d x", "d weight", "d bias")):
        assert_close(g, w, what=name)


@pytest.mark.parametrize("B,C,H,W,D,kind", PL_CASES)
def test_pool_linear_matches_reference(B, C, H, W, D, kind):
    check_pl(B, C, H, W, D, kind)


def test_pool_linear_spatial_loop_and_poisoned_outputs(monkeypatch, poison_uninitialized):
    from hcd_fast.kernels import pool as kmod
    orig = kmod._blocks
    monkeypatch.setattr(kmod, "_blocks", lambda c, hw, bh=None: orig(c, hw, 4))
    check_pl(3, 5, 3, 5, 4, "sliced")


def test_pool_linear_gradcheck_float64():
    x, w, b, _ = pl_inputs(2, 3, 3, 2, 4, seed=1)
    fn = lambda x_, w_, b_: HF.pool_linear(x_, w_, b_, backend="triton")
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pool_linear_low_precision(dtype):
    inputs = pl_inputs(4, 16, 5, 5, 8, dtype, seed=2)
    want = run_pl("reference", *[t.double() for t in inputs])
    ref = run_pl("reference", *inputs)
    got = run_pl("triton", *inputs)
    for g, r, w, name in zip(got, ref, want, ("out", "d x", "d weight", "d bias")):
        assert g.dtype == dtype
        ref_err = (r.double() - w).abs().max()
        err = (g.double() - w).abs().max()
        assert err <= 2 * ref_err + 1e-6 * w.abs().max(), f"{name}: {err:.3g} vs reference {ref_err:.3g}"


def test_torch_compile_fullgraph():
    """Both autograd.Functions over custom ops trace without a graph break (aot_eager: no codegen)."""
    x, w, b, rm, rv, gout = bn_inputs(3, 4, 3, 3, torch.float32, seed=4)
    pw, pb = torch.randn(5, 4), torch.randn(5)

    def f(x, w, b, rm, rv):
        pooled = HF.pool_linear(x, pw, pb, backend="triton")
        return (pooled * pooled).sum() + HF.bn_relu_pool(x, w, b, rm, rv, True, 0.1, 1e-5, backend="triton").sum()

    def grads(fn, rm, rv):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        out = fn(xs, ws, bs, rm, rv)
        out.sum().backward()
        return out.detach(), xs.grad, ws.grad, bs.grad, rm, rv

    eager = grads(f, rm.clone(), rv.clone())
    compiled = grads(torch.compile(f, fullgraph=True, backend="aot_eager"), rm.clone(), rv.clone())
    for a, c in zip(eager, compiled):
        assert_close(c, a)


def test_opcheck_custom_ops():
    x, w, b, rm, rv, g = bn_inputs(2, 3, 2, 3, torch.float32)
    checks = ("test_schema", "test_faketensor")
    for training in (True, False):
        torch.library.opcheck(torch.ops.hcd_triton.bn_relu_pool_fwd.default,
                              (x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5), test_utils=checks)
    out = torch.ops.hcd_triton.bn_relu_pool_fwd(x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.hcd_triton.bn_relu_pool_bwd.default,
                          (g, x, w, b, *out[1:], True), test_utils=checks)
    xc = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.hcd_triton.pool_linear.default, (xc, torch.randn(4, 3), torch.randn(4)))


# ---------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
# A subset (each distinct config is a fresh JIT compile on the GPU machine) plus a ResNet-sized map.
@pytest.mark.parametrize("B,C,H,W,training,momentum,kind",
                         [BN_CASES[1], BN_CASES[2], BN_CASES[3], (256, 512, 7, 7, True, 0.1, "channels_last")])
def test_cuda_bn_relu_pool(B, C, H, W, training, momentum, kind):
    check_bn(B, C, H, W, training, momentum, kind, device="cuda")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("B,C,H,W,D,kind", [PL_CASES[1], PL_CASES[2], (256, 512, 7, 7, 768, "contiguous")])
def test_cuda_pool_linear(B, C, H, W, D, kind):
    check_pl(B, C, H, W, D, kind, device="cuda")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(dtype):
    inputs = bn_inputs(64, 128, 14, 14, dtype, device="cuda", seed=2)
    want = run_bn("reference", *[t.double() for t in inputs], True, 0.1)
    ref = run_bn("reference", *inputs, True, 0.1)
    got = run_bn("triton", *inputs, True, 0.1)
    for g, r, w in zip(got, ref, want):
        assert (g.double() - w).abs().max() <= 2 * (r.double() - w).abs().max() + 1e-6 * w.abs().max()


@pytest.mark.cuda
@cuda
def test_cuda_deterministic():
    inputs = bn_inputs(128, 256, 14, 14, torch.float32, device="cuda", seed=3)
    a = run_bn("triton", *inputs, True, 0.1)
    b = run_bn("triton", *inputs, True, 0.1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    pl = pl_inputs(128, 256, 7, 7, 512, torch.float32, device="cuda")
    assert all(torch.equal(x, y) for x, y in zip(run_pl("triton", *pl), run_pl("triton", *pl)))
