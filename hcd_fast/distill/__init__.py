"""hcd_fast.distill: heterogeneous distillation of any timm teacher into any timm student.

The library: taps (``StudentTap``, ``TeacherTap``), ``Distiller`` (student + criterion, the trainable part)
and ``DistillTask`` (timm's ``TrainingTask`` contract), the methods registry (``build_criterion``: hcd and
the ce, kd, dkd, ofa baselines) and ``TrainStep``, the one training step. The application: ``hcd-distill``
(``cli``, ``config``, ``engine.run``), with ``data``, ``teacher`` (tap, speed, cache) and ``engine``.
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
