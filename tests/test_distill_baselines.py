"""The trainer's baseline losses against hand computations on tiny inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from hcd_fast import reference
from hcd_fast.distill.methods import CELoss, DKDLoss, KDLoss, OFALoss, dkd_loss, dkd_terms, kd_loss, ofa_term
from hcd_fast.distill.methods.common import kl_div_logits
from hcd_fast.modules import ConvProjector, LinearProjector

ZS = [[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 2.5, 1.0]]
ZT = [[2.0, 0.1, 1.0, 0.0], [-1.0, 0.5, 3.0, 2.0]]
Y = [1, 2]


def softmax(row, T=1.0):
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    s = sum(e)
    return [v / s for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ce_ls(row, y, ls):
    logp = [math.log(v) for v in softmax(row)]
    k = len(row)
    return -((1 - ls) * logp[y] + ls / k * sum(logp))


def tensors(dtype=torch.float64):
    return torch.tensor(ZS, dtype=dtype), torch.tensor(ZT, dtype=dtype), torch.tensor(Y)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_matches_hand_computation(T):
    zs, zt, y = tensors()
    loss, parts = kd_loss(zs, zt, y, temperature=T, label_smoothing=0.1, w_gt=0.7, w_kd=1.3)
    ce = sum(ce_ls(r, t, 0.1) for r, t in zip(ZS, Y)) / 2
    kd = T * T * sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(ZS, ZT)) / 2
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-12)
    assert loss.item() == pytest.approx(0.7 * ce + 1.3 * kd, rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_dkd_matches_explicit_probabilities(T):
    zs, zt, y = tensors()
    tckd, nckd = dkd_terms(zs, zt, y, temperature=T)
    want_t = want_n = 0.0
    for s, t, c in zip(ZS, ZT, Y):
        ps, pt = softmax(s, T), softmax(t, T)
        bs, bt = [ps[c], 1 - ps[c]], [pt[c], 1 - pt[c]]
        want_t += kl(bt, bs)
        # Non-target distributions: the remaining probabilities renormalised.
        ns = [p / (1 - ps[c]) for k, p in enumerate(ps) if k != c]
        nt = [p / (1 - pt[c]) for k, p in enumerate(pt) if k != c]
        want_n += kl(nt, ns)
    assert tckd.item() == pytest.approx(T * T * want_t / 2, rel=1e-10)
    assert nckd.item() == pytest.approx(T * T * want_n / 2, rel=1e-10)


def test_dkd_matches_original_masked_formulation():
    """The DKD paper's code (softmax with a -1000 offset on the target) on moderate logits."""
    torch.manual_seed(0)
    zs, zt = torch.randn(5, 7, dtype=torch.float64) * 3, torch.randn(5, 7, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (5,))
    T = 4.0
    gt = F.one_hot(y, 7).double()
    ps, pt = F.softmax(zs / T, 1), F.softmax(zt / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="sum") * T * T / 5
    nckd = F.kl_div(F.log_softmax(zs / T - 1000 * gt, 1), F.softmax(zt / T - 1000 * gt, 1),
                    reduction="sum") * T * T / 5
    got_t, got_n = dkd_terms(zs, zt, y, T)
    torch.testing.assert_close(got_t, tckd, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_n, nckd, rtol=1e-9, atol=1e-12)


def test_dkd_warmup_ramp_and_weights():
    zs, zt, y = tensors()
    tckd, nckd = dkd_terms(zs, zt, y)
    ce = F.cross_entropy(zs, y, label_smoothing=0.1)
    for epoch, ramp in ((5, 0.25), (20, 1.0), (40, 1.0)):
        loss, parts = dkd_loss(zs, zt, y, epoch, alpha=1.5, beta=2.0, warmup=20)
        torch.testing.assert_close(loss, ce + ramp * (1.5 * tckd + 2.0 * nckd))
    crit = DKDLoss(alpha=1.0, beta=8.0, warmup=10)
    crit.set_epoch(2)
    loss = crit(None, zs, None, zt, y)
    torch.testing.assert_close(loss, ce + 0.2 * (tckd + 8.0 * nckd))


