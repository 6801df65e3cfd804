"""The op contract (hcd_fast/ops/<op>.py), checked on every backend available here: a new backend adds a
parameter, not a file.

- dtypes: output and gradient dtypes equal the reference's for fp32, fp64, bf16, fp16 and autocast(bf16)
  with fp32 weights (the README's dtype table);
- no output of any registered torch op aliases an input or another output (a custom op that returns an
  intermediate it also saves broke torch.compile's gradients on torch 2.11);
- torch.compile(aot_eager, fullgraph) gives the eager gradients (fails on torch 2.11 for an op with an
  aliasing output);
- opcheck (schema, fake kernel, autograd registration) of every registered op;
- ortho_on="raw" and the large-logit student gradient against float64.
"""
import pytest
import torch

import hcd_fast
from hcd_fast import HCDConfig, reference
from hcd_fast.ops import op_table
from helpers import BACKENDS, assert_close

CPU = torch.device("cpu")
DEV = torch.device("cuda") if torch.cuda.is_available() else CPU
# The fast backends of tests/helpers.py (the one list) available on this machine's device.
FAST = [b.name for b in BACKENDS if b.device == DEV.type and DEV.type in hcd_fast.backends()[b.name].devices]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _leaf(*shape, dtype=torch.float32, grad=True, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype).requires_grad_(grad)


def _cases(op, dtype, autocast):
    """Inputs of ``op`` (a tuple) and the differentiable leaves. With autocast the parameters stay fp32 and
    the activations are bf16, as a network under autocast produces them."""
    act = torch.bfloat16 if autocast else dtype
    par = torch.float32 if autocast else dtype
    if op == "sub_logit_loss":
        zf, zs, zt = _leaf(2, 3, 2, 11, dtype=act), _leaf(3, 11, dtype=act), _leaf(3, 11, dtype=act, grad=False)
        y = torch.randint(0, 11, (3,), device=DEV)
        return (zf, zs, zt, y, HCDConfig(num_sub_logits=2)), [zf, zs]
    if op == "cfm":
        h, ft, zt = _leaf(3, 4, dtype=act), _leaf(3, 5, dtype=act, grad=False), _leaf(3, 7, dtype=act, grad=False)
        w1, b1, w2, b2 = _leaf(6, 9, dtype=par), _leaf(6, dtype=par), _leaf(14, 6, dtype=par), _leaf(14, dtype=par)
        return (h, ft, w1, b1, w2, b2, zt, 2, 0.5, 2.0), [h, w1, b1, w2, b2]
    if op == "pool_linear":
        x, w, b = _leaf(3, 5, 2, 3, dtype=act), _leaf(4, 5, dtype=par), _leaf(4, dtype=par)
        return (x, w, b), [x, w, b]
    x, w, b = _leaf(3, 5, 2, 3, dtype=act), _leaf(5, dtype=par), _leaf(5, dtype=par)
    rm, rv = torch.zeros(5, device=DEV, dtype=par), torch.ones(5, device=DEV, dtype=par)
    return (x, w, b, rm, rv, True, 0.1, 1e-5), [x, w, b]


def _run(fn, op, args, leaves, autocast):
    with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=autocast):
        out = fn(*args)
    out = out[0] if op == "sub_logit_loss" else out
    grads = torch.autograd.grad(out.float().sum(), leaves)
    return out.dtype, [g.dtype for g in grads]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("op", ["sub_logit_loss", "cfm", "pool_linear", "bn_relu_pool"])
@pytest.mark.parametrize("dtype", DTYPES + ["autocast"], ids=str)
def test_dtypes_equal_the_reference(backend, op, dtype):
    autocast = dtype == "autocast"
    args, leaves = _cases(op, torch.float32 if autocast else dtype, autocast)
    want = _run(getattr(reference, op), op, args, leaves, autocast)
    args, leaves = _cases(op, torch.float32 if autocast else dtype, autocast)
    got = _run(getattr(op_table(backend, DEV), op), op, args, leaves, autocast)
    assert got == want


def _registered(backend):
    return {"triton": torch.ops.hcd_triton, "cpu": torch.ops.hcd_fast, "cuda": torch.ops.hcd_fast}[backend]


def _op_args(ns):
    """One set of raw schema arguments per registered torch op of namespace ``ns`` (fp32, with gradients where
    they flow; sub_logit_loss_backward's statistics come from ``ns``'s own forward)."""
    g = torch.Generator().manual_seed(0)

    def r(*s, grad=True):
        return torch.randn(*s, generator=g).to(DEV).requires_grad_(grad)

    zt = r(3, 7, grad=False)
    x = r(3, 5, 4, 3)
    rm, rv = torch.zeros(5, device=DEV), torch.ones(5, device=DEV)
    w, b = r(5), r(5)
    mean, invstd = torch.randn(5, generator=g).to(DEV), torch.rand(5, generator=g).to(DEV) + 0.5
    y = torch.tensor([0, 6, 2], device=DEV)
    sll = [(r(2, 3, 2, 7), r(3, 7), zt, y, 2.0, 0.1, 0.5, 1e-12, mask, fill, shift, detach, 1.0, 1.0, 6.0, 1.0)
           for mask, fill, shift, detach in ((True, 0.0, 0.0, False), (True, -1e6, 1.5, True),
                                             (False, 0.0, 0.7, False))]
    sll_bwd = []
    for args, need in zip(sll, ((True, True), (True, False), (False, True))):
        zf, zs, zt_, y_, T, ls, _, _, mask, _, shift, detach, w_gt, w_kd, w_kl, _ = args
        with torch.no_grad():
            _, _, row_stats, ortho_coef, sample_stats = ns.sub_logit_loss(*args)
        sll_bwd.append((torch.tensor(0.7, device=DEV), zf.detach(), zs.detach(), zt_, y_, row_stats, ortho_coef,
                        sample_stats, T, ls, shift, mask, detach, w_gt, w_kd, w_kl, *need))
    ops = {}
    if hasattr(ns, "projector_dwconv"):  # the fused projector ops (triton only; see tests/test_projector.py)
        cl = x.detach().contiguous(memory_format=torch.channels_last)
        dw_w, sc, sh = r(4, 1, 3, 3), r(4), r(4)
        m4 = r(3, 4, 5, 3)
        ops["projector_dwconv"] = [(m4, dw_w, None, None, 2), (m4, dw_w, sc, sh, 1),
                                   (m4, dw_w, sc[:3], sh[:3], 2)]  # the prologue on the first 3 channels only
        ops["projector_dwconv_backward"] = [(r(3, 4, 3, 2, grad=False), m4.detach(), dw_w.detach(), None, None, 2),
                                            (r(3, 4, 5, 3, grad=False), m4.detach(), dw_w.detach(), sc.detach(),
                                             sh.detach(), 1)]
        nbt = torch.tensor(2, device=DEV)
        ops["projector_pwconv"] = [(cl, r(6, 5, grad=False), r(6, grad=False), r(6, grad=False),
                                    torch.zeros(6, device=DEV), torch.ones(6, device=DEV), nbt, training, 0.1,
                                    cumulative, 1e-5, 1)
                                   for training, cumulative in ((True, False), (True, True), (False, False))]
        m6 = r(3, 6, 4, 3, grad=False).contiguous(memory_format=torch.channels_last)
        ops["projector_pwconv"].append((m6, r(4, 3, grad=False), r(4, grad=False), r(4, grad=False),  # 2 groups
                                        torch.zeros(4, device=DEV), torch.ones(4, device=DEV), nbt, True, 0.1, False,
                                        1e-5, 2))
        y6 = r(3, 6, 4, 3, grad=False).contiguous(memory_format=torch.channels_last)
        ops["projector_pwconv_backward"] = [(r(3, 6, 4, 3, grad=False), r(6, grad=False), r(6, grad=False), xx,
                                             r(6, 5, grad=False), y6, r(6, grad=False), mean.new_zeros(6),
                                             invstd.new_ones(6), training, 1)
                                            for training in (True, False) for xx in (x.detach(), cl)]
        y4 = r(3, 4, 4, 3, grad=False).contiguous(memory_format=torch.channels_last)
        ops["projector_pwconv_backward"].append((r(3, 4, 4, 3, grad=False), r(4, grad=False), r(4, grad=False), m6,
                                                 r(4, 3, grad=False), y4, r(4, grad=False), mean.new_zeros(4),
                                                 invstd.new_ones(4), True, 2))
    return {
        **ops,
        "sub_logit_loss": sll,
        "sub_logit_loss_backward": sll_bwd,
        "cfm": [(r(3, 4), r(3, 5, grad=False), r(6, 9), r(6), r(14, 6), r(14), zt, 2, 0.5, 2.0),
                (r(3, 4), r(3, 5, grad=False), r(14, 9), r(14), None, None, zt, 2, 0.5, 2.0)],
        "pool_linear": [(x, r(6, 5), r(6)), (x.detach().contiguous(memory_format=torch.channels_last), r(6, 5),
                                              r(6))],
        "bn_relu_pool_fwd": [(x.detach(), w.detach(), b.detach(), rm, rv, training, 0.1, 1e-5)
                             for training in (True, False)],
        "bn_relu_pool_bwd": [(r(3, 5, grad=False), xx, w.detach(), b.detach(), mean, invstd, training)
                             for training in (True, False)
                             for xx in (x.detach(), x.detach().contiguous(memory_format=torch.channels_last))],
    }


