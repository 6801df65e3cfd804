"""hcd_fast: fast, exact Heterogeneous Complementary Distillation (HCD) for PyTorch."""
from hcd_fast import functional, reference
from hcd_fast.config import HCDConfig
from hcd_fast.loss import HCDLoss
from hcd_fast.ops.dispatch import BACKENDS, backends

__version__ = "0.1.0"

__all__ = ["HCDLoss", "HCDConfig", "backends", "BACKENDS", "functional", "reference", "__version__"]
