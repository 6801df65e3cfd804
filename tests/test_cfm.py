"""cfm on every backend (tests/helpers.py: cpu, triton in the interpreter, triton-cuda and cuda on a GPU) against
hcd_fast.reference: fused sub-logits zf (B, n, K) and every gradient (h_s, W1, b1, W2, b2).

Truth is the reference in float64 on the same values, on the backend's device. Fresh memory is NaN-poisoned
(every test), grad_output is random, the teacher inputs require grad and must receive none, and the "strided"
layout feeds h_s, f_t, W1, W2 as transposed-storage views and z_t as a column slice.
"""
import pytest
import torch

from hcd_fast import functional as HF
from helpers import (ALL_DTYPES, UNIT_ROUNDOFF, assert_close, backend_params, interpreter_rounding, low_atol,
                     over_backends, within_twice)

pytestmark = pytest.mark.usefixtures("poison_uninitialized")
LEAVES = ("h", "w1", "b1", "w2", "b2")
NAMES = {"out": "zf", "h": "d h_s", "w1": "d W1", "b1": "d b1", "w2": "d W2", "b2": "d b2"}


def cfm_inputs(B, D, Dt, H, n, K, dtype=torch.float32, seed=0, w_scale=None, b_scale=0.1):
    """Values drawn in float64 (then rounded to dtype), on the CPU; H None: no hidden layer (W1: D+Dt -> n*K).
    Weights N(0, w_scale^2) (default 1 / fan-in), biases N(0, b_scale^2)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    width = n * K if H is None else H
    return {"h": r(B, D), "ft": r(B, Dt), "w1": r(width, D + Dt, s=w_scale or (D + Dt) ** -0.5),
            "b1": r(width, s=b_scale), "w2": None if H is None else r(n * K, H, s=w_scale or H ** -0.5),
            "b2": None if H is None else r(n * K, s=b_scale), "zt": r(B, K, s=2.0), "gout": r(B, n, K)}


def _strided(x, column_slice=False):
    """Same values, non-contiguous: a transposed-storage view, or (z_t) a column slice of a wider tensor."""
    if column_slice:
        return torch.cat([x, x], 1)[:, :x.shape[1]]
    return x.t().contiguous().t()


def run(name, device, t, n, ls, lt, layout="contiguous", dtype=None):
    """HF.cfm(backend=name) -> {"out": zf, leaf: its gradient}; dtype casts every input first (float64 truth)."""
    cast = (lambda v: v.to(device=device, dtype=dtype)) if dtype else (lambda v: v.to(device))
    leaves = {k: cast(t[k]).clone().requires_grad_() for k in LEAVES if t[k] is not None}
    ft, zt = cast(t["ft"]).clone().requires_grad_(), cast(t["zt"]).clone().requires_grad_()
    a = dict(leaves, ft=ft, zt=zt, w2=leaves.get("w2"), b2=leaves.get("b2"))
    if layout == "strided":
        a.update({k: _strided(a[k]) for k in ("h", "ft", "w1", "w2") if a[k] is not None}, zt=_strided(zt, True))
        assert not a["w1"].is_contiguous()  # (h_s, f_t, z_t too, unless B = 1)
    out = HF.cfm(a["h"], a["ft"], a["w1"], a["b1"], a["w2"], a["b2"], a["zt"], n, ls, lt, backend=name)
    grads = torch.autograd.grad(out, list(leaves.values()) + [ft, zt], grad_outputs=cast(t["gout"]).to(out.dtype),
                                allow_unused=True)
    assert grads[-2] is None and grads[-1] is None, "the teacher inputs must not receive gradient"
    return dict(out=out.detach(), **dict(zip(leaves, grads[:-2])))


def truth(device, t, n, ls, lt):
    return run("reference", device, t, n, ls, lt, dtype=torch.float64)


# B, D, Dt, H, n, K, lambda_s, lambda_t, layout: B in {1, 3, 37}, odd sizes, K up to 1001, n in {1, 2, 3, 4, 8},
# no hidden layer (H None), lambda_t = 0, transposed / sliced inputs.
CASES = [
    (1, 5, 3, 4, 1, 7, 0.7, 1.3, "strided"), (3, 16, 24, None, 4, 7, 0.7, 1.3, "strided"),
    (37, 24, 16, 32, 3, 37, 0.7, 1.3, "strided"), (3, 64, 48, 48, 8, 100, 0.7, 1.3, "strided"),
    (8, 512, 384, 384, 4, 100, 0.7, 1.3, "strided"), (2, 8, 8, None, 2, 1001, 0.7, 1.3, "strided"),
    (1, 5, 7, 9, 1, 7, 1.0, 1.0, "contiguous"), (3, 20, 40, 33, 4, 37, 0.7, 1.3, "contiguous"),
    (37, 17, 19, None, 3, 5, 1.0, 1.0, "contiguous"), (3, 64, 48, 48, 2, 100, 0.5, 2.0, "contiguous"),
    (5, 8, 12, None, 8, 13, 1.5, 0.0, "contiguous"), (6, 9, 11, 24, 3, 19, 0.8, 1.1, "strided"),
    (6, 9, 11, None, 3, 19, 0.8, 1.1, "strided"),
]
GPU_CASES = [(128, 512, 384, 384, 4, 100, 0.7, 1.3, "strided"), (256, 768, 768, 768, 4, 1000, 1.0, 1.0, "contiguous")]
JIT_GPU_CASES = [CASES[7], CASES[8], CASES[11], GPU_CASES[1]]


# The fast lane (pytest -m "not slow") keeps the cases with a small CFM (B * (D + Dt) * n * K); the rest are slow.
FAST_CASES = [c for c in CASES if c[0] * (c[1] + c[2]) * c[4] * c[5] <= 20000]
SLOW_CASES = [c for c in CASES if c not in FAST_CASES]


@pytest.mark.parametrize("backend,B,D,Dt,H,n,K,ls,lt,layout", over_backends(FAST_CASES, GPU_CASES, JIT_GPU_CASES,
                                                                           slow_cases=SLOW_CASES))
def test_cfm_matches_reference(backend, B, D, Dt, H, n, K, ls, lt, layout):
    t = cfm_inputs(B, D, Dt, H, n, K, seed=B + D + K)
    got = run(backend.name, backend.device, t, n, ls, lt, layout)
    want = truth(backend.device, t, n, ls, lt)
    assert got["out"].shape == (B, n, K) and got["out"].dtype == torch.float32
    assert set(got) == set(want)
    for k in want:
        assert_close(NAMES[k], got[k], want[k], 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend,B,D,Dt,H,n,K,ls,lt", over_backends([
    (3, 4, 5, None, 2, 7, 0.5, 2.0), (3, 4, 5, 6, 2, 7, 0.5, 2.0), (2, 3, 4, 6, 2, 3, 0.7, 1.3),
    (2, 3, 4, None, 2, 3, 0.7, 1.3)]))
def test_cfm_gradcheck_fp64(backend, B, D, Dt, H, n, K, ls, lt):
    """Full Jacobian in float64 (Triton: the same tl.dot kernels, fp64 accumulation), transposed-storage inputs."""
    t = {k: None if v is None else v.to(backend.device) for k, v in
         cfm_inputs(B, D, Dt, H, n, K, torch.float64, seed=1).items()}
    ft, zt = _strided(t["ft"]), t["zt"]

    def f(h, w1, b1, *rest):
        w2, b2 = rest if rest else (None, None)
        return HF.cfm(_strided(h), ft, _strided(w1), b1, w2 if w2 is None else _strided(w2), b2, zt, n, ls, lt,
                      backend=backend.name)

    args = [t[k].clone().requires_grad_() for k in LEAVES if t[k] is not None]
    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7)


# B, D, Dt, H, n, K, lambda_s, lambda_t, layout, weight scale (None: 1 / fan-in, biases 0.1; else unit biases:
# the Triton files' inputs), seed, floor (relative to the largest |value|: 1e-5 from the C++ files, 1e-6 from the
# Triton ones). Seed 3 for the unit-bias case: at seed 2 one hidden pre-activation lies within a bf16 rounding
# of 0, so a backend whose (correctly rounded) hidden value lands on the other side of the ReLU than the
# reference's differs by a whole hidden unit's gradient: ill-conditioned, not a defect.
LOW_CASES = [(16, 48, 32, None, 4, 100, 1.0, 1.0, "contiguous", None, 5, 1e-5),
             (16, 48, 32, 64, 4, 100, 1.0, 1.0, "strided", None, 5, 1e-5),
             (5, 32, 48, 40, 4, 10, 1.0, 1.0, "contiguous", 0.3, 3, 1e-6)]
LOW_GPU_CASES = [(3, 16, 24, None, 4, 7, 0.7, 1.3, "strided", None, 5, 1e-5),
                 (37, 24, 16, 32, 3, 37, 0.7, 1.3, "strided", None, 5, 1e-5),
                 (128, 512, 384, 384, 4, 100, 0.7, 1.3, "strided", None, 5, 1e-5)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,B,D,Dt,H,n,K,ls,lt,layout,w_scale,seed,floor", over_backends(
    LOW_CASES, LOW_GPU_CASES, jit_gpu_cases=[(128, 256, 384, 384, 4, 100, 1.0, 1.0, "contiguous", 0.3, 2, 1e-6)]))
def test_cfm_low_precision(backend, B, D, Dt, H, n, K, ls, lt, layout, w_scale, seed, floor, dtype):
    """bf16/fp16 in, same dtype out, within twice the reference's own error in that dtype (plus ``floor`` and,
    in the Triton interpreter, its bf16 truncation: helpers.interpreter_rounding)."""
    t = cfm_inputs(B, D, Dt, H, n, K, dtype, seed=seed, w_scale=w_scale, b_scale=1.0 if w_scale else 0.1)
    got = run(backend.name, backend.device, t, n, ls, lt, layout)
    ref = run("reference", backend.device, t, n, ls, lt, layout)
    want = truth(backend.device, t, n, ls, lt)
    for k in want:
        assert got[k].dtype == dtype
        within_twice(NAMES[k], got[k], ref[k], want[k], floor + interpreter_rounding(backend, dtype))


# Rounding points, all dtypes. Pre-activations are kept away from 0 (b1 = +-1 exactly, |u W1^T| < 0.5: entries of
# u W1^T are N(0, 0.1^2)), so the ReLU mask is the same in every precision and the comparisons measure rounding only.
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


def rounding_inputs(device, B, D, Dt, H, n, K, act_dtype, param_dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dtype=act_dtype, scale=1.0, grad=True):
        v = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)
        return v.requires_grad_(grad)

    hid = n * K if H is None else H
    h, ft = r(B, D), r(B, Dt, grad=False)
    w1 = r(hid, D + Dt, dtype=param_dtype, scale=0.1 * (D + Dt) ** -0.5)
    signs = torch.randint(0, 2, (hid,), generator=g, dtype=torch.float64) * 2 - 1
    b1 = signs.to(device, param_dtype).requires_grad_()
    w2 = None if H is None else r(n * K, H, dtype=param_dtype, scale=H ** -0.5)
    b2 = None if H is None else r(n * K, dtype=param_dtype, scale=0.1)
    zt = r(B, K, grad=False)
    return h, ft, w1, b1, w2, b2, zt


def rounding_run(name, n, h, ft, w1, b1, w2, b2, zt, go, autocast_dtype=None):
    leaves = [t for t in (h, w1, b1, w2, b2) if t is not None]
    with torch.autocast(h.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = HF.cfm(h, ft, w1, b1, w2, b2, zt, n, 0.7, 1.3, backend=name)
    return (out.detach(),) + torch.autograd.grad(out, leaves, grad_outputs=go.to(out.dtype))


def rounding_truth(n, h, ft, w1, b1, w2, b2, zt, go):
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    return rounding_run("reference", n, d(h), ft.double(), d(w1), d(b1), d(w2), d(b2), zt.double(), go.double())


def cfm_emulated(n, h, ft, w1, b1, w2, b2, zt, out_dtype):
    """The forward's rounding points in fp64 (see above); g = the activation (student feature) dtype."""
    gd = h.dtype
    r = lambda t: t.detach().to(gd).double()  # noqa: E731
    u = torch.cat([r(h), r(ft)], dim=1)
    if w2 is None:
        z = u @ r(w1).t() + b1.detach().double()  # one GEMM, its fp32 output + b1 in the fusion epilogue
    else:
        hidden = torch.relu(u @ r(w1).t() + r(b1)).to(gd).double()
        z = hidden @ r(w2).t() + b2.detach().double()
    batch, num_classes = zt.shape
    zf = 0.7 * z.view(batch, n, num_classes) + 1.3 * zt.to(out_dtype).double()[:, None, :]
    return zf.to(out_dtype).double()


