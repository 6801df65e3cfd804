"""C++/CUDA backends ("cpu" and "cuda"): the kernels of the compiled extension ``hcd_fast._C`` (csrc/).

The extension registers only kernels (``TORCH_LIBRARY_IMPL(hcd_fast, CPU/CUDA)`` in csrc/hcd_fast.cpp); each
op's schema, fake kernel and autograd are defined here from its op file (``hcd_fast/ops/<op>.py``) under the
namespace ``hcd_fast``. The C++ entry points follow the kernel contract written in those files
(``sub_logit_loss`` and ``cfm`` register two kernels each: the op and its ``*_backward``).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from hcd_fast.ops import bn_relu_pool as _bn_relu_pool
from hcd_fast.ops import cfm as _cfm
from hcd_fast.ops import pool_linear as _pool_linear
from hcd_fast.ops import sub_logit_loss as _sub_logit_loss
from hcd_fast.reference import projector_dwconv, projector_pwconv  # noqa: F401  (no C++ kernels: see below)

try:
    from hcd_fast import _C  # noqa: F401  (loads the library: registers the kernels of torch.ops.hcd_fast)
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # the extension is optional: report why it is missing
    _C = None
    _IMPORT_ERROR = f"compiled extension hcd_fast._C not importable ({type(exc).__name__}: {exc})"


# Ops whose schema the loaded extension's kernels do not match (an extension built from older csrc/): they
# raise a clear error when called; the other ops of the backend keep working.
_STALE: Dict[str, str] = {}


def _define(name: str, opdef, bind: Callable) -> Callable:
    try:
        return bind(opdef.define("hcd_fast"))
    except RuntimeError as exc:
        _STALE[name] = str(exc).splitlines()[0]

        def stale(*args, **kwargs):
            raise RuntimeError(f"{name}: the compiled extension hcd_fast._C does not match this op's schema; "
                               f"rebuild it (setup.py build_ext): {_STALE[name]}")
        return stale


def status(name: str) -> Tuple[bool, str]:
    """(available, reason) of backend ``name`` ("cpu" or "cuda")."""
    if _C is None:
        return False, _IMPORT_ERROR
    stale = f"; stale kernels, rebuild the extension: {', '.join(_STALE)}" if _STALE else ""
    if name == "cpu":
        return True, f"compiled C++ kernels ({_C.cpu_capability()} vectorisation, at::parallel_for){stale}"
    if name == "cuda":
        if not _C.with_cuda():
            return False, "extension built without CUDA"
        if not torch.cuda.is_available():
            return False, "built with CUDA kernels, but no CUDA device is visible"
        return True, f"compiled CUDA kernels{stale}"
    return False, f"unknown backend {name!r}"


def devices(name: str) -> tuple:
    return {"cpu": ("cpu",), "cuda": ("cuda",)}.get(name, ())


# The SepConv projector blocks have no C++ kernels: on the cpu and cuda backends the projectors (StageProjectors)
# run them as grouped nn.Conv2d / nn.BatchNorm2d modules (ATen on the CPU, cuDNN on the GPU);
# projector_dwconv/projector_pwconv above are the reference functions. dispatch.backends() reports this per backend.
FUSED_PROJECTOR = False
PROJECTOR_NOTE = "projector blocks: grouped nn.Conv2d/BatchNorm2d modules (ATen/cuDNN), no fused kernels"


if _C is not None:
    sub_logit_loss = _define("sub_logit_loss", _sub_logit_loss.OP, _sub_logit_loss.bind)
    bn_relu_pool = _bn_relu_pool.bind(_bn_relu_pool.FWD.define("hcd_fast"), _bn_relu_pool.BWD.define("hcd_fast"))
    pool_linear = _pool_linear.bind(_pool_linear.OP.define("hcd_fast"))
    cfm = _define("cfm", _cfm.NATIVE_OP, _cfm.bind)