MUTATING = ("bn_relu_pool_fwd", "projector_pwconv")  # ops that update running statistics in place


def _storages(ts):
    return {t.untyped_storage().data_ptr() for t in ts if isinstance(t, torch.Tensor) and t.numel() > 0}


@pytest.mark.parametrize("backend", FAST)
def test_no_output_aliases_an_input_or_another_output(backend):
    ns = _registered(backend)
    for name, arg_sets in _op_args(ns).items():
        for args in arg_sets:
            args = tuple(a.clone() if isinstance(a, torch.Tensor) and name in MUTATING else a for a in args)
            with torch.no_grad():
                outs = getattr(ns, name)(*args)
            outs = (outs,) if isinstance(outs, torch.Tensor) else outs  # a single-output op
            inputs = _storages(args)
            seen = set()
            for i, o in enumerate(outs):
                if o.numel() == 0:
                    continue
                s = o.untyped_storage().data_ptr()
                assert s not in inputs, f"{backend} {name}: output {i} aliases an input"
                assert s not in seen, f"{backend} {name}: output {i} aliases another output"
                seen.add(s)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    ns = _registered(backend)
    for name, arg_sets in _op_args(ns).items():
        for args in arg_sets:
            if name in MUTATING:
                args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(getattr(ns, name).default, args)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FAST)
def test_compiled_gradients_equal_eager(backend):
    """torch.compile(aot_eager, fullgraph) of each op: forward and every gradient equal eager (fp32, output
    dtype equal to the input dtype: the case where an op's `.to(dtype)` returned its own intermediate)."""
    ops = op_table(backend, DEV)
    for op in ("pool_linear", "cfm", "sub_logit_loss", "bn_relu_pool"):
        torch.manual_seed(1)
        args, leaves = _cases(op, torch.float32, False)

        def f(*a, _op=op):
            out = getattr(ops, _op)(*a)
            return out[0] if _op == "sub_logit_loss" else out

        def run(fn):
            a = tuple(t.clone() if isinstance(t, torch.Tensor) and not t.requires_grad else t for t in args)
            out = fn(*a)
            weight = torch.linspace(-1, 2, out.numel(), device=DEV).view(out.shape)
            return [out.detach()] + list(torch.autograd.grad((out * weight).sum(), leaves))

        eager = run(f)
        torch._dynamo.reset()
        compiled = run(torch.compile(f, backend="aot_eager", fullgraph=True))
        for i, (c, e) in enumerate(zip(compiled, eager)):
            assert_close(f"{backend} {op} output/grad {i}", c, e, 1e-5)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("gt_mask", ["zero", "none", "large_negative"])
