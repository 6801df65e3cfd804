"""bn_relu_pool on every backend (tests/helpers.py: cpu, triton in the interpreter, triton-cuda and cuda on a GPU)
against hcd_fast.reference and nn.BatchNorm2d: output, running statistics, every gradient.

Truth is the reference in float64 on the same values, on the backend's device. Fresh memory is NaN-poisoned
(every test), grad_output is a random (B, C) tensor, and the map comes in every layout: NCHW, channels_last,
"sliced" (every other channel of a wider map, offset columns) and "strided" (every other column).
"""
import itertools

import pytest
import torch
import torch.nn as nn

from hcd_fast import functional as HF
from helpers import (ALL_DTYPES, MAP_SHAPES, assert_close, backend_params, interpreter_rounding, layout, low_atol,
                     over_backends, single_rounding_rtol, within_twice)

pytestmark = pytest.mark.usefixtures("poison_uninitialized")
NAMES = ("out", "d x", "d weight", "d bias", "running_mean", "running_var")


def bn_inputs(B, C, H, W, seed=0):
    """float64 values on the CPU: x (B, C, H, W) = N(0.5, 2^2), weight N(1, 0.3^2) or N(0, 1) (negative scales
    flip the ReLU side), bias N(0, 0.5^2), running stats, grad_output (B, C)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"x": r(B, C, H, W) * 2 + 0.5, "w": r(C), "b": r(C) * 0.5, "rm": r(C), "rv": r(C).abs() + 0.5,
            "gout": r(B, C)}


def run(name, device, t, training, momentum, kind="nchw", dtype=None, eps=1e-5):
    """HF.bn_relu_pool(backend=name) -> (out, d x, d weight, d bias, running_mean, running_var); dtype casts
    the inputs first (float64 truth); the map's gradient is taken in the map's own layout."""
    cast = lambda v: v.to(device=device, dtype=dtype or v.dtype).clone()  # noqa: E731  (never t's own tensors)
    x = layout(cast(t["x"]), kind).requires_grad_()
    w, b = cast(t["w"]).requires_grad_(), cast(t["b"]).requires_grad_()
    rm, rv = cast(t["rm"]), cast(t["rv"])
    out = HF.bn_relu_pool(x, w, b, rm, rv, training, momentum, eps, backend=name)
    out.backward(cast(t["gout"]).to(out.dtype))
    return out.detach(), x.grad, w.grad, b.grad, rm, rv


def truth(device, t, training, momentum, eps=1e-5):
    return run("reference", device, t, training, momentum, dtype=torch.float64, eps=eps)


# B, C, H, W, training, momentum, layout. Training needs more than one value per channel (and with two,
# x_hat = +-1 and d x cancels to ~0, which only measures rounding), so the smallest training shape has four.
CASES = [
    (1, 3, 2, 3, True, 0.3, "nhwc"), (1, 3, 1, 1, False, 0.3, "nhwc"), (3, 5, 4, 4, True, 0.3, "nhwc"),
    (3, 5, 4, 4, False, 0.3, "nhwc"), (37, 7, 3, 5, True, 0.3, "nhwc"), (37, 7, 3, 5, False, 0.3, "nhwc"),
    (2, 64, 8, 8, True, 0.3, "nhwc"), (4, 13, 1, 1, True, 0.3, "nhwc"), (4, 13, 1, 1, False, 0.3, "nhwc"),
    (37, 40, 1, 1, True, 0.3, "nhwc"), (5, 35, 1, 1, True, 0.3, "nhwc"), (5, 35, 1, 1, False, 0.3, "nhwc"),
    (1, 3, 2, 2, True, 0.1, "nchw"), (3, 5, 7, 7, True, 0.3, "nhwc"), (37, 4, 3, 5, False, 0.1, "nchw"),
    (4, 70, 5, 3, True, 0.1, "sliced"), (3, 6, 1, 1, True, 1.0, "nchw"), (2, 9, 4, 4, False, 0.1, "nhwc"),
]
GPU_CASES = [(37, 64, 8, 8, True, 0.3, "nhwc"), (37, 64, 8, 8, False, 0.3, "nhwc"),
             (128, 512, 1, 1, True, 0.3, "nhwc"), (128, 512, 1, 1, False, 0.3, "nhwc"),
             (256, 512, 7, 7, True, 0.1, "nhwc")]
JIT_GPU_CASES = [CASES[13], CASES[14], CASES[15], GPU_CASES[-1]]


# The fast lane (pytest -m "not slow") keeps the small maps; the larger ones are marked slow.
FAST_CASES = [c for c in CASES if c[0] * c[1] * c[2] * c[3] <= 1000 or c[6] == "sliced"]
SLOW_CASES = [c for c in CASES if c not in FAST_CASES]


@pytest.mark.parametrize("backend,B,C,H,W,training,momentum,kind", over_backends(FAST_CASES, GPU_CASES, JIT_GPU_CASES,
                                                                                slow_cases=SLOW_CASES))
def test_bn_relu_pool_matches_reference(backend, B, C, H, W, training, momentum, kind):
    t = bn_inputs(B, C, H, W, seed=B * C)
    got = run(backend.name, backend.device, t, training, momentum, kind, dtype=torch.float32)
    want = truth(backend.device, t, training, momentum)
    assert got[0].shape == (B, C) and got[0].dtype == torch.float32
    assert got[1].shape == (B, C, H, W) and got[1].dtype == torch.float32
    for name, g, w in zip(NAMES, got, want):
        assert_close(name, g, w, 1e-5)
    if not training:  # eval mode leaves the running statistics alone
        assert torch.equal(got[4], t["rm"].float().to(backend.device))
        assert torch.equal(got[5], t["rv"].float().to(backend.device))


# Memory formats x dtypes. Tolerances relative to the largest |value|, from the unit roundoff u of the output
# dtype: the kernels accumulate in fp32 (fp64 for fp64) and round each output once, plus fp32 summation error:
# rtol = 2u + 1e-4 (helpers.single_rounding_rtol); fp32 1e-5; fp64 1e-10.
# MAP_SHAPES (helpers.py): B = 1, H*W = 1 (and both: training must refuse it), odd C, several channel tiles,
# several row chunks of the channels_last reductions.
LAYOUTS = ["nchw", "nhwc", "strided"]
LAYOUT_CASES = [s + (kind, training, dtype) for s, kind, training, dtype in
                itertools.product(MAP_SHAPES[:5], LAYOUTS, [True, False], ALL_DTYPES)]
# The fast lane keeps one shape per layout, mode and dtype (the smallest maps rotate through them).
LAYOUT_FAST = [c for i, c in enumerate(LAYOUT_CASES) if i % 5 == 0]
LAYOUT_SLOW = [c for c in LAYOUT_CASES if c not in LAYOUT_FAST]
LAYOUT_BIG_CASES = [MAP_SHAPES[5] + (kind, training, dtype) for kind, training, dtype in
                    itertools.product(LAYOUTS, [True, False], ALL_DTYPES)]  # ~10 s each in the interpreter
LAYOUT_JIT_CASES = [s + (kind, True, dtype) for s, kind, dtype in
                    itertools.product([MAP_SHAPES[2], MAP_SHAPES[5]], ["nchw", "nhwc"],
                                      [torch.float32, torch.bfloat16])]


@pytest.mark.parametrize("backend,B,C,H,W,kind,training,dtype",
                         over_backends(LAYOUT_FAST, jit_gpu_cases=LAYOUT_JIT_CASES,
                                       compiled_cases=LAYOUT_BIG_CASES, slow_cases=LAYOUT_SLOW))
def test_bn_relu_pool_layouts_and_dtypes(backend, B, C, H, W, kind, training, dtype):
    """Every layout in every dtype: output, gradients (in the map's layout) and running statistics in the input
    dtype, each one rounding of an fp32 (fp64) result."""
    g = torch.Generator().manual_seed(1000 * B + 10 * C + H)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = {"x": r(B, C, H, W) * 2 + 0.5, "w": r(C) * 0.3 + 1.0, "b": r(C) * 0.5, "rm": r(C),
         "rv": r(C).abs() + 0.5, "gout": r(B, C)}
    t = {k: v.to(dtype).double() for k, v in t.items()}  # the values the op sees, exactly, for the truth
    if training and B * H * W == 1:  # as nn.BatchNorm2d: one value per channel has no batch variance
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            run(backend.name, backend.device, t, True, 0.3, kind, dtype=dtype)
        return
    got = run(backend.name, backend.device, t, training, 0.3, kind, dtype=dtype)
    want = truth(backend.device, t, training, 0.3)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for name, gt, wt in zip(NAMES, got, want):
        assert_close(name, gt, wt, single_rounding_rtol(dtype), atol=low_atol(dtype))


# B, C, H, W, training, momentum, layout, floor (relative to the largest |value|)
LOW_CASES = [(8, 16, 4, 4, True, 0.1, "nhwc", 1e-5), (8, 16, 4, 4, False, 0.1, "nhwc", 1e-5),
             (4, 6, 5, 5, True, 0.1, "nchw", 1e-6)]
LOW_GPU_CASES = [(3, 5, 4, 4, True, 0.3, "nhwc", 1e-5), (3, 5, 4, 4, False, 0.3, "nhwc", 1e-5),
                 (37, 64, 8, 8, True, 0.3, "nhwc", 1e-5), (37, 64, 8, 8, False, 0.3, "nhwc", 1e-5),
                 (128, 512, 1, 1, True, 0.3, "nhwc", 1e-5), (128, 512, 1, 1, False, 0.3, "nhwc", 1e-5)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,B,C,H,W,training,momentum,kind,floor", over_backends(
    LOW_CASES, LOW_GPU_CASES, jit_gpu_cases=[(64, 128, 14, 14, True, 0.1, "nchw", 1e-6)]))
def test_bn_relu_pool_low_precision(backend, B, C, H, W, training, momentum, kind, floor, dtype):
    """bf16/fp16 in and out, within twice the reference's own error in that dtype (plus, in the Triton
    interpreter, its bf16 truncation: helpers.interpreter_rounding)."""
    t = {k: v.to(dtype) for k, v in bn_inputs(B, C, H, W, seed=9).items()}
    got = run(backend.name, backend.device, t, training, momentum, kind)
    ref = run("reference", backend.device, t, training, momentum, kind)
    want = truth(backend.device, t, training, momentum)
    for name, g, r, w in zip(NAMES, got, ref, want):
        assert g.dtype == dtype
        within_twice(name, g, r, w, floor + interpreter_rounding(backend, dtype))


@pytest.mark.parametrize("backend", backend_params(reference=True))
def test_bn_relu_pool_running_stats_equal_batchnorm2d(backend):
    t = {k: v.float().to(backend.device) for k, v in bn_inputs(6, 8, 5, 5, seed=4).items()}
    bn = nn.BatchNorm2d(8, momentum=0.1).to(backend.device)
    with torch.no_grad():
        for name, key in (("running_mean", "rm"), ("running_var", "rv"), ("weight", "w"), ("bias", "b")):
            getattr(bn, name).copy_(t[key])
    bn.train()
    x = t["x"].contiguous(memory_format=torch.channels_last)
    want = torch.relu(bn(x)).mean((2, 3))
    mean, var = t["rm"].clone(), t["rv"].clone()
    got = HF.bn_relu_pool(x, t["w"], t["b"], mean, var, True, 0.1, bn.eps, backend=backend.name)
    assert_close("out", got, want.detach(), 1e-5)
    assert_close("running_mean", mean, bn.running_mean, 1e-6)
    assert_close("running_var", var, bn.running_var, 1e-6)


@pytest.mark.parametrize("backend", backend_params())
def test_bn_relu_pool_training_needs_two_values(backend):
    x = torch.randn(1, 3, 1, 1, device=backend.device)
    ones, zeros = torch.ones(3, device=backend.device), torch.zeros(3, device=backend.device)
    # nn.BatchNorm2d's error at the public boundary, for every backend ...
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        HF.bn_relu_pool(x, ones, zeros, zeros.clone(), ones.clone(), True, backend=backend.name)
    # ... and the compiled kernels' own check when their op is called directly (the Triton kernels keep only
    # memory-safety checks: their op is reached through the boundary).
    if backend.name in ("cpu", "cuda"):
        with pytest.raises(RuntimeError, match="more than 1 value per channel"):
            torch.ops.hcd_fast.bn_relu_pool_fwd(x, ones, zeros, zeros.clone(), ones.clone(), True, 0.1, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend,training,shape", over_backends(
    [(True, (2, 2, 2, 2)), (True, (3, 4, 3, 2)), (False, (3, 4, 3, 2))]))
def test_bn_relu_pool_gradcheck_fp64(backend, training, shape):
    """Full Jacobian in float64, channels_last input (in the Triton interpreter a random projection,
    fast_mode, beyond the smallest shape: a full one takes a minute there)."""
    t = {k: v.to(backend.device) for k, v in bn_inputs(*shape, seed=7).items()}

    def f(x, w, b):
        return HF.bn_relu_pool(x, w, b, t["rm"].clone(), t["rv"].clone(), training, 0.1, 1e-5, backend=backend.name)

    x = t["x"].contiguous(memory_format=torch.channels_last).requires_grad_()
    fast = backend.name == "triton" and backend.device == "cpu" and shape != (2, 2, 2, 2)
    assert torch.autograd.gradcheck(f, (x, t["w"].requires_grad_(), t["b"].requires_grad_()), eps=1e-6, atol=1e-7,
                                    fast_mode=fast)


@pytest.mark.parametrize("backend", backend_params())
def test_bn_relu_pool_fp64_scalars_exact(backend, float_args_as_fp32):
    """float64 in: momentum and eps not representable in fp32 (0.3) reach the kernels in fp64 (a compiled
    Triton kernel takes a Python float as an fp32 parameter: ~1e-8 relative error in the running statistics),
    so everything equals the float64 reference to 1e-12. In the interpreter, float arguments are made fp32 as
    on the GPU (conftest.py)."""
    t = bn_inputs(3, 5, 4, 4, seed=8)
    for training in (True, False):
        got = run(backend.name, backend.device, t, training, 0.3, "nhwc", eps=0.3)
        want = truth(backend.device, t, training, 0.3, eps=0.3)
        for name, g, w in zip(NAMES, got, want):
            assert_close(name, g, w, 1e-12, atol=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_bn_relu_pool_opcheck(backend):
    """Schema, fake kernel and autograd registration of the backend's op pair, both modes, NCHW and NHWC."""
    ns = torch.ops.hcd_triton if backend.name == "triton" else torch.ops.hcd_fast
    t = {k: v.float().to(backend.device) for k, v in bn_inputs(3, 5, 4, 4).items()}
    for x in (t["x"], t["x"].contiguous(memory_format=torch.channels_last)):
        for training in (True, False):
            torch.library.opcheck(ns.bn_relu_pool_fwd.default,
                                  (x, t["w"], t["b"], t["rm"].clone(), t["rv"].clone(), training, 0.1, 1e-5))
        _, mean, invstd = ns.bn_relu_pool_fwd(x, t["w"], t["b"], t["rm"].clone(), t["rv"].clone(), True, 0.1, 1e-5)
        torch.library.opcheck(ns.bn_relu_pool_bwd.default, (t["gout"], x, t["w"], t["b"], mean, invstd, True))


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_bn_relu_pool_torch_compile_fullgraph(backend):
    """The autograd.Function over the op pair traces without a graph break (aot_eager: no codegen); the
    in-place running-stat update survives functionalization."""
    t = {k: v.float().to(backend.device) for k, v in bn_inputs(3, 4, 3, 3, seed=4).items()}

    def f(x, w, b, rm, rv):
        return HF.bn_relu_pool(x, w, b, rm, rv, True, 0.1, 1e-5, backend=backend.name)

    def grads(fn):
        x, w, b = (t[k].clone().requires_grad_() for k in ("x", "w", "b"))
        rm, rv = t["rm"].clone(), t["rv"].clone()
        out = fn(x, w, b, rm, rv)
        out.backward(t["gout"])
        return out.detach(), x.grad, w.grad, b.grad, rm, rv

    eager = grads(f)
    torch._dynamo.reset()
    for name, c, e in zip(NAMES, grads(torch.compile(f, fullgraph=True, backend="aot_eager")), eager):
        assert_close(name, c, e, 1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,B,C,H,W,dtype", over_backends(
    [(4, 24, 7, 7, torch.float32), (4, 24, 7, 7, torch.bfloat16)],
    gpu_cases=[(16, 96, 14, 14, torch.float32), (16, 96, 14, 14, torch.bfloat16), (128, 256, 14, 14, torch.float32)],
    jit_gpu_cases=[(128, 256, 14, 14, torch.float32)]))
