"""hcd_fast.distill: heterogeneous distillation of any timm teacher into any timm student.

- ``StudentTap`` / ``TeacherTap``: logits and stage maps of the student in one forward; the frozen
  teacher's penultimate feature and logits under inference mode.
- ``Distiller``: student + criterion (HCDLoss or a baseline), the trainable part; returns
  (student_logits, loss, parts).
- ``DistillTask``: the same as a timm ``TrainingTask`` (``{"loss", "output", ...}``).
- ``baselines``: ce, kd, dkd, ofa (SPEC section 9).
- ``hcd-distill`` / ``python -m hcd_fast.distill``: the trainer CLI (``cli.main``, ``trainer.run``);
  ``checkpoint``: safe loading (weights_only), atomic writes, run folders.
"""
from hcd_fast.distill.baselines import METHODS, CELoss, DKDLoss, KDLoss, OFALoss
from hcd_fast.distill.distiller import (HAS_TIMM_TASK, Distiller, DistillTask, HCDTask, LossOptions,
                                       build_criterion)
from hcd_fast.distill.errors import TrainingError, UserError
from hcd_fast.distill.taps import StudentTap, TeacherTap, probe_student, probe_teacher

__all__ = ["METHODS", "CELoss", "KDLoss", "DKDLoss", "OFALoss", "Distiller", "DistillTask", "HCDTask", "LossOptions",
           "build_criterion", "HAS_TIMM_TASK", "StudentTap", "TeacherTap", "probe_student", "probe_teacher",
           "UserError", "TrainingError"]
