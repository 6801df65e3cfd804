"""Benchmark cases of the four fused ops and the whole HCD head: shapes, profiles and the byte/FLOP models.

A case is one op at one shape and dtype, timed forward + backward ("fwd+bwd"), since training is what HCD is
for; the ``fwd`` cases time sub_logit_loss's forward alone (no autograd), whose bandwidth target is read
against the forward design's bytes (``sub_logit_loss_fwd_bytes``). How each provider runs a case:
``benchmarks/ops.py`` (the four ops) and ``benchmarks/head.py``.

Shapes: CIFAR-like (B=128, K=100, teacher dim 384, so D=512) and ImageNet-like
(B=256, K=1000, teacher dim 768, so D=768), S=4 stages, n=4 sub-logits, ResNet18 stage channels
(64, 128, 256, 512) with maps 56/28/14/7 at 224x224 input or 8/4/2/1 at 32x32 input. The projector ops
(bn_relu_pool, pool_linear) see the deepest map (7x7 at 224 input).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

RESNET18_CHANNELS = (64, 128, 256, 512)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (B, K, teacher dim) of the two shape families.
FAMILIES = {"cifar": (128, 100, 384), "imagenet": (256, 1000, 768)}


def stage_maps(img: int) -> Tuple[int, ...]:
    """ResNet18 stage map sizes at ``img`` x ``img`` input (stride 4, 8, 16, 32)."""
    return tuple(max(1, img // s) for s in (4, 8, 16, 32))


@dataclass
class Case:
    """One benchmark case. ``shape`` holds every size that defines it (recorded in the JSON)."""
    op: str                      # sub_logit_loss | bn_relu_pool | pool_linear | cfm | head
    group: str                   # cifar | imagenet | sweep | quick
    dtype: str                   # fp32 | bf16 | fp16
    shape: Dict[str, int]
    target: Optional[str] = None  # the target this case is read against (never asserted)
    dynamic: bool = False         # compile with dynamic=True (shared by the sweep's cases)
    mode: str = "fwd+bwd"

    @property
    def id(self) -> str:
        if self.mode == "fwd":
            return f"{self.op}/fwd/B={self.shape['B']}/{self.dtype}"
        if self.group == "sweep":
            return f"sweep/{self.op}/B={self.shape['B']}/{self.dtype}"
        return f"{self.op}/{self.group}/{self.dtype}"

    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


def _sub_logit_shape(family: str) -> Dict[str, int]:
    b, k, _ = FAMILIES[family]
    return {"S": 4, "B": b, "n": 4, "K": k}


def _proj_shape(family: str, img: int) -> Dict[str, int]:
    b, _, dt = FAMILIES[family]
    m = stage_maps(img)[-1]
    return {"B": b, "C": 512, "H": m, "W": m, "D": max(512, dt)}


def _cfm_shape(family: str) -> Dict[str, int]:
    b, k, dt = FAMILIES[family]
    return {"B": b, "D": max(512, dt), "Dt": dt, "hidden": dt, "n": 4, "K": k}


def _head_shape(family: str, img: int) -> Dict[str, int]:
    b, k, dt = FAMILIES[family]
    return {"B": b, "K": k, "Dt": dt, "n": 4, "img": img}


def _bn_shape(family: str, img: int) -> Dict[str, int]:
    # Input of the last BN of a SepConv projector: D channels at the deepest map.
    b, _, dt = FAMILIES[family]
    m = stage_maps(img)[-1]
    return {"B": b, "C": max(512, dt), "H": m, "W": m}


def _family_cases(family: str, dtypes, ops, op_img: int, head_img: int) -> List[Case]:
    shapes = {"sub_logit_loss": _sub_logit_shape(family), "bn_relu_pool": _bn_shape(family, op_img),
              "pool_linear": _proj_shape(family, op_img), "cfm": _cfm_shape(family),
              "head": _head_shape(family, head_img)}
    return [Case(op, family, dt, dict(shapes[op])) for op in ops for dt in dtypes]


def sweep_cases(batches, dtype: str = "fp32", K: int = 1000) -> List[Case]:
    return [Case("sub_logit_loss", "sweep", dtype, {"S": 4, "B": b, "n": 4, "K": K}, dynamic=True)
            for b in batches]


CPU_TARGET = "cpu backend >= 5x eager and >= 3x torch.compile"
GPU_HEAD_TARGET = "H100: >= 5x eager, >= 2x the best stock baseline (faster of compile, compile-ro)"
CPU_HEAD_TARGET = "CPU head case (no numeric target): fused vs eager and compile"
GPU_BW_TARGET = "fused >= 70% of copy bandwidth (B >= 4096, L2 flushed)"
GPU_FWD_BW_TARGET = "forward >= 75% of copy bandwidth (B >= 4096, the forward design's bytes)"


def forward_cases(batches, dtypes, K: int = 1000, target: Optional[str] = None) -> List[Case]:
    """sub_logit_loss forward alone (S = 4, n = 4): the bandwidth of its one-pass forward kernels."""
    return [Case("sub_logit_loss", "fwd", dt, {"S": 4, "B": b, "n": 4, "K": K}, target=target, mode="fwd")
            for b in batches for dt in dtypes]


def profile_cases(profile: str) -> List[Case]:
    """Every case of a profile, the target cases first (so a time budget never drops them).

    cpu: pruned to fit ``make bench`` in 10 minutes on 2 cores, compile time included: the CPU target case
    (sub_logit_loss S=4, B=256, n=4, K=1000 fp32), the head at B=128, K=100 on 32x32 maps, the other ops
    at both shape families in one dtype each, and a short batch sweep.
    gpu: both families, fp32 and bf16, the head on 224x224 maps, the sweep from 8 to 8192, and sub_logit_loss's
    forward alone at B = 4096, K = 1000 in fp32 and bf16 (its bandwidth target; eager and the fused backends
    only: no compile, to stay inside gpu_check's budget).
    quick: tiny shapes for the smoke test.
    """
    if profile == "cpu":
        cases = [Case("sub_logit_loss", "imagenet", "fp32", _sub_logit_shape("imagenet"), target=CPU_TARGET),
                 Case("head", "cifar", "fp32", _head_shape("cifar", 32), target=CPU_HEAD_TARGET),
                 Case("sub_logit_loss", "imagenet", "bf16", _sub_logit_shape("imagenet")),
                 Case("sub_logit_loss", "cifar", "fp32", _sub_logit_shape("cifar")),
                 Case("head", "cifar", "bf16", _head_shape("cifar", 32))]
        cases += _family_cases("cifar", ["fp32"], ["bn_relu_pool", "pool_linear", "cfm"], 224, 32)
        cases += _family_cases("imagenet", ["bf16"], ["bn_relu_pool", "pool_linear", "cfm"], 224, 32)
        cases += sweep_cases((8, 32, 128, 512, 1024))
        return cases
    if profile == "gpu":
        cases = [Case("head", "imagenet", "bf16", _head_shape("imagenet", 224), target=GPU_HEAD_TARGET),
                 Case("head", "imagenet", "fp32", _head_shape("imagenet", 224))]
        cases += forward_cases((4096,), ("bf16", "fp32"), target=GPU_FWD_BW_TARGET)
        cases += _family_cases("imagenet", ["fp32", "bf16"], ["sub_logit_loss", "bn_relu_pool", "pool_linear",
                                                              "cfm"], 224, 224)
        cases += _family_cases("cifar", ["fp32", "bf16"], ["sub_logit_loss", "bn_relu_pool", "pool_linear",
                                                           "cfm", "head"], 224, 224)
        sweep = sweep_cases((8, 32, 128, 512, 1024, 2048, 4096, 8192))
        for c in sweep:
            if c.shape["B"] >= 4096:
                c.target = GPU_BW_TARGET
        return cases + sweep
    if profile == "quick":
        return [Case("sub_logit_loss", "quick", "fp32", {"S": 2, "B": 5, "n": 3, "K": 37}),
                Case("bn_relu_pool", "quick", "fp32", {"B": 3, "C": 8, "H": 3, "W": 3}),
                Case("pool_linear", "quick", "bf16", {"B": 3, "C": 8, "H": 3, "W": 3, "D": 12}),
                Case("cfm", "quick", "fp32", {"B": 5, "D": 12, "Dt": 10, "hidden": 10, "n": 3, "K": 37}),
                Case("head", "quick", "fp32", {"B": 3, "K": 37, "Dt": 24, "n": 3, "img": 32,
                                               "channels": 4}),
                *sweep_cases((2, 7), K=37), *forward_cases((5,), ("fp32",), K=37)]
    raise ValueError(f"unknown profile {profile!r}; expected cpu, gpu or quick")


def sub_logit_loss_bytes(S: int, B: int, n: int, K: int, elem: int) -> Tuple[int, int]:
    """(essential, design) bytes of one sub_logit_loss fwd+bwd (the byte model in kernels/sub_logit_loss.py's
    header). R = S B n K sub-logit elements, Z = B K, E = ``elem`` bytes per logit, 8 B target bytes per read.
    essential: read zf, z_s, z_t and the targets once, write dzf and dz_s once = 2RE + 3ZE + 8B.
    design: fwd reads zf, z_s, z_t, y (RE + 2ZE + 8B); bwd reads them again and writes dzf, dz_s
    (2RE + 3ZE + 8B); the statistics are written once and read once: row_stats S B n 3 and sample_stats B 3
    float64, ortho_coef S B n n and the partial sums 5 S B in the accumulation dtype (4 bytes; 8 for fp64)."""
    rows, z = S * B * n * K, B * K
    acc = 8 if elem == 8 else 4
    essential = 2 * rows * elem + 3 * z * elem + 8 * B
    stats = 2 * (8 * (S * B * n * 3 + B * 3) + acc * (S * B * n * n + 5 * max(S, 1) * B))
    design = (rows * elem + 2 * z * elem + 8 * B) + (2 * rows * elem + 3 * z * elem + 8 * B) + stats
    return essential, design


def sub_logit_loss_fwd_bytes(S: int, B: int, n: int, K: int, elem: int) -> Tuple[int, int]:
    """(essential, design) bytes of one sub_logit_loss forward alone. essential: read zf, z_s, z_t and the
    targets once = RE + 2ZE + 8B. design: that plus the statistics the forward writes (row_stats S B n 3 and
    sample_stats B 3 float64, ortho_coef S B n n and the partial sums 5 S B in the accumulation dtype); the
    reduce kernel's read of the partials (written just before, L2-resident) is not counted. S = 4, n = 4,
    B = 4096, K = 1000: fp32 294.94 + 3.05 MB, bf16 147.49 + 3.05 MB (decimal; kernels/sub_logit_loss.py)."""
    rows, z = S * B * n * K, B * K
    acc = 8 if elem == 8 else 4
    essential = rows * elem + 2 * z * elem + 8 * B
    stats = 8 * (S * B * n * 3 + B * 3) + acc * (S * B * n * n + 5 * max(S, 1) * B)
    return essential, essential + stats


def essential_bytes(case: Case) -> Optional[int]:
    """Bytes a fwd+bwd (a ``fwd`` case: its forward) must move at the least (each input read once, each
    gradient written once), for the memory-bound ops; None for the GEMM-bound cfm and the head. The roofline
    floor uses these."""
    es = torch.tensor([], dtype=DTYPES[case.dtype]).element_size()
    s = case.shape
    if case.op == "sub_logit_loss":
        model = sub_logit_loss_fwd_bytes if case.mode == "fwd" else sub_logit_loss_bytes
        return model(s["S"], s["B"], s["n"], s["K"], es)[0]
    if case.op == "bn_relu_pool":
        # fwd reads x; bwd reads x again and writes dx.
        return 3 * s["B"] * s["C"] * s["H"] * s["W"] * es
    if case.op == "pool_linear":
        # fwd reads x; bwd writes dx; W and dW.
        return 2 * s["B"] * s["C"] * s["H"] * s["W"] * es + 2 * s["D"] * s["C"] * es
    return None


def design_bytes(case: Case) -> Optional[int]:
    """Bytes the fused kernels' design moves in a fwd+bwd (sub_logit_loss: ``sub_logit_loss_bytes``, a ``fwd``
    case: ``sub_logit_loss_fwd_bytes``; the other memory-bound ops: their essential bytes, no separate model).
    Achieved bandwidth = this / time."""
    if case.op == "sub_logit_loss":
        s = case.shape
        es = torch.tensor([], dtype=DTYPES[case.dtype]).element_size()
        model = sub_logit_loss_fwd_bytes if case.mode == "fwd" else sub_logit_loss_bytes
        return model(s["S"], s["B"], s["n"], s["K"], es)[1]
    return essential_bytes(case)


def flops(case: Case) -> Optional[int]:
    """Matmul FLOPs of a fwd+bwd of cfm (forward GEMMs x3)."""
    if case.op != "cfm":
        return None
    s = case.shape
    fwd = 2 * s["B"] * ((s["D"] + s["Dt"]) * s["hidden"] + s["hidden"] * s["n"] * s["K"])
    return 3 * fwd


# The roofline every op case is held against, whatever device ran it: the H100 SXM's
# HBM3 bandwidth and its dense peak, tensor cores for bf16/fp16, CUDA cores for fp32 (TF32 off) and fp64.
H100_HBM_BYTES_PER_S = 3.35e12
H100_PEAK_FLOPS = {"bf16": 990e12, "fp16": 990e12, "fp32": 67e12, "fp64": 67e12}


def roofline_floor_ms(case: Case) -> Optional[float]:
    """The least time a fwd+bwd (a ``fwd`` case: its forward) can take on an H100: max(essential bytes / HBM
    bandwidth, FLOPs / peak), in ms; None where neither is modelled (the whole head)."""
    nbytes, nflops = essential_bytes(case), flops(case)
    if nbytes is None and nflops is None:
        return None
    t = max(nbytes / H100_HBM_BYTES_PER_S if nbytes else 0.0,
            nflops / H100_PEAK_FLOPS[case.dtype] if nflops else 0.0)
    return 1e3 * t
