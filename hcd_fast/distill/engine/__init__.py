"""The training engine of hcd-distill: the step (``step``), what a run builds (``components``), the loop
(``loop``), run state (``state``), distributed helpers, checks, evaluation and reporting; ``run`` is the
entry point."""
from hcd_fast.distill.engine.step import StepOutput, TrainStep

__all__ = ["StepOutput", "TrainStep"]
