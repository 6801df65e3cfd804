"""C++/CUDA backends ("cpu" and "cuda"): the kernels of the compiled extension ``hcd_fast._C`` (csrc/).

The extension registers only kernels (``TORCH_LIBRARY_IMPL(hcd_fast, CPU/CUDA)`` in csrc/hcd_fast.cpp); each
op's schema, fake kernel and autograd are defined here from its op file (``hcd_fast/ops/<op>.py``) under the
namespace ``hcd_fast``. The C++ entry points follow the kernel contract written in those files.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from hcd_fast.ops import bn_relu_pool as _bn_relu_pool
from hcd_fast.ops import cfm as _cfm
from hcd_fast.ops import pool_linear as _pool_linear
from hcd_fast.ops import sub_logit_loss as _sub_logit_loss

try:
    from hcd_fast import _C  # noqa: F401  (loads the library: registers the kernels of torch.ops.hcd_fast)
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # the extension is optional: report why it is missing
    _C = None
    _IMPORT_ERROR = f"compiled extension hcd_fast._C not importable ({type(exc).__name__}: {exc})"


def status(name: str) -> Tuple[bool, str]:
    """(available, reason) of backend ``name`` ("cpu" or "cuda")."""
    if _C is None:
        return False, _IMPORT_ERROR
    if name == "cpu":
        return True, f"compiled C++ kernels ({_C.cpu_capability()} vectorisation, at::parallel_for)"
    if name == "cuda":
        if not _C.with_cuda():
            return False, "extension built without CUDA"
        if not torch.cuda.is_available():
            return False, "built with CUDA kernels, but no CUDA device is visible"
        return True, "compiled CUDA kernels"
    return False, f"unknown backend {name!r}"


def devices(name: str) -> tuple:
    return {"cpu": ("cpu",), "cuda": ("cuda",)}.get(name, ())


if _C is not None:
    sub_logit_loss = _sub_logit_loss.bind(_sub_logit_loss.OP.define("hcd_fast"))
    bn_relu_pool = _bn_relu_pool.bind(_bn_relu_pool.FWD.define("hcd_fast"), _bn_relu_pool.BWD.define("hcd_fast"))
    pool_linear = _pool_linear.bind(_pool_linear.OP.define("hcd_fast"))
    cfm = _cfm.bind(_cfm.OP.define("hcd_fast"))
