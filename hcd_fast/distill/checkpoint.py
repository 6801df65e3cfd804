"""Checkpoint files and run folders of hcd-distill: ``safe_load`` never unpickles arbitrary objects
(``weights_only=True`` plus ``argparse.Namespace``, which timm stores, or .safetensors); ``load_weights``
reads plain, timm and hcd-distill checkpoints; writes are atomic (temporary file, fsync, ``os.replace``);
``RunFolder`` refuses another run's folder, holds a lock while running and removes interrupted writes."""
from __future__ import annotations

import argparse
import os
import pickle
import re
import socket
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from hcd_fast.distill.errors import UserError

CKPT_FORMAT = "hcd-distill/1"
SAFE_GLOBALS = [argparse.Namespace]
RESULT_FILES = ("last.pt", "best.pt", "summary.json", "metrics.csv", "metrics.jsonl", "loss.png", "accuracy.png")
LOCK_NAME = ".hcd-distill.lock"
_TMP_RE = re.compile(r"^(%s)\.tmp\d*$" % "|".join(re.escape(n) for n in RESULT_FILES))


# ------------------------------------------------------------------------------------------- loading
def safe_load(path: str, flag: str):
    """The object stored in ``path`` (a torch checkpoint or .safetensors), never unpickling arbitrary types."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover
            raise UserError(f"{flag} {path!r}: reading .safetensors needs the safetensors package") from None
        try:
            return load_file(path)
        except Exception as exc:
            raise UserError(f"{flag} {path!r}: not a readable .safetensors file ({exc})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        extra = ""
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            extra = f" (it needs {', '.join(names)})" if names else ""
        except Exception:
            pass
        if "Unsupported global" in str(exc) or extra:
            raise UserError(f"{flag} {path!r}: holds Python objects beyond tensors, containers and "
                            f"argparse.Namespace{extra}; hcd-distill never unpickles arbitrary objects. Re-save "
                            f"it as a plain state_dict (torch.save(model.state_dict(), ...)) or .safetensors") from None
        raise UserError(f"{flag} {path!r}: cannot be read, truncated or not a PyTorch checkpoint "
                        f"({load_error_reason(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - damaged bytes reach the unpickler as any error (IndexError, KeyError...)
        raise UserError(f"{flag} {path!r}: cannot be read, truncated or not a PyTorch checkpoint "
                        f"({load_error_reason(exc)})") from None


def load_error_reason(exc: BaseException) -> str:
    """One line on why torch.load failed, without PyTorch's advice to retry with ``weights_only=False``
    (which would run any code the file holds): the unpickler's own reason when it gave one."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return f"{type(exc).__name__}: {reason[:200]}"
    first = lines[0] if lines else ""
    if "weights_only" in first:
        first = "not a checkpoint of tensors and containers"
    return f"{type(exc).__name__}: {first[:200]}"


def check_finite(state: Dict[str, torch.Tensor], path: str, flag: str) -> None:
    """UserError naming the file and the first tensor holding NaN or Inf: such weights would only fail later,
    at the first step, as a non-finite loss."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise UserError(f"{flag} {path!r}: the weight {name!r} holds {bad} values; the file is damaged or "
                            f"from a run that diverged")


def read_state_dict(path: str, flag: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state_dict, meta) from a plain / timm / hcd-distill checkpoint or a .safetensors file. ``meta`` holds
    the input normalisation an hcd-distill checkpoint was trained with (``data_config``), else is empty."""
    obj = safe_load(path, flag)
    meta: dict = {}
    if isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT:
        prefix = "student.model."  # an hcd-distill checkpoint: its student becomes this model
        if isinstance(obj.get("data_config"), dict):
            meta["data_config"] = obj["data_config"]
        obj = {k[len(prefix):]: v for k, v in obj["distiller"].items() if k.startswith(prefix)}
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{flag} {path!r}: expected a state_dict (names to tensors), got "
                        f"{type(obj).__name__}")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}, meta


def load_weights(model: nn.Module, path: str, num_classes: int, flag: str) -> dict:
    """Load ``path`` into ``model`` exactly (every key, every shape); returns the file's meta."""
    state, meta = read_state_dict(path, flag)
    own = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    for k, got, want in mismatched:
        if want and want[0] == num_classes and got and got[0] != num_classes:
            raise UserError(f"{flag} {path!r}: the model was trained for {got[0]} classes "
                            f"({k} has shape {got}) but the dataset has {num_classes}")
    if mismatched:
        sized = any("pos_embed" in k or "relative_position" in k for k, _, _ in mismatched)
        hint = ("; the file was made for another input size: set --img-size to it (or img_size in the "
                "model's --*-kwargs)") if sized else ""
        raise UserError(f"{flag} {path!r} does not fit the model: "
                        + "; ".join(f"{k}: checkpoint {g} vs model {w}" for k, g, w in mismatched[:5]) + hint)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"{flag} {path!r} does not fit the model: missing keys "
                        f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                        f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    check_finite(state, path, flag)
    model.load_state_dict(state)
    return meta


