"""sub_logit_loss on every fused backend against hcd_fast.reference: loss, every part, d/d sub_logits and
d/d student_logits, and the statistics the forward saves for the backward op.

Backends are parameters: "cpu" (C++), "triton" (CPU tensors under the Triton interpreter, TRITON_INTERPRET=1 set
by conftest.py without a GPU), and on a GPU "cuda" and "triton-cuda" (``cuda`` marker; a subset of the cases:
every distinct Triton configuration is a JIT compile there). Truth is the reference evaluated in float64 on the
same input values. Inputs are non-contiguous views, grad_output is a tensor != 1, and every freshly allocated
tensor is NaN-poisoned (torch.utils.deterministic.fill_uninitialized_memory), so an element a kernel forgets
to write shows.
"""
import itertools

import pytest
import torch

import hcd_fast
from hcd_fast import HCDConfig
from hcd_fast import functional as HF
from hcd_fast import reference as R
from hcd_fast.config import LARGE_NEGATIVE
from hcd_fast.ops import sub_logit_loss as OPDEF
from helpers import BACKENDS as ALL_BACKENDS
from helpers import assert_close, backend_marks

PARTS = R.PART_NAMES
REPORT = hcd_fast.backends()
GPU = torch.cuda.is_available()
# The backends come from tests/helpers.py's one list (with its marks: ``cuda`` on the GPU, ``triton`` for Triton,
# skipped with the backend's own reason where it is not available), as (name, device) parameters.
_PARAMS = [pytest.param(b.name, b.device, id=b.id, marks=backend_marks(b)) for b in ALL_BACKENDS]
CPU_BACKENDS = [p for p, b in zip(_PARAMS, ALL_BACKENDS) if b.device == "cpu"]
GPU_BACKENDS = [p for p, b in zip(_PARAMS, ALL_BACKENDS) if b.device == "cuda"]
BACKENDS = CPU_BACKENDS + GPU_BACKENDS

pytestmark = pytest.mark.usefixtures("poison_uninitialized")


def test_backends_available():
    """The parameters above are not silently skipped here: the C++ extension is built and Triton runs
    (interpreter or GPU)."""
    assert REPORT["cpu"].available, REPORT["cpu"].reason
    assert REPORT["triton"].available, REPORT["triton"].reason


