"""backend="cpu" cfm (csrc/cpu/cfm.cpp) against hcd_fast.reference.

Truth is the reference in float64 on the same values; inputs and weights are non-contiguous views, the
teacher inputs require grad (and must receive none), grad_output is random, fresh memory NaN-poisoned.
"""
import pytest
import torch

from hcd_fast import functional as HF
from hcd_fast.ops import cpp_ops
from helpers import assert_close


pytestmark = pytest.mark.usefixtures("poison_uninitialized")


def cfm_inputs(B, D, Dt, H, n, K, dtype=torch.float32, seed=0):
    """Leaves stored transposed; the op sees (B, D), (B, Dt), (H, D+Dt), (n*K, H) views."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).requires_grad_()

    hidden = n * K if H is None else H
    leaves = {
        "h": r(D, B), "ft": r(Dt, B), "w1": r(D + Dt, hidden, s=(D + Dt) ** -0.5), "b1": r(hidden, s=0.1),
        "w2": None if H is None else r(H, n * K, s=H ** -0.5), "b2": None if H is None else r(n * K, s=0.1),
        "zt": r(B, K),
    }
    grad_out = torch.randn(B, n, K, generator=g, dtype=torch.float64).to(dtype)
    return leaves, grad_out


def cfm_run(backend, leaves, grad_out, n, ls, lt):
    w2 = None if leaves["w2"] is None else leaves["w2"].t()
    out = HF.cfm(leaves["h"].t(), leaves["ft"].t(), leaves["w1"].t(), leaves["b1"], w2, leaves["b2"], leaves["zt"],
                 n, ls, lt, backend=backend)
    names = [k for k in ("h", "w1", "b1", "w2", "b2") if leaves[k] is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in names] + [leaves["ft"], leaves["zt"]],
                                grad_outputs=grad_out, allow_unused=True)
    assert grads[-2] is None and grads[-1] is None, "the teacher inputs must not receive gradient"
    return out.detach(), dict(zip(names, grads[:-2]))


def cfm_truth(leaves, grad_out, n, ls, lt):
    t = {k: None if v is None else v.detach().double().requires_grad_() for k, v in leaves.items()}
    return cfm_run("reference", t, grad_out.double(), n, ls, lt)


@pytest.mark.parametrize("B,D,Dt,H,n,K", [
    (1, 5, 3, 4, 1, 7), (3, 16, 24, None, 4, 7), (37, 24, 16, 32, 3, 37), (3, 64, 48, 48, 8, 100),
    (8, 512, 384, 384, 4, 100), (2, 8, 8, None, 2, 1001)])
def test_cfm_matches_reference(B, D, Dt, H, n, K):
    leaves, grad_out = cfm_inputs(B, D, Dt, H, n, K, seed=B + D + K)
    out, grads = cfm_run("cpu", leaves, grad_out, n, 0.7, 1.3)
    want_out, want_grads = cfm_truth(leaves, grad_out, n, 0.7, 1.3)
    assert out.shape == (B, n, K) and out.dtype == torch.float32
    assert_close("out", out, want_out, 1e-5)
    assert set(grads) == set(want_grads)
    for k in grads:
        assert_close(f"grad {k}", grads[k], want_grads[k], 1e-5)


@pytest.mark.parametrize("H", [None, 6])
def test_cfm_gradcheck_fp64(H):
    leaves, _ = cfm_inputs(3, 4, 5, H, 2, 7, dtype=torch.float64)
    ft, zt = leaves["ft"].detach().t(), leaves["zt"].detach()

    def f(h, w1, b1, *rest):
        w2, b2 = rest if rest else (None, None)
        return cpp_ops.cfm(h, ft, w1, b1, w2, b2, zt, 2, 0.5, 2.0)

    args = [leaves["h"].detach().t().requires_grad_(), leaves["w1"].detach().t().requires_grad_(), leaves["b1"]]
    if H is not None:
        args += [leaves["w2"].detach().t().requires_grad_(), leaves["b2"]]
    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [None, 64])
def test_cfm_low_precision(dtype, H):
    leaves, grad_out = cfm_inputs(16, 48, 32, H, 4, 100, dtype=dtype, seed=5)
    got, ref, want = (cfm_run("cpu", leaves, grad_out, 4, 1.0, 1.0), cfm_run("reference", leaves, grad_out, 4, 1.0, 1.0),
                      cfm_truth(leaves, grad_out, 4, 1.0, 1.0))
    assert got[0].dtype == dtype
    pairs = [("out", got[0], ref[0], want[0])] + [(f"grad {k}", got[1][k], ref[1][k], want[1][k]) for k in got[1]]
    for name, g, r, w in pairs:
        assert g.dtype == dtype
        err = (g.double() - w).abs().max().item()
        ref_err = (r.double() - w).abs().max().item()
        assert err <= 2 * ref_err + 1e-5 * w.abs().max().item(), f"{name}: {err:.3e} vs reference {ref_err:.3e}"


def test_cfm_opcheck():
    for H in (None, 6):
        leaves, _ = cfm_inputs(3, 4, 5, H, 2, 7)
        c = {k: None if v is None else v.detach().t().contiguous() if v.dim() == 2 and k != "zt" else v.detach()
             for k, v in leaves.items()}
        for k in ("h", "w1", "b1", "w2", "b2"):
            if c[k] is not None:
                c[k].requires_grad_()
        torch.library.opcheck(torch.ops.hcd_fast.cfm.default,
                              (c["h"], c["ft"], c["w1"], c["b1"], c["w2"], c["b2"], c["zt"], 2, 0.5, 2.0))
