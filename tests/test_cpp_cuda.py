"""backend="cuda" (csrc/cuda/*.cu) against hcd_fast.reference, on a CUDA device (run with ``pytest -m cuda``;
skipped without a GPU). Truth is the reference in float64 on the same values; inputs are non-contiguous,
grad_output != 1, and fresh CUDA memory is NaN-poisoned (fill_uninitialized_memory)."""
import copy

import pytest
import torch

import hcd_fast
from hcd_fast import HCDConfig, HCDLoss
from hcd_fast import functional as HF
from helpers import assert_close

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("poison_uninitialized"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = "cuda"


def test_cuda_backend_available():
    status = hcd_fast.backends()["cuda"]
    assert status.available, status.reason


def within_twice(name, got, ref, want):
    err = (got.double() - want).abs().max().item()
    ref_err = (ref.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-5 * want.abs().max().item(), f"{name}: {err:.3e} vs reference {ref_err:.3e}"


# sub_logit_loss: tests/test_sub_logit_loss.py (the "cuda" and "triton-cuda" parameters).


# --------------------------------------------------------------------------------------------------
# bn_relu_pool, pool_linear, cfm
# --------------------------------------------------------------------------------------------------
def rnd(g, *shape, dtype=torch.float32, scale=1.0, shift=0.0, grad=True):
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(DEV, dtype)
    return t.requires_grad_() if grad else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("B,C,H,W", [(3, 5, 4, 4), (37, 64, 8, 8), (128, 512, 1, 1)])
def test_bn_relu_pool_cuda(B, C, H, W, training, dtype):
    g = torch.Generator().manual_seed(B + C)
    x = rnd(g, B, H, W, C, dtype=dtype, scale=2.0, shift=0.5)
    w = rnd(g, C, dtype=dtype, scale=0.3, shift=1.0)
    b = rnd(g, C, dtype=dtype, scale=0.5)
    rm, rv = rnd(g, C, dtype=dtype, grad=False), rnd(g, C, dtype=dtype, grad=False).abs() + 0.5
    go = rnd(g, B, C, dtype=dtype, grad=False)

    def run(backend, x, w, b, rm, rv, go):
        rm, rv = rm.clone(), rv.clone()
        out = HF.bn_relu_pool(x.permute(0, 3, 1, 2), w, b, rm, rv, training, 0.3, 1e-5, backend=backend)
        return (out.detach(),) + torch.autograd.grad(out, (x, w, b), grad_outputs=go) + (rm, rv)

    got = run("cuda", x, w, b, rm, rv, go)
    want = run("reference", *[t.detach().double().requires_grad_() for t in (x, w, b)], rm.double(), rv.double(),
               go.double())
    names = ("out", "grad x", "grad w", "grad b", "running_mean", "running_var")
    if dtype == torch.float32:
        for name, gt, wt in zip(names, got, want):
            assert_close(name, gt, wt, 1e-5)
    else:
        ref = run("reference", x, w, b, rm, rv, go)
        for name, gt, r, wt in zip(names, got, ref, want):
            within_twice(name, gt, r, wt)


@pytest.mark.parametrize("B,C,H,W,D", [(3, 37, 2, 2, 100), (128, 512, 1, 1, 384), (37, 64, 4, 3, 7)])
def test_pool_linear_cuda(B, C, H, W, D):
    g = torch.Generator().manual_seed(C + D)
    x, wt, b, go = rnd(g, B, H, W, C), rnd(g, C, D, scale=C ** -0.5), rnd(g, D), rnd(g, B, D, grad=False)

    def run(backend, x, wt, b, go):
        out = HF.pool_linear(x.permute(0, 3, 1, 2), wt.t(), b, backend=backend)
        return (out.detach(),) + torch.autograd.grad(out, (x, wt, b), grad_outputs=go)

    got = run("cuda", x, wt, b, go)
    want = run("reference", *[t.detach().double().requires_grad_() for t in (x, wt, b)], go.double())
    for name, gt, w_ in zip(("out", "grad x", "grad w", "grad b"), got, want):
        assert_close(name, gt, w_, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,D,Dt,H,n,K", [(3, 16, 24, None, 4, 7), (37, 24, 16, 32, 3, 37), (128, 512, 384, 384, 4, 100)])
def test_cfm_cuda(B, D, Dt, H, n, K, dtype):
    g = torch.Generator().manual_seed(B + D)
    hid = n * K if H is None else H
    h, ft = rnd(g, D, B, dtype=dtype), rnd(g, Dt, B, dtype=dtype)
    w1, b1 = rnd(g, D + Dt, hid, dtype=dtype, scale=(D + Dt) ** -0.5), rnd(g, hid, dtype=dtype, scale=0.1)
    w2 = None if H is None else rnd(g, H, n * K, dtype=dtype, scale=H ** -0.5)
    b2 = None if H is None else rnd(g, n * K, dtype=dtype, scale=0.1)
    zt, go = rnd(g, B, K, dtype=dtype, grad=False), rnd(g, B, n, K, dtype=dtype, grad=False)

    def run(backend, h, ft, w1, b1, w2, b2, zt, go):
        out = HF.cfm(h.t(), ft.t(), w1.t(), b1, None if w2 is None else w2.t(), b2, zt, n, 0.7, 1.3, backend=backend)
        leaves = [t for t in (h, w1, b1, w2, b2) if t is not None]
        return (out.detach(),) + torch.autograd.grad(out, leaves, grad_outputs=go)

    got = run("cuda", h, ft, w1, b1, w2, b2, zt, go)
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    want = run("reference", d(h), ft.double(), d(w1), d(b1), d(w2), d(b2), zt.double(), go.double())
    if dtype == torch.float32:
        for i, (gt, w_) in enumerate(zip(got, want)):
            assert_close(f"cfm output {i}", gt, w_, 1e-5)
    else:
        ref = run("reference", h, ft, w1, b1, w2, b2, zt, go)
        for i, (gt, r, w_) in enumerate(zip(got, ref, want)):
            within_twice(f"cfm output {i}", gt, r, w_)


# --------------------------------------------------------------------------------------------------
# HCDLoss and opcheck
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_hcd_loss_cuda_matches_reference(no_tf32):
    """HCDLoss(backend="cuda") vs the reference in float64 (truth), within twice the fp32 reference's own error
    (floor: 2e-5 of the largest value): loss, parts, every parameter gradient, running statistics."""
    channels, sizes, B, K, Dt = (64, 128, 256, 512), (8, 4, 2, 1), 16, 100, 384
    torch.manual_seed(0)
    ref = HCDLoss(channels, Dt, K, backend="reference").to(DEV).train()
    fast = copy.deepcopy(ref)
    for m in fast.modules():
        if hasattr(m, "backend"):
            m.backend = "cuda"
    truth = copy.deepcopy(ref).double()
    g = torch.Generator().manual_seed(1)
    feats = [rnd(g, B, c, s, s) for c, s in zip(channels, sizes)]
    zs, ft, zt = rnd(g, B, K, scale=2.0), rnd(g, B, Dt, grad=False), rnd(g, B, K, scale=2.0, grad=False)
    y = torch.randint(0, K, (B,), generator=g).to(DEV)
    results = []
    for crit, dt in ((ref, torch.float32), (fast, torch.float32), (truth, torch.float64)):
        crit.zero_grad()
        loss, parts = crit([f.detach().to(dt) for f in feats], zs.detach().to(dt), ft.to(dt), zt.to(dt), y,
                           return_parts=True)
        loss.backward()
        results.append(({"loss": loss.detach(), **parts}, {n: p.grad.clone() for n, p in crit.named_parameters()},
                        {n: b.clone() for n, b in crit.named_buffers()}))
    (rv, rg, rb), (fv, fg, fb), (tv, tg, tb) = results

    def check(name, got, ref32, want):
        err = (got.double() - want).abs().max().item()
        ref_err = (ref32.double() - want).abs().max().item()
        assert err <= 2 * ref_err + 2e-5 * want.abs().max().item(), f"{name}: {err:.3e} vs reference {ref_err:.3e}"

    for k in tv:
        check(k, fv[k], rv[k], tv[k])
    assert set(fg) == set(tg)
    for name in tg:
        check(f"grad {name}", fg[name], rg[name], tg[name])
    for name in tb:
        check(f"buffer {name}", fb[name], rb[name], tb[name])


def test_opcheck_cuda():
    g = torch.Generator().manual_seed(0)
    x = rnd(g, 3, 5, 4, 4, grad=False)
    w, b, rm, rv = (rnd(g, 5, grad=False) for _ in range(4))
    torch.library.opcheck(torch.ops.hcd_fast.bn_relu_pool_fwd.default, (x, w, b, rm, rv.abs() + 0.5, True, 0.1, 1e-5))
    torch.library.opcheck(torch.ops.hcd_fast.pool_linear.default, (rnd(g, 3, 5, 2, 2), rnd(g, 6, 5), rnd(g, 6)))
    torch.library.opcheck(torch.ops.hcd_fast.cfm.default, (rnd(g, 3, 4), rnd(g, 3, 5, grad=False), rnd(g, 6, 9),
                                                           rnd(g, 6), rnd(g, 14, 6), rnd(g, 14), rnd(g, 3, 7, grad=False),
                                                           2, 0.5, 2.0))


# --------------------------------------------------------------------------------------------------
# Memory formats and dtypes (issue 11): bn_relu_pool and pool_linear read NCHW and channels_last maps in
# place; cfm runs bf16/fp16 GEMMs (tensor cores, fp32 accumulation) in the activation dtype.
#
# Truth: the reference in float64 on the very same (already rounded) input values. Tolerances are relative to
# the largest |value| (assert_close), from the unit roundoff u of the output dtype (bf16 2^-8, fp16 2^-11):
# - bn_relu_pool / pool_linear accumulate in fp32 (fp64 for fp64) and round each output once (error <= u
#   relative to the element), plus fp32 summation error (< 1e-4 relative here): rtol = 2u + 1e-4.
# - fp32: 1e-5 (fp32 summation over at most a few thousand terms); fp64: 1e-10.
# --------------------------------------------------------------------------------------------------
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def single_rounding_rtol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype) or 2 * UNIT_ROUNDOFF[dtype] + 1e-4


def low_atol(dtype):
    """Absolute floor for values near fp16's subnormal range (6e-8 spacing); none for fp32/fp64."""
    return 1e-7 if dtype in UNIT_ROUNDOFF else 1e-12


def make_map(g, B, C, H, W, layout, dtype, scale=1.0, shift=0.0):
    """A (B, C, H, W) leaf (requires grad) and the view the op reads: NCHW-contiguous, channels_last
    (NHWC memory), or "strided" (every other column of a wider map: neither, so the kernels copy it)."""
    if layout == "nchw":
        leaf = rnd(g, B, C, H, W, dtype=dtype, scale=scale, shift=shift)
        return leaf, leaf
    if layout == "nhwc":
        leaf = rnd(g, B, H, W, C, dtype=dtype, scale=scale, shift=shift)
        view = leaf.permute(0, 3, 1, 2)
        assert view.is_contiguous(memory_format=torch.channels_last)
        return leaf, view
    leaf = rnd(g, B, C, H, 2 * W, dtype=dtype, scale=scale, shift=shift)
    return leaf, leaf[..., ::2]


# B = 1, H*W = 1 (and both: training must refuse it), C not a multiple of 4/8/32, C > 32 (several channel
# tiles), H*W < 8 and > 8, and a map large enough for several row chunks of the channels_last reductions
# (N = B*H*W = 2 * 40 * 40 = 3200 rows: 50 chunks of 64).
MAP_SHAPES = [(1, 5, 3, 3), (3, 37, 1, 1), (2, 70, 5, 3), (1, 3, 1, 7), (1, 6, 1, 1), (2, 33, 40, 40)]
LAYOUTS = ["nchw", "nhwc"]
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS + ["strided"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("B,C,H,W", MAP_SHAPES)
def test_bn_relu_pool_cuda_layouts(B, C, H, W, training, layout, dtype):
    g = torch.Generator().manual_seed(1000 * B + 10 * C + H)
    leaf, x = make_map(g, B, C, H, W, layout, dtype, scale=2.0, shift=0.5)
    w = rnd(g, C, dtype=dtype, scale=0.3, shift=1.0)
    b = rnd(g, C, dtype=dtype, scale=0.5)
    rm, rv = rnd(g, C, dtype=dtype, grad=False), rnd(g, C, dtype=dtype, grad=False).abs() + 0.5
    go = rnd(g, B, C, dtype=dtype, grad=False)
    if training and B * H * W == 1:  # as nn.BatchNorm2d: one value per channel has no batch variance
        # nn.BatchNorm2d's ValueError at the public boundary (hcd_fast.functional validates once) ...
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            HF.bn_relu_pool(x, w, b, rm.clone(), rv.clone(), True, 0.3, 1e-5, backend="cuda")
        # ... and the CUDA kernel's own check when its op is called directly.
        with pytest.raises(RuntimeError, match="more than 1 value per channel"):
            torch.ops.hcd_fast.bn_relu_pool_fwd(x, w, b, rm.clone(), rv.clone(), True, 0.3, 1e-5)
        return

    def run(backend, leaf, x, w, b, rm, rv, go):
        rm, rv = rm.clone(), rv.clone()
        out = HF.bn_relu_pool(x, w, b, rm, rv, training, 0.3, 1e-5, backend=backend)
        return (out.detach(),) + torch.autograd.grad(out, (leaf, w, b), grad_outputs=go) + (rm, rv)

    got = run("cuda", leaf, x, w, b, rm, rv, go)
    d_leaf = leaf.detach().double().requires_grad_()
    d_x = {"nchw": lambda t: t, "nhwc": lambda t: t.permute(0, 3, 1, 2), "strided": lambda t: t[..., ::2]}[layout](d_leaf)
    want = run("reference", d_leaf, d_x, *[t.detach().double().requires_grad_() for t in (w, b)], rm.double(),
               rv.double(), go.double())
    assert got[0].dtype == dtype and got[1].dtype == dtype
    rtol = single_rounding_rtol(dtype)
    for name, gt, wt in zip(("out", "grad x", "grad w", "grad b", "running_mean", "running_var"), got, want):
        assert_close(name, gt, wt, rtol, atol=low_atol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_relu_pool_cuda_channels_last_deterministic(dtype):
    """Two runs on channels_last input give identical bits; NCHW and channels_last agree to rounding."""
    g = torch.Generator().manual_seed(7)
    B, C, H, W = 16, 96, 14, 14
    x_cl = rnd(g, B, C, H, W, dtype=dtype, scale=2.0, shift=0.5, grad=False).contiguous(memory_format=torch.channels_last)
    w, b = rnd(g, C, dtype=dtype, shift=1.0, grad=False), rnd(g, C, dtype=dtype, grad=False)
    go = rnd(g, B, C, dtype=dtype, grad=False)

    def run(x):
        x = x.detach().requires_grad_()
        wl, bl = w.detach().requires_grad_(), b.detach().requires_grad_()
        rm, rv = torch.zeros(C, device=DEV, dtype=dtype), torch.ones(C, device=DEV, dtype=dtype)
        out = HF.bn_relu_pool(x, wl, bl, rm, rv, True, 0.1, 1e-5, backend="cuda")
        return (out.detach(),) + torch.autograd.grad(out, (x, wl, bl), grad_outputs=go) + (rm, rv)

    first, second = run(x_cl), run(x_cl)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    nchw = run(x_cl.contiguous())
    for name, a, c in zip(("out", "grad x", "grad w", "grad b", "running_mean", "running_var"), first, nchw):
        assert_close(name, a, c, single_rounding_rtol(dtype), atol=low_atol(dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS + ["strided"])
@pytest.mark.parametrize("B,C,H,W", MAP_SHAPES)
def test_pool_linear_cuda_layouts(B, C, H, W, layout, dtype):
    g = torch.Generator().manual_seed(1000 * B + 10 * C + W)
    D = 11
    leaf, x = make_map(g, B, C, H, W, layout, dtype)
    wt, b, go = rnd(g, D, C, dtype=dtype, scale=C ** -0.5), rnd(g, D, dtype=dtype), rnd(g, B, D, dtype=dtype, grad=False)

    def run(backend, leaf, x, wt, b, go):
        out = HF.pool_linear(x, wt, b, backend=backend)
        return (out.detach(),) + torch.autograd.grad(out, (leaf, wt, b), grad_outputs=go)

    got = run("cuda", leaf, x, wt, b, go)
    d_leaf = leaf.detach().double().requires_grad_()
    d_x = {"nchw": lambda t: t, "nhwc": lambda t: t.permute(0, 3, 1, 2), "strided": lambda t: t[..., ::2]}[layout](d_leaf)
    want = run("reference", d_leaf, d_x, *[t.detach().double().requires_grad_() for t in (wt, b)], go.double())
    assert got[0].dtype == dtype
    # out = W pooled + b: the GEMM reads the fp32 pooled means and the weights in fp32 (one rounding of out);
    # the gradients are single roundings of fp32 GEMM / sum results.
    for name, gt, w_ in zip(("out", "grad x", "grad w", "grad b"), got, want):
        assert_close(name, gt, w_, single_rounding_rtol(dtype), atol=low_atol(dtype))


def test_pool_linear_cuda_channels_last_mixed_and_deterministic():
    """bf16 channels_last map with fp32 weights (autocast-style): fp32 mean, fp32 GEMM, one bf16 rounding; the
    channels_last and NCHW kernels agree, and reruns are bit-identical."""
    g = torch.Generator().manual_seed(3)
    B, C, H, W, D = 9, 45, 7, 7, 13
    leaf = rnd(g, B, H, W, C, dtype=torch.bfloat16)
    x = leaf.permute(0, 3, 1, 2)
    wt, b, go = rnd(g, D, C, scale=C ** -0.5), rnd(g, D), rnd(g, B, D, dtype=torch.bfloat16, grad=False)
    out = HF.pool_linear(x, wt, b, backend="cuda")
    gx, gw, gb = torch.autograd.grad(out, (leaf, wt, b), grad_outputs=go)
    d = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    d_leaf, d_w, d_b = d(leaf), d(wt), d(b)
    want = HF.pool_linear(d_leaf.permute(0, 3, 1, 2), d_w, d_b, backend="reference")
    wgx, wgw, wgb = torch.autograd.grad(want, (d_leaf, d_w, d_b), grad_outputs=go.double())
    assert out.dtype == torch.bfloat16
    rtol = single_rounding_rtol(torch.bfloat16)
    assert_close("out", out, want, rtol)
    assert_close("grad x", gx, wgx, rtol, atol=1e-7)
    assert_close("grad w", gw, wgw, 1e-5)  # fp32 weights: fp32 GEMM of fp32 pooled values
    assert_close("grad b", gb, wgb, 1e-5)
    again = HF.pool_linear(x, wt, b, backend="cuda")
    assert torch.equal(out, again)
    assert_close("nchw", HF.pool_linear(x.contiguous(), wt, b, backend="cuda"), out, rtol)


# cfm. Pre-activations are kept away from 0 (b1 = +-1 exactly, |u W1^T| < 0.5: entries of u W1^T are
# N(0, 0.1^2)), so the ReLU mask is the same in every precision and the comparisons measure rounding only.
#
# Forward, against an fp64 emulation of the design: the GEMM inputs (u, W1, b1, W2) rounded to the GEMM dtype g
# (the activation dtype), exact products and sums, hidden rounded to g, z + b2 and the teacher term exact, zf
# rounded once to the output dtype. The kernels differ from it by fp32 accumulation (~1e-6 relative) and by
# hidden values that sit on a rounding boundary (the epilogue may round an fp32 value where the emulation rounds
# an fp64 one): at most one ulp of g per hidden element, which moves z by about u_g * rms(z) at most; plus one
# ulp of the output dtype: rtol = 2 u_g + u_out + 1e-4 relative to the largest |value| (bf16 ~0.012 / 0.008).
# A layout, transpose or missing-term defect moves zf by more than 0.1 of its largest value.
#
# Gradients (the backward's GEMMs also run in g) and the forward, against the fp64 truth of the unrounded
# inputs: up to four roundings of relative size u_g (inputs and weights, hidden, GEMM result, output) each
# contribute about u_g * rms(result) summed over a GEMM's terms with random signs, ~4 u_g at the worst element:
# rtol = 16 u_g (bf16 0.0625, fp16 0.0078); fp32 keeps 1e-5 and fp64 1e-10 (no rounding to a lower precision).
def cfm_rtol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype) or 16 * UNIT_ROUNDOFF[dtype]


def cfm_inputs(B, D, Dt, H, n, K, act_dtype, param_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hid = n * K if H is None else H
    h, ft = rnd(g, B, D, dtype=act_dtype), rnd(g, B, Dt, dtype=act_dtype, grad=False)
    w1 = rnd(g, hid, D + Dt, dtype=param_dtype, scale=0.1 * (D + Dt) ** -0.5)
    signs = torch.randint(0, 2, (hid,), generator=g, dtype=torch.float64) * 2 - 1
    b1 = signs.to(DEV, param_dtype).requires_grad_()
    w2 = None if H is None else rnd(g, n * K, H, dtype=param_dtype, scale=H ** -0.5)
    b2 = None if H is None else rnd(g, n * K, dtype=param_dtype, scale=0.1)
    zt = rnd(g, B, K, dtype=act_dtype, grad=False)
    return h, ft, w1, b1, w2, b2, zt


def cfm_run(backend, n, h, ft, w1, b1, w2, b2, zt, go, autocast_dtype=None):
    leaves = [t for t in (h, w1, b1, w2, b2) if t is not None]
    if autocast_dtype is None:
        out = HF.cfm(h, ft, w1, b1, w2, b2, zt, n, 0.7, 1.3, backend=backend)
    else:
        with torch.autocast("cuda", dtype=autocast_dtype):
            out = HF.cfm(h, ft, w1, b1, w2, b2, zt, n, 0.7, 1.3, backend=backend)
    return (out.detach(),) + torch.autograd.grad(out, leaves, grad_outputs=go.to(out.dtype))


def cfm_truth(n, h, ft, w1, b1, w2, b2, zt, go):
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    return cfm_run("reference", n, d(h), ft.double(), d(w1), d(b1), d(w2), d(b2), zt.double(), go.double())


def cfm_emulated(n, h, ft, w1, b1, w2, b2, zt, out_dtype):
    """The forward's rounding points in fp64 (see above); g = the activation (student feature) dtype."""
    gd = h.dtype
    r = lambda t: t.detach().to(gd).double()  # noqa: E731
    u = torch.cat([r(h), r(ft)], dim=1)
    if w2 is None:
        z = u @ r(w1).t() + b1.detach().double()  # one GEMM, its fp32 output + b1 in the fusion kernel
    else:
        hidden = torch.relu(u @ r(w1).t() + r(b1)).to(gd).double()
        z = hidden @ r(w2).t() + b2.detach().double()
    batch, num_classes = zt.shape
    zf = 0.7 * z.view(batch, n, num_classes) + 1.3 * zt.to(out_dtype).double()[:, None, :]
    return zf.to(out_dtype).double()


def emulation_rtol(gemm_dtype, out_dtype):
    return 2 * UNIT_ROUNDOFF.get(gemm_dtype, 0.0) + UNIT_ROUNDOFF.get(out_dtype, 0.0) + 1e-4


# B = 1 and B = 3 < ... (B = 1: cuBLASLt is skipped, GEMM + epilogue kernel), odd D, Dt, H, K, no W2
# (z = W1 u + b1), and a larger one.
CFM_SHAPES = [(1, 16, 24, 32, 4, 7), (3, 13, 11, None, 3, 5), (37, 24, 16, 33, 3, 37), (5, 7, 9, 5, 2, 3),
              (128, 512, 384, 384, 4, 100)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("B,D,Dt,H,n,K", CFM_SHAPES)
def test_cfm_cuda_dtypes(B, D, Dt, H, n, K, dtype):
    """Every input in one dtype: bf16/fp16 run tensor-core GEMMs (cuBLASLt bias+ReLU epilogue where it fits)."""
    inputs = cfm_inputs(B, D, Dt, H, n, K, dtype, dtype, seed=B + D + K)
    go = rnd(torch.Generator().manual_seed(B), B, n, K, dtype=dtype, grad=False)
    got = cfm_run("cuda", n, *inputs, go)
    want = cfm_truth(n, *inputs, go)
    assert got[0].dtype == dtype
    for i, (gt, w_) in enumerate(zip(got, want)):
        assert_close(f"cfm output {i}", gt, w_, cfm_rtol(dtype), atol=low_atol(dtype))
    if dtype in UNIT_ROUNDOFF:
        assert_close("cfm forward (emulated)", got[0], cfm_emulated(n, *inputs, dtype), emulation_rtol(dtype, dtype))


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,D,Dt,H,n,K", CFM_SHAPES)
def test_cfm_cuda_autocast_fp32_weights(B, D, Dt, H, n, K, act_dtype):
    """Under torch.autocast with fp32 parameters and low-precision features (what the trainer runs): the
    forward's GEMMs run in the activation dtype, like the backward's; forward and every gradient against the
    fp64 truth, the forward against the emulation of its rounding points, and bit-identical reruns."""
    inputs = cfm_inputs(B, D, Dt, H, n, K, act_dtype, torch.float32, seed=3 * B + D)
    go = rnd(torch.Generator().manual_seed(B + 1), B, n, K, grad=False)
    got = cfm_run("cuda", n, *inputs, go, autocast_dtype=act_dtype)
    want = cfm_truth(n, *inputs, go)
    for i, (gt, w_) in enumerate(zip(got, want)):
        assert_close(f"cfm output {i}", gt, w_, cfm_rtol(act_dtype), atol=low_atol(act_dtype))
    out_dtype = got[0].dtype
    assert_close("cfm forward (emulated)", got[0], cfm_emulated(n, *inputs, out_dtype),
                 emulation_rtol(act_dtype, out_dtype))
    again = cfm_run("cuda", n, *inputs, go, autocast_dtype=act_dtype)
    for gt, ag in zip(got, again):
        assert torch.equal(gt, ag)  # deterministic run to run
