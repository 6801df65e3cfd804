"""Teacher feature cache of hcd-distill (opt-in): run the teacher once, train many epochs without it.

``hcd-distill cache-teacher --views K --output DIR ...`` runs the teacher over K augmented views of every
training image and stores, per view, the crop window and flip and the teacher's pre-logit feature f_t:

- ``DIR/views.npy``: int32 (N, K, 5): top, left, height, width of the RandomResizedCrop window (in pixels
  of the decoded image) and the horizontal flip (0/1). View k of image n is drawn from its own generator
  seeded with (seed, n, k) with torchvision's RandomResizedCrop algorithm (scale (0.08, 1), ratio
  (3/4, 4/3), 10 tries, then the centre crop), flip with probability 1/2.
- ``DIR/feats.npy``: fp16 (default) or fp32 (N, K, D_t) f_t, memory-mapped when read.
- ``DIR/meta.json`` (written last: a cache without it is incomplete and never read): format, teacher
  name, kwargs and weights hash (sha256 of its state_dict), the teacher's input normalisation (mean, std:
  its timm data config, or its hcd-distill checkpoint's), dataset name, hash of its file list (paths and
  labels; the pixels for in-memory data), N, image size, the transform, K, D_t, dtype, seed.

Under torchrun (``torchrun --nproc-per-node N -m hcd_fast.distill cache-teacher ...``, the ranks sharing the
output folder) each rank fills the views of its slice of the images and the features of every N-th batch of
the single-process build; rank 0 writes meta.json once all are done: the same files as one process.

Normalisation: the teacher saw each view normalised with its own statistics; a training run normalises the
replayed view with the student's (its data config) and its online teacher converts that to the teacher's
statistics (``TeacherTap``), the same input up to float rounding. The cache's ``teacher_input`` must equal
the run's teacher statistics; the student's normalisation is the run's own and not part of the cache.
Unreadable image files become ``BadSample`` at replay, as in ``SampleDataset``; the replay draws no global
RNG (the view is stored, its choice a pure function of (seed, epoch, n)), so it needs no per-sample seeding.

Training with ``--teacher-cache DIR`` (any method) replays, for image n in epoch e, view
k = choice(seed, e, n) of its K (a pure function of the run's seed, the epoch and the index, so sharding
under torchrun and resuming are exact) through the same crop and flip, so the student sees the view the
teacher saw, and the teacher logits are recomputed as classifier(f_t): no teacher forward. The probe
(``probe_teacher``) checks classifier(pre_logits) against the teacher's forward_head; a teacher failing it
is refused, as is a cache whose metadata differ from the run (teacher, weights, data, size, transform) or
a run with augmentations that cannot be replayed (RandAugment / auto-augment, random erasing). Under the
cache the training transform is RandomResizedCrop + flip + normalisation: timm's default colour jitter is
random per step and cannot be replayed either, so it is off (``--no-aug``: resize + centre crop, one view).
The digits dataset (in memory, not augmented online) has one view per image, the image itself, unless
``--digits-aug`` (both commands) gives it the same crop + flip views; online, ``--digits-aug`` draws a fresh
view per image and epoch (``FreshViewDataset``), the K = infinity end of the cache.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hcd_fast.distill.data import (_READ_ERRORS, DATASETS, BadSample, DataConfig, SampleDataset, build_data,
                                   sample_path)
from hcd_fast.distill.cache_files import check_output, files_stat_hash, open_array, read_meta, remove_partials
from hcd_fast.distill.errors import UserError

FORMAT = "hcd-distill-teacher-cache/1"
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CHOICE_SALT = 0x7EAC4E  # separates the replay choice's stream from the views' streams


# ------------------------------------------------------------------------------------------- sources
class RawSource:
    """Un-transformed training samples of a hcd-distill dataset: ``get(n) -> (image, label)`` where image
    is a PIL image (imagefolder, cifar100) or a normalised (3, H, W) tensor (digits). A ``SampleDataset``
    (hcd-distill's wrapper of image datasets) is unwrapped to the dataset it holds."""

    def __init__(self, dataset: Dataset):
        if isinstance(dataset, SampleDataset):
            dataset = dataset.base
        self.dataset = dataset
        name = type(dataset).__name__
        if isinstance(dataset, TensorDataset):
            self.kind = "tensor"
        elif hasattr(dataset, "samples") and hasattr(dataset, "loader"):
            self.kind = "imagefolder"
        elif name in ("CIFAR100", "CIFAR10"):
            self.kind = "cifar"
        else:
            raise UserError(f"--teacher-cache: the training set ({name}) is not one the cache can replay "
                            f"(imagefolder, cifar100, digits)")

    def __len__(self) -> int:
        return len(self.dataset)

    def path(self, n: int) -> str:
        return sample_path(self.dataset, n)

    def get(self, n: int):
        d = self.dataset
        if self.kind == "tensor":
            return d.tensors[0][n], int(d.tensors[1][n])
        if self.kind == "imagefolder":
            path, label = d.samples[n]
            return d.loader(path), int(label)
        from PIL import Image
        return Image.fromarray(d.data[n]), int(d.targets[n])

    def file_list_hash(self) -> str:
        """sha256 of what identifies the data: relative paths and labels (imagefolder), or the pixels and
        labels (in-memory data)."""
        h = hashlib.sha256()
        d = self.dataset
        if self.kind == "imagefolder":
            root = d.root
            for path, label in d.samples:
                h.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
        elif self.kind == "cifar":
            h.update(np.ascontiguousarray(d.data).tobytes())
            h.update(np.asarray(d.targets, dtype=np.int64).tobytes())
        else:
            for t in d.tensors:
                h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    def image_hw(self, image) -> Tuple[int, int]:
        if self.kind == "tensor":
            return int(image.shape[-2]), int(image.shape[-1])
        return image.size[1], image.size[0]  # PIL: (width, height)


# -------------------------------------------------------------------------------------------- views
def transform_spec(dataset: str, img_size: int, interpolation: str, no_aug: bool, digits_aug: bool = False) -> dict:
    """The replayable training views of a run (stored in the metadata, compared at training); the
    normalisation is not in it (the teacher's is ``teacher_input``, the student's the run's own)."""
    aug = "none" if (no_aug or (dataset == "digits" and not digits_aug)) else "rrc_flip"
    spec = {"aug": aug, "img_size": img_size, "interpolation": interpolation}
    if aug == "rrc_flip":
        spec.update(scale=list(SCALE), ratio=[round(r, 6) for r in RATIO])
    return spec


def sample_view(rng: np.random.Generator, height: int, width: int) -> Tuple[int, int, int, int, int]:
    """(top, left, h, w, flip): torchvision's RandomResizedCrop.get_params (scale (0.08, 1), ratio
    (3/4, 4/3), 10 tries then the centre crop at the clamped ratio) on ``rng``, then a fair-coin flip."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    window = None
    for _ in range(10):
        target_area = area * rng.uniform(SCALE[0], SCALE[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            window = (i, j, h, w)
            break
    if window is None:
        in_ratio = width / height
        if in_ratio < RATIO[0]:
            w, h = width, int(round(width / RATIO[0]))
        elif in_ratio > RATIO[1]:
            h, w = height, int(round(height * RATIO[1]))
        else:
            w, h = width, height
        window = ((height - h) // 2, (width - w) // 2, h, w)
    return window + (int(rng.integers(0, 2)),)


def view_rng(seed: int, index: int, k: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, k])


def replay_choice(seed: int, epoch: int, index: int, num_views: int) -> int:
    """Which of its K views image ``index`` shows in ``epoch``: a pure function of (seed, epoch, index)."""
    if num_views == 1:
        return 0
    return int(np.random.default_rng([seed, epoch, index, _CHOICE_SALT]).integers(0, num_views))


class ViewTransform:
    """Image + view (top, left, h, w, flip) -> (3, S, S) float tensor normalised with (mean, std), the
    same function at caching (the teacher's statistics) and at replay (the student's).
    ``aug == "rrc_flip"``: resized crop of the window to S x S with the run's interpolation (timm's
    RandomResizedCropAndInterpolation does exactly this with its sampled window), flip, to tensor,
    normalise. ``aug == "none"``: timm's no-augmentation train transform (resize the short side, centre
    crop) for images; the tensor itself for in-memory (digits) data."""

    def __init__(self, spec: dict, mean, std):
        self.spec, self.mean, self.std = spec, tuple(mean), tuple(std)
        self._noaug = None

    def noaug_transform(self):
        """timm's no-augmentation train transform of the spec (resize the short side, centre crop,
        normalise): the ``aug == "none"`` view of images (also the DALI loader's plan of it)."""
        if self._noaug is None:
            from timm.data import create_transform
            s = self.spec
            self._noaug = create_transform(s["img_size"], is_training=True, no_aug=True,
                                           interpolation=s["interpolation"], mean=self.mean, std=self.std)
        return self._noaug

    def __call__(self, image, view) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from timm.data.transforms import str_to_interp_mode
        s = self.spec
        if isinstance(image, torch.Tensor):
            if s["aug"] == "none":
                return image
            i, j, h, w, flip = (int(v) for v in view)
            x = TF.resized_crop(image, i, j, h, w, [s["img_size"]] * 2,
                                interpolation=str_to_interp_mode(s["interpolation"]), antialias=True)
            return TF.hflip(x) if flip else x
        if s["aug"] == "none":
            return self.noaug_transform()(image)
        i, j, h, w, flip = (int(v) for v in view)
        image = TF.resized_crop(image, i, j, h, w, [s["img_size"]] * 2,
                                interpolation=str_to_interp_mode(s["interpolation"]))
        if flip:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


def make_views(source: RawSource, spec: dict, num_views: int, seed: int, out: Optional[np.ndarray] = None,
               images: Optional[range] = None) -> np.ndarray:
    """int32 (N, K, 5) views of every image (decodes each image once for its size when augmenting); with
    ``out`` and ``images``, only those images' rows of ``out`` are filled (a rank's share of a sharded build)."""
    n = len(source)
    views = np.zeros((n, num_views, 5), dtype=np.int32) if out is None else out
    for idx in (range(n) if images is None else images):
        try:
            image, _ = source.get(idx)
        except _READ_ERRORS as exc:
            raise UserError(f"cache-teacher: cannot read {source.path(idx)!r} ({type(exc).__name__}: {exc}); "
                            f"fix or remove the file") from None
        height, width = source.image_hw(image)
        for k in range(num_views):
            views[idx, k] = (sample_view(view_rng(seed, idx, k), height, width) if spec["aug"] == "rrc_flip"
                             else (0, 0, height, width, 0))
    return views


class _AllViews(Dataset):
    """Flat (image, view) pairs for caching: item n*K + k -> (x, n, k)."""

    def __init__(self, source: RawSource, spec: dict, views: np.ndarray, mean, std):
        self.source, self.tf, self.views = source, ViewTransform(spec, mean, std), views
        self.k = views.shape[1]

    def __len__(self) -> int:
        return len(self.source) * self.k

    def __getitem__(self, item: int):
        n, k = divmod(item, self.k)
        image, _ = self.source.get(n)
        return self.tf(image, self.views[n, k]), n, k


# -------------------------------------------------------------------------------------------- store
def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of a state_dict (names, dtypes, shapes, values in fp32), in key order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update((t.float() if t.is_floating_point() else t).contiguous().numpy().tobytes())
    return h.hexdigest()


class TeacherCache:
    """A finished cache folder: ``meta`` (dict), ``views`` (N, K, 5) and ``feats`` (N, K, D_t) memory maps
    (opened lazily, also in each data-loader worker)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.meta = read_meta(folder)  # a damaged meta.json: UserError naming it
        if self.meta.get("format") != FORMAT:
            raise UserError(f"--teacher-cache {folder!r}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self._views = self._feats = None

    @property
    def views(self) -> np.ndarray:
        if self._views is None:
            self._views = open_array(self.folder, "views.npy")
        return self._views

    @property
    def feats(self) -> np.ndarray:
        if self._feats is None:
            self._feats = open_array(self.folder, "feats.npy")
        return self._feats

    def __getstate__(self):  # memory maps are reopened in each worker, never pickled
        return {"folder": self.folder, "meta": self.meta, "_views": None, "_feats": None}

    def check(self, expected: dict) -> None:
        """UserError naming every metadata field that differs from the run's ``expected`` values."""
        diffs = [f"{k}: cache {self.meta.get(k)!r} vs run {v!r}" for k, v in expected.items() if self.meta.get(k) != v]
        if diffs:
            raise UserError(f"--teacher-cache {self.folder!r} does not match this run (make a new cache with "
                            f"`hcd-distill cache-teacher`): " + "; ".join(diffs))
        n, k, d = self.meta["num_images"], self.meta["num_views"], self.meta["feat_dim"]
        if self.views.shape != (n, k, 5) or self.feats.shape != (n, k, d):
            raise UserError(f"--teacher-cache {self.folder!r}: views.npy {self.views.shape} / feats.npy "
                            f"{self.feats.shape} do not fit meta.json (N={n}, K={k}, D_t={d}); the cache is damaged")


class CachedViewDataset(Dataset):
    """The training set under ``--teacher-cache``: item n -> (x (3, S, S) normalised with (mean, std), label,
    f_t (D_t,) fp32) of view ``replay_choice(seed, epoch, n, K)``, or ``BadSample`` when its file cannot be
    read; ``set_epoch`` before each epoch's iterator."""

    def __init__(self, source: RawSource, cache: TeacherCache, seed: int, mean, std):
        self.source, self.cache, self.seed = source, cache, seed
        self.tf = ViewTransform(cache.meta["transform"], mean, std)
        self.num_views = cache.meta["num_views"]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def view_index(self, n: int) -> int:
        """Which stored view image ``n`` shows in the current epoch (also the DALI loader's choice)."""
        return replay_choice(self.seed, self.epoch, n, self.num_views)

    def __getitem__(self, n: int):
        k = self.view_index(n)
        try:
            image, label = self.source.get(n)
        except _READ_ERRORS as exc:
            return BadSample(self.source.path(n), f"{type(exc).__name__}: {exc}")
        x = self.tf(image, self.cache.views[n, k])
        feat = torch.from_numpy(np.array(self.cache.feats[n, k], dtype=np.float32))
        return x, label, feat


class FreshViewDataset(Dataset):
    """Online counterpart of ``CachedViewDataset`` for in-memory data (``--digits-aug`` without a cache):
    item n in epoch e -> (x, label) through a fresh view drawn from (seed, e, n), never repeated (K = inf),
    with the same crop and flip function the cache replays."""

    def __init__(self, source: RawSource, spec: dict, seed: int):
        # In-memory tensors are already normalised: the view transform crops and flips them only.
        self.source, self.tf, self.seed, self.epoch = source, ViewTransform(spec, (0.0,) * 3, (1.0,) * 3), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, n: int):
        image, label = self.source.get(n)
        height, width = self.source.image_hw(image)
        rng = np.random.default_rng([self.seed, self.epoch, n, _CHOICE_SALT + 1])
        return self.tf(image, sample_view(rng, height, width)), label


