"""HCDLoss(backend="cpu") against HCDLoss(backend="reference") with the same weights: loss, parts, every
parameter gradient, the student/teacher input gradients and the BatchNorm running statistics; and a
fullgraph torch.compile of HCDLoss(backend="cpu") against eager."""
import copy

import pytest
import torch

from hcd_fast import HCDConfig, HCDLoss
from hcd_fast.reference import PART_NAMES
from helpers import assert_close


def make_case(channels, sizes, B, K, Dt, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = [(torch.randn(B, c, s, s, generator=g) * 1.5).to(dtype).requires_grad_() for c, s in zip(channels, sizes)]
    zs = (torch.randn(B, K, generator=g) * 2).to(dtype).requires_grad_()
    ft = torch.randn(B, Dt, generator=g).to(dtype)
    zt = (torch.randn(B, K, generator=g) * 2).to(dtype)
    y = torch.randint(0, K, (B,), generator=g)
    return feats, zs, ft, zt, y


def step(criterion, feats, zs, ft, zt, y, grad_out):
    criterion.zero_grad()
    leaves = [f.detach().clone().requires_grad_() for f in feats] + [zs.detach().clone().requires_grad_()]
    loss, parts = criterion(leaves[:-1], leaves[-1], ft, zt, y, return_parts=True)
    loss.backward(torch.tensor(grad_out, dtype=loss.dtype))
    strip = lambda n: n.replace("_orig_mod.", "")  # noqa: E731  (torch.compile's wrapper prefix)
    grads = {strip(n): p.grad.clone() for n, p in criterion.named_parameters() if p.grad is not None}
    inputs = [t.grad.clone() for t in leaves]
    buffers = {strip(n): b.clone() for n, b in criterion.named_buffers()}
    return loss.detach(), parts, grads, inputs, buffers


def close(name, got, want, rtol=2e-5):
    assert_close(name, got, want, rtol, atol=1e-9)


CASES = [
    # ResNet18-like stages at 32x32 input (8, 4, 2, 1), CIFAR-like K.
    ((64, 128, 256, 512), (8, 4, 2, 1), 4, 100, 384, HCDConfig()),
    # One stage, no CFM hidden layer, other options.
    ((16,), (3,), 3, 37, 24, HCDConfig(num_sub_logits=3, temperature=4.0, cfm_hidden=None, gt_mask="none",
                                          w_kl=2.0, w_ol=3.0, lambda_student=0.5, lambda_teacher=2.0)),
    # Two stages, odd sizes, detached sub-logit targets, large_negative mask.
    ((8, 12), (5, 3), 5, 1001, 16, HCDConfig(num_sub_logits=2, cfm_hidden=20, gt_mask="large_negative",
                                              detach_sub_targets=True, label_smoothing=0.0)),
]


@pytest.mark.parametrize("channels,sizes,B,K,Dt,cfg", CASES)
def test_hcd_loss_cpu_matches_reference(channels, sizes, B, K, Dt, cfg):
    torch.manual_seed(0)
    ref = HCDLoss(channels, Dt, K, config=cfg, backend="reference").train()
    cpu = copy.deepcopy(ref)
    cpu.backend = "cpu"
    for m in cpu.modules():
        if hasattr(m, "backend"):
            m.backend = "cpu"
    case = make_case(channels, sizes, B, K, Dt, seed=B + K)
    for it in range(2):  # two steps: running statistics accumulate
        r = step(ref, *case, grad_out=0.8)
        c = step(cpu, *case, grad_out=0.8)
        close("loss", c[0], r[0])
        for k in PART_NAMES:
            close(k, c[1][k], r[1][k])
        assert set(c[2]) == set(r[2]) and len(r[2]) > 0
        for name in r[2]:
            close(f"grad {name}", c[2][name], r[2][name], rtol=1e-4)
        for i, (gc, gr) in enumerate(zip(c[3], r[3])):
            close(f"grad input {i}", gc, gr, rtol=1e-4)
        for name in r[4]:
            close(f"buffer {name}", c[4][name], r[4][name])
    cpu.eval(), ref.eval()
    with torch.no_grad():
        feats, zs, ft, zt, y = case
        close("eval loss", cpu(feats, zs, ft, zt, y), ref(feats, zs, ft, zt, y))


def test_hcd_loss_cpu_compiled_fullgraph_matches_eager():
    channels, sizes, B, K, Dt = (8, 16), (4, 2), 3, 37, 12
    cfg = HCDConfig(num_sub_logits=3)
    torch.manual_seed(1)
    eager = HCDLoss(channels, Dt, K, config=cfg, backend="cpu")
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    case = make_case(channels, sizes, B, K, Dt, seed=3)
    e = step(eager, *case, grad_out=1.0)
    c = step(compiled, *case, grad_out=1.0)
    close("loss", c[0], e[0])
    for k in PART_NAMES:
        close(k, c[1][k], e[1][k])
    assert set(c[2]) == set(e[2]) and len(e[2]) > 0
    for name in e[2]:
        close(f"grad {name}", c[2][name], e[2][name], rtol=1e-4)
    for name in e[4]:
        close(f"buffer {name}", c[4][name], e[4][name])


def test_hcd_loss_cpu_under_autocast_bf16():
    """Autocast hands the ops bf16 activations with fp32 weights; the ops compute in fp32 regardless."""
    channels, sizes, B, K, Dt = (8, 16), (4, 2), 3, 37, 12
    torch.manual_seed(2)
    crit = HCDLoss(channels, Dt, K, backend="cpu")
    feats, zs, ft, zt, y = make_case(channels, sizes, B, K, Dt, seed=4)
    want = crit(feats, zs, ft, zt, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(feats, zs, ft, zt, y)
    assert loss.dtype == torch.float32
    close("autocast loss", loss.detach(), want.detach(), rtol=5e-2)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in crit.parameters())
