"""pool_linear on every backend (tests/helpers.py: cpu, triton in the interpreter, triton-cuda and cuda on a GPU)
against hcd_fast.reference: out = W mean_hw(x) + b and every gradient.

Truth is the reference in float64 on the same values, on the backend's device. Fresh memory is NaN-poisoned
(every test), grad_output is a random (B, D) tensor, the map comes in every layout (NCHW, channels_last,
"sliced", "strided": helpers.layout) and W as a transposed-storage view.
"""
import itertools

import pytest
import torch

from hcd_fast import functional as HF
from helpers import (ALL_DTYPES, MAP_SHAPES, assert_close, backend_params, interpreter_rounding, layout, low_atol,
                     over_backends, single_rounding_rtol, within_twice)

pytestmark = pytest.mark.usefixtures("poison_uninitialized")
NAMES = ("out", "d x", "d weight", "d bias")


def pl_inputs(B, C, H, W, D, seed=0):
    """float64 values on the CPU: x (B, C, H, W), W (D, C) scaled 1 / sqrt(C), b (D,), grad_output (B, D)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"x": r(B, C, H, W), "w": r(D, C) / C ** 0.5, "b": r(D), "gout": r(B, D)}


def run(name, device, t, kind="nchw", w_strided=False, dtype=None):
    """HF.pool_linear(backend=name) -> (out, d x, d W, d b); dtype casts the inputs first (float64 truth)."""
    cast = lambda v: v.to(device=device, dtype=dtype or v.dtype).clone()  # noqa: E731  (never t's own tensors)
    x = layout(cast(t["x"]), kind).requires_grad_()
    w, b = cast(t["w"]).requires_grad_(), cast(t["b"]).requires_grad_()
    out = HF.pool_linear(x, w.t().contiguous().t() if w_strided else w, b, backend=name)
    out.backward(cast(t["gout"]).to(out.dtype))
    return out.detach(), x.grad, w.grad, b.grad


def truth(device, t):
    return run("reference", device, t, dtype=torch.float64)


# B, C, H, W, D, layout of x, W as a transposed-storage view
CASES = [(1, 3, 1, 1, 5, "nhwc", True), (3, 37, 2, 2, 100, "nhwc", True), (37, 64, 4, 3, 7, "nhwc", True),
         (8, 512, 1, 1, 384, "nhwc", True), (1, 3, 1, 1, 5, "nchw", False), (3, 7, 7, 7, 12, "nhwc", False),
         (37, 16, 2, 3, 9, "sliced", False), (2, 33, 9, 5, 40, "nchw", False)]
GPU_CASES = [(128, 512, 1, 1, 384, "nhwc", True), (256, 512, 7, 7, 768, "nchw", False)]
JIT_GPU_CASES = [CASES[5], CASES[6], GPU_CASES[1]]


@pytest.mark.parametrize("backend,B,C,H,W,D,kind,w_strided", over_backends(CASES, GPU_CASES, JIT_GPU_CASES))
def test_pool_linear_matches_reference(backend, B, C, H, W, D, kind, w_strided):
    t = pl_inputs(B, C, H, W, D, seed=C + D)
    got = run(backend.name, backend.device, t, kind, w_strided, dtype=torch.float32)
    want = truth(backend.device, t)
    assert got[0].shape == (B, D) and got[0].dtype == torch.float32
    assert got[1].shape == (B, C, H, W) and got[1].dtype == torch.float32
    for name, g, w in zip(NAMES, got, want):
        assert_close(name, g, w, 1e-5)


# Every layout in every dtype (helpers.MAP_SHAPES), D = 11. out = W pooled + b: the GEMM
# reads the fp32 pooled means and the weights in fp32 (one rounding of out); the gradients are single roundings
# of fp32 GEMM / sum results: helpers.single_rounding_rtol.
LAYOUTS = ["nchw", "nhwc", "strided"]
LAYOUT_CASES = [s + (kind, dtype) for s, kind, dtype in itertools.product(MAP_SHAPES[:5], LAYOUTS, ALL_DTYPES)]
LAYOUT_BIG_CASES = [MAP_SHAPES[5] + (kind, dtype) for kind, dtype in itertools.product(LAYOUTS, ALL_DTYPES)]
LAYOUT_JIT_CASES = [s + (kind, dtype) for s, kind, dtype in
                    itertools.product([MAP_SHAPES[2], MAP_SHAPES[5]], ["nchw", "nhwc"],
                                      [torch.float32, torch.bfloat16])]


@pytest.mark.parametrize("backend,B,C,H,W,kind,dtype", over_backends(
    LAYOUT_CASES, jit_gpu_cases=LAYOUT_JIT_CASES, compiled_cases=LAYOUT_BIG_CASES))
def test_pool_linear_layouts_and_dtypes(backend, B, C, H, W, kind, dtype):
    t = {k: v.to(dtype).double() for k, v in pl_inputs(B, C, H, W, 11, seed=1000 * B + 10 * C + W).items()}
    got = run(backend.name, backend.device, t, kind, dtype=dtype)
    want = truth(backend.device, t)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for name, g, w in zip(NAMES, got, want):
        assert_close(name, g, w, single_rounding_rtol(dtype), atol=low_atol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,B,C,H,W,D,kind,w_strided,floor", over_backends(
    [(16, 64, 4, 4, 96, "nhwc", True, 1e-5), (4, 16, 5, 5, 8, "nchw", False, 1e-6)]))
def test_pool_linear_low_precision(backend, B, C, H, W, D, kind, w_strided, floor, dtype):
    """bf16/fp16 in and out, within twice the reference's own error in that dtype (plus, in the Triton
    interpreter, its bf16 truncation: helpers.interpreter_rounding)."""
    t = {k: v.to(dtype) for k, v in pl_inputs(B, C, H, W, D, seed=2).items()}
    got = run(backend.name, backend.device, t, kind, w_strided)
    ref = run("reference", backend.device, t, kind, w_strided)
    want = truth(backend.device, t)
    for name, g, r, w in zip(NAMES, got, ref, want):
        assert g.dtype == dtype
        within_twice(name, g, r, w, floor + interpreter_rounding(backend, dtype))


@pytest.mark.parametrize("backend", backend_params())
def test_pool_linear_channels_last_mixed_and_deterministic(backend):
    """bf16 channels_last map with fp32 weights (autocast-style): fp32 mean, fp32 GEMM, one bf16 rounding; the
    channels_last and NCHW kernels agree, and reruns are bit-identical."""
    t = pl_inputs(9, 45, 7, 7, 13, seed=3)
    x = t["x"].to(backend.device, torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = (t[k].to(backend.device, torch.float32).requires_grad_() for k in ("w", "b"))
    go = t["gout"].to(backend.device, torch.bfloat16)
    out = HF.pool_linear(x, w, b, backend=backend.name)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), grad_outputs=go)
    d = lambda v: v.detach().double().requires_grad_()  # noqa: E731
    dx, dw, db = d(x), d(w), d(b)
    want = HF.pool_linear(dx, dw, db, backend="reference")
    wgx, wgw, wgb = torch.autograd.grad(want, (dx, dw, db), grad_outputs=go.double())
    assert out.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    rtol = single_rounding_rtol(torch.bfloat16) + interpreter_rounding(backend, torch.bfloat16)
    assert_close("out", out, want, rtol)
    assert_close("grad x", gx, wgx, rtol, atol=1e-7)
    assert_close("grad w", gw, wgw, 1e-5)  # fp32 weights: fp32 GEMM of fp32 pooled values
    assert_close("grad b", gb, wgb, 1e-5)
    assert torch.equal(out, HF.pool_linear(x, w, b, backend=backend.name))
    assert_close("nchw", HF.pool_linear(x.contiguous(), w, b, backend=backend.name), out, rtol)


@pytest.mark.parametrize("backend,B,C,H,W,D", over_backends(
    [(4, 24, 7, 7, 16)], gpu_cases=[(128, 256, 7, 7, 512)], jit_gpu_cases=[(128, 256, 7, 7, 512)]))
def test_pool_linear_deterministic(backend, B, C, H, W, D):
    t = pl_inputs(B, C, H, W, D)
    a, b = (run(backend.name, backend.device, t, dtype=torch.float32) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("backend,shape", over_backends([((2, 3, 2, 3, 4),), ((2, 3, 3, 2, 4),)]))
def test_pool_linear_gradcheck_fp64(backend, shape):
    """Full Jacobian in float64: channels_last map, W a transposed-storage view."""
    t = {k: v.to(backend.device) for k, v in pl_inputs(*shape, seed=1).items()}
    x = t["x"].contiguous(memory_format=torch.channels_last).requires_grad_()
    fn = lambda x_, w_, b_: HF.pool_linear(x_, w_.t().contiguous().t(), b_, backend=backend.name)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, t["w"].requires_grad_(), t["b"].requires_grad_()), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params())
def test_pool_linear_fp64_exact(backend, float_args_as_fp32):
    """float64 in: out and every gradient equal the float64 reference to 1e-12 (pool_linear has no float
    scalar; this guards the fp64 accumulation of the spatial mean)."""
    t = pl_inputs(3, 7, 5, 3, 6, seed=4)
    for name, g, w in zip(NAMES, run(backend.name, backend.device, t, "nhwc", True), truth(backend.device, t)):
        assert_close(name, g, w, 1e-12, atol=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_pool_linear_opcheck(backend):
    """Schema, fake kernel and autograd registration of the backend's torch op, NCHW and channels_last."""
    ns = torch.ops.hcd_triton if backend.name == "triton" else torch.ops.hcd_fast
    t = {k: v.float().to(backend.device) for k, v in pl_inputs(3, 5, 2, 2, 6).items()}
    for x in (t["x"], t["x"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
        torch.library.opcheck(ns.pool_linear.default, (x.requires_grad_(), t["w"].requires_grad_(),
                                                       t["b"].requires_grad_()))


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_pool_linear_torch_compile_fullgraph(backend):
    """The custom op traces without a graph break (aot_eager: no codegen) and gives the eager gradients."""
    t = {k: v.float().to(backend.device) for k, v in pl_inputs(3, 4, 3, 3, 5, seed=4).items()}

    def f(x, w, b):
        pooled = HF.pool_linear(x, w, b, backend=backend.name)
        return (pooled * pooled).sum()

    def grads(fn):
        leaves = [t[k].clone().requires_grad_() for k in ("x", "w", "b")]
        out = fn(*leaves)
        out.backward()
        return [out.detach()] + [v.grad for v in leaves]

    eager = grads(f)
    torch._dynamo.reset()
    for name, c, e in zip(NAMES, grads(torch.compile(f, fullgraph=True, backend="aot_eager")), eager):
        assert_close(name, c, e, 1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(names=("triton",)))
def test_pool_linear_spatial_loop_and_poisoned_outputs(backend, monkeypatch):
    """Triton: BLOCK_HW = 4 < H*W = 15 (ragged spatial loop), every output buffer starts as NaN."""
    from hcd_fast.kernels import pool as kmod
    orig = kmod._blocks
    monkeypatch.setattr(kmod, "_blocks", lambda c, hw, bh=None: orig(c, hw, 4))
    t = pl_inputs(3, 5, 3, 5, 4)
    got = run(backend.name, backend.device, t, "sliced", dtype=torch.float32)
    for name, g, w in zip(NAMES, got, truth(backend.device, t)):
        assert_close(name, g, w, 1e-5, atol=1e-6)
