"""backend="cuda" (csrc/cuda/*.cu) against hcd_fast.reference, on a CUDA device (run with ``pytest -m cuda``;
skipped without a GPU). Truth is the reference in float64 on the same values; inputs are non-contiguous,
grad_output != 1, and fresh CUDA memory is NaN-poisoned (fill_uninitialized_memory)."""
import copy

import pytest
import torch

import hcd_fast
from hcd_fast import HCDConfig, HCDLoss
from hcd_fast import functional as HF
from hcd_fast.ops import cpp_ops
from hcd_fast.reference import PART_NAMES
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


# --------------------------------------------------------------------------------------------------
# sub_logit_loss
# --------------------------------------------------------------------------------------------------
def sll_inputs(S, B, n, K, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(K, n, B, S, generator=g, dtype=torch.float64) * scale
    base = 0.6 * base + torch.randn(K, 1, B, S, generator=g, dtype=torch.float64) * scale
    sub = base.to(DEV, dtype).requires_grad_()
    zs = (torch.randn(K, B, generator=g, dtype=torch.float64) * scale).to(DEV, dtype).requires_grad_()
    zt = (torch.randn(B, K, generator=g, dtype=torch.float64) * scale).to(DEV, dtype)
    y = torch.randint(0, K, (B,), generator=g).to(DEV)
    return sub, zs, zt, y


def sll_run(backend, sub, zs, zt, y, cfg, grad_out):
    loss, parts = HF.sub_logit_loss(sub.permute(3, 2, 1, 0), zs.t(), zt, y, cfg, backend=backend)
    gs, gz = torch.autograd.grad(loss, (sub, zs), grad_outputs=torch.tensor(grad_out, dtype=loss.dtype, device=DEV))
    return loss.detach(), {k: v.clone() for k, v in parts.items()}, gs, gz


def sll_truth(sub, zs, zt, y, cfg, grad_out):
    return sll_run("reference", sub.detach().double().requires_grad_(), zs.detach().double().requires_grad_(),
                   zt.double(), y, cfg, grad_out)


SLL_CASES = [
    (1, 7, 1, 1, 1.0, "zero", False), (3, 37, 2, 4, 4.0, "none", True), (37, 100, 3, 1, 1.0, "large_negative", False),
    (3, 1000, 4, 4, 1.0, "zero", False), (37, 1001, 8, 4, 4.0, "zero", True), (2, 32768, 4, 2, 2.0, "none", False),
]


@pytest.mark.parametrize("B,K,n,S,T,mode,detach", SLL_CASES)
def test_sub_logit_loss_cuda(B, K, n, S, T, mode, detach):
    cfg = HCDConfig(num_sub_logits=n, temperature=T, gt_mask=mode, detach_sub_targets=detach, label_smoothing=0.2,
                    ortho_threshold=0.3, w_gt=0.7, w_kd=1.3, w_kl=2.5, w_ol=3.0)
    inputs = sll_inputs(S, B, n, K, seed=K + n)
    got = sll_run("cuda", *inputs, cfg, 0.37)
    want = sll_truth(*inputs, cfg, 0.37)
    assert got[0].dtype == torch.float32 and got[0].device.type == "cuda"
    assert_close("loss", got[0], want[0], 1e-5)
    for k in PART_NAMES:
        assert_close(k, got[1][k], want[1][k], 1e-5 if want[1][k].abs() > 1e-6 else 1.0)
    assert_close("grad sub_logits", got[2], want[2], 1e-5)
    assert_close("grad student_logits", got[3], want[3], 1e-5)


@pytest.mark.parametrize("K", [1000, 1001])  # 16-byte aligned rows (vector loads) or not
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sub_logit_loss_cuda_low_precision(dtype, K):
    cfg = HCDConfig(num_sub_logits=4, temperature=2.0)
    inputs = sll_inputs(4, 37, 4, K, dtype=dtype, seed=1)
    got, ref, want = sll_run("cuda", *inputs, cfg, 0.5), sll_run("reference", *inputs, cfg, 0.5), sll_truth(*inputs, cfg, 0.5)
    assert got[2].dtype == dtype
    for i, name in ((0, "loss"), (2, "grad sub"), (3, "grad student")):
        within_twice(name, got[i], ref[i], want[i])


def test_sub_logit_loss_cuda_deterministic_and_large_logits():
    cfg = HCDConfig()
    inputs = sll_inputs(4, 256, 4, 1000, scale=150.0, seed=2)
    a, b = sll_run("cuda", *inputs, cfg, 1.0), sll_run("cuda", *inputs, cfg, 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    want = sll_truth(*inputs, cfg, 1.0)
    assert_close("loss", a[0], want[0], 1e-5)
    assert_close("grad sub_logits", a[2], want[2], 1e-5)


@pytest.mark.parametrize("n,dtype", [(80, torch.float32), (60, torch.float64), (200, torch.float32)])
def test_sub_logit_loss_cuda_many_sub_logits(n, dtype):
    """Any n (SPEC): the per-sample scratch exceeds the default 48 KB of shared memory from n = 76 (fp32) --
    opted in up to the device limit (n = 80, fp64 n = 60), global memory beyond it (n = 200)."""
    cfg = HCDConfig(num_sub_logits=n, temperature=2.0, ortho_threshold=0.1, ortho_on="raw", lambda_teacher=0.5)
    inputs = sll_inputs(2, 3, n, 37, dtype=dtype, seed=n)
    got = sll_run("cuda", *inputs, cfg, 0.37)
    want = sll_truth(*inputs, cfg, 0.37)
    assert_close("loss", got[0], want[0], 1e-5)
    assert_close("grad sub_logits", got[2], want[2], 1e-5)
    assert_close("grad student_logits", got[3], want[3], 1e-5)


def test_sub_logit_loss_cuda_gradcheck_fp64():
    cfg = HCDConfig(num_sub_logits=3, temperature=2.0, ortho_threshold=0.2)
    sub, zs, zt, y = sll_inputs(2, 3, 3, 7, dtype=torch.float64, scale=1.0)
    f = lambda s, z: cpp_ops.sub_logit_loss(s, z, zt, y, cfg)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (sub.detach().permute(3, 2, 1, 0).requires_grad_(),
                                        zs.detach().t().requires_grad_()), eps=1e-6, atol=1e-7)


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
    sub, zs, zt, y = sll_inputs(2, 3, 4, 37)
    args = (sub.detach().permute(3, 2, 1, 0).contiguous().requires_grad_(), zs.detach().t().contiguous().requires_grad_(),
            zt, y, 2.0, 0.1, 0.5, 1e-12, True, 0.0, 0.0, False, 1.0, 1.0, 6.0, 1.0, True)
    torch.library.opcheck(torch.ops.hcd_fast.sub_logit_loss.default, args)
    x = rnd(g, 3, 5, 4, 4, grad=False)
    w, b, rm, rv = (rnd(g, 5, grad=False) for _ in range(4))
    torch.library.opcheck(torch.ops.hcd_fast.bn_relu_pool_fwd.default, (x, w, b, rm, rv.abs() + 0.5, True, 0.1, 1e-5))
    torch.library.opcheck(torch.ops.hcd_fast.pool_linear.default, (rnd(g, 3, 5, 2, 2), rnd(g, 6, 5), rnd(g, 6)))
    torch.library.opcheck(torch.ops.hcd_fast.cfm.default, (rnd(g, 3, 4), rnd(g, 3, 5, grad=False), rnd(g, 6, 9),
                                                           rnd(g, 6), rnd(g, 14, 6), rnd(g, 14), rnd(g, 3, 7, grad=False),
                                                           2, 0.5, 2.0))
