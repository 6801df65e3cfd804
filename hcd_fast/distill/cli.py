"""The command line of ``hcd-distill`` (also ``python -m hcd_fast.distill``) and of ``hcd-distill cache-teacher``:
parsers generated from the ``TrainConfig`` / ``CacheConfig`` fields (``config.py``) and the loss option
dataclasses, parsed into those dataclasses. The only place an ``argparse.Namespace`` exists."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import List, Optional

from hcd_fast.config import HCDConfig
from hcd_fast.distill.config import HCD_FLAG_BOUNDS, PRESETS, CacheConfig, TrainConfig, hcd_config
from hcd_fast.distill.errors import Interrupted, TrainingError, UserError, interrupted_message
from hcd_fast.distill.methods import REGISTRY
from hcd_fast.distill.options import describe_bounds, flag_name

EPILOG = """examples:
  hcd-distill --teacher vit_tiny_patch16_224 --student resnet18 --teacher-checkpoint t.pt --method hcd
  hcd-distill --teacher vit_tiny_patch16_224 --student resnet18 --allow-random-teacher --epochs 1  # smoke test
  hcd-distill --preset cifar100 --data-dir data/ --teacher swin_tiny_patch4_window7_224 --student resnet18 \\
      --teacher-checkpoint swin_t_cifar100.pt --method hcd
  torchrun --nproc-per-node 8 -m hcd_fast.distill --preset imagenet --data-dir /data/imagenet ...
  hcd-distill ... --resume auto            # continue a killed run from OUTPUT/last.pt
  hcd-distill cache-teacher --teacher T --teacher-checkpoint t.pt ... --views 16 --output cache/  # then:
  hcd-distill --teacher T --teacher-checkpoint t.pt ... --teacher-cache cache/   # no teacher forward
  hcd-distill --dataset imagefolder --data-dir /data/imagenet ... --loader dali  # GPU JPEG decoding (DALI)
A preset sets the defaults of its flags; flags given explicitly win. Outputs: OUTPUT/{last,best}.pt,
metrics.csv, metrics.jsonl, loss.png, accuracy.png, summary.json. Exit codes: 0 done, 1 training failed
(a non-finite loss), 2 a bad flag, file, dataset or output folder (found before the first step)."""


CACHE_EPILOG = """example:
  hcd-distill cache-teacher --teacher vit_base_patch16_224 --teacher-checkpoint t.pt --dataset imagefolder \\
      --data-dir /data/imagenet --img-size 224 --views 16 --output cache/vitb_k16
  hcd-distill --teacher vit_base_patch16_224 --teacher-checkpoint t.pt --dataset imagefolder \\
      --data-dir /data/imagenet --img-size 224 --student resnet18 --teacher-cache cache/vitb_k16"""

GROUP_TITLES = {"optim": "optimisation (timm create_optimizer_v2 / create_scheduler_v2)"}


def _json_dict(text: str) -> dict:
    """argparse type of --*-kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"img_size\": 32}}', got {text!r}")
    return value


# HCDConfig fields the baselines use too; every other loss flag is HCD-only and its help says so.
_SHARED_LOSS_FLAGS = ("temperature", "label_smoothing", "w_gt", "w_kd", "embed_dim")


def add_hcd_config_flags(group) -> None:
    """One flag per HCDConfig field, generated from the field: name, default, choices and help text live in
    hcd_fast/config.py only."""
    for f in dataclasses.fields(HCDConfig):
        flag = "--" + f.name.replace("_", "-")
        text = ("" if f.name in _SHARED_LOSS_FLAGS else "hcd: ") + f.metadata["help"]
        if f.name in HCD_FLAG_BOUNDS:
            text += f"; on the command line {describe_bounds(HCD_FLAG_BOUNDS[f.name])}"
        if isinstance(f.default, bool):
            group.add_argument(flag, action="store_true", help=text)
        elif f.name == "cfm_hidden":  # 'teacher', an int or 'none': parsed in parse_args
            group.add_argument(flag, default=f.default, help=text + "; on the command line 'none' (default "
                               f"{f.default})")
        elif "choices" in f.metadata:
            group.add_argument(flag, default=f.default, choices=f.metadata["choices"],
                               help=f"{text} (default {f.default})")
        else:
            kind = int if f.name in ("num_sub_logits", "embed_dim") else float
            group.add_argument(flag, type=kind, default=f.default, help=f"{text} (default {f.default})")


