"""NVIDIA DALI input pipeline of hcd-distill (``--loader dali``; ``pip install hcd_fast[dali]``).

DALI decodes the JPEGs (nvJPEG on CUDA, libjpeg-turbo on the CPU) and resizes, colour-jitters, flips and
normalises on the same device. The random choices are drawn on the host, per sample, by the very timm
transforms the timm loader applies, seeded with (seed, epoch, index) (or, under ``--teacher-cache``, the
stored view), so each image gets the view the timm loader would have given it, whatever the thread count.
Order, sharding and resume are the sampler's. The views differ from PIL's only by the resamplers' rounding
(a few grey levels; tests/test_dali_loader.py bounds it). Unreadable headers become ``BadSample``.
"""
from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass
from typing import Deque, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from hcd_fast.distill.data.datasets import BadSample, SampleDataset, sample_seed, seeded_rngs
from hcd_fast.distill.errors import UserError

INSTALL_HINT = "pip install 'hcd_fast[dali]' (NVIDIA DALI, the nvidia-dali-cuda130 package)"
JPEG_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif")
_PIL_TO_DALI_INTERP = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR", "nearest": "INTERP_NN",
                       "lanczos": "INTERP_LANCZOS3"}


def dali_status() -> Tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install (missing shared library)
        return False, f"nvidia.dali cannot be imported ({type(exc).__name__}: {exc})"
    return True, dali.__version__


# ------------------------------------------------------------------------------------- the view plan
@dataclass
class ViewPlan:
    """What a timm transform does, in the terms of the DALI graph.

    ``kind``: "window" (RandomResizedCrop of a window to ``size``, flip, jitter) or "resize_crop" (resize the
    shorter side to ``resize``, centre crop ``size``). ``rrc``/``flip``/``jitter``: the timm transform objects
    whose ``get_params`` draw the random choices (None when absent)."""

    kind: str
    size: int
    interpolation: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    resize: int = 0
    rrc: object = None
    flip: object = None
    jitter: object = None


def _interp_name(mode) -> str:
    if isinstance(mode, (tuple, list)):
        raise UserError("--loader dali: the transform picks a random interpolation per image ('random'), which "
                        "DALI cannot replay; set --interpolation bicubic/bilinear, or use --loader timm")
    name = getattr(mode, "value", str(mode)).lower()
    if name not in _PIL_TO_DALI_INTERP:
        raise UserError(f"--loader dali: interpolation {name!r} has no DALI equivalent (bicubic, bilinear, nearest, "
                        f"lanczos); set --interpolation, or use --loader timm")
    return name


def _square(size, what: str) -> int:
    s = [size] if isinstance(size, int) else list(size)
    if len(s) == 1 or (len(s) == 2 and s[0] == s[1]):
        return int(s[0])
    raise UserError(f"--loader dali: {what} size {size} is not square")


