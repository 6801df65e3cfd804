"""backend="cpu" bn_relu_pool and pool_linear (csrc/cpu/) against hcd_fast.reference and nn.BatchNorm2d.

Truth is the reference in float64 on the same input values; inputs are non-contiguous, grad_output is a
random (B, C)/(B, D) tensor, and fresh torch.empty memory is NaN-poisoned.
"""
import pytest
import torch
import torch.nn as nn

from hcd_fast import functional as HF
from hcd_fast import reference as R
from hcd_fast.ops import cpp_ops
from helpers import assert_close


pytestmark = pytest.mark.usefixtures("poison_uninitialized")


def bn_inputs(B, C, H, W, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Stored (B, H, W, C): x is a channels-last (non-contiguous NCHW) view.
    x_leaf = (torch.randn(B, H, W, C, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).requires_grad_()
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    bias = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    rm = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    grad_out = torch.randn(B, C, generator=g, dtype=torch.float64).to(dtype)
    return x_leaf, weight, bias, rm, rv, grad_out


def bn_run(backend, x_leaf, weight, bias, rm, rv, grad_out, training, momentum, eps=1e-5):
    rm, rv = rm.clone(), rv.clone()
    x = x_leaf.permute(0, 3, 1, 2)
    out = HF.bn_relu_pool(x, weight, bias, rm, rv, training, momentum, eps, backend=backend)
    grads = torch.autograd.grad(out, (x_leaf, weight, bias), grad_outputs=grad_out)
    return (out.detach(),) + grads + (rm, rv)


def bn_truth(x_leaf, weight, bias, rm, rv, grad_out, training, momentum):
    leaves = [t.detach().double().requires_grad_() for t in (x_leaf, weight, bias)]
    return bn_run("reference", *leaves, rm.double(), rv.double(), grad_out.double(), training, momentum)


BN_NAMES = ("out", "grad x", "grad weight", "grad bias", "running_mean", "running_var")


# Training needs more than one value per channel (and with two, x_hat = +-1 and d x cancels to ~0, which
# only measures rounding), so the smallest training shape has six.
BN_SHAPES = [(1, 3, 2, 3, True), (1, 3, 1, 1, False), (3, 5, 4, 4, True), (3, 5, 4, 4, False),
             (37, 7, 3, 5, True), (37, 7, 3, 5, False), (2, 64, 8, 8, True), (4, 13, 1, 1, True),
             (4, 13, 1, 1, False), (37, 40, 1, 1, True), (5, 35, 1, 1, True), (5, 35, 1, 1, False)]


@pytest.mark.parametrize("B,C,H,W,training", BN_SHAPES)
def test_bn_relu_pool_matches_reference(B, C, H, W, training):
    inputs = bn_inputs(B, C, H, W, seed=B * C)
    got = bn_run("cpu", *inputs, training, 0.3)
    want = bn_truth(*inputs, training, 0.3)
    assert got[0].shape == (B, C) and got[0].dtype == torch.float32
    for name, g, w in zip(BN_NAMES, got, want):
        assert_close(name, g, w, 1e-5)


def test_bn_relu_pool_running_stats_equal_batchnorm2d():
    x_leaf, weight, bias, rm, rv, _ = bn_inputs(6, 8, 5, 5, seed=4)
    bn = nn.BatchNorm2d(8, momentum=0.1)
    with torch.no_grad():
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    bn.train()
    x = x_leaf.detach().permute(0, 3, 1, 2)
    want = torch.relu(bn(x)).mean((2, 3))
    mean, var = rm.clone(), rv.clone()
    got = HF.bn_relu_pool(x, weight.detach(), bias.detach(), mean, var, True, 0.1, bn.eps, backend="cpu")
    assert_close("out", got, want.detach(), 1e-5)
    assert_close("running_mean", mean, bn.running_mean, 1e-6)
    assert_close("running_var", var, bn.running_var, 1e-6)


def test_bn_relu_pool_training_needs_two_values():
    x = torch.randn(1, 3, 1, 1)
    args = (x, torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3), True)
    # nn.BatchNorm2d's error at the public boundary, for every backend ...
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        HF.bn_relu_pool(*args, backend="cpu")
    # ... and the kernel's own check when its op is called directly.
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        torch.ops.hcd_fast.bn_relu_pool_fwd(*args, 0.1, 1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_pool_gradcheck_fp64(training):
    x_leaf, weight, bias, rm, rv, _ = bn_inputs(3, 4, 3, 2, dtype=torch.float64, seed=7)

    def f(x, w, b):
        return cpp_ops.bn_relu_pool(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x_leaf.detach().permute(0, 3, 1, 2).requires_grad_(), weight, bias),
                                    eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_pool_low_precision(dtype, training):
    inputs = bn_inputs(8, 16, 4, 4, dtype=dtype, seed=9)
    got = bn_run("cpu", *inputs, training, 0.1)
    ref = bn_run("reference", *inputs, training, 0.1)
    want = bn_truth(*inputs, training, 0.1)
    assert got[0].dtype == dtype
    for name, g, r, w in zip(BN_NAMES, got, ref, want):
        err = (g.double() - w).abs().max().item()
        ref_err = (r.double() - w).abs().max().item()
        assert err <= 2 * ref_err + 1e-5 * w.abs().max().item(), f"{name}: {err:.3e} vs reference {ref_err:.3e}"


def test_bn_relu_pool_opcheck():
    x_leaf, weight, bias, rm, rv, grad_out = bn_inputs(3, 5, 4, 4)
    x = x_leaf.detach().permute(0, 3, 1, 2)
    for training in (True, False):
        torch.library.opcheck(torch.ops.hcd_fast.bn_relu_pool_fwd.default,
                              (x, weight.detach(), bias.detach(), rm.clone(), rv.clone(), training, 0.1, 1e-5))
    _, mean, invstd = torch.ops.hcd_fast.bn_relu_pool_fwd(x, weight.detach(), bias.detach(), rm.clone(), rv.clone(),
                                                          True, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.hcd_fast.bn_relu_pool_bwd.default,
                          (grad_out, x, weight.detach(), bias.detach(), mean, invstd, True))


# --------------------------------------------------------------------------------------------------
# pool_linear
# --------------------------------------------------------------------------------------------------
def pl_inputs(B, C, H, W, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_leaf = torch.randn(B, H, W, C, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w_leaf = (torch.randn(C, D, generator=g, dtype=torch.float64) / C ** 0.5).to(dtype).requires_grad_()
    bias = torch.randn(D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    grad_out = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    return x_leaf, w_leaf, bias, grad_out


def pl_run(backend, x_leaf, w_leaf, bias, grad_out):
    out = HF.pool_linear(x_leaf.permute(0, 3, 1, 2), w_leaf.t(), bias, backend=backend)
    return (out.detach(),) + torch.autograd.grad(out, (x_leaf, w_leaf, bias), grad_outputs=grad_out)


def pl_truth(x_leaf, w_leaf, bias, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in (x_leaf, w_leaf, bias)]
    return pl_run("reference", *leaves, grad_out.double())


PL_NAMES = ("out", "grad x", "grad weight", "grad bias")


@pytest.mark.parametrize("B,C,H,W,D", [(1, 3, 1, 1, 5), (3, 37, 2, 2, 100), (37, 64, 4, 3, 7), (8, 512, 1, 1, 384)])
def test_pool_linear_matches_reference(B, C, H, W, D):
    inputs = pl_inputs(B, C, H, W, D, seed=C + D)
    got = pl_run("cpu", *inputs)
    want = pl_truth(*inputs)
    assert got[0].shape == (B, D) and got[0].dtype == torch.float32
    for name, g, w in zip(PL_NAMES, got, want):
        assert_close(name, g, w, 1e-5)


def test_pool_linear_gradcheck_fp64():
    x_leaf, w_leaf, bias, _ = pl_inputs(2, 3, 2, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        cpp_ops.pool_linear, (x_leaf.detach().permute(0, 3, 1, 2).requires_grad_(), w_leaf.detach().t().requires_grad_(),
                              bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pool_linear_low_precision(dtype):
    inputs = pl_inputs(16, 64, 4, 4, 96, dtype=dtype, seed=2)
    got, ref, want = pl_run("cpu", *inputs), pl_run("reference", *inputs), pl_truth(*inputs)
    assert got[0].dtype == dtype
    for name, g, r, w in zip(PL_NAMES, got, ref, want):
        err = (g.double() - w).abs().max().item()
        ref_err = (r.double() - w).abs().max().item()
        assert err <= 2 * ref_err + 1e-5 * w.abs().max().item(), f"{name}: {err:.3e} vs reference {ref_err:.3e}"


def test_pool_linear_opcheck():
    x_leaf, w_leaf, bias, _ = pl_inputs(3, 5, 2, 2, 6)
    x = x_leaf.detach().permute(0, 3, 1, 2).requires_grad_()
    torch.library.opcheck(torch.ops.hcd_fast.pool_linear.default, (x, w_leaf.detach().t().contiguous().requires_grad_(), bias))


@pytest.mark.parametrize("H,W", [(1, 1), (3, 3)])
def test_bn_relu_pool_same_result_for_any_thread_count(H, W):
    inputs = bn_inputs(64, 1000, H, W, seed=12)  # B*C*HW > 32768: several channel chunks
    threads = torch.get_num_threads()
    try:
        a = bn_run("cpu", *inputs, True, 0.1)
        torch.set_num_threads(1)
        b = bn_run("cpu", *inputs, True, 0.1)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
