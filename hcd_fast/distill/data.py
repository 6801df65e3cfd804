"""Datasets and resumable, distributed samplers for hcd-distill.

- ``digits``: scikit-learn's embedded 8x8 handwritten digits (1797 images, 10 classes, no download),
  scaled to [0, 1], bilinearly upsampled to ``img_size``, replicated to 3 channels and normalised; held in
  memory as tensors. A fixed permutation (seed 0) holds out ``val_fraction`` of it for validation.
- ``cifar100``: torchvision's CIFAR100 from ``data_dir`` (never downloaded), timm transforms.
- ``imagefolder``: ``data_dir/<train_split>/<class>/*.jpg`` and ``data_dir/<val_split>/...`` (ImageNet layout).

``ResumableDistributedSampler`` is ``DistributedSampler`` (same permutation: seed + epoch) that can start
mid-epoch, so a resumed run sees exactly the samples the killed one had not yet seen.
``ShardSampler`` splits the validation set without padding, so metrics summed over ranks are exact.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler, Sampler, TensorDataset

from hcd_fast.distill.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("digits", "cifar100", "imagefolder")


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


def build_digits(img_size: int, val_fraction: float = 0.2) -> DataBundle:
    x, y = digits_tensors(img_size)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = int(round(len(y) * val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return DataBundle(TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx]), 10,
                      (3, img_size, img_size), True)


def _transforms(img_size: int, aa: Optional[str], reprob: float, no_aug: bool, interpolation: str):
    from timm.data import create_transform
    train_tf = create_transform(img_size, is_training=not no_aug, auto_augment=aa, re_prob=reprob,
                                interpolation=interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    val_tf = create_transform(img_size, is_training=False, interpolation=interpolation, mean=IMAGENET_MEAN,
                              std=IMAGENET_STD, crop_pct=1.0)
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


def build_data(dataset: str, data_dir: Optional[str], img_size: int, *, val_fraction: float = 0.2,
               aa: Optional[str] = None, reprob: float = 0.0, no_aug: bool = False,
               interpolation: str = "bicubic", train_split: str = "train", val_split: str = "val") -> DataBundle:
    """The train/val datasets, class count and input size of ``dataset`` (one of DATASETS)."""
    if dataset == "digits":
        return build_digits(img_size, val_fraction)
    if dataset == "cifar100":
        root = check_cifar100_dir(data_dir)
        from torchvision.datasets import CIFAR100
        train_tf, val_tf = _transforms(img_size, aa, reprob, no_aug, interpolation)
        train = CIFAR100(root, train=True, transform=train_tf, download=False)
        val = CIFAR100(root, train=False, transform=val_tf, download=False)
        return DataBundle(train, val, 100, (3, img_size, img_size), False)
    if dataset == "imagefolder":
        check_imagefolder_dir(data_dir, train_split, val_split)
        from torchvision.datasets import ImageFolder
        train_tf, val_tf = _transforms(img_size, aa, reprob, no_aug, interpolation)
        train = ImageFolder(os.path.join(data_dir, train_split), transform=train_tf)
        val = ImageFolder(os.path.join(data_dir, val_split), transform=val_tf)
        if train.classes != val.classes:
            raise UserError(f"--data-dir {data_dir!r}: {train_split} has {len(train.classes)} classes, "
                             f"{val_split} has {len(val.classes)}; they must list the same class folders")
        return DataBundle(train, val, len(train.classes), (3, img_size, img_size), False)
    raise UserError(f"--dataset: expected one of {DATASETS}, got {dataset!r}")


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (permutation from seed + epoch, rank r takes every world-th index) that skips
    the first ``start`` of this rank's indices; ``set_start`` is reset by ``set_epoch``."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Indices rank, rank + world, ... in order: every sample exactly once over all ranks, no padding."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        self.n, self.world, self.rank = len(dataset), num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))