def view_plan(transform) -> ViewPlan:
    """The plan of a timm train/eval transform (a Compose), or a UserError naming the transform DALI cannot
    apply (RandAugment/auto-augment, random erasing, hue jitter, ...)."""
    ts = list(getattr(transform, "transforms", [transform]))
    rrc = flip = jitter = resize = crop = norm = None
    for t in ts:
        name = type(t).__name__
        if name in ("RandomResizedCropAndInterpolation", "RandomResizedCrop") and rrc is None and resize is None:
            rrc = t
        elif name == "RandomHorizontalFlip" and flip is None:
            flip = t
        elif name == "ColorJitter" and jitter is None:
            if t.hue is not None:
                raise UserError("--loader dali: hue jitter is not implemented in the DALI pipeline; use --loader timm")
            jitter = t
        elif name == "Resize" and resize is None and rrc is None:
            if getattr(t, "max_size", None) is not None or not (isinstance(t.size, int) or len(t.size) == 1):
                raise UserError(f"--loader dali: Resize({t.size}, max_size={t.max_size}) is not a shorter-side "
                                f"resize; use --loader timm")
            resize = t
        elif name == "CenterCrop" and crop is None and resize is not None:
            crop = t
        elif name in ("ToTensor", "MaybeToTensor"):
            pass
        elif name == "Normalize" and norm is None:
            norm = t
        else:
            raise UserError(f"--loader dali cannot apply the {name} transform of this run (DALI does "
                            f"RandomResizedCrop, flip, colour jitter without hue, resize + centre crop and "
                            f"normalisation); drop the option that adds it (--aa, --reprob) or use --loader timm")
    if norm is None:
        raise UserError("--loader dali: the transform does not normalise; use --loader timm")
    present = [t for t in (rrc, flip, jitter, norm) if t is not None]
    if [ts.index(t) for t in present] != sorted(ts.index(t) for t in present):
        # train_params draws crop, flip, jitter in this order, as timm's transform applies them
        raise UserError("--loader dali: the transform's crop, flip, jitter and normalisation are not in timm's "
                        "order; use --loader timm")
    mean = tuple(float(v) for v in np.asarray(norm.mean).reshape(-1))
    std = tuple(float(v) for v in np.asarray(norm.std).reshape(-1))
    if rrc is not None:
        return ViewPlan("window", _square(rrc.size, "RandomResizedCrop"), _interp_name(rrc.interpolation), mean,
                        std, rrc=rrc, flip=flip, jitter=jitter)
    if resize is None or crop is None or flip is not None or jitter is not None:
        raise UserError("--loader dali: this transform is neither RandomResizedCrop (+ flip, jitter) nor resize + "
                        "centre crop; use --loader timm")
    short = resize.size if isinstance(resize.size, int) else resize.size[0]
    return ViewPlan("resize_crop", _square(crop.size, "CenterCrop"), _interp_name(resize.interpolation), mean, std,
                    resize=int(short))


def replay_view_plan(view_tf) -> ViewPlan:
    """The plan of the teacher cache's ``ViewTransform`` (its stored spec): a "window" plan without
    jitter for ``rrc_flip`` (the window and flip come from the cache), timm's no-aug transform otherwise."""
    spec = view_tf.spec
    if spec["aug"] == "none":
        return view_plan(view_tf.noaug_transform())
    from timm.data.transforms import str_to_interp_mode
    return ViewPlan("window", int(spec["img_size"]), _interp_name(str_to_interp_mode(spec["interpolation"])),
                    tuple(view_tf.mean), tuple(view_tf.std))


# ------------------------------------------------------------------------------- host-side parameters
IDENTITY_JITTER = np.array([[1.0, 0.0, 0.0]] * 3, dtype=np.float32)


def jitter_coefficients(order, b, c, s) -> np.ndarray:
    """(3, 3) float32 rows (f, a, m) per applied stage of ColorJitter's order: with d = a L + m round(mean(L)),
    the stage computes ``x <- trunc(clamp(d + f (x - d), 0, 255))``: brightness (f=b, d=0), contrast
    (f=c, d=mean L), saturation (f=s, d=L); hue (id 3) is never on; unused rows are the identity."""
    rows = []
    for fn_id in [int(v) for v in order]:
        if fn_id == 0 and b is not None:
            rows.append((b, 0.0, 0.0))
        elif fn_id == 1 and c is not None:
            rows.append((c, 0.0, 1.0))
        elif fn_id == 2 and s is not None:
            rows.append((s, 1.0, 0.0))
    rows += [(1.0, 0.0, 0.0)] * (3 - len(rows))
    return np.asarray(rows, dtype=np.float32)


def train_params(plan: ViewPlan, width: int, height: int, seed: int, epoch: int, index: int):
    """(top, left, h, w), flip, jitter coefficients of training sample ``index`` in ``epoch``: the draws of
    the timm train transform, in its order, on the RNGs ``SampleDataset`` seeds for that sample."""
    from PIL import Image
    stub = Image.new("1", (width, height))  # get_params reads only the size (1 bit per pixel)
    with seeded_rngs(sample_seed(seed, epoch, index)):
        i, j, h, w = plan.rrc.get_params(stub, plan.rrc.scale, plan.rrc.ratio)
        flip = bool(torch.rand(1) < plan.flip.p) if plan.flip is not None else False
        coef = IDENTITY_JITTER
        if plan.jitter is not None:
            jt = plan.jitter
            order, b, c, s, _ = jt.get_params(jt.brightness, jt.contrast, jt.saturation, jt.hue)
            coef = jitter_coefficients(order, b, c, s)
    return (i, j, h, w), flip, coef


