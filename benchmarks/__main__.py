"""``python -m benchmarks [pipeline | step-parts | compare] ...``

    python -m benchmarks                      # every case, every provider (benchmarks/runner.py)
    python -m benchmarks --quick              # tiny shapes, 2 repetitions: a smoke run
    python -m benchmarks --cases head,steps --providers eager,compile,fused --out /tmp/r
    python -m benchmarks pipeline             # loader / teacher / step / end-to-end img/s (benchmarks/pipeline.py)
    python -m benchmarks step-parts           # the parts of the CPU hcd step in CPU time (benchmarks/step_parts.py)
    python -m benchmarks compare OLD.json NEW.json   # speedup ratios side by side (benchmarks/compare.py)
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {"pipeline": "benchmarks.pipeline", "step-parts": "benchmarks.step_parts", "compare": "benchmarks.compare"}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    from benchmarks import runner
    runner.run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
