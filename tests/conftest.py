import os

import torch

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