def resize_crop_params(size: int, crop: int, width: int, height: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """((new_h, new_w), (top, left)): torchvision's Resize(size) output size (shorter side = size, the longer
    one truncated) and CenterCrop(crop) offsets (``int(round(d / 2))``)."""
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_h, new_w = size, int(size * width / height)
    return (new_h, new_w), (int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0)))


def read_jpeg(path: str) -> Tuple[Optional[np.ndarray], int, int, Optional[str]]:
    """(bytes as uint8, width, height, None) of a JPEG file, or (None, 0, 0, reason) when it cannot be read
    or its header is not a JPEG's (PIL parses the header only)."""
    from PIL import Image
    try:
        raw = np.fromfile(path, dtype=np.uint8)
        with Image.open(io.BytesIO(raw)) as im:  # lazy: the header only
            fmt, (width, height) = im.format, im.size
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return None, 0, 0, f"{type(exc).__name__}: {exc}"
    if fmt != "JPEG":
        return None, 0, 0, f"not a JPEG (PIL reads it as {fmt}); --loader dali decodes JPEGs only"
    return raw, width, height, None


# -------------------------------------------------------------------------------------------- checks
def image_folder_of(dataset):
    """The torchvision ImageFolder under a hcd-distill dataset (SampleDataset, CachedViewDataset), or None."""
    base = dataset
    if hasattr(base, "source"):  # CachedViewDataset -> RawSource
        base = base.source.dataset
    if isinstance(base, SampleDataset):
        base = base.base
    return base if hasattr(base, "samples") and hasattr(base, "loader") else None


def check_dali_run(datasets: Sequence, *, dataset: str, aa: Optional[str] = None, reprob: float = 0.0,
                   digits_aug: bool = False) -> None:
    """Everything ``--loader dali`` needs, before the first step: DALI importable, an ImageFolder of JPEGs
    (every file name, and the first file's header), no option DALI cannot honour."""
    ok, why = dali_status()
    if not ok:
        raise UserError(f"--loader dali: {why}; install it with {INSTALL_HINT}, or use --loader timm")
    if dataset != "imagefolder":
        raise UserError(f"--loader dali decodes an ImageFolder of JPEGs (--dataset imagefolder); --dataset "
                        f"{dataset} is not one (use --loader timm)")
    if digits_aug:
        raise UserError("--loader dali: --digits-aug is for the digits dataset (use --loader timm)")
    for flag, on in (("--aa", aa), ("--reprob", reprob)):
        if on:
            raise UserError(f"--loader dali cannot apply {flag} {on!r} (not in the DALI pipeline); drop it or "
                            f"use --loader timm")
    for ds in datasets:
        folder = image_folder_of(ds)
        if folder is None:
            raise UserError(f"--loader dali: the dataset ({type(ds).__name__}) is not an ImageFolder")
        bad = [p for p, _ in folder.samples if not p.lower().endswith(JPEG_EXTENSIONS)]
        if bad:
            raise UserError(f"--loader dali decodes JPEGs only: {len(bad)} file(s) of {folder.root!r} are not "
                            f"named .jpg/.jpeg, e.g. {bad[0]!r} (use --loader timm)")
        if folder.samples:
            _, _, _, reason = read_jpeg(folder.samples[0][0])
            if reason:
                raise UserError(f"--loader dali: cannot use {folder.samples[0][0]!r} ({reason})")


