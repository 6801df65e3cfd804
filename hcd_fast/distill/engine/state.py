"""Where a run is (``TrainState``) and every RNG state, both saved in last.pt so a resumed run continues
bit for bit."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from hcd_fast.distill.errors import UserError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG state as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



@dataclass
class TrainState:
    """Where a run is: saved in last.pt with the model, optimizer, scheduler and RNG states."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps done in the current epoch
    global_step: int = 0
    history: List[dict] = field(default_factory=list)
    best_top1: Optional[float] = None
    best_epoch: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0
    accum: Optional[dict] = None  # mid-epoch running sums {"sums": (2 + P,) float64, "count": int}
    bad_files: Dict[str, str] = field(default_factory=dict)  # unreadable image path -> reason
    skipped_samples: int = 0
    skipped_steps: int = 0  # batches left with < 2 readable images, and --skip-nonfinite steps
    skipped_nonfinite: int = 0  # of which non-finite (at most --skip-nonfinite)
    saved_step: Optional[int] = None  # global step of the last checkpoint (not stored)

    FIELDS = ("epoch", "step_in_epoch", "global_step", "history", "best_top1", "best_epoch", "train_seconds",
              "images_seen", "accum", "bad_files", "skipped_samples", "skipped_steps", "skipped_nonfinite")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        missing = [k for k in cls.FIELDS if k not in d]
        if missing:
            raise UserError(f"--resume: the checkpoint lacks {', '.join(missing)} (written by another version)")
        return cls(**{k: d[k] for k in cls.FIELDS}, saved_step=d["global_step"])
