"""timm models for hcd-distill: name checks, creation (pretrained weights, input size), a dry run at the
training input size, and the teacher and student of a run with their probed widths."""
from __future__ import annotations

import difflib
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from hcd_fast.distill.checkpoint import classifier_classes, load_weights
from hcd_fast.distill.data.datasets import DataConfig
from hcd_fast.distill.errors import UserError
from hcd_fast.distill.taps import probe_student
from hcd_fast.distill.teacher.tap import TeacherTap, probe_teacher


def check_model_name(flag: str, name: Optional[str]) -> None:
    import timm
    if not name:
        raise UserError(f"{flag}: a timm model name is required")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"{flag} {name!r}: not a timm model (see timm.list_models()){hint}")


def pretrained_kwargs(flag: str, name: str, source: Optional[str]) -> Tuple[dict, Optional[int]]:
    """timm.create_model kwargs for timm's pretrained weights (the hub, or a local file through
    pretrained_cfg_overlay) and the class count of those weights."""
    if source is None:
        return {"pretrained": False}, None
    from timm.models import get_pretrained_cfg
    pcfg = get_pretrained_cfg(name)
    if pcfg is None:
        raise UserError(f"{flag}: timm has no pretrained weights for {name!r}")
    if source == "hub":
        return {"pretrained": True}, pcfg.num_classes
    n = classifier_classes(source, pcfg.classifier if isinstance(pcfg.classifier, str) else "", flag)
    overlay = {"file": source, "num_classes": n if n is not None else pcfg.num_classes}
    return {"pretrained": True, "pretrained_cfg_overlay": overlay}, overlay["num_classes"]


def create_model(flag: str, name: str, num_classes: int, kwargs: dict, img_size: int,
                 pretrained: Optional[str] = None) -> nn.Module:
    """timm.create_model, given ``img_size`` when the model takes one (ViTs, Swins, ...) and the user did not
    set it in the kwargs; pretrained weights from the hub or a local file when asked."""
    import timm
    kw, _ = pretrained_kwargs(flag + "-pretrained", name, pretrained)
    kw.update(kwargs)
    sized = "img_size" not in kwargs
    try:
        try:
            return timm.create_model(name, num_classes=num_classes, **kw, **({"img_size": img_size} if sized else {}))
        except TypeError as exc:
            if not (sized and "img_size" in str(exc)):
                raise
            return timm.create_model(name, num_classes=num_classes, **kw)
    except TypeError as exc:
        raise UserError(f"{flag} {name!r}: timm.create_model rejected the kwargs {kwargs}: {exc}") from None
    except UserError:
        raise
    except Exception as exc:
        if pretrained is None:
            raise
        raise UserError(f"{flag}-pretrained {pretrained}: cannot load timm's pretrained weights of {name!r} "
                        f"({type(exc).__name__}: {str(exc)[:300]})") from None


def dry_run(flag: str, name: str, model: nn.Module, input_size) -> None:
    """One eval forward at the training input size: a model that cannot take it fails here."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters(), None)
            model(torch.zeros(1, *input_size, device=p.device if p is not None else "cpu"))
    except Exception as exc:
        raise UserError(f"{flag} {name!r} does not run at --img-size {input_size[-1]} "
                        f"({type(exc).__name__}: {str(exc)[:200]}); set --img-size to a size it takes, or the "
                        f"model's input size through {flag}-kwargs (e.g. '{{\"img_size\": {input_size[-1]}}}')") from None
    finally:
        model.train(was_training)


def teacher_data_config(name: str, checkpoint_meta: dict, interpolation: Optional[str] = None) -> DataConfig:
    """The input statistics the teacher was trained with: its timm data config, or the ``data_config`` an
    hcd-distill checkpoint records (``checkpoint_meta`` from ``load_weights``)."""
    cfg = DataConfig.of_model(name, interpolation)
    if "data_config" in checkpoint_meta:
        dc = checkpoint_meta["data_config"]
        cfg = DataConfig(tuple(dc["mean"]), tuple(dc["std"]), cfg.interpolation, cfg.crop_pct)
    return cfg


def load_teacher(name: str, num_classes: int, kwargs: dict, img_size: int, checkpoint: Optional[str] = None,
                 pretrained: Optional[str] = None, interpolation: Optional[str] = None
                 ) -> Tuple[nn.Module, DataConfig]:
    """The teacher model (weights from ``checkpoint``, else ``pretrained``, else random) and the data config
    of its training input (``teacher_data_config``)."""
    model = create_model("--teacher", name, num_classes, kwargs, img_size, pretrained)
    meta = load_weights(model, checkpoint, num_classes, "--teacher-checkpoint") if checkpoint else {}
    return model, teacher_data_config(name, meta, interpolation)


def build_teacher(name: str, num_classes: int, device: torch.device, input_stats, input_size, *,
                  kwargs: dict = None, checkpoint: Optional[str] = None, pretrained: Optional[str] = None
                  ) -> Tuple[TeacherTap, int]:
    """The frozen, probed teacher tap of a run and its feature width D_t. ``input_stats``: (mean, std) of the
    run's (student's) input; the tap converts it to the teacher's own statistics."""
    if pretrained is not None and checkpoint is None:
        _, n = pretrained_kwargs("--teacher-pretrained", name, pretrained)
        if n != num_classes:
            raise UserError(f"--teacher-pretrained: timm's {name!r} weights classify {n} classes, the dataset has "
                            f"{num_classes}, so the teacher's head would be random; give a --teacher-checkpoint "
                            f"trained on this dataset")
    model, teacher_cfg = load_teacher(name, num_classes, kwargs or {}, input_size[-1], checkpoint, pretrained)
    model = model.to(device)
    dry_run("--teacher", name, model, input_size)
    teacher = TeacherTap(model, input_stats, teacher_cfg.stats())
    teacher_dim, teacher_k = probe_teacher(teacher, input_size)
    if teacher_k != num_classes:
        raise UserError(f"--teacher {name!r} outputs {teacher_k} classes, the dataset has {num_classes}")
    return teacher, teacher_dim


def build_student(name: str, num_classes: int, device: torch.device, input_size, indices: Union[int, Sequence[int]],
                  *, kwargs: dict = None, drop_path: float = 0.0, pretrained: Optional[str] = None
                  ) -> Tuple[nn.Module, Tuple[int, ...]]:
    """The student model and the channels C_s of its tapped stages (probed at ``input_size``)."""
    kwargs = dict(kwargs or {})
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    student = create_model("--student", name, num_classes, kwargs, input_size[-1], pretrained).to(device)
    if not hasattr(student, "forward_intermediates"):
        raise UserError(f"--student {name!r}: this timm model has no forward_intermediates, so its "
                        f"stages cannot be tapped; pick another student")
    dry_run("--student", name, student, input_size)
    try:
        channels, student_k = probe_student(student, indices, input_size)
    except (IndexError, AssertionError, ValueError, RuntimeError) as exc:
        raise UserError(f"--indices {indices!r} for --student {name!r}: {exc}") from None
    if student_k != num_classes:
        raise UserError(f"--student {name!r} outputs {student_k} classes, the dataset has {num_classes}")
    return student, channels