# ---------------------------------------------------------------------------------------- the graph
def build_pipeline(plan: ViewPlan, batch_size: int, num_threads: int, device: torch.device, source, seed: int = 0):
    """The DALI pipeline of ``plan``; ``source()`` returns one batch of its external inputs (lists of numpy
    arrays: jpegs, then window anchor (2,) + shape (2,) + flip () + jitter (3, 3) for "window", or size (2,)
    + anchor (2,) for "resize_crop"), or raises StopIteration at the end of the epoch."""
    import nvidia.dali as dali
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    gpu = device.type == "cuda"
    interp = getattr(types, _PIL_TO_DALI_INTERP[plan.interpolation])
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=max(1, num_threads),
                         device_id=(device.index or 0) if gpu else None, seed=seed, prefetch_queue_depth=2,
                         exec_pipelined=True, exec_async=True)
    decode_device = "mixed" if gpu else "cpu"
    # mixed: libjpeg-turbo's ("fancy") chroma upsampling, as PIL decodes; every image to the hardware decoder
    # where the GPU has one (the default 0.65 splits each batch between two decoders, so a sample's pixels
    # would depend on its batch), nvJPEG's CUDA decoder otherwise or for JPEGs the hardware cannot decode.
    decode_kw = dict(jpeg_fancy_upsampling=True, hw_decoder_load=1.0) if gpu else {}
    with pipe:
        if plan.kind == "window":
            jittered = plan.jitter is not None
            jpegs, anchor, shape, flip, *coef = fn.external_source(
                source=source, num_outputs=5 if jittered else 4, batch=True,
                dtype=[types.UINT8, types.INT32, types.INT32, types.INT32] + [types.FLOAT] * jittered)
            img = fn.decoders.image_slice(jpegs, anchor, shape, device=decode_device, output_type=types.RGB,
                                          axes=[0, 1], adjust_orientation=False, **decode_kw)
            # uint8 out of the resize (rounded, clamped), as PIL's resize gives the timm transform
            x = fn.resize(img, size=[plan.size, plan.size], interp_type=interp, antialias=True)
            if plan.jitter is not None:
                c = coef[0].gpu() if gpu else coef[0]
                for p in range(3):  # ColorJitter's stages in the sample's own order (identity rows pad)
                    # PIL's ImageEnhance on uint8: degenerate d = 0 / round(mean(L)) / L with L = round(luma),
                    # Image.blend(d, x, f) = trunc(clamp(d + f (x - d), 0, 255))
                    gray = dali.math.floor(fn.coord_transform(x, M=[0.299, 0.587, 0.114], dtype=types.FLOAT) + 0.5)
                    mean = dali.math.floor(fn.reductions.mean(gray) + 0.5)
                    d = gray * c[p, 1] + mean * c[p, 2]
                    x = dali.math.floor(dali.math.clamp(d + c[p, 0] * (x - d), 0.0, 255.0))
            mirror = flip
        else:
            jpegs, size, anchor = fn.external_source(source=source, num_outputs=3, batch=True,
                                                     dtype=[types.UINT8, types.FLOAT, types.INT32])
            img = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, adjust_orientation=False,
                                    **decode_kw)
            x = fn.resize(img, size=size, interp_type=interp, antialias=True)  # uint8, as PIL's
            # named argument inputs live on the CPU whatever the operator's device
            x = fn.slice(x, start=anchor, shape=[plan.size, plan.size], axes=[0, 1])
            mirror = 0
        out = fn.crop_mirror_normalize(x, mirror=mirror, mean=[255.0 * m for m in plan.mean],
                                       std=[255.0 * s for s in plan.std], output_layout="CHW", dtype=types.FLOAT)
        pipe.set_outputs(out)
    pipe.build()
    return pipe


# --------------------------------------------------------------------------------------- the loader
@dataclass
class _Batch:
    labels: List[int]
    bad: List[BadSample]
    feats: Optional[np.ndarray] = None


class HostInputs(Dataset):
    """The host side of the DALI pipeline, per sample: item n -> (JPEG bytes, the plan's parameters (numpy
    arrays in the graph's input order), label, cached f_t or None), or ``BadSample`` when the file cannot be
    read or is not a JPEG. Run in DataLoader workers (``--workers``), so reading files and drawing views
    happen beside the training loop, as the timm loader's decoding does."""

    def __init__(self, dataset, folder, plan: ViewPlan, cached: bool):
        self.dataset, self.folder, self.plan, self.cached = dataset, folder, plan, cached

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, n: int):
        path, label = self.folder.samples[n]
        raw, width, height, reason = read_jpeg(path)
        if raw is None:
            return BadSample(path, reason)
        plan, feat = self.plan, None
        k = self.dataset.view_index(n) if self.cached else None
        if self.cached:
            feat = np.asarray(self.dataset.cache.feats[n, k], dtype=np.float32)
        if plan.kind == "resize_crop":
            (nh, nw), (top, left) = resize_crop_params(plan.resize, plan.size, width, height)
            params = (np.array([nh, nw], dtype=np.float32), np.array([top, left], dtype=np.int32))
        else:
            if self.cached:
                top, left, h, w, flip = (int(v) for v in self.dataset.cache.views[n, k])
                coef = IDENTITY_JITTER
            else:
                (top, left, h, w), flip, coef = train_params(plan, width, height, self.dataset.seed,
                                                             self.dataset.epoch, n)
            params = (np.array([top, left], dtype=np.int32), np.array([h, w], dtype=np.int32),
                      np.array(int(flip), dtype=np.int32)) + ((coef,) if plan.jitter is not None else ())
        return raw, params, int(label), feat


