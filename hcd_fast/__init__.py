"""hcd_fast: fast, exact Heterogeneous Complementary Distillation (HCD) for PyTorch."""
from hcd_fast import functional, reference
from hcd_fast.config import HCDConfig
from hcd_fast.loss import HCDLoss
from hcd_fast.ops.dispatch import BACKENDS, backends

__version__ = "0.1.0"

# Import every backend now (about 0.1 s), not at the first call: that call may be inside torch.compile,
# where importing a module breaks the graph. A backend that fails to import is only reported, never raised.
backends()

__all__ = ["HCDLoss", "HCDConfig", "backends", "BACKENDS", "functional", "reference", "__version__"]
