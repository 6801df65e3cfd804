"""The training engine of hcd-distill: the step (``TrainStep``), the loop, run state, distributed helpers,
checkpointing and reporting."""
from hcd_fast.distill.engine.step import StepOutput, TrainStep

__all__ = ["StepOutput", "TrainStep"]
