"""Triton kernels of hcd_fast, installed as ``hcd_fast.kernels`` (one file per fused op).

- ``sub_logit_loss``: the HCD loss and per-row statistics in one launch over (stage, sample) plus a reduction
  launch; a recomputing backward over (sample, K block) that writes each gradient once in its input's dtype.
- ``pool``: ``bn_relu_pool`` (BN statistics, normalise+ReLU+spatial mean, recomputing backward) and the
  spatial mean of ``pool_linear``.
- ``cfm``: the CFM GEMMs over the two concat segments with bias/ReLU and teacher-fusion epilogues.

Each op's schema, fake kernel and autograd live in its op file (``hcd_fast/ops/<op>.py``);
``hcd_fast.ops.triton_ops`` registers these launchers as its kernels. To run the kernels on CPU tensors
(tests), set ``TRITON_INTERPRET=1`` before this package is imported.
"""
import torch


def fp64_scalars(device: torch.device, *values: float) -> torch.Tensor:
    """``values`` as a float64 tensor on ``device``, for kernels that accumulate in fp64: a compiled Triton
    kernel takes a Python float argument as an fp32 parameter (~1e-8 relative error), so those kernels read
    their float scalars from here instead. Filled on the device (fill_: no host synchronisation)."""
    out = torch.empty((len(values),), dtype=torch.float64, device=device)
    for i, v in enumerate(values):
        out[i].fill_(float(v))
    return out
