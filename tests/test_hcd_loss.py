"""HCDLoss: structure, gradcheck, autocast, state_dict, torch.compile, errors (reference backend); and every
backend (tests/helpers.py: cpu, triton in the interpreter, triton-cuda and cuda on a GPU) against the reference
with the same weights: loss, parts, every parameter and input gradient, running statistics."""
import copy

import pytest
import torch
import torch.nn as nn

import hcd_fast
from hcd_fast import HCDConfig, HCDLoss, functional as HF
from hcd_fast.modules import ConvProjector, LinearProjector, SepConv
from hcd_fast.reference import PART_NAMES
from helpers import assert_close, backend_params, over_backends

CHANNELS = (4, 6, 8)
SIZES = (8, 4, 2)
TEACHER_DIM, K = 10, 7


def make_inputs(B=3, channels=CHANNELS, sizes=SIZES, Dt=TEACHER_DIM, K=K, dtype=torch.float32, grad=False):
    feats = [torch.randn(B, c, s, s, dtype=dtype, requires_grad=grad) for c, s in zip(channels, sizes)]
    zs = torch.randn(B, K, dtype=dtype, requires_grad=grad)
    return feats, zs, torch.randn(B, Dt, dtype=dtype), torch.randn(B, K, dtype=dtype), torch.randint(0, K, (B,))


def test_structure_follows_spec():
    crit = HCDLoss((64, 128, 256, 512), 768, 100)
    assert crit.embed_dim == 768
    stages = [crit.projectors.stage(s) for s in range(4)]
    assert len(crit.projectors) == 4
    assert [type(p) for p in stages] == [ConvProjector] * 3 + [LinearProjector]
    assert [len(p.blocks) for p in stages[:3]] == [3, 2, 1]
    first = stages[0].blocks
    assert [(b.pw2.in_channels, b.pw2.out_channels) for b in first] == [(64, 128), (128, 256), (256, 768)]
    assert first[0].dw1.stride == (2, 2) and first[0].dw1.groups == 64 and first[0].dw1.bias is None
    assert stages[3].proj.bias is not None
    # ResNet widths: 6 blocks in 3 grouped blocks, one per distance from the end of the projector.
    groups = crit.projectors.groups
    assert [g.members for g in groups] == [((0, 0),), ((0, 1), (1, 0)), ((0, 2), (1, 1), (2, 0))]
    assert [(g.c_in, g.c_out) for g in groups] == [(64, 128), (128, 256), (256, 768)]
    last = groups[2]
    assert (last.pw2.in_channels, last.pw2.out_channels, last.pw2.groups) == (768, 3 * 768, 3)
    assert last.dw1.groups == 768 and tuple(last.bn2.weight.shape) == (3 * 768,)
    assert crit.projectors.group_of(1, 0) == (groups[1], 1)
    cfm = crit.cfms.stage(0)  # the S CFMs are stacked: (S, out, in) weights
    assert (cfm.fc1.in_features, cfm.fc1.out_features, cfm.fc2.out_features) == (768 + 768, 768, 400)
    assert tuple(crit.cfms.fc1.weight.shape) == (4, 768, 1536) and tuple(crit.cfms.fc2.weight.shape) == (4, 400, 768)
    single = HCDLoss((8, 16), 12, 5, HCDConfig(cfm_hidden=None, embed_dim=20, num_sub_logits=2))
    assert single.cfms.stage(1).fc2 is None and single.cfms.stage(1).fc1.out_features == 10
    assert single.cfms.fc2 is None and tuple(single.cfms.fc1.weight.shape) == (2, 10, 32)
    assert single.embed_dim == 20 and single.projectors.stage(0).blocks[-1].pw2.out_channels == 20


