"""Ops dispatched per HCDLoss forward+backward on CPU tensors (benchmarks/op_count.py: a TorchDispatchMode), the
CPU proxy of the head's GPU kernel launches, recorded per backend against a documented budget. The count is
deterministic (the same code dispatches the same ops), so a budget is a fair test: a change that adds launches
to the head fails here and must raise the budget on purpose.

Measured on the 4-stage head of benchmarks/op_count.py (default HCDConfig, training mode, fp32), before the CFM
batching (stage-stacked CFM weights, one batched GEMM per layer, batched backward; this test's first commit):
every op 1009 (reference) / 308 (cpu, triton), kernel ops (no views, detach, empty) 617 / 160. About 110 of the
fused backends' kernel ops are the SepConv projector blocks (convolutions, BatchNorms, ReLUs and their
backwards), which only a fused projector removes. With the fused projector ops (triton backend), triton is at
209 / 81; each projector op launches 1-3 Triton kernels, which this count sees as one op (about 98 Triton launches
per forward+backward at these shapes). The reference went 1012 -> 1016 / 623 -> 627 with the orthogonality
norm written as where(norm > eps, norm, eps) (one more op per stage than clamp_min); torch 2.11 (the compat lane)
dispatches 4 more there (1020 / 631), so the reference's budget is the larger of the two. The cpu backend's CFM
backward became one op of its own (cfm_backward, its batched GEMMs inside the C++ kernel; on CUDA the ReLU and
bias gradients ride on cuBLASLt epilogues): cpu 245 -> 233 / 126 -> 119.
With the same-shape SepConv blocks of different stages grouped (hcd_fast.modules.StageProjectors: the 6 blocks of
the 4-stage head run as 3 grouped blocks, pointwise convs as grouped convs): cpu 233 -> 160 / 119 -> 74,
triton 209 -> 152 / 81 -> 56. The reference runs every member on its own slices of the grouped parameters (the
published per-stage blocks; each slice's backward is a copy into the grouped gradient): 1114 / 686 (torch 2.11:
1118 / 690).
"""
import pytest

from benchmarks.op_count import OpCounter, count_head_ops, launch_ops
from helpers import backend_params

# (every op dispatched, kernel ops) per HCDLoss forward+backward: the budgets (measured + a small margin of 0).
BUDGETS = {"reference": (1118, 690), "cpu": (160, 74), "triton": (152, 56)}


@pytest.mark.parametrize("backend", backend_params(["cpu", "triton"], reference=True))
def test_head_op_count_within_budget(backend):
    total, counts = count_head_ops(backend.name)
    kernels = launch_ops(counts)
    print(f"{backend.name}: {total} ops dispatched, {kernels} kernel ops")
    budget_total, budget_kernels = BUDGETS[backend.name]
    assert kernels <= budget_kernels, (kernels, sorted(counts.items(), key=lambda kv: -kv[1]))
    assert total <= budget_total, (total, sorted(counts.items(), key=lambda kv: -kv[1]))
    if backend.name != "reference":
        # The S CFMs are one op forward, and their backward is batched: one op (cpu: cfm_backward), or one bmm
        # per product for all stages (triton).
        assert sum(n for op, n in counts.items() if op.endswith(".cfm")) == 1
        # The projector outputs (S, B, D): one cat of the grouped last blocks' (S-1, B, D) and the deepest stage's;
        # no stack of the sub-logits.
        assert counts.get("aten.stack", 0) == 0
        if backend.name == "cpu":
            assert counts.get("hcd_fast.cfm_backward", 0) == 1 and counts.get("aten.bmm", 0) == 0
        else:
            assert counts.get("aten.bmm", 0) == 4
    if backend.name == "triton":
        # 3 grouped blocks (not 6): 2 dwconvs each, 2 BN'd pwconvs each but the last (bn_relu_pool's).
        assert counts["hcd_triton.projector_dwconv"] == 6 and counts["hcd_triton.projector_pwconv"] == 5


def test_counter_counts_what_runs():
    import torch

    with OpCounter() as counter:
        a = torch.ones(3)
        (a + a).sum()
    assert counter.counts["aten.add"] == 1 and counter.counts["aten.sum"] == 1 and counter.total >= 3
    assert launch_ops({"aten.view": 3, "aten.mm": 2, "aten.detach": 5}) == 2
