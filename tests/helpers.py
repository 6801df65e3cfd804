"""Helpers shared by the op test files: comparisons, and the one list of backends they are parametrized over."""
import dataclasses

import pytest
import torch


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float = 1e-12) -> None:
    """max |got - want| <= rtol * max |want| + atol, in float64, and got finite: a relative bound on the
    largest entry, which a kernel that forgets or corrupts any element fails."""
    got, want = got.double(), want.double().to(got.device)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if want.numel() == 0:
        return
    scale = max(want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item()
    assert err <= rtol * scale + atol, f"{name}: max error {err:.3e} vs scale {scale:.3e}"


def assert_close_to(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6,
                    what: str = "") -> None:
    """``assert_close`` with the argument order of the Triton test files."""
    assert_close(what, got, want, rtol, atol)


# ------------------------------------------------------------------------------------------ backends
# The one place the op test files get their backends from: a new backend is one more entry in BACKENDS
# (a parameter of every op test), not a new test file.
@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend name (the ``backend=`` argument) and the device its tensors live on."""
    name: str
    device: str
    jit: bool = False  # Triton: interpreted on the CPU (slow), one compile per configuration on the GPU

    @property
    def id(self) -> str:
        return self.name if self.device == "cpu" or self.name == "cuda" else f"{self.name}-{self.device}"

    def __str__(self) -> str:
        return self.id


REFERENCE = Backend("reference", "cpu")
# triton on "cpu" runs the kernels in the interpreter (TRITON_INTERPRET=1, set by conftest.py without a GPU);
# on a GPU machine it is skipped and its "cuda" twin runs instead.
BACKENDS = (Backend("cpu", "cpu"), Backend("triton", "cpu", jit=True), Backend("triton", "cuda", jit=True),
            Backend("cuda", "cuda"))


def backend_marks(b: Backend) -> list:
    import hcd_fast

    marks = []
    if b.device == "cuda":
        marks += [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    if b.name == "triton":
        marks.append(pytest.mark.triton)
    status = hcd_fast.backends()[b.name]
    if not status.available:
        marks.append(pytest.mark.skipif(True, reason=f"backend {b.name}: {status.reason}"))
    elif b.device not in status.devices and (b.device != "cuda" or torch.cuda.is_available()):
        marks.append(pytest.mark.skipif(True, reason=f"backend {b.name} runs on {status.devices}, not {b.device}"))
    return marks


def select(names=None, reference=False):
    """The Backends named (default: every fast backend), with the reference first if asked for."""
    chosen = [b for b in BACKENDS if names is None or b.name in names or b.id in names]
    return ([REFERENCE] if reference else []) + chosen


def backend_params(names=None, reference=False) -> list:
    """pytest params, one per backend (ids ``cpu``, ``triton``, ``triton-cuda``, ``cuda``, ``reference``), each
    marked ``cuda`` (and skipped without a GPU) when its tensors live on the GPU, ``triton`` for Triton, and
    skipped with the backend's own reason when it is not available here."""
    return [pytest.param(b, id=b.id, marks=backend_marks(b)) for b in select(names, reference)]


def over_backends(cases, gpu_cases=(), jit_gpu_cases=None, compiled_cases=(), names=None,
                  reference=False, slow_cases=()) -> list:
    """pytest params ``(backend, *case)``: every case on every backend; ``gpu_cases`` (large shapes) only on
    the backends whose tensors live on the GPU, ``compiled_cases`` only on the non-JIT ones (compiled C++/CUDA:
    shapes too slow for the Triton interpreter). A JIT backend on the GPU (Triton: each distinct kernel
    configuration is a fresh 1-4 s compile there) runs ``jit_gpu_cases`` instead, when given. ``slow_cases``
    run on every backend like ``cases``, marked slow (out of the fast lane, ``pytest -m "not slow"``)."""
    params = []
    slow = [c if isinstance(c, tuple) else (c,) for c in slow_cases]
    for b in select(names, reference):
        todo = list(cases) + list(slow_cases) + (list(gpu_cases) if b.device == "cuda" else []) + \
            ([] if b.jit else list(compiled_cases))
        if b.device == "cuda" and b.jit and jit_gpu_cases is not None:
            todo = list(jit_gpu_cases)
        for case in todo:
            case = case if isinstance(case, tuple) else (case,)
            marks = backend_marks(b) + ([pytest.mark.slow] if case in slow else [])
            params.append(pytest.param(b, *case, id="-".join([b.id] + [_case_id(v) for v in case]), marks=marks))
    return params


def _case_id(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if v is None or isinstance(v, (bool, int, float, str, tuple)):
        return str(v)
    return type(v).__name__  # (pytest numbers repeated ids)


def interpreter_rounding(backend: Backend, dtype) -> float:
    """Extra relative error of a bf16 result of the Triton interpreter: it converts fp32 -> bf16 by truncation
    (triton 3.8's interpreter casts without a rounding mode), up to one ulp = 2u where the GPU's
    round-to-nearest makes u, so one more u of the largest value; 0 for every other backend and dtype."""
    return UNIT_ROUNDOFF[torch.bfloat16] if backend.name == "triton" and backend.device == "cpu" and \
        dtype == torch.bfloat16 else 0.0


def within_twice(name: str, got: torch.Tensor, ref: torch.Tensor, want: torch.Tensor, floor: float) -> None:
    """Low precision: max |got - want| <= 2 * max |ref - want| + floor * max |want|, with ``want`` the float64
    truth and ``ref`` the reference backend in the same low precision (SPEC section 6); ``floor`` includes
    ``interpreter_rounding`` where it applies."""
    want = want.double().to(got.device)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = (got.double() - want).abs().max().item()
    ref_err = (ref.double().to(got.device) - want).abs().max().item()
    assert err <= 2 * ref_err + floor * want.abs().max().item(), f"{name}: {err:.3e} vs reference {ref_err:.3e}"


# Unit roundoff of the low-precision dtypes, and the tolerance of a result rounded once from an fp32 (fp64 for
# fp64) computation: 2u + 1e-4 relative to the largest value (fp32 summation error < 1e-4 relative here);
# fp32 1e-5, fp64 1e-10.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def single_rounding_rtol(dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype) or 2 * UNIT_ROUNDOFF[dtype] + 1e-4


def low_atol(dtype) -> float:
    """Absolute floor for values near fp16's subnormal range (6e-8 spacing); none for fp32/fp64."""
    return 1e-7 if dtype in UNIT_ROUNDOFF else 1e-12


# Maps of bn_relu_pool / pool_linear: B = 1, H*W = 1 (and both: training must refuse it), C not a multiple of
# 4/8/32, C > 32 (several channel tiles), H*W < 8 and > 8, and a map large enough for several row chunks of the
# channels_last reductions (N = B*H*W = 2 * 40 * 40 = 3200 rows: 50 chunks of 64).
MAP_SHAPES = [(1, 5, 3, 3), (3, 37, 1, 1), (2, 70, 5, 3), (1, 3, 1, 7), (1, 6, 1, 1), (2, 33, 40, 40)]


def layout(x, kind):
    """Same values, different memory: "nchw" (contiguous), "nhwc" (channels_last), "sliced" (every other channel
    of a wider map, columns offset by one) or "strided" (every other column): the last two are neither."""
    if kind == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":
        big = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2], x.shape[3] + 3, dtype=x.dtype, device=x.device)
        big[:, ::2, :, 1:x.shape[3] + 1] = x
        return big[:, ::2, :, 1:x.shape[3] + 1]
    if kind == "strided":
        big = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        return big[..., ::2]
    return x.contiguous()