def online_views(args, train_set: Dataset, cfg: DataConfig) -> Dataset:
    """The training set of ``--digits-aug`` without a cache: digits through a fresh crop + flip per epoch
    (resized with ``cfg.interpolation``, the run's data config)."""
    if args.dataset != "digits":
        raise UserError(f"--digits-aug: only for --dataset digits (the {args.dataset} loader already augments)")
    spec = transform_spec(args.dataset, args.img_size, cfg.interpolation, args.no_aug, True)
    return FreshViewDataset(RawSource(train_set), spec, args.seed) if spec["aug"] != "none" else train_set


def files_hash(args, source: RawSource) -> str:
    """``source.file_list_hash()``; in-memory digits are hashed as built with the default (ImageNet)
    statistics, since a run holds them normalised with the student's and the cache with the teacher's."""
    if source.kind == "tensor" and args.dataset == "digits":
        from hcd_fast.distill.data import build_digits
        return RawSource(build_digits(args.img_size, args.val_fraction).train).file_list_hash()
    return source.file_list_hash()


def run_identity(args, source: RawSource, teacher_model: Optional[torch.nn.Module], interpolation: str,
                 teacher_stats=None) -> dict:
    """The metadata fields a cache must have for this run (teacher fields only when there is a teacher).
    ``interpolation``: the run's resize interpolation (its data config); ``teacher_stats``: (mean, std) the
    teacher's input is normalised with."""
    out = {"dataset": args.dataset, "num_images": len(source), "files_sha256": files_hash(args, source),
           # imagefolder: each file's size and mtime too (a file rewritten under its name); in-memory data
           # are hashed by their pixels already
           "files_size_mtime_sha256": (files_stat_hash(source.dataset.root, source.dataset.samples)
                                       if source.kind == "imagefolder" else None),
           "transform": transform_spec(args.dataset, args.img_size, interpolation, args.no_aug,
                                       getattr(args, "digits_aug", False))}
    if teacher_model is not None:
        out.update(teacher=args.teacher, teacher_kwargs=dict(args.teacher_kwargs),
                   teacher_weights_sha256=weights_hash(teacher_model),
                   teacher_input={"mean": [float(v) for v in teacher_stats[0]],
                                  "std": [float(v) for v in teacher_stats[1]]})
    return out


