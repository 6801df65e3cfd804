"""A deterministic synthetic ImageFolder of JPEGs at ImageNet-like sizes, generated once and reused: the
data of the pipeline benchmark and of the loader and teacher-cache tests."""
from __future__ import annotations

import hashlib
import os

import numpy as np


def _jpeg(args) -> None:
    path, seed, idx, width, height = args
    from PIL import Image
    rng = np.random.default_rng([seed, idx])
    # Smooth colour fields plus texture: JPEG sizes and decode costs like photographs, not like noise.
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-24, 25, size=img.shape, dtype=np.int16)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def synthetic_imagefolder(root: str, classes: int, per_class: int, seed: int = 0, val_per_class: int = 1,
                          sizes=((500, 375), (375, 500), (500, 333), (640, 480), (400, 400))) -> str:
    """An ImageFolder (``root/train/cXXX/*.jpg``, ``root/val/...``) of deterministic synthetic JPEGs at
    ImageNet-like sizes, made once: a finished folder holds ``DONE`` and is reused as it is."""
    tag = "x".join(f"{w}-{h}" for w, h in sizes)
    digest = hashlib.sha256(tag.encode()).hexdigest()[:8]
    name = f"synth_imagefolder_c{classes}_n{per_class}_v{val_per_class}_s{seed}_{digest}"
    folder = os.path.join(os.path.expanduser(root), name)
    if os.path.isfile(os.path.join(folder, "DONE")):
        return folder
    jobs = []
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = os.path.join(folder, split, f"c{c:03d}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                idx = len(jobs)
                w, h = sizes[(idx * 7 + c) % len(sizes)]
                jobs.append((os.path.join(d, f"{i:05d}.jpg"), seed, idx, w, h))
    if len(jobs) > 64 and (os.cpu_count() or 1) > 1:
        from multiprocessing import Pool
        with Pool(min(16, os.cpu_count() or 1)) as pool:
            pool.map(_jpeg, jobs, chunksize=16)
    else:
        for j in jobs:
            _jpeg(j)
    with open(os.path.join(folder, "DONE"), "w") as f:
        f.write(f"{len(jobs)} images\n")
    return folder
