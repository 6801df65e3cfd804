import os

# PyTorch's oneDNN bf16 kernels on AMX CPUs give NaN gradients in some trials (hcd_fast/distill/onednn_amx.py), so
# a correct submission could fail at random. oneDNN reads the cap once, at its first primitive: it must be set
# before torch is imported here, and the hcd-distill subprocesses of the tests inherit it.
# tests/test_onednn_amx.py checks that it takes effect.
os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE"

import torch  # noqa: E402

# Triton kernels run on CPU tensors through the interpreter; the variable must be set before any
# kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _source_tree_kernels() -> None:
    """Where hcd_fast is imported from this source tree (PYTHONPATH, a worktree), make ``hcd_fast.kernels`` this
    tree's kernels/ too, not the one an editable install of another checkout maps it to."""
    import importlib.util
    import pathlib
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.find_spec("hcd_fast")
    if spec is None or spec.origin is None or pathlib.Path(spec.origin).resolve().parent != root / "hcd_fast":
        return
    kspec = importlib.util.spec_from_file_location("hcd_fast.kernels", root / "kernels" / "__init__.py",
                                                   submodule_search_locations=[str(root / "kernels")])
    module = importlib.util.module_from_spec(kspec)
    sys.modules["hcd_fast.kernels"] = module
    kspec.loader.exec_module(module)


_source_tree_kernels()


@pytest.fixture
def poison_uninitialized():
    """Fresh torch.empty memory is NaN-filled, so an output element a kernel forgets to write shows up."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.fixture
def triton_cpu_guard(request):
    """Triton tests without the cuda marker use CPU tensors: they run only where the kernels were built
    for the interpreter (no GPU); on a GPU machine their ``cuda`` twins run instead."""
    import hcd_fast

    status = hcd_fast.backends()["triton"]
    if request.node.get_closest_marker("cuda") is None and "cpu" not in status.devices:
        pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 at import)")


def pytest_collection_modifyitems(config, items):
    """The ``triton`` marker on every test of a tests/test_triton*.py file too (the backend-parametrized files
    mark their triton parameters in tests/helpers.py), so ``-m "cuda and triton"`` selects every Triton GPU
    test and ``-m "cuda and not triton"`` every other CUDA test (benchmarks/gpu_check.sh)."""
    for item in items:
        if item.fspath.basename.startswith("test_triton") and item.get_closest_marker("triton") is None:
            item.add_marker(pytest.mark.triton)


@pytest.fixture
def no_tf32():
    """cuDNN/cuBLAS in true fp32 (the projector convs run in eager torch on every backend)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def float_args_as_fp32(monkeypatch):
    """The Triton interpreter passes a Python float kernel argument as the compiled launcher does: an fp32
    scalar. (The interpreter keeps the Python float, which then takes the dtype of the tensor it meets, exact in
    fp64; on the GPU a float argument is an fp32 kernel parameter, ~1e-8 relative error at fp64.) A no-op
    where the kernels are compiled for the GPU."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    original = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return original(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", implicit_cvt)
    yield