def _check_replayable(args) -> None:
    if args.aa:
        raise UserError(f"--aa {args.aa!r} with --teacher-cache: auto-augment is random per step and cannot be "
                        f"replayed from the cache (drop --aa, or train online)")
    if args.reprob:
        raise UserError(f"--reprob {args.reprob} with --teacher-cache: random erasing cannot be replayed from "
                        f"the cache (use --reprob 0, or train online)")


def open_for_training(args, train_set: Dataset, teacher, feat_dim: Optional[int], cfg: DataConfig) -> CachedViewDataset:
    """The replaying training set of ``--teacher-cache`` after every check (UserError otherwise).

    ``teacher`` is the probed ``TeacherTap`` (None for method ce), before any speed setting is applied;
    ``feat_dim`` its D_t; ``cfg`` the run's (student's) data config: the replayed views are resized with its
    interpolation and normalised with its mean and std, as the online loader would."""
    _check_replayable(args)
    cache = TeacherCache(args.teacher_cache)
    source = RawSource(train_set)
    if teacher is not None and not teacher._use_classifier:
        raise UserError(f"--teacher-cache with --teacher {args.teacher!r}: its logits are not "
                        f"classifier(pre_logits) (the probe compared them with forward_head), so cached features "
                        f"cannot stand in for its forward; train online")
    if teacher is not None and teacher.teacher_input_stats is None:
        raise ValueError("open_for_training: the TeacherTap was built without input statistics")
    expected = run_identity(args, source, teacher.model if teacher is not None else None, cfg.interpolation,
                            teacher.teacher_input_stats if teacher is not None else None)
    if teacher is not None:
        expected["feat_dim"] = feat_dim
    cache.check(expected)
    return CachedViewDataset(source, cache, args.seed, cfg.mean, cfg.std)


