"""hcd: Heterogeneous Complementary Distillation, ``hcd_fast.HCDLoss`` with every option from ``HCDConfig``."""
from __future__ import annotations

from hcd_fast.distill.methods.registry import Method
from hcd_fast.loss import HCDLoss
from hcd_fast.reference import PART_NAMES

METHOD = Method("hcd", lambda channels, teacher_dim, num_classes, config, options, backend:
                HCDLoss(tuple(channels), teacher_dim, num_classes, config, backend=backend), PART_NAMES,
                help="Heterogeneous Complementary Distillation")
