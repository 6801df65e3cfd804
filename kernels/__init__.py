"""Triton kernels of hcd_fast, installed as ``hcd_fast.kernels`` (one file per fused op)."""