def emulation_rtol(gemm_dtype, out_dtype):
    return 2 * UNIT_ROUNDOFF.get(gemm_dtype, 0.0) + UNIT_ROUNDOFF.get(out_dtype, 0.0) + 1e-4


# B = 1 and B = 3 (B = 1: cuBLASLt is skipped, GEMM + epilogue kernel), odd D, Dt, H, K, no W2 (z = W1 u + b1),
# and a larger one (GPU only: slow in the Triton interpreter).
ROUNDING_SHAPES = [(1, 16, 24, 32, 4, 7), (3, 13, 11, None, 3, 5), (37, 24, 16, 33, 3, 37), (5, 7, 9, 5, 2, 3)]
ROUNDING_GPU_SHAPES = [(128, 512, 384, 384, 4, 100)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("backend,B,D,Dt,H,n,K", over_backends(ROUNDING_SHAPES, ROUNDING_GPU_SHAPES,
                                                                ROUNDING_SHAPES[:2]))
def test_cfm_dtypes(backend, B, D, Dt, H, n, K, dtype):
    """Every input in one dtype: bf16/fp16 run the GEMMs in that dtype (tensor cores on the GPU), one rounding
    of the output; forward and gradients against the fp64 truth, the forward against the rounding emulation."""
    inputs = rounding_inputs(backend.device, B, D, Dt, H, n, K, dtype, dtype, seed=B + D + K)
    go = torch.randn(B, n, K, generator=torch.Generator().manual_seed(B), dtype=torch.float64).to(backend.device, dtype)
    got = rounding_run(backend.name, n, *inputs, go)
    want = rounding_truth(n, *inputs, go)
    assert got[0].dtype == dtype
    for i, (gt, w_) in enumerate(zip(got, want)):
        assert_close(f"cfm output {i}", gt, w_, cfm_rtol(dtype), atol=low_atol(dtype))
    if dtype in UNIT_ROUNDOFF:
        assert_close("cfm forward (emulated)", got[0], cfm_emulated(n, *inputs, dtype), emulation_rtol(dtype, dtype))


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,B,D,Dt,H,n,K", over_backends(ROUNDING_SHAPES, ROUNDING_GPU_SHAPES,
                                                                ROUNDING_SHAPES[:2]))
