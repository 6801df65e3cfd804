"""The fused ops: one file per op (``sub_logit_loss``, ``cfm``, ``bn_relu_pool``, ``pool_linear``) owns its
schema, fake kernel, autograd and precision policy; the backends (``triton_ops``, ``cpp_ops``) only register
kernels against them; ``dispatch`` maps (backend, device) to an op table. See README.md in this folder."""
from hcd_fast.ops.dispatch import BACKENDS, OPS, BackendStatus, OpTable, backends, get_op, op_table, resolve

__all__ = ["BACKENDS", "OPS", "BackendStatus", "OpTable", "backends", "get_op", "op_table", "resolve"]
