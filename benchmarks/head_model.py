"""Byte and FLOP model of the HCD head's SepConv projectors: today's op split against the fused projector ops.

Self-contained (imports nothing from the rest of benchmarks/): ``python -m benchmarks.head_model`` prints the
tables; ``block_passes`` / ``head_table`` are what tests and benchmark rows import.

A *pass* is one kernel (fused design) or one ATen op (today's split) with the feature maps it reads and
writes; every map is counted once per pass that touches it (a perfect cache inside a pass, none between
passes). The model counts maps only (B x C x H x W tensors); parameters, BatchNorm statistics and per-tile
partials are O(C) or O(C^2) and are reported apart (``param_bytes``). tests/test_head_model.py checks the map
counts against a brute-force count at a tiny shape: the sizes of the map tensors every dispatched ATen op
(today) or every launched Triton kernel (fused) touches.

One SepConv(c, o) block on a map (B, c, H, W), stride 2 then 1 (h = ceil(H/2), w = ceil(W/2)):
    X = B c H W (input), N1 = B c h w (inner maps), N2 = B o h w (output)

Today (module path: nn.Conv2d / nn.BatchNorm2d / F.relu, each materialising its output), training fwd+bwd:
    fwd  dw1 X->N1, pw1 N1->N1, bn1 N1->N1, relu1 N1->N1, dw2 N1->N1, pw2 N1->N2,
         [not the projector's last block] bn2 N2->N2, relu2 N2->N2
    bwd  [relu2 (g, out)->g, bn2 (g, x)->g], pw2 (g, a2)->g, dw2 (g, z1)->g, relu1, bn1, pw1 (g, a1)->g,
         dw1 (g, x)->g
    = 3X + 26 N1 + 12 N2 (the last block: 3X + 26 N1 + 5 N2; its bn2+ReLU+GAP is bn_relu_pool in both designs)

Fused (hcd_fast/ops/projector.py, kernels/projector.py):
    fwd  projector_dwconv (prologue: the previous BN's scale/shift + ReLU) X->N1
         projector_pwconv GEMM N1->N1 (+ bn1 statistics in the epilogue: per-tile partials, then a per-channel
           pass that also updates the running statistics: O(C))
         projector_dwconv (bn1 prologue) N1->N1
         projector_pwconv GEMM N1->N2 (+ bn2 statistics)   [the last block: torch's 1x1 conv N1->N2]
    bwd  pw2 dgrad (g, y2)->N1 and wgrad (g, y2, a2): the BN-statistics gradient g + c1 + c2 (y - mean) is
         recomputed in the GEMM prologues instead of being stored    [last block: conv backward (g, a2)->N1]
         dwconv2 backward (g, y1)->N1: transposed depthwise conv, ReLU mask and weight/scale/shift partials
         recomputed from y1 in one pass
         pw1 dgrad (g, y1)->N1, wgrad (g, y1, a1); dwconv1 backward (g, x)->X
    = 3X + 18 N1 + 5 N2 (the last block: 3X + 18 N1 + 2 N2)

FLOPs (multiply-add = 2): pointwise GEMMs 2 B h w c (c + o) forward, twice that backward; depthwise 2*9 per
output forward, 2*2*9 backward; elementwise BN/ReLU work ~ a few per element (counted as 4 per element touched
by BN/ReLU passes). The head is memory-bound at these shapes, which is why bytes are the model's measure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

# ResNet18 at 224 px: stage channels and map sizes; the teacher's width (Swin-T / ViT-S: 768) sets D.
RESNET18_CHANNELS = (64, 128, 256, 512)
RESNET18_MAPS_224 = (56, 28, 14, 7)
TEACHER_DIM = 768
ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Pass:
    """One kernel/op: the map tensors it reads and writes, as (name, numel) pairs."""
    name: str
    reads: Tuple[Tuple[str, int], ...]
    writes: Tuple[Tuple[str, int], ...]

    @property
    def elems(self) -> int:
        return sum(n for _, n in self.reads) + sum(n for _, n in self.writes)


@dataclass(frozen=True)
class Block:
    """One SepConv(c_in, c_out) block of a projector on a (B, c_in, H, W) map."""
    stage: int
    index: int
    c_in: int
    c_out: int
    height: int
    width: int
    first: bool  # the projector's first block: its input is the raw stage map (no BN prologue)
    last: bool   # the projector's last block: its bn2 + ReLU + GAP is the bn_relu_pool op

    @property
    def name(self) -> str:
        return f"stage{self.stage}.block{self.index}"

    def sizes(self, batch: int) -> Tuple[int, int, int]:
        h, w = math.ceil(self.height / 2), math.ceil(self.width / 2)
        return (batch * self.c_in * self.height * self.width, batch * self.c_in * h * w,
                batch * self.c_out * h * w)


def head_blocks(channels: Sequence[int] = RESNET18_CHANNELS, maps: Sequence[int] = RESNET18_MAPS_224,
                teacher_dim: int = TEACHER_DIM) -> List[Block]:
    """The SepConv blocks of HCDLoss's projectors (hcd_fast/loss.py, hcd_fast/modules.StageProjectors): stage s of
    S has S-1-s blocks, channels doubling, the last emitting D = max(C_last, D_t); the deepest stage has none. (The
    projectors run same-shape blocks of different stages as one grouped block: the same bytes per block, plus the
    copy that concatenates a group's input, which this model leaves out.)"""
    dim = max(channels[-1], teacher_dim)
    blocks = []
    for s, (c, size) in enumerate(zip(channels[:-1], maps[:-1])):
        nb = len(channels) - 1 - s
        chans = [c * 2 ** j for j in range(nb)] + [dim]
        for j in range(nb):
            blocks.append(Block(s, j, chans[j], chans[j + 1], size, size, j == 0, j == nb - 1))
            size = math.ceil(size / 2)
    return blocks


def block_passes(block: Block, batch: int, fused: bool) -> List[Pass]:
    """The map-touching passes of one block's training fwd+bwd (module docstring)."""
    X, N1, N2 = block.sizes(batch)
    P = lambda name, reads, writes: Pass(name, tuple(reads), tuple(writes))  # noqa: E731
    if not fused:
        fwd = [P("dw1", [("x", X)], [("a1", N1)]), P("pw1", [("a1", N1)], [("y1", N1)]),
               P("bn1", [("y1", N1)], [("b1", N1)]), P("relu1", [("b1", N1)], [("z1", N1)]),
               P("dw2", [("z1", N1)], [("a2", N1)]), P("pw2", [("a2", N1)], [("y2", N2)])]
        bwd = []
        if not block.last:
            fwd += [P("bn2", [("y2", N2)], [("b2", N2)]), P("relu2", [("b2", N2)], [("z2", N2)])]
            bwd += [P("relu2 bwd", [("g", N2), ("z2", N2)], [("g", N2)]),
                    P("bn2 bwd", [("g", N2), ("y2", N2)], [("g", N2)])]
        bwd += [P("pw2 bwd", [("g", N2), ("a2", N1)], [("g", N1)]),
                P("dw2 bwd", [("g", N1), ("z1", N1)], [("g", N1)]),
                P("relu1 bwd", [("g", N1), ("z1", N1)], [("g", N1)]),
                P("bn1 bwd", [("g", N1), ("y1", N1)], [("g", N1)]),
                P("pw1 bwd", [("g", N1), ("a1", N1)], [("g", N1)]),
                P("dw1 bwd", [("g", N1), ("x", X)], [("g", X)])]
        return fwd + bwd
    fwd = [P("dwconv1", [("x", X)], [("a1", N1)]), P("pwconv1", [("a1", N1)], [("y1", N1)]),
           P("dwconv2", [("y1", N1)], [("a2", N1)])]
    if block.last:
        fwd.append(P("pw2 (torch)", [("a2", N1)], [("y2", N2)]))
        bwd = [P("pw2 bwd (torch)", [("g", N2), ("a2", N1)], [("g", N1)])]
    else:
        fwd.append(P("pwconv2", [("a2", N1)], [("y2", N2)]))
        bwd = [P("pwconv2 dgrad", [("g", N2), ("y2", N2)], [("g", N1)]),
               P("pwconv2 wgrad", [("g", N2), ("y2", N2), ("a2", N1)], [])]
    bwd += [P("dwconv2 bwd", [("g", N1), ("y1", N1)], [("g", N1)]),
            P("pwconv1 dgrad", [("g", N1), ("y1", N1)], [("g", N1)]),
            P("pwconv1 wgrad", [("g", N1), ("y1", N1), ("a1", N1)], []),
            P("dwconv1 bwd", [("g", N1), ("x", X)], [("g", X)])]
    return fwd + bwd


def block_map_elems(block: Block, batch: int, fused: bool) -> int:
    return sum(p.elems for p in block_passes(block, batch, fused))


def block_param_elems(block: Block) -> int:
    """Parameters read in the forward and their gradients written in the backward (both designs): dw weights
    9c twice, pw weights c^2 + c o, BN weight/bias/running stats 4(c + o)."""
    c, o = block.c_in, block.c_out
    return 2 * (2 * 9 * c + c * c + c * o + 2 * (c + o)) + 2 * 2 * (c + o)


def block_flops(block: Block, batch: int, fused: bool) -> int:
    """FLOPs of the block's fwd+bwd (module docstring); the fused design adds the recomputed BN/ReLU work."""
    X, N1, N2 = block.sizes(batch)
    c, o = block.c_in, block.c_out
    m = N1 // c
    gemm = 3 * (2 * m * c * c + 2 * m * c * o)
    depthwise = 3 * 2 * 9 * 2 * N1
    elementwise = 4 * (4 * N1 + (0 if block.last else 4 * N2))
    if fused:
        elementwise += 4 * (2 * N1 + 2 * N2)  # the recomputed BN-gradient terms in the GEMM prologues
    return gemm + depthwise + elementwise


def tail_elems(batch: int, channels: Sequence[int] = RESNET18_CHANNELS, maps: Sequence[int] = RESNET18_MAPS_224,
               teacher_dim: int = TEACHER_DIM, num_classes: int = 1000, n: int = 4) -> int:
    """Map/activation elements of the rest of the head, the same in both designs: bn_relu_pool on each projector's
    last map (fwd: statistics + apply, 2 reads; bwd: partials + dx, 2 reads + 1 write), pool_linear on the
    deepest map (1 read fwd, 1 write bwd), the CFMs (S: inputs B(D + D_t), hidden B D_t read/written 4 times,
    outputs B n K twice) and sub_logit_loss (S B n K read fwd, read + write bwd)."""
    dim = max(channels[-1], teacher_dim)
    S = len(channels)
    last_maps = [b.sizes(batch)[2] for b in head_blocks(channels, maps, teacher_dim) if b.last]
    elems = sum(5 * m for m in last_maps)
    elems += 2 * batch * channels[-1] * maps[-1] ** 2
    elems += S * (3 * batch * (dim + teacher_dim) + 4 * batch * teacher_dim + 3 * batch * n * num_classes)
    elems += 3 * S * batch * n * num_classes
    return elems


def head_table(batch: int, dtype: str = "bf16") -> Dict[str, object]:
    """Per block and whole head: bytes of today's split and of the fused design, and FLOPs (fwd+bwd)."""
    e = ELEM_BYTES[dtype]
    rows = []
    for b in head_blocks():
        rows.append(dict(block=b.name, c_in=b.c_in, c_out=b.c_out, map=b.height,
                         unfused_bytes=e * block_map_elems(b, batch, False) + 4 * block_param_elems(b),
                         fused_bytes=e * block_map_elems(b, batch, True) + 4 * block_param_elems(b),
                         unfused_flops=block_flops(b, batch, False), fused_flops=block_flops(b, batch, True)))
    tail = e * tail_elems(batch)
    proj_u = sum(r["unfused_bytes"] for r in rows)
    proj_f = sum(r["fused_bytes"] for r in rows)
    return dict(batch=batch, dtype=dtype, blocks=rows, projector_unfused_bytes=proj_u, projector_fused_bytes=proj_f,
                rest_of_head_bytes=tail, head_unfused_bytes=proj_u + tail, head_fused_bytes=proj_f + tail)


def markdown(batch: int, dtype: str = "bf16", hbm_bytes_per_s: float = 3.35e12) -> str:
    t = head_table(batch, dtype)
    mb = lambda v: f"{v / 1e6:.1f}"  # noqa: E731
    lines = [f"B={batch}, {dtype}, training fwd+bwd; MB = 1e6 bytes; floor at {hbm_bytes_per_s / 1e12:.2f} TB/s",
             "", "| block | c_in -> c_out | map | today MB | fused MB | fused/today | GFLOP |",
             "|---|---|---|---|---|---|---|"]
    for r in t["blocks"]:
        lines.append(f"| {r['block']} | {r['c_in']} -> {r['c_out']} | {r['map']} | {mb(r['unfused_bytes'])} | "
                     f"{mb(r['fused_bytes'])} | {r['fused_bytes'] / r['unfused_bytes']:.2f} | "
                     f"{r['fused_flops'] / 1e9:.1f} |")
    lines.append(f"| projectors | | | {mb(t['projector_unfused_bytes'])} | {mb(t['projector_fused_bytes'])} | "
                 f"{t['projector_fused_bytes'] / t['projector_unfused_bytes']:.2f} | |")
    lines.append(f"| rest of head | | | {mb(t['rest_of_head_bytes'])} | {mb(t['rest_of_head_bytes'])} | 1.00 | |")
    lines.append(f"| head | | | {mb(t['head_unfused_bytes'])} | {mb(t['head_fused_bytes'])} | "
                 f"{t['head_fused_bytes'] / t['head_unfused_bytes']:.2f} | |")
    lines.append("")
    lines.append(f"byte floor: today {t['head_unfused_bytes'] / hbm_bytes_per_s * 1e3:.2f} ms, fused "
                 f"{t['head_fused_bytes'] / hbm_bytes_per_s * 1e3:.2f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    for batch in (256, 128):
        print(markdown(batch))
        print()
