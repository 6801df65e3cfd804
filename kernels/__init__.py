"""Triton kernels of hcd_fast, installed as ``hcd_fast.kernels`` (one file per fused op).

- ``sub_logit_loss``: the HCD loss and its gradients in one launch over the batch, plus a reduction launch.
- ``pool``: ``bn_relu_pool`` (BN statistics, normalise+ReLU+spatial mean, recomputing backward) and the
  spatial mean / broadcast of ``pool_linear``.
- ``cfm``: the CFM GEMMs over the two concat segments with bias/ReLU and teacher-fusion epilogues.

The autograd Functions and torch.library registration live in ``hcd_fast.ops.triton_ops``. To run the
kernels on CPU tensors (tests), set ``TRITON_INTERPRET=1`` before this package is imported.
"""
