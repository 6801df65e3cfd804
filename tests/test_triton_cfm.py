"""Triton cfm vs hcd_fast.reference: fused sub-logits and every gradient (h_s, W1, b1, W2, b2).

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


def cfm_inputs(B, D, Dt, hidden, n, K, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale
    width = hidden if hidden is not None else n * K
    tensors = dict(h=r(B, D), f=r(B, Dt), w1=r(width, D + Dt, scale=0.3), b1=r(width), zt=r(B, K, scale=2.0),
                   w2=r(n * K, hidden, scale=0.3) if hidden else None, b2=r(n * K) if hidden else None,
                   gout=r(B, n, K))
    return {k: (v.to(device=device, dtype=dtype) if v is not None else None) for k, v in tensors.items()}


def run(backend, t, n, ls, lt, transform=None):
    leaves = {k: (t[k].detach().clone().requires_grad_() if t[k] is not None else None)
              for k in ("h", "w1", "b1", "w2", "b2")}
    f, zt = t["f"].detach().clone().requires_grad_(), t["zt"].detach().clone().requires_grad_()
    args = dict(leaves, f=f, zt=zt)
    if transform is not None:
        args = transform(args)
    out = HF.cfm(args["h"], args["f"], args["w1"], args["b1"], args["w2"], args["b2"], args["zt"], n, ls, lt,
                 backend=backend)
    out.backward(t["gout"])
    assert f.grad is None and zt.grad is None  # the teacher gets no gradient
    return [out.detach()] + [leaves[k].grad for k in ("h", "w1", "b1", "w2", "b2") if leaves[k] is not None]


NAMES = ("zf", "d h_s", "d W1", "d b1", "d W2", "d b2")
CASES = [
    # B, D, Dt, hidden, n, K, lambda_s, lambda_t
    (1, 5, 7, 9, 1, 7, 1.0, 1.0),
    (3, 20, 40, 33, 4, 37, 0.7, 1.3),
    (37, 17, 19, None, 3, 5, 1.0, 1.0),
    (3, 64, 48, 48, 2, 100, 0.5, 2.0),
    (5, 8, 12, None, 8, 13, 1.5, 0.0),
]


def check(B, D, Dt, hidden, n, K, ls, lt, device="cpu", transform=None):
    t = cfm_inputs(B, D, Dt, hidden, n, K, torch.float32, device)
    want = run("reference", {k: (v.double() if v is not None else None) for k, v in t.items()}, n, ls, lt)
    got = run("triton", t, n, ls, lt, transform)
    assert got[0].shape == (B, n, K) and got[0].dtype == torch.float32
    for g, w, name in zip(got, want, NAMES):
        assert_close(g, w, what=name)


@pytest.mark.parametrize("B,D,Dt,hidden,n,K,ls,lt", CASES)
def test_cfm_matches_reference(B, D, Dt, hidden, n, K, ls, lt):
    check(B, D, Dt, hidden, n, K, ls, lt)


@pytest.mark.parametrize("hidden", [24, None])
def test_non_contiguous_inputs_and_poisoned_outputs(hidden, monkeypatch, poison_uninitialized):
    from hcd_fast.kernels import cfm as kmod

    def transform(a):
        # transposed storage for h_s, f_t and W1, a column slice for z_t (same values)
        a = dict(a)
        a["h"] = a["h"].t().contiguous().t()
        a["f"] = a["f"].t().contiguous().t()
        a["w1"] = a["w1"].t().contiguous().t()
        a["zt"] = torch.cat([a["zt"], a["zt"]], 1)[:, :a["zt"].shape[1]]
        assert not (a["h"].is_contiguous() or a["w1"].is_contiguous() or a["zt"].is_contiguous())
        return a
    check(6, 9, 11, hidden, 3, 19, 0.8, 1.1, transform=transform)


def test_gradcheck_float64():
    """float64 runs through the same tl.dot kernels (fp64 accumulation) on the interpreter."""
    for hidden, fast in ((6, True), (None, False)):  # full Jacobian for the single GEMM, projections for two
        t = cfm_inputs(2, 3, 4, hidden, 2, 3, torch.float64, seed=1)
        if hidden:
            fn = lambda h, w1, b1, w2, b2: HF.cfm(h, t["f"], w1, b1, w2, b2, t["zt"], 2, 0.7, 1.3, backend="triton")
            inputs = [t[k].requires_grad_() for k in ("h", "w1", "b1", "w2", "b2")]
        else:
            fn = lambda h, w1, b1: HF.cfm(h, t["f"], w1, b1, None, None, t["zt"], 2, 0.7, 1.3, backend="triton")
            inputs = [t[k].requires_grad_() for k in ("h", "w1", "b1")]
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_reference_error(dtype):
    t = cfm_inputs(5, 32, 48, 40, 4, 10, dtype, seed=2)
    want = run("reference", {k: (v.double() if v is not None else None) for k, v in t.items()}, 4, 1.0, 1.0)
    ref = run("reference", t, 4, 1.0, 1.0)
    got = run("triton", t, 4, 1.0, 1.0)
    for g, r, w, name in zip(got, ref, want, NAMES):
        assert g.dtype == dtype
        ref_err = (r.double() - w).abs().max()
        err = (g.double() - w).abs().max()
        assert err <= 2 * ref_err + 1e-6 * w.abs().max(), f"{name}: {err:.3g} vs reference {ref_err:.3g}"


def test_torch_compile_fullgraph():
    t = cfm_inputs(3, 8, 6, 10, 2, 5)

    def f(h, w1, b1, w2, b2):
        return HF.cfm(h, t["f"], w1, b1, w2, b2, t["zt"], 2, 0.5, 1.5, backend="triton")

    def grads(fn):
        leaves = [t[k].clone().requires_grad_() for k in ("h", "w1", "b1", "w2", "b2")]
        out = fn(*leaves)
        out.backward(t["gout"])
        return [out.detach()] + [x.grad for x in leaves]

    for a, c in zip(grads(f), grads(torch.compile(f, fullgraph=True, backend="aot_eager"))):
        assert_close(c, a)


def test_opcheck_custom_op():
    t = cfm_inputs(3, 4, 5, 6, 2, 3)
    torch.library.opcheck(torch.ops.hcd_triton.cfm.default,
                          (t["h"], t["f"], t["w1"], t["b1"], t["w2"], t["b2"], t["zt"], 2, 0.5, 1.5))


# ---------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("B,D,Dt,hidden,n,K,ls,lt", [CASES[1], CASES[2], (256, 768, 768, 768, 4, 1000, 1.0, 1.0)])
def test_cuda_cfm(B, D, Dt, hidden, n, K, ls, lt):
    check(B, D, Dt, hidden, n, K, ls, lt, device="cuda")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(dtype):
    t = cfm_inputs(128, 256, 384, 384, 4, 100, dtype, device="cuda", seed=2)
    want = run("reference", {k: (v.double() if v is not None else None) for k, v in t.items()}, 4, 1.0, 1.0)
    ref = run("reference", t, 4, 1.0, 1.0)
    got = run("triton", t, 4, 1.0, 1.0)
    for g, r, w in zip(got, ref, want):
        assert (g.double() - w).abs().max() <= 2 * (r.double() - w).abs().max() + 1e-6 * w.abs().max()


@pytest.mark.cuda
@cuda
def test_cuda_deterministic():
    t = cfm_inputs(128, 256, 384, 384, 4, 100, device="cuda")
    a, b = run("triton", t, 4, 1.0, 1.0), run("triton", t, 4, 1.0, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
