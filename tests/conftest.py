import os

import torch

# Triton kernels run on CPU tensors through the interpreter; the variable must be set before any
# kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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
