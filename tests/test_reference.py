"""The eager reference (the spec): gradcheck of every piece, the properties of SPEC section 6, and each part
of the loss against an independent pure-Python computation on a tiny case."""
import math

import pytest
import torch
import torch.nn as nn

from hcd_fast import HCDConfig, reference

torch.set_default_dtype(torch.float32)


def _rand(*shape, scale=1.0, dtype=torch.float64, grad=True):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(grad)


# ---------------------------------------------------------------- gradcheck of every piece (float64)

@pytest.mark.slow
@pytest.mark.parametrize("gt_mask", ["zero", "none", "large_negative"])
@pytest.mark.parametrize("n,T", [(1, 1.0), (3, 4.0), (4, 2.0)])
def test_sub_logit_loss_gradcheck(gt_mask, n, T):
    # detach_sub_targets deliberately drops part of the true gradient, so it is tested separately.
    torch.manual_seed(0)
    S, B, K = 2, 3, 5
    cfg = HCDConfig(num_sub_logits=n, temperature=T, gt_mask=gt_mask,
                    w_gt=0.7, w_kd=1.3, w_kl=2.0, w_ol=3.0, ortho_threshold=0.1)
    zf, zs = _rand(S, B, n, K), _rand(B, K)
    zt = torch.randn(B, K, dtype=torch.float64)
    y = torch.randint(0, K, (B,))
    torch.autograd.gradcheck(lambda a, b: reference.sub_logit_loss(a, b, zt, y, cfg)[0], (zf, zs))


def test_bn_relu_pool_gradcheck():
    torch.manual_seed(0)
    x, w, b = _rand(3, 4, 5, 3), _rand(4), _rand(4)
    for training in (True, False):
        rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        torch.autograd.gradcheck(
            lambda x, w, b: reference.bn_relu_pool(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5),
            (x, w, b))


def test_pool_linear_gradcheck():
    torch.manual_seed(0)
    torch.autograd.gradcheck(reference.pool_linear, (_rand(2, 3, 4, 5), _rand(6, 3), _rand(6)))


@pytest.mark.parametrize("hidden", [True, False])
def test_cfm_gradcheck(hidden):
    torch.manual_seed(0)
    B, D, Dt, H, n, K = 3, 4, 5, 6, 2, 3
    hs = _rand(B, D)
    ft, zt = torch.randn(B, Dt, dtype=torch.float64), torch.randn(B, K, dtype=torch.float64)
    if hidden:
        params = (_rand(H, D + Dt), _rand(H), _rand(n * K, H), _rand(n * K))
    else:
        params = (_rand(n * K, D + Dt), _rand(n * K))
    def f(hs, *p):
        w2, b2 = (p[2], p[3]) if hidden else (None, None)
        return reference.cfm(hs, ft, p[0], p[1], w2, b2, zt, n, 0.7, 1.3)
    torch.autograd.gradcheck(f, (hs, *params))


def test_cfm_teacher_gets_no_gradient():
    B, D, Dt, n, K = 2, 3, 4, 2, 3
    ft, zt = _rand(B, Dt), _rand(B, K)
    out = reference.cfm(_rand(B, D), ft, _rand(n * K, D + Dt), _rand(n * K), None, None, zt, n)
    out.sum().backward()
    assert ft.grad is None and zt.grad is None


# ---------------------------------------------------------------- properties (SPEC section 6)

def test_kl_zero_when_distributions_equal():
    torch.manual_seed(1)
    S, B, n, K = 2, 4, 3, 7
    zs = torch.randn(B, K)
    zf = zs[None, :, None, :].expand(S, B, n, K).contiguous()
    for T in (1.0, 3.0):
        _, parts = reference.sub_logit_loss(zf, zs, zs.clone(), torch.randint(0, K, (B,)),
                                            HCDConfig(num_sub_logits=n, temperature=T))
        assert parts["kd"].abs() < 1e-6 and parts["sub_kl"].abs() < 1e-6
    # ... and strictly positive when they differ.
    _, parts = reference.sub_logit_loss(zf + torch.randn_like(zf), zs, zs + torch.randn_like(zs),
                                        torch.randint(0, K, (B,)), HCDConfig(num_sub_logits=n))
    assert parts["kd"] > 1e-4 and parts["sub_kl"] > 1e-4


