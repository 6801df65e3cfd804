"""The files of a teacher cache folder, read and written defensively.

- ``read_meta`` / ``open_array``: a damaged cache (truncated ``feats.npy`` / ``views.npy``, a ``meta.json``
  that is not a JSON object or lacks fields) is a ``UserError`` naming the file, never a traceback.
- ``check_output``: ``cache-teacher`` writes only into a new or empty folder, or with ``--overwrite``; it
  never replaces a user's own ``feats.npy`` / ``views.npy``.
- ``remove_partials``: a refused or failed build leaves no ``*.partial`` file (nor the folder it created).
- ``files_stat_hash``: size and modification time of every image file, part of a cache's identity, so a file
  rewritten under the same name (other pixels) is noticed.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Tuple

import numpy as np

from hcd_fast.distill.errors import UserError

CACHE_FILES = ("meta.json", "views.npy", "feats.npy")
PARTIAL_FILES = tuple(f"{n}.partial" for n in CACHE_FILES)
META_FIELDS = ("format", "num_images", "num_views", "feat_dim", "transform")


def read_meta(folder: str, flag: str = "--teacher-cache") -> dict:
    """The cache's meta.json as a dict holding at least META_FIELDS, else UserError naming the file."""
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {folder!r}: no meta.json there (not a finished cache; make one with "
                        f"`hcd-distill cache-teacher ... --output {folder}`)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{flag}: {path!r} cannot be read as JSON ({type(exc).__name__}: {exc}); the cache is "
                        f"damaged, make it again with `hcd-distill cache-teacher`") from None
    if not isinstance(meta, dict):
        raise UserError(f"{flag}: {path!r} holds a JSON {type(meta).__name__}, not the cache's metadata object; "
                        f"the cache is damaged, make it again with `hcd-distill cache-teacher`")
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        raise UserError(f"{flag}: {path!r} lacks {', '.join(missing)}; the cache is damaged or not a teacher "
                        f"cache, make it again with `hcd-distill cache-teacher`")
    return meta


def open_array(folder: str, name: str, flag: str = "--teacher-cache") -> np.ndarray:
    """``folder/name`` memory-mapped read-only, else UserError naming the file (missing, truncated, not .npy)."""
    path = os.path.join(folder, name)
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{flag}: {path!r} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); the cache "
                        f"is damaged (truncated?), make it again with `hcd-distill cache-teacher`") from None


def check_output(path: str, overwrite: bool) -> None:
    """cache-teacher's --output: a new or empty folder, or (with ``overwrite``) any folder, whose cache
    files are then removed first; never a file, never a folder of other files without ``overwrite``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output {path!r}: exists and is not a folder")
    if not os.path.isdir(path):
        return
    names = sorted(os.listdir(path))
    if names and not overwrite:
        listed = ", ".join(names[:5]) + ("..." if len(names) > 5 else "")
        what = ("already holds a teacher cache" if "meta.json" in names
                else f"is not empty and holds no teacher cache ({listed})")
        raise UserError(f"--output {path!r} {what}; choose another folder, or pass --overwrite to replace "
                        f"{', '.join(CACHE_FILES)} there")
    if overwrite:
        for name in ("meta.json",) + CACHE_FILES[1:] + PARTIAL_FILES:  # meta.json first: the old cache is gone
            try:
                os.remove(os.path.join(path, name))
            except FileNotFoundError:
                pass


def remove_partials(path: str, created: bool) -> None:
    """After a refused or failed build: no ``*.partial`` file, and no folder this build created empty."""
    for name in PARTIAL_FILES:
        try:
            os.remove(os.path.join(path, name))
        except (FileNotFoundError, NotADirectoryError):
            pass
    if created:
        try:
            os.rmdir(path)
        except OSError:
            pass


def files_stat_hash(root: str, samples: Iterable[Tuple[str, int]]) -> str:
    """sha256 of (relative path, size in bytes, modification time in whole seconds) of every file: a file
    rewritten under the same name changes it; whole seconds survive copies that keep timestamps (rsync -a,
    cp -p, tar) across file systems of other timestamp precision."""
    h = hashlib.sha256()
    for path, _ in samples:
        try:
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, root)}\t{st.st_size}\t{int(st.st_mtime)}\n".encode())
        except OSError:  # unreadable: the image is skipped and reported at replay
            h.update(f"{os.path.relpath(path, root)}\tmissing\n".encode())
    return h.hexdigest()