def _as_list(batch: list) -> list:
    return batch


class DaliLoader:
    """Iterates one epoch of ``dataset`` in the order of ``sampler`` (re-read at each ``iter()``, so
    ``set_epoch``/``set_start`` apply), yielding what the trainer's DataLoader yields: ``(x (B, 3, S, S)
    float32 on ``device``, y (B,) int64, bad samples)``, plus ``f_t (B, D_t)`` for a ``CachedViewDataset``.

    ``dataset``: a ``SampleDataset`` of an ImageFolder (its ``transform`` gives the plan; training views
    drawn with (``dataset.seed``, ``dataset.epoch``, index)), or the teacher cache's ``CachedViewDataset``
    (stored windows). ``workers``: DataLoader processes computing ``HostInputs`` (0: in this process) and
    DALI threads (at least 1)."""

    def __init__(self, dataset, sampler, batch_size: int, device: torch.device, workers: int = 4,
                 drop_last: bool = False):
        self.dataset, self.sampler, self.batch_size, self.device = dataset, sampler, batch_size, device
        self.workers, self.drop_last = workers, drop_last
        self.cached = hasattr(dataset, "view_index")
        self.folder = image_folder_of(dataset)
        if self.folder is None:
            raise UserError(f"--loader dali: the dataset ({type(dataset).__name__}) is not an ImageFolder")
        self.plan = replay_view_plan(dataset.tf) if self.cached else view_plan(self.folder.transform)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def host_batches(self) -> Iterator[list]:
        """This epoch's batches of ``HostInputs`` items, in the sampler's order."""
        from torch.utils.data import BatchSampler, DataLoader
        return iter(DataLoader(HostInputs(self.dataset, self.folder, self.plan, self.cached),
                               batch_sampler=BatchSampler(self.sampler, self.batch_size, self.drop_last),
                               num_workers=self.workers, collate_fn=_as_list))

    def _to_torch(self, tl) -> torch.Tensor:
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray
            t = tl.as_tensor()
            out = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        return torch.from_numpy(np.array(tl.as_array(), copy=True))

    def __iter__(self) -> Iterator[tuple]:
        host = self.host_batches()
        metas: Deque[_Batch] = deque()
        carried: List[BadSample] = []  # bad samples of batches that had no readable image left

        def source():
            for items in host:
                good = [it for it in items if not isinstance(it, BadSample)]
                bad = carried + [it for it in items if isinstance(it, BadSample)]
                carried.clear()
                if not good:
                    carried.extend(bad)
                    continue
                feats = np.stack([it[3] for it in good]) if self.cached else None
                metas.append(_Batch([it[2] for it in good], bad, feats))
                columns = [[it[0] for it in good]] + [list(c) for c in zip(*(it[1] for it in good))]
                return tuple(columns)
            raise StopIteration

        # A new pipeline per epoch: one left mid-epoch (a break) holds prefetched batches of the old order.
        pipe = build_pipeline(self.plan, self.batch_size, max(self.workers, 1), self.device, source)
        # On CUDA the outputs are bound to torch's current stream (no host synchronisation per batch).
        stream = (torch.cuda.current_stream(self.device),) if self.device.type == "cuda" else ()
        try:
            while True:
                try:
                    (out,) = pipe.run(*stream)
                except StopIteration:
                    break
                meta = metas.popleft()
                x = self._to_torch(out)
                y = torch.tensor(meta.labels, dtype=torch.int64)
                if self.cached:
                    yield x, y, meta.bad, torch.from_numpy(meta.feats)
                else:
                    yield x, y, meta.bad
        finally:
            del pipe
        if carried:
            yield None, None, list(carried)
