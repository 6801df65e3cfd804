"""Datasets of hcd-distill: ``digits`` (scikit-learn's embedded 8x8 digits, upsampled, in memory, no
download), ``cifar100`` (torchvision, from ``--data-dir``, never downloaded) and ``imagefolder`` (ImageNet
layout), normalised with the student's timm data config (``DataConfig``). Each sample's augmentation is a
pure function of (seed, epoch, index) whatever the worker (``SampleDataset``), so runs resume exactly; an
unreadable file becomes a ``BadSample`` that ``collate_skip_bad`` drops and the loop reports."""
from __future__ import annotations

import hashlib
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset
from torch.utils.data import default_collate

from hcd_fast.distill.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("digits", "cifar100", "imagefolder")


@dataclass(frozen=True)
class DataConfig:
    """How images become the student's input: timm's data config of the student model."""

    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    @classmethod
    def of_model(cls, name: str, interpolation: Optional[str] = None, crop_pct: Optional[float] = None) -> "DataConfig":
        """timm's data config of the model ``name`` (its default pretrained_cfg), flags overriding."""
        from timm.data import resolve_data_config
        from timm.models import get_pretrained_cfg
        pcfg = get_pretrained_cfg(name)
        cfg = resolve_data_config(pretrained_cfg=pcfg.to_dict() if pcfg is not None else {"mean": IMAGENET_MEAN})
        return cls(tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]),
                   interpolation or cfg.get("interpolation", "bicubic"),
                   float(crop_pct if crop_pct is not None else cfg.get("crop_pct", 1.0)))

    def stats(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        return self.mean, self.std

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "crop_pct": self.crop_pct}


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    input_size: Tuple[int, int, int]
    in_memory: bool  # tensors already normalised (no workers needed)


def digits_tensors(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 3, img_size, img_size) float32 normalised images and (N,) int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from exc
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if img_size != 8:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous(), torch.as_tensor(d.target, dtype=torch.int64)


def build_digits(img_size: int, val_fraction: float = 0.2, cfg: DataConfig = DataConfig()) -> DataBundle:
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction}: expected a fraction in [0, 1) (0: no validation)")
    try:
        x, y = digits_tensors(img_size, cfg.mean, cfg.std)
    except (RuntimeError, MemoryError) as exc:  # the 1797 upsampled digits are held in memory
        gib = 1797 * 3 * img_size * img_size * 4 / 2 ** 30
        raise UserError(f"--img-size {img_size}: the digits upsampled to {img_size} px need {gib:.1f} GiB in memory "
                        f"({type(exc).__name__}); use a smaller --img-size") from None
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = int(round(len(y) * val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return DataBundle(TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx]), 10,
                      (3, img_size, img_size), True)


def _transforms(img_size: int, aa: Optional[str], reprob: float, no_aug: bool, cfg: DataConfig):
    """timm's train/eval transforms; eval resizes to img_size / crop_pct and centre-crops img_size."""
    from timm.data import create_transform
    train_tf = create_transform(img_size, is_training=not no_aug, auto_augment=aa, re_prob=reprob,
                                interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std)
    val_tf = create_transform(img_size, is_training=False, interpolation=cfg.interpolation, mean=cfg.mean,
                              std=cfg.std, crop_pct=cfg.crop_pct)
    return train_tf, val_tf


