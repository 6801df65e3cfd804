"""What an hcd-distill run and a cache-teacher build are asked to do, as dataclasses: every flag is a field
declared once here (default, help, valid range, command-line form); ``cli.py`` generates the parsers from
them. The loss options are ``HCDConfig``'s fields and the methods' own option dataclasses, never restated."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from hcd_fast.config import HCDConfig
from hcd_fast.distill.data.datasets import DATASETS
from hcd_fast.distill.data.loaders import LOADERS
from hcd_fast.distill.errors import UserError
from hcd_fast.distill.methods import METHODS, get_method
from hcd_fast.distill.options import check_ranges, check_value, flag_name, option

SWITCH = ("auto", "on", "off")

# The published recipe of HCD (as OFA-KD trains): SGD momentum 0.9, lr 0.05, wd 2e-3, cosine to 1e-3 with 3 warm-up
# epochs, 300 epochs, batch 128, CIFAR-100 upsampled to 224 (as OFA-KD does).
_RECIPE = dict(opt="sgd", lr=0.05, momentum=0.9, weight_decay=2e-3, sched="cosine", min_lr=1e-3,
               warmup_epochs=3, epochs=300, batch_size=128, img_size=224)
PRESETS = {
    "cifar100": dict(_RECIPE, dataset="cifar100", ofa_eps=1.0),
    "imagenet": dict(_RECIPE, dataset="imagefolder", ofa_eps=1.5),
}


# Options both commands take (a function each: every dataclass needs its own field object).
def _teacher_checkpoint():
    return option(None, "local file with the teacher's weights (a state_dict, or a dict holding one under "
                  "'state_dict'/'model'/'state_dict_ema', or .safetensors; read with torch.load(weights_only=True), "
                  "never unpickled); its class count must match the dataset", group="models", metavar="PATH")


def _allow_random_teacher():
    return option(False, "run without --teacher-checkpoint (random teacher; for smoke tests and benchmarks only)",
                  group="models")


def _teacher_kwargs():
    return option({}, "extra timm.create_model kwargs of the teacher, e.g. '{\"img_size\": 32, \"patch_size\": 4}'",
                  group="models", kind="json", metavar="JSON")


def _dataset():
    return option("digits", "digits (embedded in scikit-learn, no download), cifar100 or imagefolder (both need "
                  "--data-dir)", group="data", choices=DATASETS)


def _data_dir():
    return option(None, "dataset root: for cifar100 the folder holding cifar-100-python/, for imagefolder the folder "
                  "holding <train-split>/ and <val-split>/", group="data", metavar="PATH")


def _split(default: str, what: str):
    return option(default, f"imagefolder: {what} sub-folder", group="data")


def _img_size(help: str):
    return option(32, help, ge=1, le=8192, group="data")


def _val_fraction():
    return option(0.2, "digits: held-out fraction (0: no validation)", ge=0.0, lt=1.0, group="data")


def _no_aug(help: str):
    return option(False, help, group="data")


def _digits_aug(help: str):
    return option(False, help, group="data")


def _workers(help: str):
    return option(4, help, ge=0, le=1024, group="data")


def _seed(help: str):
    return option(0, help, ge=0, group="state and output")


def _device():
    return option(None, "cpu, cuda or cuda:N (default: cuda when available)", group="speed")


def _threads():
    return option(None, "torch CPU threads (default torch's)", ge=1, le=1024, group="speed")


def _teacher_bf16(help: str):
    return option("auto", help, group="speed", choices=SWITCH)


def _teacher_channels_last():
    return option("auto", "channels_last teacher (auto: on for CNN teachers on CUDA)", group="speed", choices=SWITCH)


def _no_progress(help: str = "no tqdm progress bar"):
    return option(False, help, group="state and output")


@dataclass
class TrainConfig:
    """An hcd-distill run (``hcd_fast.distill.engine.run``). ``loss``: the HCD options, shared in part by every
    method (temperature, label_smoothing, w_gt, w_kd, embed_dim); ``method_options``: each method's own
    options by method name (``get_method(name).options``)."""

    # models
    student: Optional[str] = option(None, "timm model name of the student; it must support forward_intermediates",
                                    group="models", required=True)
    teacher: Optional[str] = option(None, "timm model name of the teacher (see timm.list_models()); not needed for "
                                    "--method ce", group="models")
    teacher_checkpoint: Optional[str] = _teacher_checkpoint()
    teacher_pretrained: Optional[str] = option(
        None, "start the teacher from timm's pretrained weights: from the hub (no value) or a local FILE (timm's "
        "pretrained_cfg_overlay); without --teacher-checkpoint their class count must match the dataset",
        group="models", nargs="?", const="hub", metavar="FILE")
    student_pretrained: Optional[str] = option(
        None, "start the student from timm's pretrained weights: from the hub (no value) or a local FILE; a "
        "classifier of another class count is re-initialised", group="models", nargs="?", const="hub", metavar="FILE")
    allow_random_teacher: bool = _allow_random_teacher()
    teacher_kwargs: Dict[str, Any] = _teacher_kwargs()
    student_kwargs: Dict[str, Any] = option({}, "extra timm.create_model kwargs of the student", group="models",
                                            kind="json", metavar="JSON")
    indices: Union[int, List[int]] = option(4, "student stages to tap, timm forward_intermediates style: N = the last "
                                            "N stages, or a comma list of stage indices", group="models",
                                            kind="indices")
    drop_path: float = option(0.0, "student drop-path rate", ge=0.0, lt=1.0, group="models")
    # method and loss (the HCDConfig flags and the methods' own follow --backend in the parser)
    method: str = option("hcd", "hcd, or the baselines ce (student alone), kd (Hinton et al. 2015), dkd (decoupled "
                         "KD, Zhao et al. 2022), ofa (OFA-KD, Hao et al. 2023)", group="method and loss",
                         choices=METHODS)
    backend: str = option("auto", "hcd_fast backend: auto (fused when available), reference, triton, cuda, cpu",
                          group="method and loss")
    loss: HCDConfig = field(default_factory=HCDConfig, metadata={"nested": True})
    method_options: Dict[str, Any] = field(default_factory=dict, metadata={"nested": True})
    # data
    preset: str = option("none", "cifar100 or imagenet: the published recipe (dataset, 224 px, SGD 0.05, wd 2e-3, "
                         "cosine to 1e-3, 3 warm-up epochs, 300 epochs, batch 128)", group="data",
                         choices=("none",) + tuple(PRESETS))
    dataset: str = _dataset()
    data_dir: Optional[str] = _data_dir()
    train_split: str = _split("train", "training")
    val_split: str = _split("val", "validation")
    num_classes: Optional[int] = option(None, "optional check: the dataset must have this many classes", ge=1,
                                        group="data")
    img_size: int = _img_size("input size in pixels (digits are 8x8, upsampled)")
    val_fraction: float = _val_fraction()
    aa: Optional[str] = option(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5 (off)", group="data")
    reprob: float = option(0.0, "random-erasing probability", ge=0.0, le=1.0, group="data")
    no_aug: bool = _no_aug("no training augmentation (cifar100/imagefolder)")
    digits_aug: bool = _digits_aug("digits: RandomResizedCrop + flip views (fresh each epoch; the teacher cache's "
                                   "views with --teacher-cache); digits are otherwise not augmented")
    interpolation: Optional[str] = option(None, "resize interpolation (default: the student's timm data config, "
                                          "usually bicubic)", group="data")
    crop_pct: Optional[float] = option(None, "evaluation centre-crop fraction (default: the student's timm data "
                                       "config, e.g. 0.875, for imagefolder; 1.0 for cifar100)", gt=0.0, le=1.0,
                                       group="data")
    workers: int = _workers("data-loader workers per process (digits always uses 0, it is in memory); DALI threads "
                            "with --loader dali")
    loader: str = option("timm", "; ".join(f"{name}: {lo.help}" for name, lo in LOADERS.items()), group="data",
                         choices=tuple(LOADERS))
    # optimisation
    epochs: int = option(10, "epochs", ge=1, group="optim")
    batch_size: int = option(64, "GLOBAL batch size, split evenly over processes", ge=1, group="optim")
    opt: str = option("sgd", "timm optimizer name", group="optim")
    lr: float = option(0.05, "peak learning rate", ge=0.0, le=100.0, group="optim")
    momentum: float = option(0.9, "SGD momentum (--opt sgd is Nesterov's: > 0 there)", ge=0.0, lt=1.0,
                             group="optim")
    weight_decay: float = option(2e-3, "weight decay, not applied to biases and norms", ge=0.0, le=10.0,
                                 group="optim")
    sched: str = option("cosine", "timm scheduler name, stepped every update, or 'none'", group="optim")
    min_lr: float = option(1e-3, "final learning rate of the schedule", ge=0.0, le=100.0, group="optim")
    warmup_epochs: int = option(1, "linear warm-up epochs", ge=0, group="optim")
    warmup_lr: float = option(1e-5, "learning rate at the start of warm-up", ge=0.0, le=100.0, group="optim")
    clip_grad: Optional[float] = option(None, "clip the gradient norm to this (off)", gt=0.0, group="optim")
    # speed
    device: Optional[str] = _device()
    amp: str = option("auto", "autocast: auto = bf16 on CUDA, off on CPU; fp16 adds a GradScaler", group="speed",
                      choices=("auto", "bf16", "fp16", "off"))
    channels_last: str = option("auto", "channels_last memory format (auto: on for CUDA)", group="speed",
                                choices=SWITCH)
    compile: bool = option(False, "torch.compile the student and teacher forwards", group="speed")
    cuda_graph: bool = option(False, "capture the whole training step (teacher forward unless cached, student, head, "
                              "loss, backward, --clip-grad, optimizer step, fp16 scale update) in one CUDA graph "
                              "after 3 warm-up steps and replay it; the optimizer is PyTorch's fused one (--opt sgd, "
                              "nesterov, momentum, adam or adamw) with the scheduled lr in a device tensor. CUDA "
                              "only, one process, fixed batch; not with --compile, --teacher-compile on or "
                              "--skip-nonfinite", group="speed")
    teacher_bf16: str = _teacher_bf16("teacher weights cast to bf16, fp32 outputs (auto: on under bf16 autocast "
                                      "on CUDA)")
    teacher_channels_last: str = _teacher_channels_last()
    teacher_compile: str = option("auto", "torch.compile the teacher forward on its own, with CUDA graphs on CUDA "
                                  "(auto: follows --compile)", group="speed", choices=SWITCH)
    teacher_cache: Optional[str] = option(None, "replay stored views and teacher features from DIR (made by "
                                          "`hcd-distill cache-teacher`): no teacher forward in training",
                                          group="speed", metavar="DIR")
    log_interval: int = option(20, "read metrics from the device (one host sync) every N steps", ge=1, group="speed")
    threads: Optional[int] = _threads()
    # distributed
    sync_bn: bool = option(False, "convert BatchNorm to SyncBatchNorm, the HCD projectors' included (CUDA only)",
                           group="distributed (torchrun)")
    freeze_bn: bool = option(False, "keep every BatchNorm (student and projectors) in eval mode: running "
                             "statistics, per-sample independent losses", group="distributed (torchrun)")
    find_unused_parameters: bool = option(False, "DDP find_unused_parameters", group="distributed (torchrun)")
    # state and output
    output: Optional[str] = option(None, "output folder (default runs/<dataset>_<teacher>_to_<student>_<method>_"
                                   "s<seed>_<hash of the flags that change results>); a folder holding another "
                                   "run's results is refused unless --resume or --overwrite",
                                   group="state and output", metavar="DIR")
    overwrite: bool = option(False, "start afresh in an output folder holding another run's results, deleting them",
                             group="state and output")
    allow_changed_args: bool = option(False, "resume although result-defining flags changed since the checkpoint "
                                      "(listed in a warning) instead of refusing", group="state and output")
    resume: str = option("none", "'auto': continue from OUTPUT/last.pt if it exists; a path: continue from that "
                         "checkpoint; 'none': start fresh", group="state and output")
    ckpt_interval: int = option(0, "also checkpoint every N steps (0: off)", ge=0, group="state and output")
    ckpt_minutes: float = option(10.0, "also checkpoint last.pt when this many minutes of wall time passed since "
                                 "the last one, checked every --log-interval steps (0: off); epoch ends always "
                                 "checkpoint", ge=0.0, group="state and output")
    skip_nonfinite: int = option(0, "skip up to N steps whose loss is not finite (costs one host sync per step); "
                                 "by default (0) a non-finite loss stops the run", ge=0, group="state and output",
                                 metavar="N")
    seed: int = _seed("seed of initialisation and data order")
    max_steps_per_epoch: Optional[int] = option(None, "debug: cut every epoch to N steps", ge=1,
                                                group="state and output")
    stop_after_steps: Optional[int] = option(None, "debug: exit after N global steps without a final checkpoint, "
                                             "as if the process had been killed", ge=1, group="state and output")
    no_progress: bool = _no_progress()
    no_plots: bool = option(False, "no PNG plots", group="state and output")

    def __getattr__(self, name: str):
        # The loss options read as attributes too (config.temperature, config.dkd_beta): one flat namespace of
        # flags, as the checkpoint stores it.
        if name in ("loss", "method_options") or name.startswith("__"):
            raise AttributeError(name)
        if name in _HCD_FIELDS:
            return getattr(self.loss, name)
        for opts in self.method_options.values():
            if any(f.name == name for f in dataclasses.fields(opts)):
                return getattr(opts, name)
        raise AttributeError(f"TrainConfig has no option {name!r}")

    def method_config(self):
        """The current method's own options (its defaults when not given), or None."""
        opts_type = get_method(self.method).options
        if opts_type is None:
            return None
        return self.method_options.get(self.method) or opts_type()

    def flat(self) -> Dict[str, Any]:
        """Every flag by name (the HCDConfig and method fields included): what a checkpoint records."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("nested")}
        out.update(dataclasses.asdict(self.loss))
        for name in METHODS:
            opts_type = get_method(name).options
            if opts_type is not None:
                out.update(dataclasses.asdict(self.method_options.get(name) or opts_type()))
        return out

    def check(self) -> None:
        """Every declared range (UserError naming the flag); also the method options'."""
        check_ranges(self)
        for opts in self.method_options.values():
            check_ranges(opts)


