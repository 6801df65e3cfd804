"""The method record every distillation method module defines (``METHOD``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch.nn as nn

from hcd_fast.config import HCDConfig

# (student_channels, teacher_dim, num_classes, HCDConfig, the method's options or None, backend) -> criterion
Builder = Callable[[Sequence[int], int, int, HCDConfig, object, str], nn.Module]


@dataclass(frozen=True)
class Method:
    """A distillation method: how its criterion is built and what it reports.

    name: the ``--method`` value. build: the criterion builder (HCDLoss's call signature). part_names: the
    loss parts it reports. options: a frozen dataclass of its own options (each field a CLI flag of the same
    name, declared with ``option``), or None; the options it shares with HCD (temperature, label smoothing,
    w_gt, w_kd, embed_dim) come from ``HCDConfig``. needs_teacher: False only for ce.
    """

    name: str
    build: Builder
    part_names: Tuple[str, ...]
    options: Optional[type] = None
    needs_teacher: bool = True
    help: str = ""
