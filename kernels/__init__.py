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