def classifier_classes(path: str, classifier: str, flag: str) -> Optional[int]:
    """Output count of the classifier ``classifier`` (timm's pretrained_cfg['classifier']) in ``path``."""
    state, _ = read_state_dict(path, flag)
    w = state.get(f"{classifier}.weight")
    return int(w.shape[0]) if w is not None and w.dim() >= 1 else None


# ------------------------------------------------------------------------------------------- writing
def _tmp_name(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def write_error(path: str, exc: OSError) -> UserError:
    """A failed write (full disk, quota, read-only folder) as one line naming the file; the previous version of
    the file, if any, is intact (writes are atomic)."""
    return UserError(f"--output: cannot write {path!r} ({exc.strerror or exc}); the previous version of it, if "
                     f"any, is intact. Free space (or fix the folder) and continue with --resume auto")


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace (never a torn file)."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        cause = _os_error(exc)
        if cause is not None:
            raise write_error(path, cause) from None
        raise


def _os_error(exc: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write: torch.save's zip writer reports a short write (full disk) as an
    OSError, or as a RuntimeError raised while handling one."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def atomic_write_bytes(data: bytes, path: str) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def atomic_write_text(text: str, path: str) -> None:
    atomic_write_bytes(text.encode(), path)


def atomic_copy(src: str, dst: str) -> None:
    with open(src, "rb") as f:
        atomic_write_bytes(f.read(), dst)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------- run folder
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """The output folder of one run: lock file, result checks, stale temporary files.

    ``open`` (rank 0, before any model is built) creates the folder, takes the lock (which also proves the
    folder writable) and only then refuses a folder holding another run's results, unless the run resumes a
    checkpoint of that folder or ``overwrite`` is set: lock first, then check, so a run started while another
    builds its models cannot finish in the folder and be overwritten. ``prepare`` (just before training)
    removes temporary files of interrupted saves and, with ``overwrite``, the previous results. ``release``
    drops the lock and removes the folder again when this run created it and left it empty.
    """

    def __init__(self, path: str):
        self.path = path
        self.lock = os.path.join(path, LOCK_NAME)
        self.locked = False
        self.created = False

    def results(self) -> list:
        return [n for n in RESULT_FILES if os.path.isfile(os.path.join(self.path, n))]

    def holds(self, checkpoint: Optional[str]) -> bool:
        """Whether ``checkpoint`` is one of this folder's own result checkpoints (last.pt, best.pt)."""
        if checkpoint is None or os.path.basename(checkpoint) not in ("last.pt", "best.pt"):
            return False
        return os.path.realpath(os.path.dirname(os.path.abspath(checkpoint))) == os.path.realpath(self.path)

    def check(self, resuming_here: bool, overwrite: bool) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"--output {self.path!r}: exists and is not a folder")
        found = self.results()
        if found and not resuming_here and not overwrite:
            raise UserError(f"--output {self.path!r} already holds another run's results ({', '.join(found)}): "
                            f"pass --resume auto to continue that run, --overwrite to replace it, or choose "
                            f"another --output")

    def open(self, resume: Optional[str], overwrite: bool) -> None:
        """Lock, then check the results (see the class docstring); UserError (lock released) when refused."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"--output {self.path!r}: exists and is not a folder")
        try:
            if not os.path.isdir(self.path):
                os.makedirs(self.path)
                self.created = True
            self._take_lock()
        except FileExistsError:  # made by another run between the two calls: take its lock the normal way
            self._take_lock()
        except OSError as exc:
            self.release()
            raise UserError(f"--output {self.path!r}: cannot write there ({exc.strerror or exc})") from None
        try:
            self.check(resuming_here=self.holds(resume), overwrite=overwrite)
        except UserError:
            self.release()
            raise

    def prepare(self, overwrite: bool) -> None:
        for name in os.listdir(self.path):
            if _TMP_RE.match(name) or (overwrite and name in RESULT_FILES):
                _remove(os.path.join(self.path, name))

    def _take_lock(self) -> None:
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(self.lock) as f:
                        pid_text, _, host = f.read().strip().partition(" ")
                    pid = int(pid_text)
                except (OSError, ValueError):
                    pid, host = -1, ""
                if host == socket.gethostname() and (pid < 0 or not _pid_alive(pid)):
                    _remove(self.lock)  # stale: its run is gone
                    continue
                raise UserError(f"--output {self.path!r} is in use by another hcd-distill run (pid {pid} on "
                                f"{host or 'an unknown host'}); if that run is gone, delete {self.lock!r}") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.locked = True
            return
        raise UserError(f"--output {self.path!r}: could not take the lock {self.lock!r}")

    def release(self) -> None:
        if self.locked:
            _remove(self.lock)
            self.locked = False
        if self.created:
            try:
                os.rmdir(self.path)  # only when empty: a run that failed before writing anything
            except OSError:
                pass
            self.created = False
