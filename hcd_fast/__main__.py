"""``python -m hcd_fast``: report each backend, available or not, and why (like ds_report)."""
import platform

import torch

import hcd_fast
from hcd_fast.ops.dispatch import fused_projector_backends


def main() -> None:
    print(f"hcd_fast {hcd_fast.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    for status in hcd_fast.backends().values():
        print(f"  {status}")
    fused = fused_projector_backends()
    if fused:
        print("fused projector blocks: " + ", ".join(
            name if source == name else f"{name} (the {source} backend's kernels)" for name, source in fused.items()))
    else:
        print("fused projector blocks: none available here (the SepConv blocks run as grouped nn modules)")


if __name__ == "__main__":
    main()