@pytest.mark.parametrize("gt_mask", ["zero", "none"])
def test_orthogonal_sub_logits_give_zero_ortho(gt_mask):
    B, n, K = 3, 4, 6
    # Sub-logit i is a one-hot on class i + 1 (never the target 0): mutually orthogonal.
    zf = torch.zeros(1, B, n, K)
    for i in range(n):
        zf[0, :, i, i + 1] = 5.0
    y = torch.zeros(B, dtype=torch.long)
    _, parts = reference.sub_logit_loss(zf, torch.randn(B, K), torch.randn(B, K), y,
                                        HCDConfig(num_sub_logits=n, gt_mask=gt_mask, ortho_threshold=0.0))
    assert parts["ortho"] == 0
    # Identical sub-logits are maximally non-orthogonal: G_ij = 1 off the diagonal.
    same = zf[:, :, :1].expand(1, B, n, K).contiguous()
    _, parts = reference.sub_logit_loss(same, torch.randn(B, K), torch.randn(B, K), y,
                                        HCDConfig(num_sub_logits=n, gt_mask=gt_mask, ortho_threshold=0.5))
    assert torch.allclose(parts["ortho"], torch.tensor(0.25))


def test_one_sub_logit_gives_zero_ortho():
    torch.manual_seed(2)
    B, K = 5, 9
    zf = torch.randn(3, B, 1, K, requires_grad=True)
    loss, parts = reference.sub_logit_loss(zf, torch.randn(B, K), torch.randn(B, K),
                                           torch.randint(0, K, (B,)), HCDConfig(num_sub_logits=1, w_gt=0,
                                                                                w_kd=0, w_kl=0, w_ol=1))
    assert parts["ortho"] == 0
    loss.backward()
    assert torch.count_nonzero(zf.grad) == 0


def test_gt_mask_modes_differ_only_at_target():
    torch.manual_seed(3)
    S, B, n, K = 1, 4, 3, 8
    zf, zs, zt = torch.randn(S, B, n, K), torch.randn(B, K), torch.randn(B, K)
    y = torch.randint(0, K, (B,))
    results = {}
    for mode in ("zero", "none", "large_negative"):
        zf_ = zf.clone().requires_grad_(True)
        loss, parts = reference.sub_logit_loss(zf_, zs, zt, y, HCDConfig(num_sub_logits=n, gt_mask=mode,
                                                                           ortho_threshold=-1.0))
        loss.backward()
        results[mode] = (parts, zf_.grad)
    for mode in ("none", "large_negative"):
        # Only the orthogonality term depends on the mode ...
        for k in ("ce", "sub_ce", "kd", "sub_kl"):
            assert torch.equal(results[mode][0][k], results["zero"][0][k])
        assert not torch.allclose(results[mode][0]["ortho"], results["zero"][0]["ortho"])
    # ... and under "zero" the ortho gradient at the target entry vanishes: the gradients of "zero" and
    # "none" differ elsewhere too, but "zero" gets no ortho gradient at the target class.
    ortho_only = HCDConfig(num_sub_logits=n, gt_mask="zero", w_gt=0, w_kd=0, w_kl=0, ortho_threshold=-1.0)
    zf_ = zf.clone().requires_grad_(True)
    reference.sub_logit_loss(zf_, zs, zt, y, ortho_only)[0].backward()
    at_target = zf_.grad[0, torch.arange(B), :, y]
    assert torch.count_nonzero(at_target) == 0
    assert torch.count_nonzero(zf_.grad) > 0


