"""Ad-hoc GPU probe behind benchmarks/results/h100/probe/probe.txt: torch.compile gradients of pool_linear on the
triton and cuda backends (they once differed from the reference on torch 2.11), and a torch.profiler table of the sub_logit_loss fwd+bwd kernels.

    PYTHONPATH=$PWD python3 benchmarks/gpu_probe.py      # on a CUDA machine
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from hcd_fast import functional as F
from hcd_fast.config import HCDConfig

torch.manual_seed(0)
dev = "cuda"
bad = []  # (backend, compiler) whose compiled gradients differ from the reference: exit 1 at the end
# 1. torch.compile gradients of pool_linear against the reference on every GPU backend
for be in ("triton", "cuda"):
    x = torch.randn(3, 37, 4, 3, device=dev, requires_grad=True); w = torch.randn(7, 37, device=dev, requires_grad=True)
    b = torch.randn(7, device=dev, requires_grad=True)
    ref = torch.autograd.grad(F.pool_linear(x, w, b, backend="reference").square().sum(), (x, w, b))
    for bk in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        f = torch.compile(lambda x, w, b: F.pool_linear(x, w, b, backend=be), backend=bk, fullgraph=True)
        try:
            g = torch.autograd.grad(f(x, w, b).square().sum(), (x, w, b))
            err = [float((a - r).abs().max()) for a, r in zip(g, ref)]
            print("compile pool_linear", be, bk, "max grad err", err)
            if max(err) > 1e-3:
                bad.append((be, bk))
        except Exception as e:
            print("compile pool_linear", be, bk, "ERROR", type(e).__name__, str(e)[:300])
            bad.append((be, bk))
# 2. profile sub_logit_loss fwd+bwd kernels
cfg = HCDConfig()
for dt in (torch.float32, torch.bfloat16):
  for B in (256, 4096):
    S, n, K = 4, cfg.num_sub_logits, 1000
    zf = torch.randn(S, B, n, K, device=dev, dtype=dt, requires_grad=True)
    zs = torch.randn(B, K, device=dev, dtype=dt, requires_grad=True)
    zt = torch.randn(B, K, device=dev, dtype=dt); y = torch.randint(0, K, (B,), device=dev)
    for be in ("triton", "cuda"):
        def step():
            loss, _ = F.sub_logit_loss(zf, zs, zt, y, cfg, backend=be)
            loss.backward()
        for _ in range(5): step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50): step()
        torch.cuda.synchronize(); wall = (time.perf_counter() - t0) / 50 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10): step()
            torch.cuda.synchronize()
        print(f"\n== sub_logit_loss {be} {dt} B={B}: wall {wall:.3f} ms/iter (no L2 flush)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
if bad:
    print("torch.compile gave wrong gradients or failed for:", bad)
    raise SystemExit(1)
