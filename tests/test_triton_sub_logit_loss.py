"""Triton sub_logit_loss vs hcd_fast.reference: loss, every part, d/d sub_logits and d/d student_logits.

On CPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py); the same
tests run on CUDA tensors under ``-m cuda``. Truth is the reference evaluated in float64.
"""
import pytest
import torch

import hcd_fast
from hcd_fast import HCDConfig, functional as HF, reference as R
from helpers import assert_close_to as assert_close

TRITON = hcd_fast.backends()["triton"]
pytestmark = [pytest.mark.skipif(not TRITON.available, reason=TRITON.reason),
              pytest.mark.usefixtures("triton_cpu_guard")]

GRAD_OUT = 0.7


def make_inputs(S, B, n, K, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    zf = torch.randn(S, B, n, K, generator=g, dtype=torch.float64) * scale
    zs = torch.randn(B, K, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(B, K, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, K, (B,), generator=g)
    return [t.to(device) for t in (zf.to(dtype), zs.to(dtype), zt.to(dtype), y)]


def run(backend, zf, zs, zt, y, cfg, grad_out=GRAD_OUT):
    zf = zf.detach().requires_grad_()
    zs = zs.detach().requires_grad_()
    loss, parts = HF.sub_logit_loss(zf, zs, zt, y, cfg, backend=backend)
    loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=loss.device))
    return loss.detach(), parts, zf.grad, zs.grad


def truth(zf, zs, zt, y, cfg):
    return run("reference", zf.double(), zs.double(), zt.double(), y, cfg)


def check_fp32(S, B, n, K, cfg, device="cpu", scale=3.0, seed=0, transform=None, block_k=None,
               monkeypatch=None):
    zf, zs, zt, y = make_inputs(S, B, n, K, torch.float32, device, scale, seed)
    want = truth(zf, zs, zt, y, cfg)
    if transform is not None:
        zf, zs, zt, y = transform(zf, zs, zt, y)
    if block_k is not None:
        from hcd_fast.kernels import sub_logit_loss as kmod
        orig = kmod._heuristic
        monkeypatch.setattr(kmod, "_heuristic", lambda n_, k_, bk=None: orig(n_, k_, block_k))
    got = run("triton", zf, zs, zt, y, cfg)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert_close(got[0], want[0], what="loss")
    for name in R.PART_NAMES:
        assert got[1][name].dtype == torch.float32 and not got[1][name].requires_grad
        assert_close(got[1][name], want[1][name], atol=1e-5, what=name)
    assert got[2].dtype == zf.dtype and got[3].dtype == zs.dtype
    assert_close(got[2], want[2], what="d sub_logits")
    assert_close(got[3], want[3], what="d student_logits")


# Covering combinations of SPEC section 6 (not the full product: the interpreter is slow).
CASES = [
    # S, B, n, K, config
    (1, 1, 1, 7, HCDConfig(num_sub_logits=1)),
    (4, 3, 4, 37, HCDConfig(num_sub_logits=4, temperature=4.0, gt_mask="none", detach_sub_targets=True)),
    (1, 37, 2, 100, HCDConfig(num_sub_logits=2, gt_mask="large_negative", label_smoothing=0.0,
                             w_gt=0.3, w_kd=2.0, w_kl=0.5, w_ol=4.0)),
    (4, 3, 8, 1001, HCDConfig(num_sub_logits=8, ortho_threshold=-0.3)),
    (1, 3, 3, 1000, HCDConfig(num_sub_logits=3, temperature=4.0, ortho_threshold=0.1, w_ol=5.0)),
    (4, 1, 16, 37, HCDConfig(num_sub_logits=16, gt_mask="large_negative", temperature=4.0,
                            detach_sub_targets=True, ortho_threshold=0.0)),
]


@pytest.mark.parametrize("S,B,n,K,cfg", CASES)
def test_matches_reference_fp32(S, B, n, K, cfg):
    check_fp32(S, B, n, K, cfg)


@pytest.mark.parametrize("gt_mask", ["zero", "none", "large_negative"])
def test_k_loop(gt_mask, monkeypatch):
    """BLOCK_K = 16 < K = 100: every pass loops over several K blocks with a ragged tail."""
    cfg = HCDConfig(num_sub_logits=3, temperature=4.0, gt_mask=gt_mask, ortho_threshold=0.0)
    check_fp32(2, 3, 3, 100, cfg, block_k=16, monkeypatch=monkeypatch)


def test_logits_in_the_hundreds_are_stable():
    cfg = HCDConfig(num_sub_logits=4, temperature=1.0)
    check_fp32(2, 3, 4, 37, cfg, scale=300.0, seed=3)


def test_non_contiguous_inputs():
    def transform(zf, zs, zt, y):
        # Strided views with the same values: permuted storage for zf, transposed z_s/z_t, strided y.
        zf = zf.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        zs, zt = zs.t().contiguous().t(), zt.t().contiguous().t()
        y = torch.stack([y, y], 1)[:, 0]
        assert not (zf.is_contiguous() or zs.is_contiguous() or zt.is_contiguous() or y.is_contiguous())
        return zf, zs, zt, y
    check_fp32(2, 5, 3, 37, HCDConfig(num_sub_logits=3, temperature=2.0), transform=transform)


def test_every_output_element_is_written(monkeypatch, poison_uninitialized):
    """Buffers the kernels write start as NaN: any element left unwritten would show."""
    from hcd_fast.kernels import sub_logit_loss as kmod
    check_fp32(2, 3, 4, 37, HCDConfig(), block_k=16, monkeypatch=monkeypatch)