_HCD_FIELDS = frozenset(f.name for f in dataclasses.fields(HCDConfig))
# Bounds the command line adds to HCDConfig's own checks (signs and open ranges, which hold for the library
# too): values past them are typing mistakes that would only overflow, exhaust memory or wreck the run.
_WEIGHT = {"ge": 0.0, "le": 1000.0}
HCD_FLAG_BOUNDS = {"num_sub_logits": {"le": 64}, "embed_dim": {"le": 16384}, "cfm_hidden": {"le": 16384},
                   "temperature": {"le": 100.0}, "lambda_student": {"ge": -1000.0, "le": 1000.0},
                   "lambda_teacher": {"ge": -1000.0, "le": 1000.0}, "w_gt": _WEIGHT, "w_kd": _WEIGHT,
                   "w_kl": _WEIGHT, "w_ol": _WEIGHT}


def hcd_config(values: Dict[str, Any]) -> HCDConfig:
    """HCDConfig from flag values; its own validation's error names the flag."""
    for name, bounds in HCD_FLAG_BOUNDS.items():
        if name in values:
            check_value(name, values[name], bounds)
    try:
        return HCDConfig(**values)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        for name in _HCD_FIELDS:
            text = text.replace(f"HCDConfig.{name}", flag_name(name))
        raise UserError(f"loss options: {text}") from None