def test_cfm_autocast_fp32_weights(backend, B, D, Dt, H, n, K, act_dtype):
    """Under torch.autocast with fp32 parameters and low-precision features (what the trainer runs): the
    forward's GEMMs run in the activation dtype, like the backward's; forward and every gradient against the
    fp64 truth, the forward against the emulation of its rounding points, and bit-identical reruns."""
    inputs = rounding_inputs(backend.device, B, D, Dt, H, n, K, act_dtype, torch.float32, seed=3 * B + D)
    go = torch.randn(B, n, K, generator=torch.Generator().manual_seed(B + 1), dtype=torch.float64)
    go = go.to(backend.device, torch.float32)
    got = rounding_run(backend.name, n, *inputs, go, autocast_dtype=act_dtype)
    want = rounding_truth(n, *inputs, go)
    for i, (gt, w_) in enumerate(zip(got, want)):
        assert_close(f"cfm output {i}", gt, w_, cfm_rtol(act_dtype), atol=low_atol(act_dtype))
    out_dtype = got[0].dtype
    assert_close("cfm forward (emulated)", got[0], cfm_emulated(n, *inputs, out_dtype),
                 emulation_rtol(act_dtype, out_dtype))
    again = rounding_run(backend.name, n, *inputs, go, autocast_dtype=act_dtype)
    for gt, ag in zip(got, again):
        assert torch.equal(gt, ag)  # deterministic run to run