# ---------------------------------------------------------------------------------------------- helpers
def make_inputs(S, B, n, K, dtype=torch.float32, device="cpu", correlated=True, scale=3.0, seed=0):
    """Leaf tensors in a (K, n, B, S) / (K, B) layout, so the (S, B, n, K) / (B, K) views the op sees are
    non-contiguous. ``correlated`` makes a sample's sub-logits share a component: Gram entries exceed the
    orthogonality threshold and that term (and its gradient) is not trivially 0."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(K, n, B, S, generator=g, dtype=torch.float64) * scale
    if correlated:
        base = 0.6 * base + torch.randn(K, 1, B, S, generator=g, dtype=torch.float64) * scale
    sub_leaf = base.to(device, dtype).requires_grad_()
    zs_leaf = (torch.randn(K, B, generator=g, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()
    zt = (torch.randn(B, K, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    y = torch.randint(0, K, (B,), generator=g).to(device)
    return sub_leaf, zs_leaf, zt, y


def views(sub_leaf, zs_leaf):
    return sub_leaf.permute(3, 2, 1, 0), zs_leaf.t()


def run(backend, sub_leaf, zs_leaf, zt, y, cfg, grad_out, validate=None):
    """loss, parts, d/d sub_logits, d/d student_logits; grad_out is given as a tensor on the device."""
    sub, zs = views(sub_leaf, zs_leaf)
    loss, parts = HF.sub_logit_loss(sub, zs, zt, y, cfg, backend=backend, validate=validate)
    go = torch.tensor(grad_out, dtype=loss.dtype, device=loss.device)
    gs, gz = torch.autograd.grad(loss, (sub_leaf, zs_leaf), grad_outputs=go)
    return loss.detach(), {k: v.clone() for k, v in parts.items()}, gs, gz


def truth(sub_leaf, zs_leaf, zt, y, cfg, grad_out):
    s = sub_leaf.detach().double().requires_grad_()
    z = zs_leaf.detach().double().requires_grad_()
    return run("reference", s, z, zt.double(), y, cfg, grad_out)


def check(got, want, rtol=1e-5, dtype=torch.float32):
    loss, parts, gs, gz = got
    assert loss.dtype == dtype and loss.dim() == 0
    assert_close("loss", loss, want[0], rtol)
    for k in PARTS:
        assert parts[k].dtype == dtype and not parts[k].requires_grad
        # a part that is ~0 (ortho with large_negative, or n = 1) is checked absolutely
        assert_close(k, parts[k], want[1][k], rtol) if want[1][k].abs() > 1e-6 else \
            assert_close(k, parts[k], want[1][k], 1.0, atol=1e-6)
    assert_close("grad sub_logits", gs, want[2], rtol)
    assert_close("grad student_logits", gz, want[3], rtol)


def cases():
    """Covering combinations of SPEC section 6 (K x n crossed; B, S, T, gt_mask, detach, ortho_on cycled)."""
    Ks, ns, Bs, Ss, Ts = (7, 37, 100, 1000, 1001), (1, 2, 3, 4, 8), (1, 3, 37), (1, 4), (1.0, 4.0)
    modes = ("zero", "none", "large_negative")
    for i, (K, n) in enumerate(itertools.product(Ks, ns)):
        B, S, T, mode, detach, raw = Bs[i % 3], Ss[(i // 3) % 2], Ts[i % 2], modes[(i // 2) % 3], i % 4 == 3, \
            i % 5 == 2
        yield (B, K, n, S, T, mode, detach, raw), (f"B{B}-K{K}-n{n}-S{S}-T{T:g}-{mode}"
                                                  f"{'-detach' if detach else ''}{'-raw' if raw else ''}")


CASES = list(cases())
# The Triton interpreter is slow on a shared CPU: a subset that still covers every K, n, gt_mask, detach,
# ortho_on, T, S and B value above.
INTERPRETER_CASES = [CASES[i] for i in (0, 4, 7, 8, 11, 13, 19, 22)]
# GPU: a few cases (one JIT compile per distinct Triton configuration) and the longest rows.
GPU_CASES = [CASES[i] for i in (0, 6, 12, 18, 24)] + [((2, 32768, 4, 2, 2.0, "none", False, False),
                                                       "B2-K32768-n4-S2-T2-none")]
# The fast lane (pytest -m "not slow") keeps the cases with B * K * n under 4000; the rest are slow.
MATCH_PARAMS = [pytest.param(b.values[0], b.values[1], *c, id=f"{b.id}-{cid}",
                             marks=list(b.marks) + ([pytest.mark.slow] if c[0] * c[1] * c[2] >= 4000 else []))
                for b, case_list in ((CPU_BACKENDS[0], CASES), (CPU_BACKENDS[1], INTERPRETER_CASES),
                                     (GPU_BACKENDS[0], GPU_CASES), (GPU_BACKENDS[1], GPU_CASES))
                for c, cid in case_list]


def config(n, T=2.0, mode="zero", detach=False, raw=False, **kw):
    return HCDConfig(num_sub_logits=n, temperature=T, gt_mask=mode, detach_sub_targets=detach,
                     ortho_on="raw" if raw else "fused", lambda_teacher=0.7 if raw else 1.0, **kw)


# ---------------------------------------------------------------------------------------------- fp32
@pytest.mark.parametrize("backend,device,B,K,n,S,T,mode,detach,raw", MATCH_PARAMS)
def test_matches_reference_fp32(backend, device, B, K, n, S, T, mode, detach, raw):
    cfg = config(n, T, mode, detach, raw, label_smoothing=0.2, ortho_threshold=0.3, w_gt=0.7, w_kd=1.3,
                 w_kl=2.5, w_ol=3.0)
    inputs = make_inputs(S, B, n, K, device=device, seed=K * 31 + n)
    want = truth(*inputs, cfg, 0.37)
    check(run(backend, *inputs, cfg, 0.37), want)
    if n > 1 and mode != "large_negative" and not raw:
        assert want[1]["ortho"] > 0  # the correlated inputs exercise the hinge


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", ["zero", "none", "large_negative"])
def test_options_without_label_smoothing(backend, device, mode):
    """label_smoothing = 0, ortho_on="raw" with lambda_student != 1, threshold < 0 (every pair active)."""
    cfg = HCDConfig(num_sub_logits=3, temperature=2.0, gt_mask=mode, label_smoothing=0.0, ortho_on="raw",
                    lambda_student=1.3, lambda_teacher=0.6, ortho_threshold=-0.2, w_ol=2.0)
    inputs = make_inputs(2, 5, 3, 37, device=device, seed=7)
    check(run(backend, *inputs, cfg, 1.7), truth(*inputs, cfg, 1.7))


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale,T", [(150.0, 1.0), (300.0, 4.0)])
def test_logits_in_the_hundreds_are_stable(backend, device, scale, T):
    """Log-softmax on both sides of every KL; the backward's statistics keep fp32 accuracy."""
    cfg = HCDConfig(num_sub_logits=4, temperature=T)
    inputs = make_inputs(2, 5, 4, 1000, device=device, scale=scale, correlated=False, seed=3)
    check(run(backend, *inputs, cfg, 1.0), truth(*inputs, cfg, 1.0))