def add_option(group, f: dataclasses.Field) -> None:
    """One flag from a declared field: its help, default, choices and command-line form (metadata)."""
    meta, default = f.metadata, (f.default if f.default is not dataclasses.MISSING else f.default_factory())
    kw = {"help": meta.get("help", "")}
    for key in ("choices", "nargs", "const", "metavar", "required"):
        if key in meta:
            kw[key] = meta[key]
    if isinstance(default, bool):
        group.add_argument(flag_name(f.name), action="store_true", **kw)
        return
    notes = [f"default {default}"] if default not in (None, {}) and not meta.get("required") else []
    if meta.get("bounds"):
        notes.append(describe_bounds(meta["bounds"]))
    if notes:
        kw["help"] += f" ({'; '.join(notes)})"
    kind = meta.get("kind")
    if kind == "json":
        kw["type"] = _json_dict
    elif kind != "indices" and "choices" not in meta and "nargs" not in meta:
        kw["type"] = _scalar_type(f)
    group.add_argument(flag_name(f.name), default=default, **kw)


def _scalar_type(f: dataclasses.Field):
    text = str(f.type)
    return int if "int" in text and "float" not in text else float if "float" in text else str


def _add_fields(parser, dataclass_type, groups: dict, after: dict = None) -> None:
    for f in dataclasses.fields(dataclass_type):
        if f.metadata.get("nested"):
            continue
        name = f.metadata["group"]
        if name not in groups:
            groups[name] = parser.add_argument_group(GROUP_TITLES.get(name, name))
        add_option(groups[name], f)
        if after and f.name in after:
            after[f.name](groups[name])


def _add_loss_flags(group) -> None:
    """HCDConfig's fields, then each method's own options."""
    add_hcd_config_flags(group)
    for method in REGISTRY.values():
        if method.options is not None:
            for f in dataclasses.fields(method.options):
                add_option(group, f)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hcd-distill", description="Heterogeneous distillation of any timm teacher into any timm student "
        "with HCD (or the ce/kd/dkd/ofa baselines), on one device or many (torchrun).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_fields(p, TrainConfig, {}, after={"backend": _add_loss_flags})
    return p


def build_cache_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hcd-distill cache-teacher", description="Run the teacher once over K augmented views of every "
        "training image and store the crop windows, flips and pre-logit features f_t for --teacher-cache.",
        epilog=CACHE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_fields(p, CacheConfig, {})
    return p


def parse_args(argv: Optional[List[str]] = None) -> TrainConfig:
    """Parse ``argv`` into a ``TrainConfig``; a --preset supplies defaults that explicit flags override."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = parser.parse_known_args(argv)
    if known.preset != "none":
        parser.set_defaults(**PRESETS[known.preset])
    values = vars(parser.parse_args(argv))
    values["indices"] = _parse_indices(values["indices"])
    values["cfm_hidden"] = _parse_cfm_hidden(values["cfm_hidden"])
    loss = hcd_config({f.name: values.pop(f.name) for f in dataclasses.fields(HCDConfig)})
    options = {m.name: m.options(**{f.name: values.pop(f.name) for f in dataclasses.fields(m.options)})
               for m in REGISTRY.values() if m.options is not None}
    return TrainConfig(**values, loss=loss, method_options=options)


def parse_cache_args(argv: Optional[List[str]] = None) -> CacheConfig:
    return CacheConfig(**vars(build_cache_parser().parse_args(argv)))


def _parse_cfm_hidden(value):
    if not isinstance(value, str):
        return value
    h = value.strip().lower()
    if h not in ("none", "teacher") and not h.isdigit():
        raise UserError(f"--cfm-hidden: expected 'teacher', 'none' or an int, got {value!r}")
    return None if h == "none" else ("teacher" if h == "teacher" else int(h))


def _parse_indices(text):
    if isinstance(text, (int, list)):
        return text
    parts = [t for t in str(text).replace(" ", "").split(",") if t]
    try:
        values = [int(t) for t in parts]
    except ValueError:
        raise UserError(f"--indices: expected N or a comma list of ints, got {text!r}") from None
    if len(values) == 1 and "," not in str(text):
        return values[0]
    return values


def cache_main(argv: Optional[List[str]] = None) -> int:
    """``hcd-distill cache-teacher``."""
    from hcd_fast.distill.teacher.build import build_cache
    try:
        cfg = parse_cache_args(argv)
        meta = build_cache(cfg)
    except UserError as exc:
        print(f"hcd-distill cache-teacher: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        ranks = f", {meta['ranks']} ranks" if meta["ranks"] > 1 else ""
        print(f"hcd-distill cache-teacher: {meta['num_images']} images x {meta['num_views']} views, D_t "
              f"{meta['feat_dim']} ({meta['dtype']}) in {cfg.output} ({meta['seconds']:.1f} s{ranks})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cache-teacher"]:  # the teacher feature cache's own command
        return cache_main(argv[1:])
    from hcd_fast.distill.engine.run import run
    try:
        run(parse_args(argv))
    except UserError as exc:
        print(f"hcd-distill: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"hcd-distill: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # Ctrl-C in training: one line (rank 0's under torchrun), no traceback
        if int(os.environ.get("RANK", "0")) == 0:
            print(interrupted_message(exc, argv), file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C before training: nothing was written
        print("hcd-distill: interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    return 0