def check_cifar100_dir(data_dir: Optional[str]) -> str:
    """The CIFAR-100 root, or a ValueError that says what to put where."""
    expected = "cifar-100-python/{train,test,meta}"
    if not data_dir:
        raise UserError(f"--dataset cifar100 needs --data-dir PATH, a folder holding {expected} (the python "
                         f"version of https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extracted; "
                         f"hcd-distill never downloads)")
    folder = os.path.join(data_dir, "cifar-100-python")
    missing = [f for f in ("train", "test", "meta") if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise UserError(f"--data-dir {data_dir!r}: CIFAR-100 not found: expected {os.path.join(data_dir, expected)}, "
                         f"missing {', '.join(missing)}. Extract cifar-100-python.tar.gz into {data_dir!r} "
                         f"(hcd-distill never downloads)")
    return data_dir


def check_imagefolder_dir(data_dir: Optional[str], train_split: str, val_split: str) -> None:
    if not data_dir:
        raise UserError("--dataset imagefolder needs --data-dir PATH with PATH/<train-split>/<class>/*.jpg and "
                         "PATH/<val-split>/<class>/*.jpg (ImageNet layout)")
    for split in (train_split, val_split):
        path = os.path.join(data_dir, split)
        if not os.path.isdir(path):
            raise UserError(f"--data-dir {data_dir!r}: expected the folder {path!r} with one sub-folder of "
                             f"images per class (ImageNet layout: {data_dir}/{train_split}/<class>/*.jpg, "
                             f"{data_dir}/{val_split}/<class>/*.jpg)")


def _warn(text: str) -> None:
    import sys
    print(f"hcd-distill: warning: {text}", file=sys.stderr, flush=True)


def scan_image_folder(directory: str, class_to_idx: dict, extensions) -> list:
    """(path, class index) of every image under ``directory/<class>/``, following directory symlinks but each
    real folder and each real file once: a symlink loop (``ln -s . loop``) or a second path to the same file
    (another link) is skipped with a warning, where torchvision's walk would list it up to 40 times."""
    from torchvision.datasets.folder import has_file_allowed_extension
    samples, seen_dirs, seen_files = [], set(), {}
    loops, duplicates = [], []
    for name in sorted(class_to_idx):
        top = os.path.join(directory, name)
        if not os.path.isdir(top):
            continue
        for root, dirs, files in os.walk(top, followlinks=True):
            real = os.path.realpath(root)
            if real in seen_dirs:  # reached again through a link: a loop, or the same folder twice
                loops.append(root)
                dirs[:] = []
                continue
            seen_dirs.add(real)
            dirs.sort()
            for fname in sorted(files):
                path = os.path.join(root, fname)
                if not has_file_allowed_extension(path, extensions):
                    continue
                real_file = os.path.realpath(path)
                if real_file in seen_files:
                    duplicates.append((path, seen_files[real_file]))
                    continue
                seen_files[real_file] = path
                samples.append((path, class_to_idx[name]))
    if loops:
        _warn(f"{directory}: {len(loops)} folder(s) reached again through a symlink (a loop, or a second link "
              f"to a folder already read) were not followed: {', '.join(loops[:3])}{'...' if len(loops) > 3 else ''}")
    if duplicates:
        _warn(f"{directory}: {len(duplicates)} duplicate path(s) of files already counted were ignored, e.g. "
              f"{duplicates[0][0]!r} (same file as {duplicates[0][1]!r})")
    return samples


def _image_folder(root: str, transform):
    from torchvision.datasets import ImageFolder

    class LinkSafeImageFolder(ImageFolder):
        @staticmethod
        def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            from torchvision.datasets.folder import IMG_EXTENSIONS
            samples = scan_image_folder(os.path.expanduser(directory), class_to_idx, extensions or IMG_EXTENSIONS)
            found = {t for _, t in samples}
            empty = sorted(n for n, i in class_to_idx.items() if i not in found)
            if empty and not allow_empty:
                raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
            return samples

    try:
        return LinkSafeImageFolder(root, transform=transform)
    except (FileNotFoundError, OSError) as exc:  # no class folder, or a class folder without images
        raise UserError(f"--data-dir: the split {root!r} cannot be used: {exc}") from None


def build_data(dataset: str, data_dir: Optional[str], img_size: int, *, val_fraction: float = 0.2,
               aa: Optional[str] = None, reprob: float = 0.0, no_aug: bool = False,
               cfg: DataConfig = DataConfig(), train_split: str = "train", val_split: str = "val",
               seed: int = 0) -> DataBundle:
    """The train/val datasets, class count and input size of ``dataset`` (one of DATASETS). Image
    datasets are wrapped in ``SampleDataset`` and their first image is read now (a split that cannot be
    read fails here, naming the file)."""
    if dataset == "digits":
        return build_digits(img_size, val_fraction, cfg)
    if dataset == "cifar100":
        root = check_cifar100_dir(data_dir)
        from torchvision.datasets import CIFAR100
        train_tf, val_tf = _transforms(img_size, aa, reprob, no_aug, cfg)
        try:
            train = CIFAR100(root, train=True, transform=train_tf, download=False)
            val = CIFAR100(root, train=False, transform=val_tf, download=False)
        except Exception as exc:
            raise UserError(f"--data-dir {data_dir!r}: CIFAR-100 cannot be read ({type(exc).__name__}: {exc})") from None
        return DataBundle(SampleDataset(train, seed), SampleDataset(val, seed), 100, (3, img_size, img_size), False)
    if dataset == "imagefolder":
        check_imagefolder_dir(data_dir, train_split, val_split)
        train_tf, val_tf = _transforms(img_size, aa, reprob, no_aug, cfg)
        train = _image_folder(os.path.join(data_dir, train_split), train_tf)
        val = _image_folder(os.path.join(data_dir, val_split), val_tf)
        if train.classes != val.classes:
            raise UserError(f"--data-dir {data_dir!r}: {train_split} and {val_split} must list the same class "
                            f"folders; {_class_difference(train.classes, val.classes, train_split, val_split)}")
        bundle = DataBundle(SampleDataset(train, seed), SampleDataset(val, seed), len(train.classes),
                            (3, img_size, img_size), False)
        for split in (bundle.train, bundle.val):
            split.check_readable()
        return bundle
    raise UserError(f"--dataset: expected one of {DATASETS}, got {dataset!r}")


def _class_difference(a: list, b: list, name_a: str, name_b: str) -> str:
    """Which class folders differ between two splits, named (a few), for the error message."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    show = lambda names: ", ".join(repr(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")  # noqa: E731
    parts = [f"only in {name_a}: {show(only_a)}" if only_a else "",
             f"only in {name_b}: {show(only_b)}" if only_b else ""]
    return "; ".join(p for p in parts if p) or f"{name_a} has {len(a)} classes, {name_b} has {len(b)}"


# ------------------------------------------------------------------------------ per-sample datasets
class BadSample(NamedTuple):
    """A sample whose file could not be read: its path and why."""

    path: str
    reason: str


# What PIL and torchvision raise for a truncated, corrupt or non-image file.
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, sample index)."""
    digest = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_path(dataset, index: int) -> str:
    """The file behind ``dataset[index]`` (ImageFolder's ``samples``), else ``Name[index]``: for messages."""
    samples = getattr(dataset, "samples", None)
    return samples[index][0] if samples is not None else f"{type(dataset).__name__}[{index}]"


@contextmanager
def seeded_rngs(seed: int):
    """torch (CPU), python and numpy global RNGs seeded with ``seed`` inside, restored afterwards (the
    main process's RNG streams, e.g. drop-path's, do not see the data loading when --workers is 0). Only
    the CPU generator is seeded (``torch.manual_seed`` would also reseed, and not restore, the CUDA ones,
    at ~0.5 ms per sample); transforms draw from it alone."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


class SampleDataset(Dataset):
    """An image dataset whose sample i in epoch e is a pure function of (seed, e, i), whatever worker loads
    it; an unreadable file gives ``BadSample(path, reason)`` instead of raising."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def path(self, index: int) -> str:
        return sample_path(self.base, index)

    def __getitem__(self, index: int):
        with seeded_rngs(sample_seed(self.seed, self.epoch, index)):
            try:
                return self.base[index]
            except READ_ERRORS as exc:
                return BadSample(self.path(index), f"{type(exc).__name__}: {exc}")

    def check_readable(self) -> None:
        """Read the first sample: a split whose files cannot be read fails before training."""
        if len(self) and isinstance(self[0], BadSample):
            bad = self[0]
            raise UserError(f"--data-dir: cannot read {bad.path!r} ({bad.reason}); fix or remove the file")


def collate_skip_bad(batch: list) -> tuple:
    """(images, labels, bad samples) from (image, label) samples, and (images, labels, bad samples,
    cached teacher features f_t (B, D_t)) from the teacher cache's (image, label, f_t) samples: unreadable
    samples are dropped from the batch; images and labels are None (and no f_t) when none is left."""
    good = [b for b in batch if not isinstance(b, BadSample)]
    bad = [b for b in batch if isinstance(b, BadSample)]
    if not good:
        return None, None, bad
    x, y, *extra = default_collate(good)
    return (x, y, bad, *extra)