@pytest.mark.parametrize("backend,B,D,Dt,H,n,K", over_backends(
    [(37, 24, 16, 32, 3, 37), (5, 8, 12, None, 8, 13)], gpu_cases=[(128, 256, 384, 384, 4, 100)],
    jit_gpu_cases=[(128, 256, 384, 384, 4, 100)]))
def test_cfm_deterministic(backend, B, D, Dt, H, n, K):
    t = cfm_inputs(B, D, Dt, H, n, K, seed=3)
    a, b = (run(backend.name, backend.device, t, n, 1.0, 1.0) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("H", [None, 6])
def test_cfm_fp64_scalars_exact(backend, H, float_args_as_fp32):
    """float64 in: lambda_s, lambda_t not representable in fp32 (0.3, 0.7) reach the kernels in fp64 (a compiled
    Triton kernel takes a Python float as an fp32 parameter: ~1e-8 relative error), so zf equals the float64
    reference to 1e-12. In the interpreter, float arguments are made fp32 as on the GPU (conftest.py)."""
    t = cfm_inputs(5, 7, 9, H, 3, 11, torch.float64, seed=6)
    got = run(backend.name, backend.device, t, 3, 0.3, 0.7)
    want = truth(backend.device, t, 3, 0.3, 0.7)
    for k in want:
        assert_close(NAMES[k], got[k], want[k], 1e-12, atol=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_cfm_torch_compile_fullgraph(backend):
    """The custom op traces without a graph break (aot_eager: no codegen) and gives the eager gradients."""
    t = {k: v.to(backend.device) for k, v in cfm_inputs(3, 8, 6, 10, 2, 5, seed=7).items()}

    def f(h, w1, b1, w2, b2):
        return HF.cfm(h, t["ft"], w1, b1, w2, b2, t["zt"], 2, 0.5, 1.5, backend=backend.name)

    def grads(fn):
        leaves = [t[k].clone().requires_grad_() for k in LEAVES]
        out = fn(*leaves)
        out.backward(t["gout"])
        return [out.detach()] + [x.grad for x in leaves]

    eager = grads(f)
    torch._dynamo.reset()
    for i, (c, e) in enumerate(zip(grads(torch.compile(f, fullgraph=True, backend="aot_eager")), eager)):
        assert_close(f"output/grad {i}", c, e, 1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_cfm_opcheck(backend):
    """Schema, fake kernel and autograd registration of the backend's torch op, with and without W2."""
    ns = torch.ops.hcd_triton if backend.name == "triton" else torch.ops.hcd_fast
    for H in (None, 6):
        t = {k: None if v is None else v.to(backend.device) for k, v in cfm_inputs(3, 4, 5, H, 2, 7).items()}
        for k in LEAVES:
            if t[k] is not None:
                t[k].requires_grad_()
        torch.library.opcheck(ns.cfm.default, (t["h"], t["ft"], t["w1"], t["b1"], t["w2"], t["b2"], t["zt"], 2, 0.5,
                                               2.0))


# ------------------------------------------------------------------ stacked stages (HCDLoss's layout)
def stacked_inputs(S, B, D, Dt, H, n, K, dtype=torch.float64, seed=0):
    """h (S, B, D) and the weights of S different CFMs stacked (S, ...); f_t, z_t shared."""
    per = [cfm_inputs(B, D, Dt, H, n, K, dtype, seed=seed + s) for s in range(S)]
    t = {k: None if per[0][k] is None else torch.stack([p[k] for p in per]) for k in ("h",) + LEAVES[1:]}
    t.update(ft=per[0]["ft"], zt=per[0]["zt"], gout=torch.stack([p["gout"] for p in per]))
    return t


def run_stacked(name, device, t, n, ls, lt, dtype=None, autocast=None):
    cast = (lambda v: v.to(device=device, dtype=dtype)) if dtype else (lambda v: v.to(device))
    leaves = {k: cast(t[k]).clone().requires_grad_() for k in LEAVES if t[k] is not None}
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = HF.cfm(leaves["h"], cast(t["ft"]), leaves["w1"], leaves["b1"], leaves.get("w2"), leaves.get("b2"),
                     cast(t["zt"]), n, ls, lt, backend=name)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=cast(t["gout"]).to(out.dtype))
    return dict(out=out.detach(), **dict(zip(leaves, grads)))


@pytest.mark.parametrize("backend,S,B,D,Dt,H,n,K,ls,lt", over_backends(
    [(4, 3, 8, 6, 10, 4, 7, 0.7, 1.3), (3, 5, 7, 9, None, 2, 11, 1.0, 1.0), (1, 2, 5, 4, 6, 3, 5, 1.0, 0.0),
     (2, 1, 4, 3, 5, 1, 9, 0.5, 2.0)], gpu_cases=[(4, 256, 768, 768, 768, 4, 1000, 1.0, 1.0)],
    reference=True))
def test_cfm_stacked_stages_match_per_stage_reference(backend, S, B, D, Dt, H, n, K, ls, lt):
    """The S stages in one call (h (S, B, D), stacked weights -> (S, B, n, K)) equal S separate one-stage
    reference calls, forward and every gradient (float64 truth), on every backend and on the reference."""
    t = stacked_inputs(S, B, D, Dt, H, n, K, torch.float64, seed=S + B + K)
    got = run_stacked(backend.name, backend.device, t, n, ls, lt, dtype=torch.float32)
    assert got["out"].shape == (S, B, n, K) and got["out"].dtype == torch.float32
    for s in range(S):
        one = {k: None if v is None or k in ("ft", "zt") else v[s] for k, v in t.items()}
        one.update(ft=t["ft"], zt=t["zt"])
        want = truth(backend.device, one, n, ls, lt)
        assert set(want) | {"out"} == set(got)
        for k in want:
            assert_close(f"stage {s} {NAMES[k]}", got[k][s], want[k], 1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_cfm_stacked_autocast_matches_per_stage(backend):
    """Under bf16 autocast with fp32 weights the stacked call rounds exactly as the one-stage calls do: the same
    GEMM dtypes and epilogues, stage by stage (equal up to the summation order of the GEMMs)."""
    S, B, D, Dt, H, n, K = 3, 5, 16, 12, 24, 4, 9
    t = stacked_inputs(S, B, D, Dt, H, n, K, torch.float32, seed=11)
    got = run_stacked(backend.name, backend.device, t, n, 0.7, 1.3, autocast=torch.bfloat16)
    for s in range(S):
        leaves = {k: t[k][s].to(backend.device).clone().requires_grad_() for k in LEAVES}
        with torch.autocast(backend.device, dtype=torch.bfloat16):
            out = HF.cfm(leaves["h"], t["ft"].to(backend.device), leaves["w1"], leaves["b1"], leaves["w2"],
                         leaves["b2"], t["zt"].to(backend.device), n, 0.7, 1.3, backend=backend.name)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=t["gout"][s].to(backend.device))
        assert got["out"].dtype == out.dtype
        assert_close(f"stage {s} zf", got["out"][s], out.detach(), 2 * UNIT_ROUNDOFF[torch.bfloat16])
        for k, g in zip(leaves, grads):
            assert got[k].dtype == g.dtype == torch.float32
            assert_close(f"stage {s} {NAMES[k]}", got[k][s], g, 2 * UNIT_ROUNDOFF[torch.bfloat16])


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_cfm_stacked_gradcheck_fp64(backend):
    t = {k: None if v is None else v.to(backend.device) for k, v in stacked_inputs(2, 3, 4, 5, 6, 2, 3).items()}

    def f(h, w1, b1, w2, b2):
        return HF.cfm(h, t["ft"], w1, b1, w2, b2, t["zt"], 2, 0.7, 1.3, backend=backend.name)

    args = tuple(t[k].clone().requires_grad_() for k in LEAVES)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_cfm_stacked_opcheck(backend):
    ns = torch.ops.hcd_triton if backend.name == "triton" else torch.ops.hcd_fast
    for H in (None, 6):
        t = {k: None if v is None else v.to(backend.device).float()
             for k, v in stacked_inputs(3, 3, 4, 5, H, 2, 7).items()}
        for k in LEAVES:
            if t[k] is not None:
                t[k].requires_grad_()
        torch.library.opcheck(ns.cfm.default, (t["h"], t["ft"], t["w1"], t["b1"], t["w2"], t["b2"], t["zt"], 2, 0.5,
                                               2.0))


def test_cfm_stacked_shape_errors():
    t = stacked_inputs(2, 3, 4, 5, 6, 2, 7, torch.float32)
    with pytest.raises(ValueError, match=r"weight1: expected a 3-d tensor, got shape \(6, 9\)"):
        HF.cfm(t["h"], t["ft"], t["w1"][0], t["b1"], t["w2"], t["b2"], t["zt"], 2)
    with pytest.raises(ValueError, match=r"bias2: expected shape \(2, 14\)"):
        HF.cfm(t["h"], t["ft"], t["w1"], t["b1"], t["w2"], t["b2"][:1], t["zt"], 2)
    with pytest.raises(ValueError, match="student_feat: expected a 2-d"):
        HF.cfm(t["h"][None], t["ft"], t["w1"], t["b1"], t["w2"], t["b2"], t["zt"], 2)


# ------------------------------------------------------------------ the backward op (cfm_backward)
def _cfm_backward_args(device, S, B, D, Dt, H, n, K, dtype, seed=0):
    """Inputs of torch.ops.hcd_fast.cfm_backward as the autograd of ``cfm`` passes them (hidden from the forward)."""
    t = stacked_inputs(S, B, D, Dt, H, n, K, torch.float64, seed=seed)
    c = {k: None if v is None else v.to(device, dtype) for k, v in t.items()}
    _, hidden = torch.ops.hcd_fast.cfm(c["h"], c["ft"], c["w1"], c["b1"], c["w2"], c["b2"], c["zt"], n, 0.7, 1.3)
    return c, hidden


@pytest.mark.parametrize("backend", backend_params(["cpu", "cuda"]))
@pytest.mark.parametrize("H", [None, 6])
def test_cfm_backward_opcheck(backend, H):
    """The backward op's schema, fake kernel and outputs (dtypes, (0,) for the gradients not asked for)."""
    c, hidden = _cfm_backward_args(backend.device, 2, 3, 4, 5, H, 2, 7, torch.float32)
    op = torch.ops.hcd_fast.cfm_backward.default
    for mask in ([True] * 5, [True, False, True, False, True], [False, True, False, True, False]):
        mask = mask if H is not None else mask[:3] + [False, False]
        args = (c["gout"], c["h"], c["ft"], c["w1"], c["w2"], hidden, 0.7, torch.float32,
                None if H is None else torch.float32, mask)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        out = op(*args)
        for g, need in zip(out, mask):
            assert g.is_contiguous() and g.dtype == torch.float32 and (g.numel() > 0) == need


@pytest.mark.parametrize("backend", backend_params(["cpu", "triton", "cuda"]))
@pytest.mark.parametrize("leaf", ["h", "w2", "b1"])
def test_cfm_gradient_subsets(backend, leaf):
    """Only some leaves require grad (frozen weights, or a frozen student): the asked-for gradient is right."""
    t = cfm_inputs(5, 6, 7, 9, 2, 5, seed=4)
    got, want = {}, {}
    for name, dev, dt, into in ((backend.name, backend.device, torch.float32, got),
                                ("reference", backend.device, torch.float64, want)):
        a = {k: None if v is None else v.to(dev, dt) for k, v in t.items()}
        a[leaf].requires_grad_()
        out = HF.cfm(a["h"], a["ft"], a["w1"], a["b1"], a["w2"], a["b2"], a["zt"], 2, 0.7, 1.3, backend=name)
        into[leaf], = torch.autograd.grad(out, [a[leaf]], grad_outputs=a["gout"].to(out.dtype))
    assert_close(NAMES[leaf], got[leaf], want[leaf], 1e-5)


# The CUDA backward (csrc/cuda/cfm.cu, cfm_backward) runs dW2/db2 and da/db1 as cuBLASLt GEMMs with the BGRADB and
# DRELU_BGRAD epilogues for bf16/fp16 with a hidden layer; sizes cuBLASLt has no algorithm for keep the ATen
# sequence, GEMM by GEMM. S, B, D, Dt, H, n, K, epilogue: aligned sizes (multiples of 8 elements) must take the
# epilogues (True); odd ones (H = 37: 74-byte rows; B = 1 or H = 1: sizes cuBLASLt is not used for) may take
# either path (None) and must be as right.
EPILOGUE_CASES = [(4, 64, 64, 64, 128, 4, 16, True), (1, 32, 48, 16, 64, 2, 8, True), (4, 256, 64, 32, 200, 2, 8, True),
                  (4, 37, 24, 16, 37, 3, 37, None), (3, 5, 9, 7, 33, 2, 5, None), (2, 1, 8, 8, 16, 2, 8, None),
                  (2, 6, 8, 8, 1, 2, 8, None)]


def epilogue_inputs(S, B, D, Dt, H, n, K, seed):
    """Stacked inputs (float64) whose hidden pre-activations stay away from 0 (b1 = +-1, |u W1^T| < 0.5, as in
    ``rounding_inputs``): the ReLU mask is the same in every precision, so the comparisons measure rounding."""
    t = stacked_inputs(S, B, D, Dt, H, n, K, torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    t["w1"] = t["w1"] * 0.1
    t["b1"] = torch.randint(0, 2, t["b1"].shape, generator=g, dtype=torch.float64) * 2 - 1
    return t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,S,B,D,Dt,H,n,K,epilogue", over_backends(EPILOGUE_CASES, names=["cuda"]))
def test_cfm_backward_epilogues_match_reference(backend, S, B, D, Dt, H, n, K, epilogue, dtype):
    """Stacked stages in bf16/fp16 (inputs, weights and biases: the epilogue path), against the float64 truth on
    the same rounded values: within twice the reference's own error in that dtype, forward and every gradient."""
    from hcd_fast import _C

    t = {k: v.to(dtype) for k, v in epilogue_inputs(S, B, D, Dt, H, n, K, seed=S + B + H).items()}
    before = _C.cfm_backward_epilogue_calls()
    got = run_stacked(backend.name, backend.device, t, n, 0.7, 1.3)
    calls = _C.cfm_backward_epilogue_calls() - before
    if epilogue:
        assert calls == 1, "the aligned bf16/fp16 backward must run its GEMMs with the cuBLASLt epilogues"
    ref = run_stacked("reference", backend.device, t, n, 0.7, 1.3)
    want = run_stacked("reference", backend.device, t, n, 0.7, 1.3, dtype=torch.float64)
    for k in want:
        assert got[k].dtype == dtype and got[k].shape == want[k].shape
        within_twice(NAMES[k], got[k], ref[k], want[k], 1e-5)


@pytest.mark.parametrize("backend", backend_params(["cuda"]))
def test_cfm_backward_epilogues_autocast_deterministic(backend):
    """The epilogue path under bf16 autocast (fp32 master weights: the op sees their bf16 casts) gives the same
    bits run to run, bias gradients included, and the float64 truth within the bf16 bound of cfm_rtol."""
    from hcd_fast import _C

    t = {k: v.float() for k, v in epilogue_inputs(4, 64, 64, 64, 128, 4, 16, seed=7).items()}
    before = _C.cfm_backward_epilogue_calls()
    a, b = (run_stacked(backend.name, backend.device, t, 4, 0.7, 1.3, autocast=torch.bfloat16) for _ in range(2))
    assert _C.cfm_backward_epilogue_calls() - before == 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    want = run_stacked("reference", backend.device, t, 4, 0.7, 1.3, dtype=torch.float64)
    for k in want:
        assert a[k].dtype == torch.float32
        assert_close(NAMES[k], a[k], want[k], cfm_rtol(torch.bfloat16), atol=low_atol(torch.bfloat16))