def test_bn_relu_pool_channels_last_deterministic(backend, B, C, H, W, dtype):
    """Two runs on channels_last input give identical bits; NCHW and channels_last agree to rounding."""
    t = {k: v.to(dtype) for k, v in bn_inputs(B, C, H, W, seed=7).items()}
    t["rm"], t["rv"] = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    first, second = (run(backend.name, backend.device, t, True, 0.1, "nhwc") for _ in range(2))
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    nchw = run(backend.name, backend.device, t, True, 0.1, "nchw")
    for name, a, c in zip(NAMES, first, nchw):
        assert_close(name, a, c, single_rounding_rtol(dtype), atol=low_atol(dtype))


@pytest.mark.parametrize("backend", backend_params(names=("triton",)))
@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_pool_spatial_loop_and_poisoned_outputs(backend, training, monkeypatch):
    """Triton: BLOCK_HW = 4 < H*W = 15 (ragged spatial loop), every output buffer starts as NaN."""
    from hcd_fast.kernels import pool as kmod
    orig = kmod._blocks
    monkeypatch.setattr(kmod, "_blocks", lambda c, hw, bh=None: orig(c, hw, 4))
    t = bn_inputs(3, 5, 3, 5)
    got = run(backend.name, backend.device, t, training, 0.1, "sliced", dtype=torch.float32)
    for name, g, w in zip(NAMES, got, truth(backend.device, t, training, 0.1)):
        assert_close(name, g, w, 1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(names=("cpu",)))
@pytest.mark.parametrize("H,W", [(1, 1), (3, 3)])
def test_bn_relu_pool_same_result_for_any_thread_count(backend, H, W):
    """The C++ CPU kernels split channels over threads: the result does not depend on how many."""
    t = {k: v.float() for k, v in bn_inputs(64, 1000, H, W, seed=12).items()}  # B*C*HW > 32768: several chunks
    threads = torch.get_num_threads()
    try:
        a = run(backend.name, "cpu", t, True, 0.1, "nhwc")
        torch.set_num_threads(1)
        b = run(backend.name, "cpu", t, True, 0.1, "nhwc")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
