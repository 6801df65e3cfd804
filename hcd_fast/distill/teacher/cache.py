"""Teacher feature cache (opt-in): run the teacher once over K augmented views of every training image, then
train many epochs without a teacher forward.

A cache folder holds ``views.npy`` (int32 (N, K, 5): the RandomResizedCrop window top, left, height, width
and the flip; view k of image n drawn from a generator seeded with (seed, n, k)), ``feats.npy`` (fp16/fp32
(N, K, D_t) pre-logit features f_t) and ``meta.json`` (written last, so a cache without it is never read:
teacher, weights hash, the teacher's input statistics, data hashes (file list; each image file's size and
mtime), transform, K, D_t). Training replays, for
image n in epoch e, view ``replay_choice(seed, e, n)`` through the same crop and flip, normalised with the
student's statistics, and takes z_t = classifier(f_t). A cache whose metadata differ from the run, or a run
whose augmentations cannot be replayed (auto-augment, random erasing), is refused.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from hcd_fast.distill.data.datasets import READ_ERRORS, BadSample, DataConfig, SampleDataset, sample_path
from hcd_fast.distill.teacher.files import files_stat_hash, open_array, read_meta
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
        except READ_ERRORS as exc:
            raise UserError(f"cache-teacher: cannot read {source.path(idx)!r} ({type(exc).__name__}: {exc}); "
                            f"fix or remove the file") from None
        height, width = source.image_hw(image)
        for k in range(num_views):
            views[idx, k] = (sample_view(view_rng(seed, idx, k), height, width) if spec["aug"] == "rrc_flip"
                             else (0, 0, height, width, 0))
    return views


class AllViews(Dataset):
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
        except READ_ERRORS as exc:
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


def online_views(train_set: Dataset, cfg: DataConfig, *, dataset: str, img_size: int, no_aug: bool,
                 seed: int) -> Dataset:
    """The training set of ``--digits-aug`` without a cache: digits through a fresh crop + flip per epoch
    (resized with ``cfg.interpolation``, the run's data config)."""
    if dataset != "digits":
        raise UserError(f"--digits-aug: only for --dataset digits (the {dataset} loader already augments)")
    spec = transform_spec(dataset, img_size, cfg.interpolation, no_aug, True)
    return FreshViewDataset(RawSource(train_set), spec, seed) if spec["aug"] != "none" else train_set


def files_hash(source: RawSource, dataset: str, img_size: int, val_fraction: float) -> str:
    """``source.file_list_hash()``; in-memory digits are hashed as built with the default (ImageNet)
    statistics, since a run holds them normalised with the student's and the cache with the teacher's."""
    if source.kind == "tensor" and dataset == "digits":
        from hcd_fast.distill.data.datasets import build_digits
        return RawSource(build_digits(img_size, val_fraction).train).file_list_hash()
    return source.file_list_hash()


def run_identity(source: RawSource, *, dataset: str, img_size: int, interpolation: str, no_aug: bool,
                 digits_aug: bool, val_fraction: float, teacher: Optional[str] = None,
                 teacher_kwargs: Optional[dict] = None, teacher_model: Optional[torch.nn.Module] = None,
                 teacher_stats=None) -> dict:
    """The metadata fields a cache must have for this run (teacher fields only with ``teacher_model``).
    ``interpolation``: the run's resize interpolation (its data config); ``teacher_stats``: (mean, std) the
    teacher's input is normalised with."""
    out = {"dataset": dataset, "num_images": len(source),
           "files_sha256": files_hash(source, dataset, img_size, val_fraction),
           # imagefolder: each file's size and mtime too (a file rewritten under its name); in-memory data
           # are hashed by their pixels already
           "files_size_mtime_sha256": (files_stat_hash(source.dataset.root, source.dataset.samples)
                                       if source.kind == "imagefolder" else None),
           "transform": transform_spec(dataset, img_size, interpolation, no_aug, digits_aug)}
    if teacher_model is not None:
        out.update(teacher=teacher, teacher_kwargs=dict(teacher_kwargs or {}),
                   teacher_weights_sha256=weights_hash(teacher_model),
                   teacher_input={"mean": [float(v) for v in teacher_stats[0]],
                                  "std": [float(v) for v in teacher_stats[1]]})
    return out


def check_replayable(aa: Optional[str], reprob: float) -> None:
    """Augmentations drawn per step cannot be replayed from stored views."""
    if aa:
        raise UserError(f"--aa {aa!r} with --teacher-cache: auto-augment is random per step and cannot be "
                        f"replayed from the cache (drop --aa, or train online)")
    if reprob:
        raise UserError(f"--reprob {reprob} with --teacher-cache: random erasing cannot be replayed from "
                        f"the cache (use --reprob 0, or train online)")


def open_for_training(folder: str, train_set: Dataset, teacher, feat_dim: Optional[int], cfg: DataConfig, *,
                      seed: int, dataset: str, img_size: int, no_aug: bool, digits_aug: bool, val_fraction: float,
                      teacher_name: Optional[str], teacher_kwargs: Optional[dict]) -> CachedViewDataset:
    """The replaying training set of ``--teacher-cache folder`` after every check (UserError otherwise).

    ``teacher`` is the probed ``TeacherTap`` (None for method ce), before any speed setting is applied;
    ``feat_dim`` its D_t; ``cfg`` the run's (student's) data config: the replayed views are resized with its
    interpolation and normalised with its mean and std, as the online loader would."""
    cache = TeacherCache(folder)
    source = RawSource(train_set)
    if teacher is not None and not teacher.uses_classifier:
        raise UserError(f"--teacher-cache with --teacher {teacher_name!r}: its logits are not "
                        f"classifier(pre_logits) (the probe compared them with forward_head), so cached features "
                        f"cannot stand in for its forward; train online")
    if teacher is not None and teacher.teacher_input_stats is None:
        raise ValueError("open_for_training: the TeacherTap was built without input statistics")
    expected = run_identity(source, dataset=dataset, img_size=img_size, interpolation=cfg.interpolation,
                            no_aug=no_aug, digits_aug=digits_aug, val_fraction=val_fraction, teacher=teacher_name,
                            teacher_kwargs=teacher_kwargs, teacher_model=teacher.model if teacher is not None else None,
                            teacher_stats=teacher.teacher_input_stats if teacher is not None else None)
    if teacher is not None:
        expected["feat_dim"] = feat_dim
    cache.check(expected)
    return CachedViewDataset(source, cache, seed, cfg.mean, cfg.std)
