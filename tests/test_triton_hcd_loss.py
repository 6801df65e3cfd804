"""HCDLoss(backend="triton") vs HCDLoss(backend="reference") with the same weights: loss, parts, every
parameter gradient, the input gradients and the BN running statistics. Truth is the reference in float64.
"""
import copy

import pytest
import torch

import hcd_fast
from hcd_fast import HCDConfig, HCDLoss
from helpers import assert_close_to as assert_close

TRITON = hcd_fast.backends()["triton"]
pytestmark = [pytest.mark.skipif(not TRITON.available, reason=TRITON.reason),
              pytest.mark.usefixtures("triton_cpu_guard")]

CHANNELS = (4, 6, 8)
SIZES = (8, 4, 3)
TEACHER_DIM, K = 10, 7


def make_inputs(B, channels, sizes, Dt, K, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, c, s, s, generator=g) for c, s in zip(channels, sizes)]
    zs, ft, zt = torch.randn(B, K, generator=g), torch.randn(B, Dt, generator=g), torch.randn(B, K, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    return [[f.to(device) for f in feats], zs.to(device), ft.to(device), zt.to(device), y.to(device)]


def run(crit, inputs, dtype, grad_out=0.7):
    feats = [f.to(dtype).requires_grad_() for f in inputs[0]]
    zs = inputs[1].to(dtype).requires_grad_()
    loss, parts = crit(feats, zs, inputs[2].to(dtype), inputs[3].to(dtype), inputs[4], return_parts=True)
    crit.zero_grad()
    loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=loss.device))
    grads = {name: p.grad for name, p in crit.named_parameters()}
    grads.update({f"d feats[{i}]": f.grad for i, f in enumerate(feats)}, **{"d student_logits": zs.grad})
    buffers = {name: b.clone() for name, b in crit.named_buffers()}
    return loss.detach(), parts, grads, buffers


def compare(cfg, training, B=3, channels=CHANNELS, sizes=SIZES, Dt=TEACHER_DIM, K=K, device="cpu", steps=1,
            yardstick=False):
    """Triton in fp32 vs the reference in fp64. With ``yardstick`` (large shapes, long fp32 chains through
    the projectors) the bound is twice the fp32 reference's own error instead of a fixed rtol."""
    torch.manual_seed(0)
    ref = HCDLoss(channels, Dt, K, cfg, backend="reference").to(device).double().train(training)
    tri = HCDLoss(channels, Dt, K, cfg, backend="triton").to(device).train(training)
    ref32 = HCDLoss(channels, Dt, K, cfg, backend="reference").to(device).train(training)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    tri.load_state_dict(state)
    ref32.load_state_dict(state)
    for step in range(steps):  # a second step sees the updated running statistics
        inputs = make_inputs(B, channels, sizes, Dt, K, device, seed=step)
        want = run(ref, inputs, torch.float64)
        got = run(tri, inputs, torch.float32)
        base = run(ref32, inputs, torch.float32) if yardstick else None

        def check(i, name, rtol=1e-5, atol=1e-6):
            g, w = (got[i][name], want[i][name]) if name is not None else (got[i], want[i])
            if base is None:
                return assert_close(g, w, rtol=rtol, atol=atol, what=name or "loss")
            b = base[i][name] if name is not None else base[i]
            err, ref_err = (g.double() - w).abs().max(), (b.double() - w).abs().max()
            assert err <= 2 * ref_err + 1e-6 * w.abs().max(), f"{name}: {err:.3g} vs reference {ref_err:.3g}"

        assert got[0].dtype == torch.float32
        check(0, None)
        for name in want[1]:
            check(1, name, atol=1e-5)
        assert set(got[2]) == set(want[2])
        for name in want[2]:
            assert got[2][name] is not None, name
            check(2, name, rtol=2e-5)
        for name in want[3]:
            check(3, name)


@pytest.mark.parametrize("cfg,training,steps", [
    (HCDConfig(), True, 2),
    (HCDConfig(num_sub_logits=2, temperature=4.0, cfm_hidden=None, gt_mask="large_negative",
               lambda_student=0.7, lambda_teacher=1.3, w_kl=2.0, w_ol=3.0, detach_sub_targets=True), True, 1),
    (HCDConfig(num_sub_logits=3, cfm_hidden=16, gt_mask="none", ortho_threshold=-0.1), False, 1),
])
def test_triton_hcd_loss_matches_reference(cfg, training, steps):
    compare(cfg, training, steps=steps)


def test_single_stage():
    compare(HCDConfig(num_sub_logits=1), True, B=3, channels=(6,), sizes=(3,), steps=1)


def test_autocast_bf16_cpu():
    """Under autocast the projector convs emit bf16 while the parameters stay fp32: mixed dtypes reach
    every op; the loss stays fp32 and close to the fp32 loss, every gradient fp32."""
    torch.manual_seed(2)
    crit = HCDLoss(CHANNELS, TEACHER_DIM, K, HCDConfig(), backend="triton").train()
    twin = copy.deepcopy(crit)
    inputs = make_inputs(3, CHANNELS, SIZES, TEACHER_DIM, K, seed=4)
    want = run(crit, inputs, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = [f.requires_grad_() for f in inputs[0]]
        loss = twin(feats, *inputs[1:])
    assert loss.dtype == torch.float32
    assert_close(loss.detach(), want[0], rtol=5e-2, what="loss")
    loss.backward()
    for name, p in twin.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_torch_compile_fullgraph():
    """The whole criterion traces without a graph break through the triton ops (aot_eager: no codegen)."""
    torch.manual_seed(1)
    crit = HCDLoss(CHANNELS, TEACHER_DIM, K, HCDConfig(), backend="triton", validate=False).train()
    twin = copy.deepcopy(crit)
    inputs = make_inputs(3, CHANNELS, SIZES, TEACHER_DIM, K, seed=3)
    eager = run(crit, inputs, torch.float32)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    feats = [f.requires_grad_() for f in inputs[0]]
    loss = compiled(feats, inputs[1], inputs[2], inputs[3], inputs[4])
    loss.backward(torch.tensor(0.7))
    assert_close(loss.detach(), eager[0], what="loss")
    for name, p in twin.named_parameters():
        assert_close(p.grad, eager[2][name], what=name)
    for i, f in enumerate(feats):
        assert_close(f.grad, eager[2][f"d feats[{i}]"], what=f"d feats[{i}]")
    for name, buf in twin.named_buffers():  # the in-place running-stat update survives functionalization
        assert_close(buf, eager[3][name], what=name)


# ---------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_triton_hcd_loss_matches_reference(monkeypatch):
    # The projector convs run in eager torch for both backends: keep cuDNN/cuBLAS in true fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    compare(HCDConfig(), True, B=32, channels=(64, 128, 256, 512), sizes=(28, 14, 7, 4), Dt=384, K=100,
            device="cuda", yardstick=True)
