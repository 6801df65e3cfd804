"""Distillation methods (hcd and the baselines it is published against): one module per method, each defining ``METHOD``; a new method is a
new module here plus its name in ``_MODULES``. The CLI flags, the trainer and the checkpoint read them
from this registry."""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Sequence

import torch.nn as nn

from hcd_fast.config import HCDConfig
from hcd_fast.distill.methods.ce import CELoss
from hcd_fast.distill.methods.dkd import DKDLoss, DKDOptions, dkd_loss, dkd_terms
from hcd_fast.distill.methods.kd import KDLoss, kd_loss
from hcd_fast.distill.methods.ofa import OFALoss, OFAOptions, ofa_term
from hcd_fast.distill.methods.registry import Method

_MODULES = ("hcd", "ce", "kd", "dkd", "ofa")  # the first is the default
REGISTRY: Dict[str, Method] = {
    m.name: m for m in (importlib.import_module(f"hcd_fast.distill.methods.{n}").METHOD for n in _MODULES)}
METHODS = tuple(REGISTRY)


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"method: expected one of {METHODS}, got {name!r}")
    return REGISTRY[name]


def build_criterion(method: str, student_channels: Sequence[int], teacher_dim: int, num_classes: int,
                    config: HCDConfig = HCDConfig(), *, backend: str = "auto",
                    options: Optional[object] = None) -> nn.Module:
    """The criterion of ``method`` (one of METHODS), with HCDLoss's call signature.

    Args:
        student_channels: C_s of each tapped student stage; teacher_dim: D_t; num_classes: K.
        config: the loss options shared by every method (temperature, label_smoothing, w_gt, w_kd,
            embed_dim) and HCD's own.
        backend: hcd_fast backend of the HCD/OFA projectors and the HCD head.
        options: the method's own options (``get_method(method).options``, e.g. ``DKDOptions``); None:
            their defaults.
    """
    m = get_method(method)
    if options is None and m.options is not None:
        options = m.options()
    return m.build(tuple(student_channels), teacher_dim, num_classes, config, options, backend)


__all__ = ["METHODS", "REGISTRY", "Method", "get_method", "build_criterion", "CELoss", "KDLoss", "DKDLoss",
           "OFALoss", "DKDOptions", "OFAOptions", "kd_loss", "dkd_loss", "dkd_terms", "ofa_term"]