def test_init_follows_spec():
    torch.manual_seed(0)
    crit = HCDLoss((16, 32), 24, 10)
    # trunc_normal_(std=0.02) truncates at +-2 absolute, as timm's does in the published code.
    assert torch.all(crit.cfms.fc1.bias == 0) and torch.all(crit.cfms.fc2.bias == 0)
    assert crit.cfms.fc1.weight.abs().max() < 2
    for w in (crit.cfms.fc1.weight[0], crit.cfms.fc1.weight[1], crit.cfms.fc2.weight[1]):
        assert abs(w.std().item() - 0.02) < 0.003
    bn = crit.projectors.stage(0).blocks[0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    pw = crit.projectors.stage(0).blocks[0].pw2.weight  # kaiming fan_out: std = sqrt(2 / out_channels)
    assert abs(pw.std().item() - (2 / pw.shape[0]) ** 0.5) < 0.35 * (2 / pw.shape[0]) ** 0.5


@pytest.mark.slow
def test_gradcheck_whole_loss_float64():
    torch.manual_seed(1)
    crit = HCDLoss((2, 3), 4, 3, HCDConfig(num_sub_logits=2, temperature=2.0, ortho_threshold=-0.5),
                   backend="reference").double().eval()
    # BatchNorm biases off 0: a map that is all zeros after a ReLU (frequent on 2x2 maps) reaches the next ReLU
    # as exactly its BatchNorm's bias, which at 0 sits on the kink, where finite differences are one-sided.
    for m in crit.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.bias, 0.1)
    feats, zs, ft, zt, y = make_inputs(B=2, channels=(2, 3), sizes=(4, 2), Dt=4, K=3, dtype=torch.float64,
                                       grad=True)
    params = [p for p in crit.parameters()]
    def f(f0, f1, zs, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
                crit, {name: p for (name, _), p in zip(crit.named_parameters(), ps)}):
            return crit([f0, f1], zs, ft, zt, y)
    torch.autograd.gradcheck(f, (*feats, zs, *[p.detach().clone().requires_grad_(True) for p in params]))


@pytest.mark.slow
def test_gradcheck_train_mode_float64():
    torch.manual_seed(2)
    crit = HCDLoss((2, 3), 4, 3, HCDConfig(num_sub_logits=2), backend="reference").double().train()
    feats, zs, ft, zt, y = make_inputs(B=3, channels=(2, 3), sizes=(4, 2), Dt=4, K=3, dtype=torch.float64,
                                       grad=True)
    torch.autograd.gradcheck(lambda a, b, c: crit([a, b], c, ft, zt, y), (*feats, zs))


def test_parts_and_weights():
    torch.manual_seed(3)
    cfg = HCDConfig(w_gt=0.3, w_kd=2.0, w_kl=0.5, w_ol=4.0)
    crit = HCDLoss(CHANNELS, TEACHER_DIM, K, cfg)
    loss, parts = crit(*make_inputs(), return_parts=True)
    assert set(parts) == {"ce", "sub_ce", "kd", "sub_kl", "ortho"}
    assert all(p.dim() == 0 and not p.requires_grad and p.dtype == torch.float32 for p in parts.values())
    expected = 0.3 * (parts["ce"] + parts["sub_ce"]) + 2.0 * parts["kd"] + 0.5 * parts["sub_kl"] + 4.0 * parts["ortho"]
    assert torch.allclose(loss, expected)


def test_teacher_gets_no_gradient_and_student_does():
    torch.manual_seed(4)
    crit = HCDLoss(CHANNELS, TEACHER_DIM, K)
    feats, zs, ft, zt, y = make_inputs(grad=True)
    ft.requires_grad_(True)
    zt.requires_grad_(True)
    crit(feats, zs, ft, zt, y).backward()
    assert ft.grad is None and zt.grad is None
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats) and zs.grad.abs().sum() > 0
    assert all(p.grad is not None for p in crit.parameters())


def test_running_stats_update_in_train_not_eval():
    crit = HCDLoss(CHANNELS, TEACHER_DIM, K)
    bn = crit.projectors.group_of(0, 1)[0].bn2  # the last block of stage 0
    before = bn.running_mean.clone()
    crit(*make_inputs())
    assert not torch.equal(before, bn.running_mean) and bn.num_batches_tracked == 1
    crit.eval()
    after = bn.running_mean.clone()
    crit(*make_inputs())
    assert torch.equal(after, bn.running_mean)


def test_last_block_matches_plain_sepconv_module():
    """The fused tail (bn_relu_pool) equals SepConv.forward + GAP, running statistics included."""
    torch.manual_seed(5)
    proj = ConvProjector(4, 2, 12)
    plain = SepConv(8, 12)
    plain.load_state_dict(proj.blocks[1].state_dict())
    x = torch.randn(3, 4, 8, 8)
    out = proj(x)
    expected = plain(proj.blocks[0](x)).mean((2, 3))
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(plain.bn2.running_var, proj.blocks[1].bn2.running_var)