# -------------------------------------------------------------------------------- cache-teacher command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hcd-distill cache-teacher", description="Run the teacher once over K augmented views of every "
        "training image and store the crop windows, flips and pre-logit features f_t for --teacher-cache.",
        epilog="example:\n  hcd-distill cache-teacher --teacher vit_base_patch16_224 --teacher-checkpoint t.pt "
        "--dataset imagefolder --data-dir /data/imagenet --img-size 224 --views 16 --output cache/vitb_k16\n"
        "  hcd-distill --teacher vit_base_patch16_224 --teacher-checkpoint t.pt --dataset imagefolder "
        "--data-dir /data/imagenet --img-size 224 --student resnet18 --teacher-cache cache/vitb_k16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="timm model name of the teacher")
    p.add_argument("--teacher-checkpoint", metavar="PATH", help="the teacher's weights (as hcd-distill takes them)")
    p.add_argument("--allow-random-teacher", action="store_true", help="no checkpoint: a seeded random teacher "
                   "(tests and benchmarks only)")
    from hcd_fast.distill.cli import _json_dict
    p.add_argument("--teacher-kwargs", type=_json_dict, default={}, metavar="JSON", help="extra "
                   "timm.create_model kwargs of the teacher (must match the training run)")
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="as hcd-distill --dataset (digits)")
    p.add_argument("--data-dir", metavar="PATH", help="as hcd-distill --data-dir")
    p.add_argument("--train-split", default="train", help="imagefolder: training sub-folder (train)")
    p.add_argument("--val-split", default="val", help="imagefolder: validation sub-folder (val)")
    p.add_argument("--img-size", type=int, default=32, help="input size in pixels (32; must match training)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="digits: held-out fraction (0.2)")
    p.add_argument("--no-aug", action="store_true", help="no augmentation: one view, resize + centre crop")
    p.add_argument("--digits-aug", action="store_true", help="digits: K crop + flip views (as hcd-distill "
                   "--digits-aug; digits are otherwise never augmented)")
    p.add_argument("--interpolation", default="bicubic", help="resize interpolation (bicubic; must be the "
                   "training run's: its --interpolation, or by default the student's timm data config)")
    p.add_argument("--views", type=int, default=16, help="K augmented views per image (16)")
    p.add_argument("--cache-dtype", choices=("fp16", "fp32"), default="fp16", help="storage of f_t (fp16)")
    p.add_argument("--output", required=True, metavar="DIR", help="cache folder: new or empty, unless "
                   "--overwrite")
    p.add_argument("--overwrite", action="store_true", help="build into a non-empty --output, replacing "
                   "meta.json, views.npy and feats.npy there (other files are left alone)")
    p.add_argument("--seed", type=int, default=0, help="seed of the views (0)")
    p.add_argument("--batch-size", type=int, default=128, help="teacher batch (128)")
    p.add_argument("--workers", type=int, default=4, help="data-loader workers (4; digits uses 0)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--teacher-bf16", choices=("auto", "on", "off"), default="auto", help="teacher weights in "
                   "bf16 (auto: on for CUDA)")
    p.add_argument("--teacher-channels-last", choices=("auto", "on", "off"), default="auto",
                   help="channels_last teacher (auto: on for CNN teachers on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def create_cache(args: argparse.Namespace) -> dict:
    """Build the cache ``args.output`` (see the module docstring); returns its metadata. Under torchrun
    (WORLD_SIZE > 1) every rank builds its share and the result equals a single-process build."""
    from hcd_fast.distill.trainer import DistContext

    ctx = DistContext()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if device.type == "cuda" and ctx.enabled and device.index is None:
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    ctx.init(device)
    try:
        prepared, error = None, None
        try:
            prepared = _prepare(args, device)
        except UserError as exc:  # raised on every rank: none is left waiting at a barrier
            error = exc
        ctx.raise_any(error)
        created = not os.path.isdir(args.output)
        try:
            return _build(args, ctx, device, *prepared)
        except BaseException:
            if ctx.is_main:  # a refused or failed build leaves no *.partial file behind
                remove_partials(args.output, created)
            raise
    finally:
        ctx.close()


def _prepare(args: argparse.Namespace, device: torch.device):
    """The checks before the first teacher forward, the teacher (probed) and the metadata."""
    from hcd_fast.distill.taps import TeacherTap, probe_teacher
    from hcd_fast.distill.teacher_speed import apply_teacher_speed, resolve_teacher_speed
    from hcd_fast.distill.checkpoint import load_weights
    from hcd_fast.distill.trainer import _check_model_name, create_model, seed_everything

    _check_model_name("--teacher", args.teacher)
    if args.teacher_checkpoint is None and not args.allow_random_teacher:
        raise UserError("cache-teacher needs a trained teacher: give --teacher-checkpoint PATH (or "
                        "--allow-random-teacher for a smoke test)")
    if args.teacher_checkpoint is not None and not os.path.isfile(args.teacher_checkpoint):
        raise UserError(f"--teacher-checkpoint {args.teacher_checkpoint!r}: no such file")
    if args.views < 1 or args.batch_size < 1 or args.img_size < 1:
        raise UserError("--views, --batch-size and --img-size must be >= 1")
    check_output(args.output, args.overwrite)  # a file, a cache or other files: refused without --overwrite
    # The teacher sees every view normalised with its own statistics, as hcd-distill's online teacher
    # does (TeacherTap converts the student's input): its timm data config, or its checkpoint's.
    teacher_cfg = DataConfig.of_model(args.teacher, args.interpolation)

    def load_data(cfg: DataConfig):
        return build_data(args.dataset, args.data_dir, args.img_size, val_fraction=args.val_fraction,
                          no_aug=args.no_aug, cfg=cfg, train_split=args.train_split, val_split=args.val_split,
                          seed=args.seed)

    data = load_data(teacher_cfg)
    seed_everything(args.seed)  # the same initialisation as a training run with this seed (random teachers)
    model = create_model("--teacher", args.teacher, data.num_classes, args.teacher_kwargs, args.img_size)
    if args.teacher_checkpoint:
        meta = load_weights(model, args.teacher_checkpoint, data.num_classes, "--teacher-checkpoint")
        if "data_config" in meta:  # as the trainer's build_teacher: the checkpoint knows its statistics
            ckpt_cfg = DataConfig(tuple(meta["data_config"]["mean"]), tuple(meta["data_config"]["std"]),
                                  teacher_cfg.interpolation, teacher_cfg.crop_pct)
            if ckpt_cfg.stats() != teacher_cfg.stats():
                teacher_cfg = ckpt_cfg
                if data.in_memory:  # digits are normalised when built
                    data = load_data(teacher_cfg)
    source = RawSource(data.train)
    spec = transform_spec(args.dataset, args.img_size, args.interpolation, args.no_aug, args.digits_aug)
    num_views = args.views if spec["aug"] == "rrc_flip" else 1
    # No conversion inside the tap: its input is already normalised with the teacher's statistics.
    tap = TeacherTap(model.to(device), teacher_cfg.stats(), teacher_cfg.stats())
    feat_dim, k_out = probe_teacher(tap, data.input_size)
    if k_out != data.num_classes:
        raise UserError(f"--teacher {args.teacher!r} outputs {k_out} classes, the dataset has {data.num_classes}")
    if not tap._use_classifier:
        raise UserError(f"--teacher {args.teacher!r}: its logits are not classifier(pre_logits) (checked "
                        f"against forward_head), so its features cannot be cached; train online")
    meta = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **run_identity(args, source, model, args.interpolation, teacher_cfg.stats()), "num_views": num_views,
            "feat_dim": feat_dim,
            "dtype": args.cache_dtype, "seed": args.seed, "num_classes": data.num_classes}
    amp = "bf16" if device.type == "cuda" else "off"
    speed = resolve_teacher_speed(model, device, amp, args.teacher_bf16, args.teacher_channels_last, "off")
    apply_teacher_speed(tap, speed)
    meta["teacher_speed"] = speed.describe()
    return data, source, spec, num_views, tap, feat_dim, teacher_cfg, meta


def _build(args: argparse.Namespace, ctx, device: torch.device, data, source: RawSource, spec: dict,
           num_views: int, tap, feat_dim: int, teacher_cfg: DataConfig, meta: dict) -> dict:
    """Views and teacher features into ``args.output``, then meta.json."""
    from tqdm import tqdm

    # Sharded under torchrun: rank 0 makes the two memory-mapped files; each rank fills the views of its
    # slice of images, then (after a barrier: every view is needed before any batch is built) the teacher
    # features of its share of the batches, the very batches of a single-process build (batch b goes to
    # rank b mod world), so the result is the same file; rank 0 writes meta.json once every rank is done.
    # The ranks must share the output folder (one node, or a shared file system).
    t0 = time.perf_counter()
    views_tmp = os.path.join(args.output, "views.npy.partial")
    feats_tmp = os.path.join(args.output, "feats.npy.partial")
    n_img, n_items = len(source), len(source) * num_views
    if ctx.is_main:
        os.makedirs(args.output, exist_ok=True)
        np.lib.format.open_memmap(views_tmp, mode="w+", dtype=np.int32, shape=(n_img, num_views, 5)).flush()
        np.lib.format.open_memmap(feats_tmp, mode="w+", dtype=np.float16 if args.cache_dtype == "fp16"
                                  else np.float32, shape=(n_img, num_views, feat_dim)).flush()
    ctx.barrier()
    views = np.load(views_tmp, mmap_mode="r+")
    error = None
    try:
        make_views(source, spec, num_views, args.seed, out=views,
                   images=range(ctx.rank * n_img // ctx.world, (ctx.rank + 1) * n_img // ctx.world))
        views.flush()
    except UserError as exc:
        error = exc
    ctx.raise_any(error)
    del views
    views = np.load(views_tmp, mmap_mode="r")  # reopened after the barrier: every rank's rows
    feats = np.load(feats_tmp, mmap_mode="r+")
    workers = 0 if data.in_memory else args.workers
    batches = [list(range(b * args.batch_size, min((b + 1) * args.batch_size, n_items)))
               for b in range(ctx.rank, math.ceil(n_items / args.batch_size), ctx.world)]
    loader = DataLoader(_AllViews(source, spec, views, *teacher_cfg.stats()), batch_sampler=batches,
                        num_workers=workers, pin_memory=device.type == "cuda")
    for x, n, k in tqdm(loader, disable=args.no_progress or not ctx.is_main, desc="cache-teacher",
                        dynamic_ncols=True):
        f, _ = tap(x.to(device, non_blocking=True))
        if not torch.isfinite(f).all():
            error = UserError("cache-teacher: the teacher produced non-finite features (check the checkpoint)")
            break
        feats[n.numpy(), k.numpy()] = f.float().cpu().numpy().astype(feats.dtype)
    feats.flush()
    del feats, views, loader
    ctx.raise_any(error)  # every rank has flushed its share before rank 0 goes on
    meta["seconds"] = time.perf_counter() - t0
    meta["ranks"] = ctx.world
    if ctx.is_main:
        os.replace(views_tmp, os.path.join(args.output, "views.npy"))
        os.replace(feats_tmp, os.path.join(args.output, "feats.npy"))
        tmp = os.path.join(args.output, "meta.json.partial")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(args.output, "meta.json"))  # last: its presence marks a finished cache
    ctx.barrier()  # no rank returns before the cache is finished
    return meta


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        meta = create_cache(args)
    except UserError as exc:
        print(f"hcd-distill cache-teacher: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"hcd-distill cache-teacher: {meta['num_images']} images x {meta['num_views']} views, D_t "
              f"{meta['feat_dim']} ({meta['dtype']}) in {args.output} ({meta['seconds']:.1f} s"
              f"{', ' + str(meta['ranks']) + ' ranks' if meta['ranks'] > 1 else ''})")
    return 0
