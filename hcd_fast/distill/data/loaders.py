"""The data loaders hcd-distill can run (``--loader``): a registry, so a new loader is one entry here.

A loader takes the training and validation datasets with their samplers (the order, sharding and resume
point are the samplers', whatever the loader) and yields ``(x, y, bad samples[, f_t])`` batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hcd_fast.distill.data.datasets import collate_skip_bad


@dataclass(frozen=True)
class LoaderSpec:
    """check_available(): UserError when the loader cannot run here (before anything is built).
    check_data(datasets, dataset=, aa=, reprob=, digits_aug=): UserError for data or options it cannot take.
    create(dataset, sampler, batch_size, device, workers, drop_last, generator): the batch iterable."""

    help: str
    create: Callable[..., object]
    check_available: Callable[[], None] = lambda: None
    check_data: Callable[..., None] = lambda datasets, **options: None


def create_timm_loader(dataset: Dataset, sampler: Sampler, batch_size: int, device: torch.device, workers: int,
                       drop_last: bool = False, generator: Optional[torch.Generator] = None) -> DataLoader:
    """PIL decoding and timm transforms in ``workers`` DataLoader processes; unreadable files dropped."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last, generator=generator,
                      collate_fn=collate_skip_bad)


def _dali_available() -> None:
    from hcd_fast.distill.data import dali
    from hcd_fast.distill.errors import UserError
    ok, why = dali.dali_status()
    if not ok:
        raise UserError(f"--loader dali: {why}; install it with {dali.INSTALL_HINT}, or use --loader timm")


def _dali_check_data(datasets: Sequence[Dataset], **options) -> None:
    from hcd_fast.distill.data import dali
    dali.check_dali_run(datasets, **options)


def create_dali_loader(dataset: Dataset, sampler: Sampler, batch_size: int, device: torch.device, workers: int,
                       drop_last: bool = False, generator: Optional[torch.Generator] = None):
    """JPEG decoding and the views on the device with NVIDIA DALI (``--workers`` host processes and threads)."""
    from hcd_fast.distill.data.dali import DaliLoader
    return DaliLoader(dataset, sampler, batch_size, device, max(workers, 1), drop_last=drop_last)


LOADERS: Dict[str, LoaderSpec] = {
    "timm": LoaderSpec("PIL decoding in DataLoader workers (default)", create_timm_loader),
    "dali": LoaderSpec("NVIDIA DALI decodes the JPEGs (nvJPEG on CUDA, CPU otherwise) and crops, jitters, flips and "
                       "normalises on the device, the same views as timm's (imagefolder only; pip install "
                       "'hcd_fast[dali]')", create_dali_loader, _dali_available, _dali_check_data),
}