def test_projector_follows_its_batchnorm_mode():
    """A projector whose last BatchNorm alone is in eval mode (frozen BN) uses the running statistics, as
    bn(x) would: the BatchNorm's own training flag decides, not the projector's."""
    torch.manual_seed(6)
    proj = ConvProjector(4, 1, 6)
    plain = SepConv(4, 6)
    plain.load_state_dict(proj.blocks[0].state_dict())
    proj.blocks[0].bn2.eval()
    plain.bn2.eval()
    x = torch.randn(3, 4, 8, 8)
    before = proj.blocks[0].bn2.running_mean.clone()
    assert torch.allclose(proj(x), plain(x).mean((2, 3)), atol=1e-6)
    assert torch.equal(before, proj.blocks[0].bn2.running_mean)
    assert int(proj.blocks[0].bn2.num_batches_tracked) == 0


def test_numpy_integer_sizes_accepted():
    np = pytest.importorskip("numpy")
    crit = HCDLoss(np.array([4, 6, 8]), np.int64(TEACHER_DIM), np.int32(K))
    assert crit.student_channels == CHANNELS and type(crit.num_classes) is int
    crit(*make_inputs())
    with pytest.raises(ValueError, match="num_classes"):
        HCDLoss(CHANNELS, TEACHER_DIM, 7.0)


def test_state_dict_round_trip():
    torch.manual_seed(6)
    a = HCDLoss(CHANNELS, TEACHER_DIM, K)
    a(*make_inputs())  # move the running statistics
    b = HCDLoss(CHANNELS, TEACHER_DIM, K)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    inputs = make_inputs()
    assert torch.equal(a(*inputs), b(*inputs))
    assert any(k.endswith("running_mean") for k in a.state_dict())


def _per_stage_cfm_state(crit, seed):
    """The CFM part of a checkpoint written by earlier versions (S separate CFM modules, cfms.<s>.fc1.weight ...),
    with fresh values."""
    from hcd_fast.modules import CFM

    torch.manual_seed(seed)
    cfg = crit.config
    hidden = crit.teacher_dim if cfg.cfm_hidden == "teacher" else cfg.cfm_hidden
    old = nn.ModuleList(CFM(crit.embed_dim, crit.teacher_dim, crit.num_classes, cfg.num_sub_logits, hidden)
                        for _ in crit.student_channels)
    for p in old.parameters():
        nn.init.normal_(p, std=0.05)
    return old, {f"cfms.{k}": v for k, v in old.state_dict().items()}


@pytest.mark.parametrize("hidden", ["teacher", None])
def test_state_dict_keeps_the_per_stage_cfm_layout(hidden):
    """The stacked CFMs save under the keys, shapes and order of S separate CFM modules, and checkpoints in that
    layout (earlier versions) load: the loss then equals the per-stage reference with those weights."""
    torch.manual_seed(12)
    cfg = HCDConfig(cfm_hidden=hidden)
    crit = HCDLoss(CHANNELS, TEACHER_DIM, K, cfg, backend="reference")
    old, old_state = _per_stage_cfm_state(crit, 13)
    state = crit.state_dict()
    got = [(k, tuple(v.shape)) for k, v in state.items() if k.startswith("cfms.")]
    assert got == [(k, tuple(v.shape)) for k, v in old_state.items()]
    assert not any(k.startswith("cfms.fc") for k in state)
    state.update(old_state)
    crit.load_state_dict(state)  # strict
    for s, cfm in enumerate(old):
        assert torch.equal(crit.cfms.fc1.weight[s], cfm.fc1.weight) and torch.equal(crit.cfms.fc1.bias[s], cfm.fc1.bias)
        if hidden is not None:
            assert torch.equal(crit.cfms.fc2.weight[s], cfm.fc2.weight)
    feats, zs, ft, zt, y = make_inputs()
    crit.eval()
    h = [crit.projectors.stage(s)(f) for s, f in enumerate(feats)]
    zf = torch.stack([cfm(hs, ft, zt) for cfm, hs in zip(old, h)])
    want, _ = hcd_fast.reference.sub_logit_loss(zf, zs, zt, y, cfg)
    assert torch.allclose(crit(feats, zs, ft, zt, y), want, rtol=1e-6, atol=1e-7)
    round_trip = HCDLoss(CHANNELS, TEACHER_DIM, K, cfg)
    round_trip.load_state_dict(crit.state_dict())
    assert torch.equal(round_trip.cfms.fc1.weight, crit.cfms.fc1.weight)
    partial = {k: v for k, v in crit.state_dict().items() if not k.startswith("cfms.1.")}
    with pytest.raises(RuntimeError, match="cfms.fc1.weight"):  # an incomplete set is reported, not half-loaded
        HCDLoss(CHANNELS, TEACHER_DIM, K, cfg).load_state_dict(partial)