def test_dkd_finite_at_large_logits_and_gradcheck():
    torch.manual_seed(1)
    zs = (torch.randn(3, 5, dtype=torch.float64) * 300).requires_grad_()
    zt = torch.randn(3, 5, dtype=torch.float64) * 300
    y = torch.tensor([0, 4, 2])
    tckd, nckd = dkd_terms(zs, zt, y)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(zs.grad).all()
    small = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: dkd_terms(z, zt / 300, y, 2.0), (small,))


@pytest.mark.parametrize("eps", [1.0, 1.5])
def test_ofa_matches_hand_computation(eps):
    zs, zt, y = tensors()
    got = ofa_term(zs, zt, y, eps=eps, temperature=2.0)
    want = 0.0
    for s, t, c in zip(ZS, ZT, Y):
        pt = softmax(t, 2.0)
        logq = [math.log(v) for v in softmax(s, 2.0)]
        for k in range(4):
            onehot = 1.0 if k == c else 0.0
            want += -((pt[k] + onehot) ** eps - onehot) * logq[k]
    assert got.item() == pytest.approx(want / 2, rel=1e-12)


def test_ofa_eps1_is_cross_entropy_with_teacher_distribution():
    zs, zt, y = tensors()
    want = -(F.softmax(zt, 1) * F.log_softmax(zs, 1)).sum(1).mean()
    torch.testing.assert_close(ofa_term(zs, zt, y, eps=1.0), want)


def test_ce_and_kd_criteria_and_teacher_gets_no_gradient():
    zs, zt, y = tensors()
    zs.requires_grad_()
    zt.requires_grad_()
    loss, parts = CELoss(0.2)(None, zs, None, zt, y, return_parts=True)
    torch.testing.assert_close(loss, F.cross_entropy(zs, y, label_smoothing=0.2))
    assert set(parts) == {"ce"}
    loss = KDLoss(temperature=2.0, w_kd=2.0)(None, zs, None, zt, y)
    torch.testing.assert_close(loss, F.cross_entropy(zs, y, label_smoothing=0.1)
                               + 2.0 * kl_div_logits(zt.detach(), zs, 2.0))
    loss.backward()
    assert zt.grad is None and zs.grad is not None


def test_ofa_criterion_structure_and_value():
    torch.manual_seed(2)
    channels, dt, K = (3, 5, 6), 4, 7
    crit = OFALoss(channels, dt, K, temperature=1.0, eps=1.5, w_gt=0.5, w_kd=2.0, w_ofa=3.0, backend="reference")
    D = max(channels[-1], dt)
    assert crit.embed_dim == D and len(crit.projectors) == 3 and len(crit.heads) == 3
    assert isinstance(crit.projectors[0], ConvProjector) and len(crit.projectors[0].blocks) == 2
    assert isinstance(crit.projectors[2], LinearProjector)
    assert all(h.in_features == D and h.out_features == K for h in crit.heads)
    crit.eval()
    feats = [torch.randn(3, c, 9, 7) for c in channels]
    zs, zt, y = torch.randn(3, K, requires_grad=True), torch.randn(3, K, requires_grad=True), torch.tensor([0, 6, 3])
    loss, parts = crit(feats, zs, torch.randn(3, dt), zt, y, return_parts=True)
    # The deepest stage by the literal conv1x1 + GAP of the reference, then the head.
    p = crit.projectors[2].proj
    deep = crit.heads[2](reference.pool_linear(feats[2], p.weight.flatten(1), p.bias))
    fused = crit.heads[2](crit.projectors[2](feats[2]))
    torch.testing.assert_close(ofa_term(deep, zt, y, 1.5), ofa_term(fused, zt, y, 1.5))
    stage = sum(ofa_term(h(pr(f)), zt, y, 1.5) for f, pr, h in zip(feats, crit.projectors, crit.heads))
    want = 0.5 * F.cross_entropy(zs, y, label_smoothing=0.1) + 2.0 * ofa_term(zs, zt, y, 1.5) + 3.0 * stage
    torch.testing.assert_close(loss, want)
    assert set(parts) == {"ce", "kd", "ofa"}
    loss.backward()
    assert zt.grad is None and all(h.weight.grad is not None for h in crit.heads)
    assert all(q.grad is not None for q in crit.projectors[0].parameters())
