"""backend="cpu" sub_logit_loss (csrc/cpu/sub_logit_loss*.{h,cpp}) against hcd_fast.reference.

Truth is the reference evaluated in float64 on the same input values; the kernel runs on fp32 (or
bf16/fp16, or fp64 for gradcheck) inputs, usually non-contiguous, with grad_output != 1 and every freshly
allocated tensor poisoned with NaN (torch.utils.deterministic.fill_uninitialized_memory).
"""
import itertools

import pytest
import torch

import hcd_fast
from hcd_fast import functional as HF
from hcd_fast import reference as R
from hcd_fast.config import HCDConfig
from hcd_fast.ops import cpp_ops
from helpers import assert_close

PARTS = R.PART_NAMES


pytestmark = pytest.mark.usefixtures("poison_uninitialized")


def test_backend_available():
    assert hcd_fast.backends()["cpu"].available, hcd_fast.backends()["cpu"].reason


def make_inputs(S, B, n, K, dtype=torch.float32, correlated=True, scale=3.0, seed=0):
    """Leaf tensors plus non-contiguous views of them in the (S, B, n, K) / (B, K) layout.

    ``correlated`` makes the sub-logits of one sample share a component, so the Gram entries exceed the
    orthogonality threshold and that term (and its gradient) is not trivially 0."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(K, n, B, S, generator=g, dtype=torch.float64) * scale
    if correlated:
        common = torch.randn(K, 1, B, S, generator=g, dtype=torch.float64) * scale
        base = 0.6 * base + common
    sub_leaf = base.to(dtype).requires_grad_()
    zs_leaf = (torch.randn(K, B, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    zt = (torch.randn(B, K, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, K, (B,), generator=g)
    return sub_leaf, zs_leaf, zt, y


def views(sub_leaf, zs_leaf):
    return sub_leaf.permute(3, 2, 1, 0), zs_leaf.t()


def run(backend, sub_leaf, zs_leaf, zt, y, cfg, grad_out):
    sub, zs = views(sub_leaf, zs_leaf)
    loss, parts = HF.sub_logit_loss(sub, zs, zt, y, cfg, backend=backend)
    gs, gz = torch.autograd.grad(loss, (sub_leaf, zs_leaf), grad_outputs=torch.tensor(grad_out, dtype=loss.dtype))
    return loss.detach(), {k: v.clone() for k, v in parts.items()}, gs, gz


def truth(sub_leaf, zs_leaf, zt, y, cfg, grad_out):
    s = sub_leaf.detach().double().requires_grad_()
    z = zs_leaf.detach().double().requires_grad_()
    return run("reference", s, z, zt.double(), y, cfg, grad_out)


def cases():
    Ks, ns, Bs, Ss, Ts = (7, 37, 100, 1000, 1001), (1, 2, 3, 4, 8), (1, 3, 37), (1, 4), (1.0, 4.0)
    modes = ("zero", "none", "large_negative")
    for i, (K, n) in enumerate(itertools.product(Ks, ns)):
        yield pytest.param(Bs[i % 3], K, n, Ss[(i // 3) % 2], Ts[i % 2], modes[(i // 2) % 3], i % 4 == 3,
                           id=f"B{Bs[i % 3]}-K{K}-n{n}-S{Ss[(i // 3) % 2]}-T{Ts[i % 2]:g}-{modes[(i // 2) % 3]}"
                              f"{'-detach' if i % 4 == 3 else ''}")


@pytest.mark.parametrize("B,K,n,S,T,mode,detach", list(cases()))
def test_matches_reference_fp32(B, K, n, S, T, mode, detach):
    cfg = HCDConfig(num_sub_logits=n, temperature=T, gt_mask=mode, detach_sub_targets=detach,
                    label_smoothing=0.2, ortho_threshold=0.3, w_gt=0.7, w_kd=1.3, w_kl=2.5, w_ol=3.0)
    inputs = make_inputs(S, B, n, K, seed=K * 31 + n)
    loss, parts, gs, gz = run("cpu", *inputs, cfg, 0.37)
    tl, tp, tgs, tgz = truth(*inputs, cfg, 0.37)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close("loss", loss, tl, 1e-5)
    for k in PARTS:
        assert parts[k].dtype == torch.float32 and not parts[k].requires_grad
        assert_close(k, parts[k], tp[k], 1e-5) if tp[k].abs() > 1e-6 else assert_close(k, parts[k], tp[k], 1.0)
    if n > 1 and mode != "large_negative":
        assert tp["ortho"] > 0  # the correlated inputs exercise the hinge
    assert_close("grad sub_logits", gs, tgs, 1e-5)
    assert_close("grad student_logits", gz, tgz, 1e-5)


@pytest.mark.parametrize("mode", ["zero", "none", "large_negative"])
def test_gradcheck_fp64(mode):
    cfg = HCDConfig(num_sub_logits=3, temperature=2.0, gt_mask=mode, ortho_threshold=0.2, w_ol=2.0)
    sub_leaf, zs_leaf, zt, y = make_inputs(2, 3, 3, 7, dtype=torch.float64, scale=1.0)
    zt = zt.double()

    def f(s, z):
        return cpp_ops.sub_logit_loss(s, z, zt, y, cfg)[0]

    assert torch.autograd.gradcheck(f, (sub_leaf.detach().permute(3, 2, 1, 0).requires_grad_(),
                                        zs_leaf.detach().t().requires_grad_()), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,K,n,S", [(3, 1001, 4, 4), (37, 100, 2, 1)])
def test_low_precision_within_twice_reference_error(dtype, B, K, n, S):
    cfg = HCDConfig(num_sub_logits=n, temperature=2.0, w_kl=3.0)
    inputs = make_inputs(S, B, n, K, dtype=dtype, seed=B + K)
    got = run("cpu", *inputs, cfg, 0.5)
    ref = run("reference", *inputs, cfg, 0.5)
    want = truth(*inputs, cfg, 0.5)
    assert got[0].dtype == torch.float32
    assert got[2].dtype == dtype and got[3].dtype == dtype
    for name, g, r, w in (("loss", got[0], ref[0], want[0]), ("grad sub", got[2], ref[2], want[2]),
                          ("grad student", got[3], ref[3], want[3])):
        err = (g.double() - w).abs().max().item()
        ref_err = (r.double() - w).abs().max().item()
        floor = 1e-5 * w.abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name}: {err:.3e} > 2 x reference error {ref_err:.3e}"


def test_large_logits_stable():
    """Logits in the hundreds: log-softmax on both sides of every KL, no NaN/inf, still exact."""
    cfg = HCDConfig(num_sub_logits=4, temperature=1.0)
    inputs = make_inputs(2, 5, 4, 1000, scale=150.0, correlated=False, seed=3)
    loss, parts, gs, gz = run("cpu", *inputs, cfg, 1.0)
    tl, tp, tgs, tgz = truth(*inputs, cfg, 1.0)
    assert_close("loss", loss, tl, 1e-5)
    assert_close("grad sub_logits", gs, tgs, 1e-5)
    assert_close("grad student_logits", gz, tgz, 1e-5)


def test_no_grad_path_same_loss():
    cfg = HCDConfig()
    sub_leaf, zs_leaf, zt, y = make_inputs(4, 7, 4, 37)
    sub, zs = views(sub_leaf, zs_leaf)
    loss, parts = HF.sub_logit_loss(sub, zs, zt, y, cfg, backend="cpu")
    with torch.no_grad():
        loss2, parts2 = HF.sub_logit_loss(sub, zs, zt, y, cfg, backend="cpu")
    assert torch.equal(loss.detach(), loss2)
    assert all(torch.equal(parts[k], parts2[k]) for k in PARTS)


def test_deterministic_across_runs_and_thread_counts():
    cfg = HCDConfig(num_sub_logits=4, w_ol=2.0)
    inputs = make_inputs(4, 37, 4, 1001, seed=5)
    threads = torch.get_num_threads()
    try:
        a = run("cpu", *inputs, cfg, 1.0)
        torch.set_num_threads(1)
        b = run("cpu", *inputs, cfg, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_portable_and_avx2_builds_agree(capability):
    """Both compiled copies of the kernel body (csrc/cpu/kernels_{default,avx2}.cpp) match the reference."""
    if capability == "avx2" and hcd_fast._C.cpu_capability() != "avx2":
        pytest.skip("this CPU has no AVX2+FMA")
    cfg = HCDConfig(num_sub_logits=3, temperature=4.0, gt_mask="large_negative", ortho_threshold=0.2)
    inputs = make_inputs(4, 3, 3, 1001, seed=11)
    before = hcd_fast._C.cpu_capability()
    try:
        assert hcd_fast._C.set_cpu_capability(capability) == capability
        loss, parts, gs, gz = run("cpu", *inputs, cfg, 1.7)
    finally:
        hcd_fast._C.set_cpu_capability(before)
    tl, tp, tgs, tgz = truth(*inputs, cfg, 1.7)
    assert_close("loss", loss, tl, 1e-5)
    assert_close("grad sub_logits", gs, tgs, 1e-5)
    assert_close("grad student_logits", gz, tgz, 1e-5)


def test_only_student_requires_grad():
    cfg = HCDConfig(num_sub_logits=2)
    sub_leaf, zs_leaf, zt, y = make_inputs(1, 3, 2, 7)
    sub = sub_leaf.detach().permute(3, 2, 1, 0)
    loss, _ = HF.sub_logit_loss(sub, zs_leaf.t(), zt, y, cfg, backend="cpu")
    (gz,) = torch.autograd.grad(loss, (zs_leaf,))
    tl, _, _, tgz = truth(sub_leaf, zs_leaf, zt, y, cfg, 1.0)
    assert_close("grad student_logits", gz, tgz, 1e-5)


def test_opcheck():
    sub_leaf, zs_leaf, zt, y = make_inputs(2, 3, 4, 37)
    sub = sub_leaf.detach().permute(3, 2, 1, 0).contiguous().requires_grad_()
    zs = zs_leaf.detach().t().contiguous().requires_grad_()
    for compute_grad, mask, fill, shift in ((True, True, 0.0, 0.0), (False, True, -1e6, 1.5)):
        s, z = (sub, zs) if compute_grad else (sub.detach(), zs.detach())
        args = (s, z, zt, y, 2.0, 0.1, 0.5, 1e-12, mask, fill, shift, False, 1.0, 1.0, 6.0, 1.0, compute_grad)
        torch.library.opcheck(torch.ops.hcd_fast.sub_logit_loss.default, args)


def test_out_of_range_target_raises_even_without_validation():
    sub_leaf, zs_leaf, zt, y = make_inputs(1, 3, 2, 7)
    sub, zs = views(sub_leaf, zs_leaf)
    with pytest.raises(RuntimeError, match="out of range"):
        HF.sub_logit_loss(sub, zs, zt, torch.tensor([0, 7, 1]), HCDConfig(num_sub_logits=2), backend="cpu",
                          validate=False)
