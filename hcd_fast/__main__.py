"""``python -m hcd_fast``: report each backend, available or not, and why (like ds_report)."""
import platform

import torch

import hcd_fast


def main() -> None:
    print(f"hcd_fast {hcd_fast.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    for status in hcd_fast.backends().values():
        print(f"  {status}")


if __name__ == "__main__":
    main()
