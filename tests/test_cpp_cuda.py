"""backend="cuda" (csrc/cuda/*.cu) sub_logit_loss against hcd_fast.reference, on a CUDA device (run with
``pytest -m cuda``; skipped without a GPU). Truth is the reference in float64 on the same values; inputs are
non-contiguous, grad_output != 1, and fresh CUDA memory is NaN-poisoned (fill_uninitialized_memory).
bn_relu_pool, pool_linear, cfm and HCDLoss on CUDA are the ``cuda`` parameters of tests/test_<op>.py and
tests/test_hcd_loss.py."""
import pytest
import torch

from hcd_fast import HCDConfig
from hcd_fast import functional as HF
from hcd_fast.ops import cpp_ops
from hcd_fast.reference import PART_NAMES
from helpers import assert_close

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("poison_uninitialized"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = "cuda"


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
# opcheck
# --------------------------------------------------------------------------------------------------
def test_opcheck_cuda():
    sub, zs, zt, y = sll_inputs(2, 3, 4, 37)
    args = (sub.detach().permute(3, 2, 1, 0).contiguous().requires_grad_(), zs.detach().t().contiguous().requires_grad_(),
            zt, y, 2.0, 0.1, 0.5, 1e-12, True, 0.0, 0.0, False, 1.0, 1.0, 6.0, 1.0, True)
    torch.library.opcheck(torch.ops.hcd_fast.sub_logit_loss.default, args)