def test_detach_sub_targets_changes_only_sub_logit_grads():
    torch.manual_seed(4)
    S, B, n, K = 2, 3, 2, 6
    zf, zs, zt, y = torch.randn(S, B, n, K), torch.randn(B, K), torch.randn(B, K), torch.randint(0, K, (B,))
    grads = []
    for detach in (False, True):
        a, b = zf.clone().requires_grad_(True), zs.clone().requires_grad_(True)
        cfg = HCDConfig(num_sub_logits=n, detach_sub_targets=detach, w_gt=0, w_kd=0, w_ol=0)
        loss, _ = reference.sub_logit_loss(a, b, zt, y, cfg)
        loss.backward()
        grads.append((a.grad, b.grad, loss.detach()))
    assert torch.equal(grads[0][2], grads[1][2])  # same value
    assert torch.allclose(grads[0][1], grads[1][1])  # same student gradient
    assert torch.count_nonzero(grads[1][0]) == 0 and torch.count_nonzero(grads[0][0]) > 0


def test_stage_terms_are_summed():
    torch.manual_seed(5)
    B, n, K = 3, 2, 5
    zf, zs, zt, y = torch.randn(2, B, n, K), torch.randn(B, K), torch.randn(B, K), torch.randint(0, K, (B,))
    cfg = HCDConfig(num_sub_logits=n, ortho_threshold=-1.0)
    _, both = reference.sub_logit_loss(zf, zs, zt, y, cfg)
    _, first = reference.sub_logit_loss(zf[:1], zs, zt, y, cfg)
    _, second = reference.sub_logit_loss(zf[1:], zs, zt, y, cfg)
    for k in ("sub_ce", "sub_kl", "ortho"):
        assert torch.allclose(both[k], first[k] + second[k])
    for k in ("ce", "kd"):
        assert torch.equal(both[k], first[k])


def test_low_precision_inputs_give_fp32_loss():
    zf = torch.randn(1, 2, 4, 5, dtype=torch.bfloat16)
    loss, parts = reference.sub_logit_loss(zf, torch.randn(2, 5, dtype=torch.float16),
                                           torch.randn(2, 5, dtype=torch.bfloat16), torch.tensor([0, 4]),
                                           HCDConfig())
    assert loss.dtype == torch.float32 and all(p.dtype == torch.float32 for p in parts.values())


def test_bn_relu_pool_matches_batchnorm_module():
    torch.manual_seed(6)
    bn = nn.BatchNorm2d(5, momentum=0.3)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    x = torch.randn(4, 5, 3, 6)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    out = reference.bn_relu_pool(x, bn.weight, bn.bias, rm, rv, True, 0.3, bn.eps)
    expected = torch.relu(bn(x)).mean((2, 3))
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(rm, bn.running_mean) and torch.allclose(rv, bn.running_var)


def test_pool_linear_identity():
    torch.manual_seed(7)
    x, w, b = torch.randn(3, 4, 5, 6, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64), \
        torch.randn(7, dtype=torch.float64)
    assert torch.allclose(reference.pool_linear(x, w, b), x.mean((2, 3)) @ w.T + b)


# ---------------------------------------------------------------- each part by hand, in pure Python

def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _ce_ls(row, y, ls):
    lp = _log_softmax(row)
    return (1 - ls) * -lp[y] + ls * -sum(lp) / len(row)


def _kl(p_row, q_row, T):
    lp, lq = _log_softmax([v / T for v in p_row]), _log_softmax([v / T for v in q_row])
    return T * T * sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def _ortho(subs, y, theta, mode):
    vs = []
    for v in subs:
        v = list(v)
        if mode == "zero":
            v[y] = 0.0
        elif mode == "large_negative":
            v[y] = -1e6
        norm = max(math.sqrt(sum(a * a for a in v)), 1e-12)
        vs.append([a / norm for a in v])
    n = len(vs)
    terms = [max(sum(a * b for a, b in zip(vs[i], vs[j])) - theta, 0.0) ** 2
             for i in range(n) for j in range(n) if i != j]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("mode", ["zero", "none", "large_negative"])