def test_stacked_cfm_biases_stay_out_of_weight_decay():
    """The stacked CFM biases are 2-d (S, out) but keep the '.bias' suffix, by which timm's optimizer factory (what
    hcd-distill uses) exempts biases from weight decay, as it did the per-stage nn.Linear biases."""
    from timm.optim._param_groups import param_groups_weight_decay

    crit = HCDLoss(CHANNELS, TEACHER_DIM, K)
    assert {n for n, _ in crit.named_parameters() if n.startswith("cfms.")} == {
        "cfms.fc1.weight", "cfms.fc1.bias", "cfms.fc2.weight", "cfms.fc2.bias"}
    groups = param_groups_weight_decay(crit, weight_decay=0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(crit.cfms.fc1.bias) in no_decay and id(crit.cfms.fc2.bias) in no_decay
    assert id(crit.cfms.fc1.weight) not in no_decay and id(crit.cfms.fc2.weight) not in no_decay


@pytest.mark.parametrize("backend", backend_params(["cpu"]))
def test_autocast_weight_casts_are_cached_per_parameter_version(backend):
    """Under autocast the CFM weights are cast once per parameter version: two forwards share the casts, an
    optimizer step makes the next forward cast again, and its loss equals a fresh module's with the new weights
    (never a stale cast)."""
    torch.manual_seed(14)
    crit = HCDLoss(CHANNELS, TEACHER_DIM, K, backend=backend.name)
    opt = torch.optim.SGD(crit.parameters(), lr=0.5)
    inputs = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        crit(*inputs).backward()
        first = {k: v[3] for k, v in crit.cfms.casts._entries.items()}
        assert len(first) == 4  # weight1, bias1, weight2, bias2 in bf16
        crit(*inputs).backward()  # gradients accumulate through the shared casts
        assert all(crit.cfms.casts._entries[k][3] is v for k, v in first.items())
    grads = [p.grad.clone() for p in crit.cfms.parameters()]
    crit.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        crit(*inputs).backward()
    assert all(torch.allclose(2 * p.grad, g) for p, g in zip(crit.cfms.parameters(), grads))
    opt.step()
    fresh = HCDLoss(CHANNELS, TEACHER_DIM, K, backend=backend.name)
    fresh.load_state_dict(crit.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(*inputs)
        assert all(crit.cfms.casts._entries[k][3] is not v for k, v in first.items())
        assert torch.equal(loss, fresh(*inputs))
    copy.deepcopy(crit)  # the cache is not copied (a cast with history cannot be)


def test_momentum_none_refuses_cuda_graph_capture(monkeypatch):
    """BatchNorm momentum=None reads num_batches_tracked on the host: under capture, a clear error."""
    import hcd_fast.modules as M

    crit = HCDLoss(CHANNELS, TEACHER_DIM, K)
    crit.projectors.group_of(0, 1)[0].bn2.momentum = None
    crit(*make_inputs())  # eager: a cumulative average, as nn.BatchNorm2d
    monkeypatch.setattr(M, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="momentum=None.*CUDA graph"):
        crit(*make_inputs())


def test_autocast_bf16_cpu():
    torch.manual_seed(7)
    crit = HCDLoss(CHANNELS, TEACHER_DIM, K)
    inputs = make_inputs(grad=True)
    ref = crit(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = crit(*inputs, return_parts=True)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.allclose(loss, ref, rtol=5e-2)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in crit.parameters())


@pytest.mark.slow
def test_torch_compile_fullgraph_cpu():
    torch.manual_seed(8)
    crit = HCDLoss(CHANNELS, TEACHER_DIM, K).eval()
    inputs = make_inputs()
    compiled = torch.compile(crit, fullgraph=True)
    out = compiled(*inputs)
    assert torch.allclose(out, crit(*inputs), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input -> clear errors

def _crit():
    return HCDLoss(CHANNELS, TEACHER_DIM, K)


@pytest.mark.parametrize("mutate,exc,words", [
    (lambda a: a.update(feats=a["feats"][:2]), ValueError, ["student_feats", "3 stage features", "got 2"]),
    (lambda a: a.update(feats=tuple(a["feats"])[0]), TypeError, ["student_feats", "list or tuple"]),
    (lambda a: a["feats"].__setitem__(1, torch.randn(3, 5, 4, 4)), ValueError,
     ["student_feats[1]", "(3, 6, *, *)", "(3, 5, 4, 4)"]),
    (lambda a: a["feats"].__setitem__(0, torch.randn(2, 4, 8, 8)), ValueError, ["student_feats[0]", "(2, 4, 8, 8)"]),
    (lambda a: a["feats"].__setitem__(0, torch.randn(3, 4, 8)), ValueError, ["student_feats[0]", "4-d"]),
    (lambda a: a.update(zs=torch.randn(4, K)), ValueError, ["teacher_logits", "(4, 7)", "(3, 7)"]),
    (lambda a: a.update(zs=torch.randn(3, K + 1), zt=torch.randn(3, K + 1)), ValueError,
     ["student_logits", "7 classes", "(3, 8)"]),
    (lambda a: a.update(zt=torch.randn(3, K + 1)), ValueError, ["teacher_logits", "(3, 7)", "(3, 8)"]),
    (lambda a: a.update(zs=torch.randint(0, 3, (3, K))), TypeError, ["student_logits", "floating", "int64"]),
    (lambda a: a.update(zt=torch.ones(3, K, dtype=torch.bool)), TypeError, ["teacher_logits", "torch.bool"]),
    (lambda a: a.update(y=torch.tensor([0, 1, K])), ValueError, ["target", "[0, 7)", "7"]),
    (lambda a: a.update(y=torch.tensor([0, -1, 2])), ValueError, ["target", "-1"]),
    (lambda a: a.update(y=torch.tensor([0.0, 1.0, 2.0])), TypeError, ["target", "integer", "float32"]),
    (lambda a: a.update(y=torch.tensor([0, 1])), ValueError, ["target", "(3,)", "(2,)"]),
    (lambda a: a.update(ft=torch.randn(3, TEACHER_DIM + 1)), ValueError, ["teacher_feat", "(3, 10)", "(3, 11)"]),
    (lambda a: a.update(ft=torch.randn(3, TEACHER_DIM, device="meta")), ValueError, ["teacher_feat", "meta", "cpu"]),
    (lambda a: a.update(zs=[[0.0] * K] * 3), TypeError, ["student_logits", "torch.Tensor", "list"]),
])
def test_bad_inputs_give_clear_errors(mutate, exc, words):
    torch.manual_seed(9)
    feats, zs, ft, zt, y = make_inputs()
    args = {"feats": feats, "zs": zs, "ft": ft, "zt": zt, "y": y}
    mutate(args)
    with pytest.raises(exc) as info:
        _crit()(args["feats"], args["zs"], args["ft"], args["zt"], args["y"])
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_validate_false_skips_range_check():
    feats, zs, ft, zt, y = make_inputs()
    bad = torch.tensor([0, 1, K])
    # Without the range check, the out-of-range target reaches the eager reference's cross_entropy, which raises
    # its own error ...
    crit = HCDLoss(CHANNELS, TEACHER_DIM, K, validate=False, backend="reference")
    with pytest.raises(Exception) as info:
        crit(feats, zs, ft, zt, bad)
    assert "[0, 7)" not in str(info.value)
    # ... and makes a fused kernel's loss and every part NaN (never an out-of-bounds read, never a
    # finite wrong loss; the trainer's non-finite check then stops).
    if hcd_fast.backends()["cpu"].available:
        crit = HCDLoss(CHANNELS, TEACHER_DIM, K, validate=False, backend="cpu")
        loss, parts = crit(feats, zs, ft, zt, bad, return_parts=True)
        assert torch.isnan(loss) and all(torch.isnan(v) for v in parts.values())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="student_channels"):
        HCDLoss((), 4, 3)
    with pytest.raises(ValueError, match="teacher_dim"):
        HCDLoss((4,), 0, 3)
    with pytest.raises(ValueError, match="num_classes"):
        HCDLoss((4,), 4, -1)
    with pytest.raises(TypeError, match="config"):
        HCDLoss((4,), 4, 3, config={"temperature": 2})


def test_functional_errors_name_the_argument():
    cfg = HCDConfig(num_sub_logits=2)
    zs, zt, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"sub_logits: expected shape \(\*, 3, 2, 5\)"):
        HF.sub_logit_loss(torch.randn(1, 3, 4, 5), zs, zt, y, cfg)
    with pytest.raises(ValueError, match="weight1"):
        HF.cfm(torch.randn(3, 4), torch.randn(3, 6), torch.randn(8, 9), torch.randn(8), None, None, zt, 2)
    with pytest.raises(ValueError, match="weight2, bias2"):
        HF.cfm(torch.randn(3, 4), torch.randn(3, 6), torch.randn(8, 10), torch.randn(8), torch.randn(10, 8),
               None, zt, 2)
    with pytest.raises(ValueError, match="running_var"):
        HF.bn_relu_pool(torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(4),
                        True)
    with pytest.raises(ValueError, match=r"weight: expected shape \(\*, 3\)"):
        HF.pool_linear(torch.randn(2, 3, 4, 4), torch.randn(5, 4), torch.randn(5))


def test_sync_batchnorm_conversion_keeps_the_loss(monkeypatch):
    """convert_sync_batchnorm (DDP) turns the fused tail's BN into SyncBatchNorm, which then computes it:
    on one process the result equals the unconverted module, running statistics included."""
    torch.manual_seed(10)
    a = HCDLoss(CHANNELS, TEACHER_DIM, K)
    b = nn.SyncBatchNorm.convert_sync_batchnorm(HCDLoss(CHANNELS, TEACHER_DIM, K))
    b.load_state_dict(a.state_dict())
    assert isinstance(b.projectors.group_of(0, 1)[0].bn2, nn.SyncBatchNorm)
    inputs = make_inputs()
    expected = a(*inputs)
    calls = []
    fused = HF.bn_relu_pool
    monkeypatch.setattr(HF, "bn_relu_pool", lambda *args, **kw: calls.append(1) or fused(*args, **kw))
    assert torch.allclose(expected, b(*inputs), atol=1e-6)
    assert calls == []  # the SyncBatchNorm module, not the per-process fused op, normalised
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params(reference=True))
def test_teacher_outputs_from_inference_mode(backend):
    """Teacher tensors made under torch.inference_mode() (the usual frozen-teacher pattern) are accepted by
    every path, and give the same loss and gradients as ordinary tensors."""
    torch.manual_seed(11)
    crit = HCDLoss(CHANNELS, TEACHER_DIM, K, backend=backend.name).to(backend.device).eval()
    feats, zs, ft, zt, y = make_inputs()
    feats = [f.to(backend.device).requires_grad_() for f in feats]
    zs, ft, zt, y = zs.to(backend.device).requires_grad_(), ft.to(backend.device), zt.to(backend.device), \
        y.to(backend.device)
    with torch.inference_mode():
        ft_inf, zt_inf = ft.clone(), zt.clone()
    assert ft_inf.is_inference() and zt_inf.is_inference()
    loss_inf = crit(feats, zs, ft_inf, zt_inf, y)
    grads_inf = torch.autograd.grad(loss_inf, [*feats, zs])
    loss = crit(feats, zs, ft, zt, y)
    grads = torch.autograd.grad(loss, [*feats, zs])
    assert torch.equal(loss_inf, loss)
    assert all(torch.equal(a, b) for a, b in zip(grads_inf, grads))