def test_no_grad_path_and_single_input_grad():
    zf, zs, zt, y = make_inputs(2, 3, 4, 37)
    cfg = HCDConfig(temperature=2.0)
    want = truth(zf, zs, zt, y, cfg)
    with torch.no_grad():
        loss, parts = HF.sub_logit_loss(zf, zs, zt, y, cfg, backend="triton")
    assert_close(loss, want[0], what="loss")
    zs_leaf = zs.clone().requires_grad_()
    loss, _ = HF.sub_logit_loss(zf, zs_leaf, zt, y, cfg, backend="triton")
    loss.backward(torch.tensor(GRAD_OUT))
    assert_close(zs_leaf.grad, want[3], what="d student_logits")


def test_teacher_gets_no_gradient():
    zf, zs, zt, y = make_inputs(1, 3, 2, 7)
    zt.requires_grad_()
    loss, _ = HF.sub_logit_loss(zf.requires_grad_(), zs, zt, y, HCDConfig(num_sub_logits=2), backend="triton")
    loss.backward()
    assert zt.grad is None


def test_gradcheck_float64():
    """The kernels compute in float64 for float64 inputs (no tl.dot), so gradcheck runs through them."""
    # (detach_sub_targets is left out: it makes the backward deliberately not the forward's derivative.)
    # Full Jacobian on a tiny shape, then random-projection (fast_mode) checks on a larger one.
    for shape, gt_mask, fast in (((1, 1, 2, 3), "zero", False), ((2, 2, 3, 5), "zero", True),
                                 ((2, 2, 3, 5), "none", True), ((2, 2, 3, 5), "large_negative", True)):
        zf, zs, zt, y = make_inputs(*shape, torch.float64, seed=5)
        cfg = HCDConfig(num_sub_logits=shape[2], temperature=2.0, ortho_threshold=-0.2, gt_mask=gt_mask)
        fn = lambda a, b: HF.sub_logit_loss(a, b, zt, y, cfg, backend="triton")[0]
        inputs = (zf.clone().requires_grad_(), zs.clone().requires_grad_())
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_reference_error(dtype):
    cfg = HCDConfig(num_sub_logits=4, temperature=2.0)
    zf, zs, zt, y = make_inputs(2, 5, 4, 100, dtype)
    want = truth(zf, zs, zt, y, cfg)
    ref = run("reference", zf, zs, zt, y, cfg)
    got = run("triton", zf, zs, zt, y, cfg)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype and got[3].dtype == dtype
    for i, what in ((0, "loss"), (2, "d sub_logits"), (3, "d student_logits")):
        ref_err = (ref[i].double() - want[i]).abs().max()
        err = (got[i].double() - want[i]).abs().max()
        assert err <= 2 * ref_err + 1e-6 * want[i].abs().max(), f"{what}: {err:.3g} vs reference {ref_err:.3g}"


def test_torch_compile_fullgraph():
    """The autograd.Function over custom ops traces without a graph break (aot_eager: no codegen)."""
    zf, zs, zt, y = make_inputs(2, 3, 4, 37)
    cfg = HCDConfig(temperature=2.0)
    want = truth(zf, zs, zt, y, cfg)

    def f(zf, zs):
        return HF.sub_logit_loss(zf, zs, zt, y, cfg, backend="triton", validate=False)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    zf_, zs_ = zf.clone().requires_grad_(), zs.clone().requires_grad_()
    loss, parts = compiled(zf_, zs_)
    loss.backward(torch.tensor(GRAD_OUT))
    assert_close(loss.detach(), want[0], what="loss")
    assert_close(zf_.grad, want[2], what="d sub_logits")
    assert_close(zs_.grad, want[3], what="d student_logits")


def test_opcheck_custom_op():
    zf, zs, zt, y = make_inputs(1, 2, 2, 7)
    args = (zf, zs, zt, y, 2.0, 0.1, 0.5, 1e-12, True, 0.0, 0.0, False, 1.0, 1.0, 6.0, 1.0, True)
    torch.library.opcheck(torch.ops.hcd_triton.sub_logit_loss.default, args)


# ---------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
# A subset (each distinct config is a fresh JIT compile on the GPU machine) plus the longest rows.
@pytest.mark.parametrize("S,B,n,K,cfg", [CASES[1], CASES[3], CASES[5], (2, 64, 4, 32768, HCDConfig())])
def test_cuda_matches_reference_fp32(S, B, n, K, cfg):
    check_fp32(S, B, n, K, cfg, device="cuda")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(dtype):
    cfg = HCDConfig(num_sub_logits=4, temperature=2.0)
    zf, zs, zt, y = make_inputs(4, 64, 4, 1000, dtype, device="cuda")
    want = truth(zf, zs, zt, y, cfg)
    ref = run("reference", zf, zs, zt, y, cfg)
    got = run("triton", zf, zs, zt, y, cfg)
    for i in (0, 2, 3):
        ref_err = (ref[i].double() - want[i]).abs().max()
        err = (got[i].double() - want[i]).abs().max()
        assert err <= 2 * ref_err + 1e-6 * want[i].abs().max()


@pytest.mark.cuda
@cuda
def test_cuda_deterministic():
    zf, zs, zt, y = make_inputs(4, 128, 4, 1000, device="cuda")
    a = run("triton", zf, zs, zt, y, HCDConfig())
    b = run("triton", zf, zs, zt, y, HCDConfig())
    for x, z in zip((a[0], a[2], a[3], *a[1].values()), (b[0], b[2], b[3], *b[1].values())):
        assert torch.equal(x, z)