def test_parts_by_hand(mode):
    torch.manual_seed(8)
    S, B, n, K = 2, 2, 3, 4
    T, ls, theta, lam_s, lam_t = 2.0, 0.2, 0.1, 0.8, 1.5
    cfg = HCDConfig(num_sub_logits=n, temperature=T, label_smoothing=ls, ortho_threshold=theta,
                    lambda_student=lam_s, lambda_teacher=lam_t, gt_mask=mode,
                    w_gt=0.5, w_kd=2.0, w_kl=3.0, w_ol=4.0)
    zf = torch.randn(S, B, n, K, dtype=torch.float64) * 3
    zs, zt = torch.randn(B, K, dtype=torch.float64), torch.randn(B, K, dtype=torch.float64)
    y = torch.tensor([1, 3])
    loss, parts = reference.sub_logit_loss(zf, zs, zt, y, cfg)
    L = zf.tolist()
    s_, t_, y_ = zs.tolist(), zt.tolist(), y.tolist()
    ce = sum(_ce_ls(s_[b], y_[b], ls) for b in range(B)) / B
    kd = sum(_kl(t_[b], s_[b], T) for b in range(B)) / B
    sub_ce = sum(sum(_ce_ls(L[s][b][i], y_[b], ls) for b in range(B) for i in range(n)) / (B * n)
                 for s in range(S))
    sub_kl = sum(sum(_kl(L[s][b][i], s_[b], T) for b in range(B) for i in range(n)) / (B * n)
                 for s in range(S))
    ortho = sum(sum(_ortho(L[s][b], y_[b], theta, mode) for b in range(B)) / B for s in range(S))
    expected = {"ce": ce, "sub_ce": sub_ce, "kd": kd, "sub_kl": sub_kl, "ortho": ortho}
    for k, v in expected.items():
        assert math.isclose(parts[k].item(), v, rel_tol=1e-9, abs_tol=1e-12), k
    total = 0.5 * (ce + sub_ce) + 2.0 * kd + 3.0 * sub_kl + 4.0 * ortho
    assert math.isclose(loss.item(), total, rel_tol=1e-9)


def test_cfm_by_hand():
    torch.manual_seed(9)
    B, D, Dt, H, n, K = 2, 2, 3, 4, 2, 3
    hs, ft, zt = (torch.randn(B, D, dtype=torch.float64), torch.randn(B, Dt, dtype=torch.float64),
                  torch.randn(B, K, dtype=torch.float64))
    w1, b1 = torch.randn(H, D + Dt, dtype=torch.float64), torch.randn(H, dtype=torch.float64)
    w2, b2 = torch.randn(n * K, H, dtype=torch.float64), torch.randn(n * K, dtype=torch.float64)
    out = reference.cfm(hs, ft, w1, b1, w2, b2, zt, n, 0.5, 2.0)
    for b in range(B):
        u = hs[b].tolist() + ft[b].tolist()
        hid = [max(sum(w1[h, j].item() * u[j] for j in range(D + Dt)) + b1[h].item(), 0.0) for h in range(H)]
        for i in range(n):
            for k in range(K):
                o = i * K + k
                z = sum(w2[o, h].item() * hid[h] for h in range(H)) + b2[o].item()
                assert math.isclose(out[b, i, k].item(), 0.5 * z + 2.0 * zt[b, k].item(), rel_tol=1e-9,
                                    abs_tol=1e-12)


def test_numerically_stable_for_large_logits():
    torch.manual_seed(10)
    S, B, n, K = 1, 3, 2, 50
    zf = (torch.randn(S, B, n, K) * 300).requires_grad_(True)
    zs = (torch.randn(B, K) * 300).requires_grad_(True)
    loss, _ = reference.sub_logit_loss(zf, zs, torch.randn(B, K) * 300, torch.randint(0, K, (B,)),
                                       HCDConfig(num_sub_logits=n))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zf.grad).all() and torch.isfinite(zs.grad).all()