@pytest.mark.slow
def test_compiled_first_call_in_a_fresh_process():
    """The first call ever made may be the compiled one: nothing on the traced path imports a module
    (dispatch imports every backend when hcd_fast is imported)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from hcd_fast import HCDLoss\n"
        "crit = HCDLoss((4, 6), 8, 5)\n"
        "feats = [torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)]\n"
        "args = (feats, torch.randn(2, 5, requires_grad=True), torch.randn(2, 8), torch.randn(2, 5),\n"
        "        torch.tensor([0, 4]))\n"
        "loss = torch.compile(crit, fullgraph=True)(*args)\n"
        "loss.backward()\n"
        "print('ok', torch.isfinite(loss).item())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok True")


# ---------------------------------------------------------------- every backend against the reference
def backend_inputs(B, channels, sizes, Dt, K, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, c, s, s, generator=g, dtype=torch.float64) * 1.5 for c, s in zip(channels, sizes)]
    zs = torch.randn(B, K, generator=g, dtype=torch.float64) * 2
    ft = torch.randn(B, Dt, generator=g, dtype=torch.float64)
    zt = torch.randn(B, K, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, K, (B,), generator=g)
    return [[f.to(device) for f in feats], zs.to(device), ft.to(device), zt.to(device), y.to(device)]


def backend_step(crit, inputs, dtype, grad_out=0.7):
    """One forward/backward: loss, parts, every parameter and input gradient, the buffers after the step."""
    feats = [f.detach().to(dtype).clone().requires_grad_() for f in inputs[0]]
    zs = inputs[1].detach().to(dtype).clone().requires_grad_()
    crit.zero_grad()
    loss, parts = crit(feats, zs, inputs[2].to(dtype), inputs[3].to(dtype), inputs[4], return_parts=True)
    loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=loss.device))
    strip = lambda n: n.replace("_orig_mod.", "")  # noqa: E731  (torch.compile's wrapper prefix)
    grads = {strip(n): p.grad for n, p in crit.named_parameters()}
    grads.update({f"d feats[{i}]": f.grad for i, f in enumerate(feats)}, **{"d student_logits": zs.grad})
    buffers = {strip(n): b.clone() for n, b in crit.named_buffers()}
    return loss.detach(), parts, grads, buffers


def compare(backend, cfg, training, B, channels, sizes, Dt, K, steps, floor=1e-6, fixed=True):
    """The backend in fp32 against the reference in fp64 (truth) with the same weights, step after step (the
    running statistics accumulate), then in eval mode. Each value within rtol 1e-5 (gradients 2e-5; atol 1e-6,
    parts 1e-5) of the truth or within twice the fp32 reference's own error plus ``floor`` of the largest
    value, whichever is larger (long fp32 chains through the projectors at ResNet-like shapes); fixed=False
    keeps only the second bound."""
    dev = backend.device
    torch.manual_seed(0)
    truth = HCDLoss(channels, Dt, K, cfg, backend="reference").to(dev).double().train(training)
    fast = HCDLoss(channels, Dt, K, cfg, backend=backend.name).to(dev).train(training)
    ref32 = HCDLoss(channels, Dt, K, cfg, backend="reference").to(dev).train(training)
    state = {k: v.float() if v.is_floating_point() else v for k, v in truth.state_dict().items()}
    fast.load_state_dict(state)
    ref32.load_state_dict(state)

    def check(name, g, r, w, rtol, atol):
        w = w.double()
        err, ref_err = (g.double() - w).abs().max().item(), (r.double() - w).abs().max().item()
        scale = w.abs().max().item()
        bound = max(rtol * scale + atol if fixed else 0.0, 2 * ref_err + floor * scale)
        assert torch.isfinite(g).all() and err <= bound, f"{name}: {err:.3e} vs reference {ref_err:.3e}"

    for step in range(steps):
        inputs = backend_inputs(B, channels, sizes, Dt, K, dev, seed=step)
        want, got, base = (backend_step(c, inputs, dt) for c, dt in
                           ((truth, torch.float64), (fast, torch.float32), (ref32, torch.float32)))
        assert got[0].dtype == torch.float32
        check("loss", got[0], base[0], want[0], 1e-5, 1e-6)
        assert set(got[1]) == set(PART_NAMES)
        for name in PART_NAMES:
            check(name, got[1][name], base[1][name], want[1][name], 1e-5, 1e-5)
        assert set(got[2]) == set(want[2])
        for name in want[2]:
            assert got[2][name] is not None, name
            check(name, got[2][name], base[2][name], want[2][name], 2e-5, 1e-6)
        for name in want[3]:
            check(name, got[3][name], base[3][name], want[3][name], 1e-5, 1e-6)
    for crit in (truth, fast, ref32):
        crit.eval()
    inputs = backend_inputs(B, channels, sizes, Dt, K, dev, seed=steps)
    with torch.no_grad():
        want, got, base = (c([f.to(dt) for f in inputs[0]], *[t.to(dt) for t in inputs[1:4]], inputs[4])
                           for c, dt in ((truth, torch.float64), (fast, torch.float32), (ref32, torch.float32)))
    check("eval loss", got, base, want, 1e-5, 1e-6)


SMALL = ((4, 6, 8), (8, 4, 3), 10, 7)  # channels, sizes, teacher_dim, K
RESNET = ((64, 128, 256, 512), (8, 4, 2, 1), 384, 100)  # ResNet18-like stages at 32x32, CIFAR-like K
BACKEND_CASES = [
    # cfg, training, B, channels, sizes, Dt, K, steps
    (HCDConfig(), True, 3, *SMALL, 2),
    (HCDConfig(num_sub_logits=2, temperature=4.0, cfm_hidden=None, gt_mask="large_negative", lambda_student=0.7,
               lambda_teacher=1.3, w_kl=2.0, w_ol=3.0, detach_sub_targets=True), True, 3, *SMALL, 1),
    (HCDConfig(num_sub_logits=3, cfm_hidden=16, gt_mask="none", ortho_threshold=-0.1), False, 3, *SMALL, 1),
    (HCDConfig(num_sub_logits=1), True, 3, (6,), (3,), 10, 7, 1),  # one stage, n = 1
    (HCDConfig(), True, 4, *RESNET, 2),
    (HCDConfig(num_sub_logits=3, temperature=4.0, cfm_hidden=None, gt_mask="none", w_kl=2.0, w_ol=3.0,
               lambda_student=0.5, lambda_teacher=2.0), True, 3, (16,), (3,), 24, 37, 2),
    (HCDConfig(num_sub_logits=2, cfm_hidden=20, gt_mask="large_negative", detach_sub_targets=True,
               label_smoothing=0.0), True, 5, (8, 12), (5, 3), 16, 1001, 2),
]


FAST_CASES = [BACKEND_CASES[i] for i in (3, 5)]  # one stage and n = 1; one stage, n = 3, T = 4
SLOW_CASES = [c for i, c in enumerate(BACKEND_CASES) if i not in (3, 5)]


@pytest.mark.parametrize("backend,cfg,training,B,channels,sizes,Dt,K,steps",
                         over_backends(FAST_CASES, jit_gpu_cases=[], slow_cases=SLOW_CASES))
def test_hcd_loss_matches_reference(backend, cfg, training, B, channels, sizes, Dt, K, steps, no_tf32):
    compare(backend, cfg, training, B, channels, sizes, Dt, K, steps)


@pytest.mark.parametrize("backend,sizes,B,floor", over_backends(
    [], gpu_cases=[((8, 4, 2, 1), 16, 2e-5)], jit_gpu_cases=[((28, 14, 7, 4), 32, 1e-6)]))
def test_hcd_loss_matches_reference_gpu_sizes(backend, sizes, B, floor, no_tf32):
    """At ResNet-like sizes on the GPU, within twice the fp32 reference's own error (plus ``floor``) of the
    float64 truth: loss, parts, every gradient, running statistics."""
    compare(backend, HCDConfig(), True, B, RESNET[0], sizes, RESNET[2], RESNET[3], 1, floor=floor, fixed=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_hcd_loss_compiled_fullgraph_matches_eager(backend):
    """torch.compile(fullgraph=True) of the whole criterion (inductor around the custom ops) gives the eager
    loss, parts, gradients and running statistics (the in-place update survives functionalization). Three stages
    of doubling widths: the last blocks of stages 0 and 1 run as one grouped block."""
    channels, sizes, B, K, Dt = (8, 16, 32), (4, 2, 1), 3, 37, 12
    torch.manual_seed(1)
    eager = HCDLoss(channels, Dt, K, config=HCDConfig(num_sub_logits=3), backend=backend.name).to(backend.device)
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    inputs = backend_inputs(B, channels, sizes, Dt, K, backend.device, seed=3)
    e = backend_step(eager, inputs, torch.float32, 1.0)
    c = backend_step(compiled, inputs, torch.float32, 1.0)
    assert_close("loss", c[0], e[0], 2e-5, atol=1e-9)
    for k in PART_NAMES:
        assert_close(k, c[1][k], e[1][k], 2e-5, atol=1e-9)
    assert set(c[2]) == set(e[2]) and len(e[2]) > 0
    for name in e[2]:
        assert_close(name, c[2][name], e[2][name], 1e-4, atol=1e-9)
    for name in e[3]:
        assert_close(name, c[3][name], e[3][name], 2e-5, atol=1e-9)


@pytest.mark.parametrize("backend", backend_params())
def test_hcd_loss_under_autocast_bf16(backend):
    """Autocast hands the ops bf16 activations with fp32 weights: the loss stays fp32 and close to the fp32
    loss, every parameter gradient fp32 and finite."""
    channels, sizes, B, K, Dt = (8, 16), (4, 2), 3, 37, 12
    torch.manual_seed(2)
    crit = HCDLoss(channels, Dt, K, backend=backend.name).to(backend.device)
    feats, zs, ft, zt, y = backend_inputs(B, channels, sizes, Dt, K, backend.device, seed=4)
    feats, zs, ft, zt = [f.float() for f in feats], zs.float(), ft.float(), zt.float()
    want = crit(feats, zs, ft, zt, y)
    with torch.autocast(backend.device, dtype=torch.bfloat16):
        loss = crit([f.requires_grad_() for f in feats], zs, ft, zt, y)
    assert loss.dtype == torch.float32
    assert_close("autocast loss", loss.detach(), want.detach(), 5e-2)
    loss.backward()
    for name, p in crit.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
