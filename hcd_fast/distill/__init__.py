"""hcd_fast.distill: heterogeneous distillation of any timm teacher into any timm student.

- ``StudentTap`` / ``TeacherTap``: logits and stage maps of the student in one forward; the frozen
  teacher's penultimate feature and logits under inference mode.
- ``Distiller``: student + criterion (HCDLoss or a baseline), the trainable part; returns
  (student_logits, loss, parts).
- ``DistillTask``: the same as a timm ``TrainingTask`` (``{"loss", "output", ...}``).
- ``methods``: the registry of hcd and the ce, kd, dkd, ofa baselines (SPEC section 9), one module each.
- ``TrainStep``: the one training step (hcd-distill's loop and the benchmarks run it).
- ``hcd-distill`` / ``python -m hcd_fast.distill``: the trainer CLI (``cli.main``, ``trainer.run``);
  ``checkpoint``: safe loading (weights_only), atomic writes, run folders.
"""
from hcd_fast.distill.distiller import HAS_TIMM_TASK, Distiller, DistillTask, HCDTask
from hcd_fast.distill.engine.step import StepOutput, TrainStep
from hcd_fast.distill.methods import (METHODS, CELoss, DKDLoss, DKDOptions, KDLoss, OFALoss, OFAOptions,
                                      build_criterion, get_method)
from hcd_fast.distill.errors import TrainingError, UserError
from hcd_fast.distill.taps import StudentTap, probe_student
from hcd_fast.distill.teacher.tap import TeacherTap, probe_teacher

__all__ = ["METHODS", "CELoss", "KDLoss", "DKDLoss", "OFALoss", "Distiller", "DistillTask", "HCDTask", "DKDOptions",
           "OFAOptions", "build_criterion", "get_method", "TrainStep", "StepOutput", "HAS_TIMM_TASK", "StudentTap", "TeacherTap", "probe_student", "probe_teacher",
           "UserError", "TrainingError"]
