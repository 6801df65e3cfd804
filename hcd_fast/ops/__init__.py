"""Fused ops: one ``torch.autograd.Function`` per op and backend, behind one dispatch point."""
from hcd_fast.ops.dispatch import BACKENDS, OPS, BackendStatus, backends, get_op, resolve

__all__ = ["BACKENDS", "OPS", "BackendStatus", "backends", "get_op", "resolve"]
