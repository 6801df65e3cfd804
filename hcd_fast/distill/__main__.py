"""``python -m hcd_fast.distill`` == ``hcd-distill`` (see ``--help``)."""
import sys

from hcd_fast.distill.cli import main

if __name__ == "__main__":
    sys.exit(main())