@pytest.mark.slow
def test_k_loop_triton(monkeypatch):
    """Triton with small K blocks (16 in the backward and the large-n forward, one warp of 32 lanes x 1 in the
    one-pass forward) < K = 100: every K loop runs several blocks, ragged tail."""
    if "cpu" not in REPORT["triton"].devices:
        pytest.skip("Triton on CPU tensors needs the interpreter")
    from hcd_fast.kernels import sub_logit_loss as kmod
    for name in ("_fwd_heuristic", "_bwd_heuristic"):
        orig = getattr(kmod, name)
        monkeypatch.setattr(kmod, name, lambda n, k, bk=None, _orig=orig: _orig(n, k, 16))
    orig_lane = kmod._fwd_lane_heuristic
    monkeypatch.setattr(kmod, "_fwd_lane_heuristic",
                        lambda n, k, e, bk=None, fp64=False, **kw: orig_lane(n, k, e, 16, fp64, **kw))
    for mode in ("zero", "none", "large_negative"):
        cfg = config(3, 4.0, mode, ortho_threshold=0.0)
        inputs = make_inputs(2, 3, 3, 100, seed=11)
        check(run("triton", *inputs, cfg, 0.37), truth(*inputs, cfg, 0.37))



@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_rows(backend, device, dtype):
    """Contiguous rows with K = 1000 (a multiple of 4 and 8): the one-pass forwards take their vector-load
    paths (Triton: K and the strides passed divided by 4, ALIGN = 4, 4 warps x 4 elements = 512 per step, so
    two steps with a ragged tail; CUDA: 16-byte vectors, 4 fp32 / 8 bf16 per thread and step). The other tests
    use non-contiguous views (scalar loads in Triton)."""
    cfg = config(4, 2.0, "zero", ortho_threshold=0.1)
    sub_leaf, zs_leaf, zt, y = make_inputs(2, 3, 4, 1000, dtype=dtype, device=device, seed=17)
    sub = sub_leaf.detach().permute(3, 2, 1, 0).contiguous().requires_grad_()
    zs = zs_leaf.detach().t().contiguous().requires_grad_()
    if backend == "triton":
        from hcd_fast.kernels import sub_logit_loss as kmod
        vec = kmod._fwd_lane_heuristic(4, 1000, sub.element_size())[1]
        assert kmod._alignment(vec, 1000, (sub, zs, zt), (*sub.stride()[:3], zs.stride(0), zt.stride(0))) == 4
    loss, parts = HF.sub_logit_loss(sub, zs, zt, y, cfg, backend=backend)
    gs, gz = torch.autograd.grad(loss, (sub, zs))
    s64, z64 = sub.detach().double().requires_grad_(), zs.detach().double().requires_grad_()
    want_loss, want_parts = R.sub_logit_loss(s64, z64, zt.double(), y, cfg)
    want = torch.autograd.grad(want_loss, (s64, z64))
    assert_close("loss", loss, want_loss, 1e-5)
    for k in PARTS:
        assert_close(k, parts[k], want_parts[k], 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradients are rounded to bf16 (2^-9 relative)
    assert_close("grad sub_logits", gs, want[0], tol)
    assert_close("grad student_logits", gz, want[1], tol)


ONE_PASS_WIDE = [(1, 3, 5, 1000, torch.float32, True), (2, 3, 8, 1000, torch.bfloat16, True),
                 (1, 2, 7, 1001, torch.float16, True), (0, 5, 8, 37, torch.float32, False),
                 (2, 3, 6, 37, torch.float64, False)]


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("S,B,n,K,dtype,contiguous", ONE_PASS_WIDE,
                         ids=[f"S{c[0]}-n{c[2]}-K{c[3]}-{str(c[4])[6:]}" for c in ONE_PASS_WIDE])
def test_one_pass_forward_five_to_eight_sub_logits(backend, device, S, B, n, K, dtype, contiguous):
    """n = 5..8 (the Triton one-pass forward's 8 x 8 Gram lanes, 2 elements per lane and row; vector loads where
    the rows are contiguous and K even; fp64 takes the large-n kernel): loss, parts and both gradients against the
    reference, with odd K, S = 0 and S = 1, every dtype."""
    cfg = config(n, 2.0, "zero", ortho_threshold=0.1, w_ol=2.0)
    sub_leaf, zs_leaf, zt, y = make_inputs(S, B, n, K, dtype=dtype, device=device, seed=29 + n)
    if contiguous:
        sub = sub_leaf.detach().permute(3, 2, 1, 0).contiguous().requires_grad_()
        zs = zs_leaf.detach().t().contiguous().requires_grad_()
    else:
        sub, zs = views(sub_leaf, zs_leaf)
    if backend == "triton":
        from hcd_fast.kernels import sub_logit_loss as kmod
        fp64 = dtype == torch.float64
        assert kmod._lane_forward(n, fp64) == (not fp64)
        vec = kmod._fwd_lane_heuristic(n, K, sub.element_size(), fp64=fp64)[1]
        want_align = 2 if contiguous and K % 2 == 0 else 1
        assert kmod._alignment(vec, K, (sub, zs, zt), (*sub.stride()[:3], zs.stride(0), zt.stride(0))) == want_align
    loss, parts = HF.sub_logit_loss(sub, zs, zt, y, cfg, backend=backend)
    gs, gz = torch.autograd.grad(loss, (sub, zs), torch.tensor(0.37, dtype=loss.dtype, device=device))
    s64, z64 = sub.detach().double().requires_grad_(), zs.detach().double().requires_grad_()
    want_loss, want_parts = R.sub_logit_loss(s64, z64, zt.double(), y, cfg)
    want = torch.autograd.grad(want_loss, (s64, z64), torch.tensor(0.37, dtype=torch.float64),
                               allow_unused=True)  # S = 0: the empty sub_logits take no part
    tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5  # 16-bit gradients: rounded to 2^-9 / 2^-12
    assert_close("loss", loss, want_loss, 1e-5)
    for k in PARTS:
        assert_close(k, parts[k], want_parts[k], 1e-5, atol=1e-12)
    if S > 0:
        assert want_parts["ortho"] > 0  # the correlated rows exercise the hinge
        assert_close("grad sub_logits", gs, want[0], tol)
    else:
        assert gs.shape == sub.shape and gs.numel() == 0
    assert_close("grad student_logits", gz, want[1], tol)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_stages_gives_ce_and_kd(backend, device):
    """S = 0 (no tapped stage; allowed by the public boundary): the reference's loss is w_gt CE + w_kd KD, the
    stage parts 0, and d/d student_logits their gradient -- on every backend (the CUDA one returned NaN, and its
    backward left d/d student_logits uninitialised)."""
    cfg = config(3, 2.0, "zero", w_gt=0.7, w_kd=1.3)
    sub_leaf, zs_leaf, zt, y = make_inputs(0, 5, 3, 37, device=device, seed=19)

    def grads(backend, sub_leaf, zs_leaf, zt):
        sub, zs = views(sub_leaf, zs_leaf)
        loss, parts = HF.sub_logit_loss(sub, zs, zt, y, cfg, backend=backend)
        gz, = torch.autograd.grad(loss, (zs_leaf,), torch.tensor(0.37, dtype=loss.dtype, device=device))
        return loss.detach(), parts, gz

    loss, parts, gz = grads(backend, sub_leaf, zs_leaf, zt)
    want = grads("reference", sub_leaf.detach().double(), zs_leaf.detach().double().requires_grad_(), zt.double())
    assert_close("loss", loss, want[0], 1e-5)
    for k in PARTS:
        assert_close(k, parts[k], want[1][k], 1e-5, atol=0.0 if k in ("ce", "kd") else 1e-12)
    for k in ("sub_ce", "sub_kl", "ortho"):
        assert want[1][k] == 0.0
    assert_close("grad student_logits", gz, want[2], 1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_norm_at_eps(backend, device):
    """A row with ||v|| == eps exactly (v = (0.5, 0, ...), eps = 0.5): r = max(||v||, eps) has the minimum-norm
    subgradient 0 in ||v|| there (the reference, on every torch version), so M_ii's norm term is off at equality
    on every backend (the C++ CPU and CUDA kernels had it on: ||v|| >= eps, the Triton ones off)."""
    cfg = HCDConfig(num_sub_logits=2, temperature=1.0, gt_mask="none", ortho_eps=0.5, ortho_threshold=0.2,
                    w_ol=5.0)
    S, B, n, K = 1, 2, 2, 5
    base = torch.zeros(K, n, B, S, dtype=torch.float64)
    base[0, 0, :, 0] = 0.5    # row 0 of every sample: ||v|| = 0.5 = eps
    base[0, 1, :, 0] = 1.0    # row 1: parallel to it, so the pair's hinge is active
    base[1, 1, :, 0] = 0.25
    sub_leaf = base.to(device, torch.float32).requires_grad_()
    zs_leaf = torch.linspace(-1.0, 1.0, K * B, dtype=torch.float32).reshape(K, B).to(device).requires_grad_()
    zt = torch.linspace(1.0, -1.0, B * K, dtype=torch.float32).reshape(B, K).to(device)
    y = torch.tensor([2, 4], device=device)
    got, want = run(backend, sub_leaf, zs_leaf, zt, y, cfg, 1.0), truth(sub_leaf, zs_leaf, zt, y, cfg, 1.0)
    check(got, want)
    zf = sub_leaf.detach().permute(3, 2, 1, 0)
    coef = _stats(backend, device, zf, zs_leaf.detach().t(), zt, y, cfg)[3]
    want_coef = reference_stats(zf, zs_leaf.detach().t(), zt, y, cfg)[1]
    assert want_coef[0, 0, 0, 0] == 0 and want_coef[0, 0, 0, 1] != 0  # off at equality; the pair's hinge is on
    assert_close("ortho_coef", coef, want_coef, 1e-5)


@pytest.mark.slow
def test_stage_offset_past_2_31_elements_triton():
    """The Triton backward's stage offset s * stride_s in 64 bits: sub_logits is a view whose stage 2 lies
    3 * 2^30 fp16 elements past stage 0 (int32 would wrap to -2^30). The storage is 2^32 + small elements (8 GiB
    of address space) of which only the few pages holding the view are ever touched; the view starts 2^30
    elements in, so a wrapped offset reads zeros inside the allocation and the gradient is wrong, not a crash."""
    if "cpu" not in REPORT["triton"].devices:
        pytest.skip("Triton on CPU tensors needs the interpreter")
    S, B, n, K = 3, 2, 2, 8
    stride_s = 3 * 2 ** 29  # stage s at s * 1.5 * 2^30; s = 2: 3 * 2^30 > 2^31
    start = 2 ** 30
    cfg = HCDConfig(num_sub_logits=n, temperature=2.0)
    small, zs_leaf, zt, y = make_inputs(S, B, n, K, dtype=torch.float16, seed=23)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False  # untouched pages stay unallocated
    try:
        storage = torch.empty(start + (S - 1) * stride_s + B * n * K, dtype=torch.float16)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
    sub = storage.as_strided((S, B, n, K), (stride_s, n * K, K, 1), start)
    with torch.no_grad():
        sub.copy_(small.detach().permute(3, 2, 1, 0))
    sub.requires_grad_()
    zs = zs_leaf.detach().t().requires_grad_()
    loss, _ = HF.sub_logit_loss(sub, zs, zt, y, cfg, backend="triton")
    gs, gz = torch.autograd.grad(loss, (sub, zs))
    want = truth(small, zs_leaf, zt, y, cfg, 1.0)
    assert_close("loss", loss, want[0], 1e-3)
    assert_close("grad sub_logits", gs, want[2].permute(3, 2, 1, 0), 1e-2)
    assert_close("grad student_logits", gz, want[3].t(), 1e-2)
    del storage, sub

# ---------------------------------------------------------------------------------------------- precision
@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", ["zero", "none", "large_negative"])
def test_gradcheck_fp64(backend, device, mode):
    """float64 through the kernels (no tl.dot): the full Jacobian on a small shape (gt_mask "zero"; each
    finite difference is a kernel launch, slow in the interpreter), random projections (fast_mode) on a larger
    one for every gt_mask. (detach_sub_targets is left out: it makes the backward deliberately not the
    forward's derivative.)"""
    cfg = HCDConfig(num_sub_logits=3, temperature=2.0, gt_mask=mode, ortho_threshold=0.2, w_ol=2.0)
    shapes = (((1, 2, 3, 5), False),) if mode == "zero" else ()
    for shape, fast in shapes + (((2, 3, 3, 7), True),):
        sub_leaf, zs_leaf, zt, y = make_inputs(*shape, dtype=torch.float64, device=device, scale=1.0)

        def f(s, z):
            return HF.sub_logit_loss(s, z, zt, y, cfg, backend=backend)[0]

        assert torch.autograd.gradcheck(f, (sub_leaf.detach().permute(3, 2, 1, 0).requires_grad_(),
                                            zs_leaf.detach().t().requires_grad_()), eps=1e-6, atol=1e-7,
                                        fast_mode=fast)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fp64_scalars_are_exact(backend, device):
    """fp64 inputs: temperature 3.3, ls 0.1, weights and lambdas that are not fp32 numbers reach the kernel
    exactly: loss, parts and gradients match the fp64 reference to 1e-12."""
    cfg = HCDConfig(num_sub_logits=4, temperature=3.3, label_smoothing=0.1, ortho_threshold=0.1, w_gt=0.7,
                    w_kd=1.3, w_kl=2.9, w_ol=3.1, ortho_on="raw", lambda_teacher=0.3)
    inputs = make_inputs(2, 5, 4, 37, dtype=torch.float64, device=device, seed=13)
    got = run(backend, *inputs, cfg, 0.37)
    check(got, truth(*inputs, cfg, 0.37), rtol=1e-12, dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,K,n,S", [(3, 1001, 4, 4), (37, 100, 2, 1)])
def test_low_precision_within_twice_reference_error(backend, device, dtype, B, K, n, S):
    cfg = HCDConfig(num_sub_logits=n, temperature=2.0, w_kl=3.0)
    inputs = make_inputs(S, B, n, K, dtype=dtype, device=device, seed=B + K)
    got = run(backend, *inputs, cfg, 0.5)
    ref = run("reference", *inputs, cfg, 0.5)
    want = truth(*inputs, cfg, 0.5)
    assert got[0].dtype == torch.float32
    assert got[2].dtype == dtype and got[3].dtype == dtype
    for name, i in (("loss", 0), ("grad sub", 2), ("grad student", 3)):
        err = (got[i].double() - want[i]).abs().max().item()
        ref_err = (ref[i].double() - want[i]).abs().max().item()
        assert err <= 2 * ref_err + 1e-5 * want[i].abs().max().item(), \
            f"{name}: {err:.3e} > 2 x reference error {ref_err:.3e}"


# ---------------------------------------------------------------------------------------------- the statistics
def reference_stats(zf, zs, zt, y, cfg):
    """row_stats, ortho_coef and sample_stats (hcd_fast/ops/sub_logit_loss.py) from their definitions, float64."""
    zf, zs, zt = zf.double(), zs.double(), zt.double()
    S, B, n, K = zf.shape
    T = cfg.temperature
    log_ps = torch.log_softmax(zs / T, -1)[None, :, None, :]
    log_p = torch.log_softmax(zf / T, -1)
    kl = (log_p.exp() * (log_p - log_ps)).sum(-1)
    row = torch.stack([torch.logsumexp(zf, -1), torch.logsumexp(zf / T, -1), kl], -1)
    sample = torch.stack([torch.logsumexp(zs, -1), torch.logsumexp(zs / T, -1), torch.logsumexp(zt / T, -1)], -1)
    v = zf - (cfg.lambda_teacher * zt[None, :, None, :] if cfg.ortho_on == "raw" else 0.0)
    if cfg.gt_mask != "none":
        fill = 0.0 if cfg.gt_mask == "zero" else LARGE_NEGATIVE
        v = v.masked_fill(torch.nn.functional.one_hot(y, K).bool()[None, :, None, :], fill)
    norm = v.norm(dim=-1)
    r = torch.where(norm > cfg.ortho_eps, norm, cfg.ortho_eps)
    gram = (v @ v.transpose(-1, -2)) / (r[..., :, None] * r[..., None, :])
    off = 1.0 - torch.eye(n, dtype=torch.float64)
    a = cfg.w_ol * 4.0 / (B * n * (n - 1)) * torch.relu(gram - cfg.ortho_threshold) * off if n > 1 else \
        torch.zeros_like(gram)
    m = a / (r[..., :, None] * r[..., None, :])
    # the norm term is active where ||v|| > eps (the minimum-norm subgradient of max(||v||, eps) at equality)
    diag = torch.where(norm > cfg.ortho_eps, (a * gram).sum(-1) / r ** 2, torch.zeros_like(norm))
    return row, m - torch.diag_embed(diag), sample


def _stats(backend, device, zf, zs, zt, y, cfg):
    ns = {"triton": torch.ops.hcd_triton, "cpu": torch.ops.hcd_fast, "cuda": torch.ops.hcd_fast}[backend]
    with torch.no_grad():
        return ns.sub_logit_loss(zf, zs, zt, y, *OPDEF.encode(cfg))


STATS_CASES = [(2, 5, 4, 37, "zero", False), (1, 3, 3, 100, "large_negative", True), (3, 2, 1, 7, "none", False)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("S,B,n,K,mode,raw", STATS_CASES)
def test_statistics_match_their_definitions(backend, device, S, B, n, K, mode, raw):
    """The saved statistics are the contract between a backend's two kernels and equal across backends: each
    backend's match the float64 definitions (fp32 inputs: 1e-5; stats tensors float64, M in fp32)."""
    cfg = config(n, 2.5, mode, raw=raw, ortho_threshold=0.1, w_ol=2.0)
    sub_leaf, zs_leaf, zt, y = make_inputs(S, B, n, K, device=device, seed=S + K)
    zf, zs = (t.detach() for t in views(sub_leaf, zs_leaf))
    loss, parts, row, coef, sample = _stats(backend, device, zf, zs, zt, y, cfg)
    want_row, want_coef, want_sample = reference_stats(zf, zs, zt, y, cfg)
    assert row.dtype == sample.dtype == torch.float64 and coef.dtype == torch.float32
    assert row.shape == (S, B, n, 3) and coef.shape == (S, B, n, n) and sample.shape == (B, 3)
    assert row.is_contiguous() and coef.is_contiguous() and sample.is_contiguous()
    for j, name in enumerate(OPDEF.ROW_STATS):
        assert_close(name, row[..., j], want_row[..., j], 1e-5)
    assert_close("ortho_coef", coef, want_coef, 1e-5)
    for j, name in enumerate(OPDEF.SAMPLE_STATS):
        assert_close(name, sample[:, j], want_sample[:, j], 1e-5)


def test_statistics_equal_across_backends():
    """Every backend available here saves the same statistics for the same inputs (to fp32 rounding)."""
    avail = [(b, d) for b, d in (("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda"))
             if d in REPORT[b].devices]
    assert len(avail) >= 2, avail
    for S, B, n, K, mode, raw in STATS_CASES:
        cfg = config(n, 2.5, mode, raw=raw, ortho_threshold=0.1, w_ol=2.0)
        inputs = make_inputs(S, B, n, K, seed=S + K)
        outs = []
        for backend, device in avail:
            sub_leaf, zs_leaf, zt, y = (t.to(device) for t in inputs)
            zf, zs = (t.detach() for t in views(sub_leaf, zs_leaf))
            outs.append([t.cpu() for t in _stats(backend, device, zf, zs, zt, y, cfg)])
        for (b, d), out in zip(avail[1:], outs[1:]):
            for name, got, want in zip(("loss", "parts", "row_stats", "ortho_coef", "sample_stats"), out, outs[0]):
                assert_close(f"{b}-{d} vs {avail[0]}: {name}", got, want, 1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_single_input_gradients_and_no_grad(backend, device):
    """Only z_s, only zf, or nothing requires grad: the backward op computes just what is needed, the same
    values; no_grad gives the same loss and parts."""
    cfg = HCDConfig(num_sub_logits=2, temperature=2.0)
    sub_leaf, zs_leaf, zt, y = make_inputs(2, 3, 2, 37, device=device)
    want = truth(sub_leaf, zs_leaf, zt, y, cfg, 1.0)
    sub, zs = views(sub_leaf, zs_leaf)
    loss, _ = HF.sub_logit_loss(sub.detach(), zs, zt, y, cfg, backend=backend)
    (gz,) = torch.autograd.grad(loss, (zs_leaf,))
    assert_close("grad student_logits", gz, want[3], 1e-5)
    loss, _ = HF.sub_logit_loss(sub, zs.detach(), zt, y, cfg, backend=backend)
    (gs,) = torch.autograd.grad(loss, (sub_leaf,))
    assert_close("grad sub_logits", gs, want[2], 1e-5)
    with torch.no_grad():
        loss2, parts2 = HF.sub_logit_loss(sub, zs, zt, y, cfg, backend=backend)
    assert torch.equal(loss.detach(), loss2)
    assert_close("loss", loss2, want[0], 1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_teacher_gets_no_gradient(backend, device):
    sub_leaf, zs_leaf, zt, y = make_inputs(1, 3, 2, 7, device=device)
    zt = zt.clone().requires_grad_()
    sub, zs = views(sub_leaf, zs_leaf)
    loss, _ = HF.sub_logit_loss(sub, zs, zt, y, HCDConfig(num_sub_logits=2), backend=backend)
    loss.backward()
    assert zt.grad is None and sub_leaf.grad is not None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_of_range_target_gives_nan_not_a_stray_read(backend, device):
    """validate=False and a target outside [0, K): loss and every part NaN, that sample's gradient rows NaN,
    the other samples' rows the reference's (the same on every backend, no device assert, no clamping)."""
    cfg = HCDConfig(num_sub_logits=2, temperature=2.0)
    sub_leaf, zs_leaf, zt, y = make_inputs(2, 4, 2, 7, device=device)
    want = truth(sub_leaf, zs_leaf, zt, y, cfg, 0.5)
    for bad in (7, -1, 1 << 40):
        y_bad = y.clone()
        y_bad[1] = bad
        loss, parts, gs, gz = run(backend, sub_leaf, zs_leaf, zt, y_bad, cfg, 0.5, validate=False)
        assert torch.isnan(loss), bad
        assert all(torch.isnan(parts[k]) for k in PARTS), (bad, parts)
        gs, gz = gs.permute(3, 2, 1, 0), gz.t()  # (S, B, n, K), (B, K)
        assert torch.isnan(gs[:, 1]).all() and torch.isnan(gz[1]).all()
        good = [0, 2, 3]
        # d/d zs of a good sample is its own; d/d zf of good rows too (the loss is a sum over samples)
        assert_close("good rows d zs", gz[good], want[3].t()[good], 1e-5)
        assert_close("good rows d zf", gs[:, good], want[2].permute(3, 2, 1, 0)[:, good], 1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    """Two runs are bitwise equal (no atomics; fixed-order reductions); on the C++ CPU backend also across
    thread counts."""
    cfg = HCDConfig(num_sub_logits=4, w_ol=2.0)
    # many programs / threads where they run in parallel; small on the (sequential) interpreter
    shape = (4, 256, 4, 1000) if device == "cuda" else (4, 37, 4, 1001) if backend == "cpu" else (2, 5, 4, 100)
    inputs = make_inputs(*shape, device=device, seed=5)
    a = run(backend, *inputs, cfg, 1.0)
    threads = torch.get_num_threads()
    try:
        if backend == "cpu":
            torch.set_num_threads(1)
        b = run(backend, *inputs, cfg, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert all(torch.equal(a[1][k], b[1][k]) for k in PARTS)


def _raw_args(device, requires_grad):
    sub_leaf, zs_leaf, zt, y = make_inputs(2, 3, 4, 37, device=device)
    sub = sub_leaf.detach().permute(3, 2, 1, 0).contiguous().requires_grad_(requires_grad)
    zs = zs_leaf.detach().t().contiguous().requires_grad_(requires_grad)
    return sub, zs, zt, y


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_both_ops(backend, device):
    ns = {"triton": torch.ops.hcd_triton, "cpu": torch.ops.hcd_fast, "cuda": torch.ops.hcd_fast}[backend]
    sub, zs, zt, y = _raw_args(device, True)
    for mask, fill, shift, detach in ((True, 0.0, 0.0, False), (True, -1e6, 1.5, True), (False, 0.0, 0.7, False)):
        args = (sub, zs, zt, y, 2.0, 0.1, 0.5, 1e-12, mask, fill, shift, detach, 1.0, 1.3, 6.0, 1.1)
        torch.library.opcheck(ns.sub_logit_loss.default, args)
        with torch.no_grad():
            _, _, row, coef, sample = ns.sub_logit_loss(*args)
        for need in ((True, True), (True, False), (False, True)):
            bwd_args = (torch.tensor(0.7, device=device), sub.detach(), zs.detach(), zt, y, row, coef, sample,
                        2.0, 0.1, shift, mask, detach, 1.0, 1.3, 6.0, *need)
            torch.library.opcheck(ns.sub_logit_loss_backward.default, bwd_args)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    """The forward op, its registered autograd and the backward op trace without a graph break (aot_eager:
    no codegen); forward and gradients equal the reference."""
    cfg = HCDConfig(num_sub_logits=4, temperature=2.0)
    sub_leaf, zs_leaf, zt, y = make_inputs(2, 3, 4, 37, device=device)
    want = truth(sub_leaf, zs_leaf, zt, y, cfg, 0.37)

    def f(sub, zs):
        return HF.sub_logit_loss(sub, zs, zt, y, cfg, backend=backend, validate=False)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    sub, zs = views(sub_leaf, zs_leaf)
    loss, parts = compiled(sub, zs)
    gs, gz = torch.autograd.grad(loss, (sub_leaf, zs_leaf), grad_outputs=torch.tensor(0.37, device=device))
    check((loss.detach(), parts, gs, gz), want)


# ---------------------------------------------------------------------------------------------- backend specifics
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_portable_and_avx2_builds_agree(capability):
    """Both compiled copies of the C++ kernel body (csrc/cpu/kernels_{default,avx2}.cpp) match the reference."""
    if capability == "avx2" and hcd_fast._C.cpu_capability() != "avx2":
        pytest.skip("this CPU has no AVX2+FMA")
    cfg = HCDConfig(num_sub_logits=3, temperature=4.0, gt_mask="large_negative", ortho_threshold=0.2)
    inputs = make_inputs(4, 3, 3, 1001, seed=11)
    before = hcd_fast._C.cpu_capability()
    try:
        assert hcd_fast._C.set_cpu_capability(capability) == capability
        got = run("cpu", *inputs, cfg, 1.7)
    finally:
        hcd_fast._C.set_cpu_capability(before)
    check(got, truth(*inputs, cfg, 1.7))


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,dtype", [(80, torch.float32), (60, torch.float64), (200, torch.float32)])
def test_cuda_many_sub_logits(n, dtype):
    """Any n (SPEC) on the CUDA kernels: the per-sample scratch exceeds the default 48 KB of shared memory
    from n = 76 (fp32) -- opted in up to the device limit (n = 80, fp64 n = 60), global memory beyond it."""
    cfg = HCDConfig(num_sub_logits=n, temperature=2.0, ortho_threshold=0.1, ortho_on="raw", lambda_teacher=0.5)
    inputs = make_inputs(2, 3, n, 37, dtype=dtype, device="cuda", seed=n)
    check(run("cuda", *inputs, cfg, 0.37), truth(*inputs, cfg, 0.37), dtype=torch.float64 if
          dtype == torch.float64 else torch.float32)