@dataclass
class CacheConfig:
    """A teacher-cache build (``hcd_fast.distill.teacher.build_cache``, the ``cache-teacher`` command)."""

    teacher: Optional[str] = option(None, "timm model name of the teacher", group="models", required=True)
    teacher_checkpoint: Optional[str] = _teacher_checkpoint()
    allow_random_teacher: bool = _allow_random_teacher()
    teacher_kwargs: Dict[str, Any] = _teacher_kwargs()
    dataset: str = _dataset()
    data_dir: Optional[str] = _data_dir()
    train_split: str = _split("train", "training")
    val_split: str = _split("val", "validation")
    img_size: int = _img_size("input size in pixels (must match training)")
    val_fraction: float = _val_fraction()
    no_aug: bool = _no_aug("no augmentation: one view, resize + centre crop")
    digits_aug: bool = _digits_aug("digits: K crop + flip views (as hcd-distill --digits-aug; digits are otherwise "
                                   "never augmented)")
    interpolation: str = option("bicubic", "resize interpolation (must be the training run's: its --interpolation, "
                                "or by default the student's timm data config)", group="data")
    views: int = option(16, "K augmented views per image", ge=1, le=1024, group="cache")
    cache_dtype: str = option("fp16", "storage of f_t", group="cache", choices=("fp16", "fp32"))
    output: Optional[str] = option(None, "cache folder: new or empty, unless --overwrite", group="cache",
                                   required=True, metavar="DIR")
    overwrite: bool = option(False, "build into a non-empty --output, replacing meta.json, views.npy and feats.npy "
                             "there (other files are left alone)", group="cache")
    seed: int = _seed("seed of the views")
    batch_size: int = option(128, "teacher batch", ge=1, group="cache")
    workers: int = _workers("data-loader workers (digits uses 0)")
    device: Optional[str] = _device()
    teacher_bf16: str = _teacher_bf16("teacher weights in bf16 (auto: on for CUDA)")
    teacher_channels_last: str = _teacher_channels_last()
    threads: Optional[int] = _threads()
    no_progress: bool = _no_progress("no progress bar")

    def check(self) -> None:
        check_ranges(self)


# Flags that do not change what a run computes: they may differ on resume and do not name the run folder.
OPERATIONAL_ARGS = frozenset({
    "output", "resume", "overwrite", "allow_changed_args", "workers", "threads", "device", "channels_last",
    "compile", "backend", "log_interval", "ckpt_interval", "ckpt_minutes", "stop_after_steps", "no_progress",
    "no_plots", "find_unused_parameters", "skip_nonfinite", "preset", "cuda_graph"})
IDENTITY_ARGS = ("method", "teacher", "student")  # a resume with other values is always refused