def test_ortho_on_raw_matches_reference(backend, gt_mask):
    """ortho_on="raw" (orthogonality of zf - lambda_t z_t) equals the reference, forward and gradients, fp64
    (1e-6: Triton passes float scalars such as the loss weights to its kernels in fp32)."""
    torch.manual_seed(2)
    cfg = HCDConfig(num_sub_logits=3, temperature=2.0, ortho_on="raw", gt_mask=gt_mask, lambda_teacher=0.7,
                    lambda_student=1.3, ortho_threshold=-0.2, w_ol=3.0)
    zf, zs = _leaf(2, 5, 3, 37, dtype=torch.float64), _leaf(5, 37, dtype=torch.float64)
    zt = _leaf(5, 37, dtype=torch.float64, grad=False)
    y = torch.randint(0, 37, (5,), device=DEV)
    got, gparts = op_table(backend, DEV).sub_logit_loss(zf, zs, zt, y, cfg)
    want, wparts = reference.sub_logit_loss(zf, zs, zt, y, cfg)
    assert_close("loss", got.detach(), want.detach(), 1e-6)
    assert_close("ortho", gparts["ortho"], wparts["ortho"], 1e-6)
    for g, w, name in zip(torch.autograd.grad(got, (zf, zs)), torch.autograd.grad(want, (zf, zs)), ("zf", "zs")):
        assert_close(name, g, w, 1e-6)
    if gt_mask != "large_negative":  # there the -1e6 entry dominates every row: both choices give cosines ~1
        _, fused = reference.sub_logit_loss(zf, zs, zt, y, cfg.replace(ortho_on="fused"))
        assert abs(float(fused["ortho"]) - float(wparts["ortho"])) > 1e-3  # the two choices differ here


@pytest.mark.slow
def test_ortho_on_raw_reference_gradcheck():
    torch.manual_seed(3)
    cfg = HCDConfig(num_sub_logits=3, temperature=2.0, ortho_on="raw", lambda_teacher=0.6, ortho_threshold=-0.3)
    zf = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    zs = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    zt, y = torch.randn(2, 5, dtype=torch.float64), torch.tensor([1, 4])
    assert torch.autograd.gradcheck(lambda a, b: reference.sub_logit_loss(a, b, zt, y, cfg)[0], (zf, zs))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_student_gradient_at_large_logits_against_float64(backend, temperature):
    """At logit scale ~150 the fp32 student-logit gradient keeps fp32 accuracy (log-probabilities formed as
    (x - max)/T - log Z): relative error against the float64 reference below 2e-6 (x/T - (max/T + log Z)
    gave ~3e-5)."""
    torch.manual_seed(4)
    cfg = HCDConfig(num_sub_logits=4, temperature=temperature)
    zf64 = torch.randn(2, 8, 4, 100, dtype=torch.float64, device=DEV) * 150
    zs64 = torch.randn(8, 100, dtype=torch.float64, device=DEV) * 150
    zt64 = torch.randn(8, 100, dtype=torch.float64, device=DEV) * 150
    y = torch.randint(0, 100, (8,), device=DEV)
    zf64, zs64 = zf64.float().double(), zs64.float().double()  # the same values in both precisions
    zt64 = zt64.float().double()
    zf, zs = zf64.float().requires_grad_(), zs64.float().requires_grad_()
    zf64.requires_grad_(), zs64.requires_grad_()
    loss, _ = op_table(backend, DEV).sub_logit_loss(zf, zs, zt64.float(), y, cfg)
    want, _ = reference.sub_logit_loss(zf64, zs64, zt64, y, cfg)
    g = torch.autograd.grad(loss, (zf, zs))
    w = torch.autograd.grad(want, (zf64, zs64))
    assert_close("loss", loss.detach(), want.detach(), 2e-6)
    assert_close("d sub_logits", g[0], w[0], 5e-6)  # includes the orthogonality gradient (O(|x|) terms)
    assert_close("d student_logits", g[1], w[1], 2e-6)
