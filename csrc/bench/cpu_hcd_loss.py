"""Whole HCDLoss fwd+bwd, backend cpu vs reference, alternating single steps (paired; robust to load drift).
B=128, K=100, ResNet18 stage maps at 32x32 input (64x8x8, 128x4x4, 256x2x2, 512x1x1), D_t=384.
Usage: .venv/bin/python csrc/bench/cpu_hcd_loss.py [threads]   (the issue #4 check; benchmarks/ has the suite)"""
import copy, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
from hcd_fast import HCDLoss
B, K, Dt = 128, 100, 384
chans, sizes = (64, 128, 256, 512), (8, 4, 2, 1)
torch.manual_seed(0)
ref = HCDLoss(chans, Dt, K, backend="reference").train()
cpu = copy.deepcopy(ref)
for m in cpu.modules():
    if hasattr(m, "backend"): m.backend = "cpu"
feats = [torch.randn(B, c, s, s, requires_grad=True) for c, s in zip(chans, sizes)]
zs = torch.randn(B, K, requires_grad=True); ft = torch.randn(B, Dt); zt = torch.randn(B, K); y = torch.randint(0, K, (B,))
def run(m):
    t0 = time.perf_counter(); m.zero_grad(); m(feats, zs, ft, zt, y).backward(); return time.perf_counter() - t0
for _ in range(5): run(ref), run(cpu)
tr, tc = [], []
for i in range(40):
    if i % 2: tr.append(run(ref)); tc.append(run(cpu))
    else: tc.append(run(cpu)); tr.append(run(ref))
ratios = [a / b for a, b in zip(tr, tc)]
print(f"threads={torch.get_num_threads()} reference median {statistics.median(tr)*1e3:.1f} ms, cpu median {statistics.median(tc)*1e3:.1f} ms, "
      f"median paired ratio {statistics.median(ratios):.2f}x")
