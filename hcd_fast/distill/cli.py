"""Command line of ``hcd-distill`` (also ``python -m hcd_fast.distill``): flags, presets, early checks."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional

from hcd_fast.config import HCDConfig
from hcd_fast.distill.baselines import METHODS
from hcd_fast.distill.data import DATASETS
from hcd_fast.distill.errors import Interrupted, TrainingError, UserError, interrupted_message

# The published recipe (SPEC section 2): SGD momentum 0.9, lr 0.05, wd 2e-3, cosine to 1e-3 with 3 warm-up
# epochs, 300 epochs, batch 128, CIFAR-100 upsampled to 224 (as OFA-KD does).
_RECIPE = dict(opt="sgd", lr=0.05, momentum=0.9, weight_decay=2e-3, sched="cosine", min_lr=1e-3,
               warmup_epochs=3, epochs=300, batch_size=128, img_size=224)
PRESETS = {
    "cifar100": dict(_RECIPE, dataset="cifar100", ofa_eps=1.0),
    "imagenet": dict(_RECIPE, dataset="imagefolder", ofa_eps=1.5),
}

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


def _add_hcd_config_flags(group) -> None:
    """One flag per HCDConfig field, generated from the field: name, default, choices and help text live in
    hcd_fast/config.py only."""
    for f in dataclasses.fields(HCDConfig):
        flag = "--" + f.name.replace("_", "-")
        text = ("" if f.name in _SHARED_LOSS_FLAGS else "hcd: ") + f.metadata["help"]
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hcd-distill", description="Heterogeneous distillation of any timm teacher into any timm student "
        "with HCD (or the ce/kd/dkd/ofa baselines), on one device or many (torchrun).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--teacher", help="timm model name of the teacher (see timm.list_models()); not needed "
                   "for --method ce")
    g.add_argument("--student", required=True, help="timm model name of the student; it must support "
                   "forward_intermediates")
    g.add_argument("--teacher-checkpoint", metavar="PATH", help="local file with the teacher's weights (a "
                   "state_dict, or a dict holding one under 'state_dict'/'model'/'state_dict_ema', or "
                   ".safetensors; read with torch.load(weights_only=True), never unpickled); its class count "
                   "must match the dataset")
    g.add_argument("--teacher-pretrained", nargs="?", const="hub", default=None, metavar="FILE", help="start "
                   "the teacher from timm's pretrained weights: from the hub (no value) or a local FILE (timm's "
                   "pretrained_cfg_overlay); without --teacher-checkpoint their class count must match the dataset")
    g.add_argument("--student-pretrained", nargs="?", const="hub", default=None, metavar="FILE", help="start "
                   "the student from timm's pretrained weights: from the hub (no value) or a local FILE; a "
                   "classifier of another class count is re-initialised")
    g.add_argument("--allow-random-teacher", action="store_true", help="run without --teacher-checkpoint "
                   "(random teacher; for smoke tests and benchmarks only)")
    g.add_argument("--teacher-kwargs", type=_json_dict, default={}, metavar="JSON", help="extra "
                   "timm.create_model kwargs of the teacher, e.g. '{\"img_size\": 32, \"patch_size\": 4}'")
    g.add_argument("--student-kwargs", type=_json_dict, default={}, metavar="JSON",
                   help="extra timm.create_model kwargs of the student")
    g.add_argument("--indices", default="4", help="student stages to tap, timm forward_intermediates "
                   "style: N = the last N stages (default 4), or a comma list of stage indices")
    g.add_argument("--drop-path", type=float, default=0.0, help="student drop-path rate (default 0)")

    g = p.add_argument_group("method and loss")
    g.add_argument("--method", choices=METHODS, default="hcd", help="hcd (default), or the baselines ce "
                   "(student alone), kd (Hinton), dkd (decoupled KD), ofa (OFA-KD); SPEC section 9")
    g.add_argument("--backend", default="auto", help="hcd_fast backend: auto (fused when available), "
                   "reference, triton, cuda, cpu")
    _add_hcd_config_flags(g)
    g.add_argument("--dkd-alpha", type=float, default=1.0, help="dkd: TCKD weight (1)")
    g.add_argument("--dkd-beta", type=float, default=2.0, help="dkd: NCKD weight (2; 8 is common on ImageNet)")
    g.add_argument("--dkd-warmup", type=float, default=20.0, help="dkd: epochs of linear ramp-up (20)")
    g.add_argument("--ofa-eps", type=float, default=1.0, help="ofa: exponent eps (1 CIFAR, 1.5 ImageNet)")
    g.add_argument("--w-ofa", type=float, default=1.0, help="ofa: weight of the per-stage OFA terms (1)")

    g = p.add_argument_group("data")
    g.add_argument("--preset", choices=("none",) + tuple(PRESETS), default="none", help="cifar100 or "
                   "imagenet: the published recipe (dataset, 224 px, SGD 0.05, wd 2e-3, cosine to 1e-3, 3 "
                   "warm-up epochs, 300 epochs, batch 128)")
    g.add_argument("--dataset", choices=DATASETS, default="digits", help="digits (default; embedded in "
                   "scikit-learn, no download), cifar100 or imagefolder (both need --data-dir)")
    g.add_argument("--data-dir", metavar="PATH", help="dataset root: for cifar100 the folder holding "
                   "cifar-100-python/, for imagefolder the folder holding <train-split>/ and <val-split>/")
    g.add_argument("--train-split", default="train", help="imagefolder: training sub-folder (train)")
    g.add_argument("--val-split", default="val", help="imagefolder: validation sub-folder (val)")
    g.add_argument("--num-classes", type=int, default=None, help="optional check: the dataset must have "
                   "this many classes")
    g.add_argument("--img-size", type=int, default=32, help="input size in pixels (default 32; digits are "
                   "8x8, upsampled)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="digits: held-out fraction (0.2)")
    g.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5 (off)")
    g.add_argument("--reprob", type=float, default=0.0, help="random-erasing probability (0)")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation (cifar100/imagefolder)")
    g.add_argument("--digits-aug", action="store_true", help="digits: RandomResizedCrop + flip views (fresh "
                   "each epoch; the teacher cache's views with --teacher-cache); digits are otherwise not augmented")
    g.add_argument("--interpolation", default=None, help="resize interpolation (default: the student's timm "
                   "data config, usually bicubic)")
    g.add_argument("--crop-pct", type=float, default=None, help="evaluation centre-crop fraction (default: "
                   "the student's timm data config, e.g. 0.875, for imagefolder; 1.0 for cifar100)")
    g.add_argument("--workers", type=int, default=4, help="data-loader workers per process (4; digits "
                   "always uses 0, it is in memory); DALI threads with --loader dali")
    g.add_argument("--loader", choices=("timm", "dali"), default="timm", help="timm (default): PIL decoding in "
                   "DataLoader workers; dali: NVIDIA DALI decodes the JPEGs (nvJPEG on CUDA, CPU otherwise) and "
                   "crops, jitters, flips and normalises on the device, the same views as timm's (imagefolder "
                   "only; pip install 'hcd_fast[dali]')")

    g = p.add_argument_group("optimisation (timm create_optimizer_v2 / create_scheduler_v2)")
    g.add_argument("--epochs", type=int, default=10, help="epochs (10)")
    g.add_argument("--batch-size", type=int, default=64, help="GLOBAL batch size, split evenly over "
                   "processes (64)")
    g.add_argument("--opt", default="sgd", help="timm optimizer name (sgd)")
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate (0.05)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    g.add_argument("--weight-decay", type=float, default=2e-3, help="weight decay, not applied to biases "
                   "and norms (2e-3)")
    g.add_argument("--sched", default="cosine", help="timm scheduler name, stepped every update, or 'none' "
                   "(cosine)")
    g.add_argument("--min-lr", type=float, default=1e-3, help="final learning rate of the schedule (1e-3)")
    g.add_argument("--warmup-epochs", type=int, default=1, help="linear warm-up epochs (1)")
    g.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate at the start of warm-up")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this (off)")

    g = p.add_argument_group("speed")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="autocast: auto = "
                   "bf16 on CUDA, off on CPU; fp16 adds a GradScaler")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="channels_last memory format (auto: on for CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the student and teacher forwards")
    g.add_argument("--teacher-bf16", choices=("auto", "on", "off"), default="auto", help="teacher weights "
                   "cast to bf16, fp32 outputs (auto: on under bf16 autocast on CUDA)")
    g.add_argument("--teacher-channels-last", choices=("auto", "on", "off"), default="auto",
                   help="channels_last teacher (auto: on for CNN teachers on CUDA)")
    g.add_argument("--teacher-compile", choices=("auto", "on", "off"), default="auto", help="torch.compile "
                   "the teacher forward on its own, with CUDA graphs on CUDA (auto: follows --compile)")
    g.add_argument("--teacher-cache", metavar="DIR", default=None, help="replay stored views and teacher "
                   "features from DIR (made by `hcd-distill cache-teacher`): no teacher forward in training")
    g.add_argument("--log-interval", type=int, default=20, help="read metrics from the device (one host "
                   "sync) every N steps (20)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")

    g = p.add_argument_group("distributed (torchrun)")
    g.add_argument("--sync-bn", action="store_true", help="convert BatchNorm to SyncBatchNorm, the HCD projectors' "
                   "included (CUDA only)")
    g.add_argument("--freeze-bn", action="store_true", help="keep every BatchNorm (student and projectors) "
                   "in eval mode: running statistics, per-sample independent losses")
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP find_unused_parameters")

    g = p.add_argument_group("state and output")
    g.add_argument("--output", metavar="DIR", default=None, help="output folder (default runs/<dataset>_"
                   "<teacher>_to_<student>_<method>_s<seed>_<hash of the flags that change results>); a folder "
                   "holding another run's results is refused unless --resume or --overwrite")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an output folder holding another "
                   "run's results, deleting them")
    g.add_argument("--allow-changed-args", action="store_true", help="resume although result-defining flags "
                   "changed since the checkpoint (listed in a warning) instead of refusing")
    g.add_argument("--resume", default="none", help="'auto': continue from OUTPUT/last.pt if it exists; a "
                   "path: continue from that checkpoint; 'none' (default): start fresh")
    g.add_argument("--ckpt-interval", type=int, default=0, help="also checkpoint every N steps (0: off)")
    g.add_argument("--ckpt-minutes", type=float, default=10.0, help="also checkpoint last.pt when this many "
                   "minutes of wall time passed since the last one, checked every --log-interval steps (10; 0: "
                   "off); epoch ends always checkpoint")
    g.add_argument("--skip-nonfinite", type=int, default=0, metavar="N", help="skip up to N steps whose loss is "
                   "not finite (costs one host sync per step); by default (0) a non-finite loss stops the run")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (0)")
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="debug: cut every epoch to N steps")
    g.add_argument("--stop-after-steps", type=int, default=None, help="debug: exit after N global steps "
                   "without a final checkpoint, as if the process had been killed")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--no-plots", action="store_true", help="no PNG plots")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; a --preset supplies defaults that explicit flags override."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = parser.parse_known_args(argv)
    if known.preset != "none":
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    args.indices = _parse_indices(args.indices)
    if isinstance(args.cfm_hidden, str):
        h = args.cfm_hidden.strip().lower()
        if h not in ("none", "teacher") and not h.isdigit():
            raise UserError(f"--cfm-hidden: expected 'teacher', 'none' or an int, got {args.cfm_hidden!r}")
        args.cfm_hidden = None if h == "none" else ("teacher" if h == "teacher" else int(h))
    return args


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


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cache-teacher"]:  # the teacher feature cache's own command
        from hcd_fast.distill.teacher_cache import main as cache_main
        return cache_main(argv[1:])
    from hcd_fast.distill.trainer import run
    try:
        args = parse_args(argv)
        run(args)
    except UserError as exc:
        print(f"hcd-distill: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"hcd-distill: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # Ctrl-C in training: one line, no traceback
        print(interrupted_message(exc, argv), file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C before training: nothing was written
        print("hcd-distill: interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    return 0
