"""The compiled extension hcd_fast._C: what was built, how the cpu/cuda backends report themselves, that
import survives a missing extension, and setup.py's environment switches."""
import os
import subprocess
import sys

import pytest
import torch

import hcd_fast
from hcd_fast.ops import cpp_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_loaded_with_cpu_kernels():
    from hcd_fast import _C
    assert _C.cpu_capability() in ("avx2", "default")
    status = hcd_fast.backends()["cpu"]
    assert status.available and status.devices == ("cpu",), status
    assert hasattr(torch.ops.hcd_fast, "sub_logit_loss") and hasattr(torch.ops.hcd_fast, "cfm")


def test_cuda_kernels_built_when_toolchain_present():
    """CI has nvcc and a CUDA build of torch: the CUDA sources must have been compiled in."""
    from torch.utils.cpp_extension import CUDA_HOME
    from hcd_fast import _C
    toolchain = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if os.environ.get("HCD_FAST_NO_CUDA", "") in ("1", "true", "yes", "on"):
        toolchain = False
    assert _C.with_cuda() == toolchain


def test_cuda_backend_status_reason():
    from hcd_fast import _C
    available, reason = cpp_ops.status("cuda")
    if not _C.with_cuda():
        assert (available, reason) == (False, "extension built without CUDA")
    elif not torch.cuda.is_available():
        assert (available, reason) == (False, "built with CUDA kernels, but no CUDA device is visible")
    else:
        assert available
    assert cpp_ops.devices("cuda") == ("cuda",) and cpp_ops.devices("cpu") == ("cpu",)


def test_capability_switch_rejects_unknown():
    from hcd_fast import _C
    with pytest.raises(ValueError):
        _C.set_cpu_capability("avx9000")


@pytest.mark.slow
def test_import_without_extension_reports_why():
    code = ("import sys; sys.modules['hcd_fast._C'] = None\n"
            "import hcd_fast\n"
            "s = hcd_fast.backends()\n"
            "assert not s['cpu'].available and not s['cuda'].available, s\n"
            "assert 'hcd_fast._C' in s['cpu'].reason, s['cpu'].reason\n"
            "assert s['reference'].available\n"
            "print('ok', s['cpu'].reason)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("env,expected", [("HCD_FAST_NO_EXT", "building without the C++/CUDA extension"),
                                          ("HCD_FAST_NO_CUDA", "CUDA kernels skipped")])
def test_setup_env_switches(env, expected):
    """setup.py decides what to build at import: query it without building anything."""
    out = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, env: "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout
