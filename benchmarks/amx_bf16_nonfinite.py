"""Count trials of one bf16-autocast forward+backward of a plain timm CNN on the CPU that give a non-finite loss
or gradient: PyTorch's oneDNN AMX path (hcd_fast/distill/onednn_amx.py). No hcd_fast code runs here.

    python benchmarks/amx_bf16_nonfinite.py                                  # AMX allowed
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/amx_bf16_nonfinite.py   # the workaround: expect 0
"""
import argparse, os, timm, torch  # noqa: E401

p = argparse.ArgumentParser()
p.add_argument("--trials", type=int, default=30)
p.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
a = p.parse_args()
fmt = torch.contiguous_format if a.nchw else torch.channels_last
bad = 0
for seed in range(a.trials):
    torch.manual_seed(seed)
    m = timm.create_model("resnet10t", num_classes=10, channels=(8, 16, 32, 64), stem_width=8).to(memory_format=fmt)
    x, y = torch.randn(32, 3, 16, 16).to(memory_format=fmt), torch.randint(0, 10, (32,))
    with torch.autocast("cpu", torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(m(x), y)
    loss.backward()
    bad += not (torch.isfinite(loss) and all(torch.isfinite(q.grad).all() for q in m.parameters()))
print(f"{bad} of {a.trials} trials non-finite ({'NCHW' if a.nchw else 'channels_last'}, "
      f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')})")
