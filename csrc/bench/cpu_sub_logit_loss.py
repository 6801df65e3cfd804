"""CPU sub_logit_loss fwd+bwd at S=4, B=256, n=4, K=1000 fp32: eager reference vs torch.compile(reference) vs
backend cpu, steps interleaved (eager, compile, cpu, ...) so all three see the same load; medians.
Usage: .venv/bin/python csrc/bench/cpu_sub_logit_loss.py [threads] [repeats]   (the issue #4 check)"""
import statistics, sys, time
import torch
import hcd_fast
from hcd_fast import reference as R
from hcd_fast.ops import cpp_ops
from hcd_fast.config import HCDConfig
if len(sys.argv) > 1: torch.set_num_threads(int(sys.argv[1]))
S, B, n, K = 4, 256, 4, 1000
cfg = HCDConfig(num_sub_logits=n)
torch.manual_seed(0)
sub = torch.randn(S, B, n, K, requires_grad=True); zs = torch.randn(B, K, requires_grad=True)
zt = torch.randn(B, K); y = torch.randint(0, K, (B,))
comp = torch.compile(R.sub_logit_loss)
fns = {"eager": R.sub_logit_loss, "compile": comp, "cpu": cpp_ops.sub_logit_loss}
def step(fn):
    t0 = time.perf_counter(); sub.grad = None; zs.grad = None
    fn(sub, zs, zt, y, cfg)[0].backward(); return time.perf_counter() - t0
for _ in range(3):
    for f in fns.values(): step(f)
ts = {k: [] for k in fns}
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 20):
    for k, f in fns.items(): ts[k].append(step(f))
med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
print(f"threads={torch.get_num_threads()} cap={hcd_fast._C.cpu_capability()} " +
      " ".join(f"{k}={v:.2f}ms" for k, v in med.items()) +
      f" | cpu vs eager {med['eager']/med['cpu']:.1f}x, vs compile {med['compile']/med['cpu']:.1f}x")
