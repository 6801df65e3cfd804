"""hcd-distill under faults and bad input, black-box through the command line: no silent damage, no hang,
no lost results, no traceback.

Every test drives ``hcd-distill`` (its console entry point, in process, or ``python -m hcd_fast.distill`` /
torchrun in a subprocess with a timeout, so a hang fails instead of stalling CI) on tiny models, 16 px
images, 1-6 steps and tiny generated JPEG folders. Allowed outcomes of a bad flag or file: exit code 2 and
one error line naming it, never a Python traceback.
"""
import json
import math
import os
import random
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hcd_fast.distill.__main__ import main

STUDENT = ["--student", "resnet10t", "--student-kwargs", '{"channels": [8, 16, 32, 64], "stem_width": 8}']
VIT = '{"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}'
TEACHER = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs", VIT]
QUIET = ["--no-progress", "--no-plots", "--device", "cpu", "--threads", "1"]
TINY = ["--img-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps-per-epoch", "2"] + QUIET
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def make_folder(root, classes=3, per_class=8, val_per_class=2, size=20, names=None):
    """A tiny ImageFolder of random JPEGs: root/{train,val}/<class>/<i>.jpg."""
    from PIL import Image
    rng = np.random.default_rng(0)
    names = names or [f"c{k}" for k in range(classes)]
    for split, n in (("train", per_class), ("val", val_per_class)):
        for name in names:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


def folder(data, out, *extra, method="ce"):
    """Flags of a tiny imagefolder run."""
    return STUDENT + TINY + ["--method", method, "--dataset", "imagefolder", "--data-dir", str(data),
                             "--workers", "0", "--output", str(out), *extra]


def digits(out, *extra, method="ce"):
    """Flags of a tiny digits run (in memory: the fastest)."""
    teacher = TEACHER + ["--allow-random-teacher"] if method != "ce" else []
    return STUDENT + teacher + TINY + ["--method", method, "--output", str(out), *extra]


def cache_flags(data, out, *extra):
    return ["cache-teacher", *TEACHER, "--allow-random-teacher", "--dataset", "imagefolder", "--data-dir", str(data),
            "--img-size", "16", "--views", "2", "--batch-size", "8", "--workers", "0", "--output", str(out),
            "--no-progress", "--device", "cpu", "--threads", "1", *extra]


def cli(capsys, argv):
    """(exit code, stdout, stderr) of ``hcd-distill argv``; an exception escaping main is a traceback: fail."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors (exit 2, usage line)
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - the user would see a traceback
        out, err = capsys.readouterr()
        pytest.fail(f"traceback instead of an error line: {type(exc).__name__}: {exc}\n{err[-2000:]}")
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err):
    return [line for line in err.splitlines() if "error" in line.lower()]


def assert_exit2_naming(code, err, *names):
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])


def summary(out):
    return json.loads((out / "summary.json").read_text())


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------- 1, 8, 10: flag ranges checked up front
BAD_FLAGS = [
    # item 1: wrong signs that used to train (and wreck) with exit 0
    ("clip-grad", ["--clip-grad", "-1"], "--clip-grad"),
    ("warmup-lr", ["--warmup-lr", "-1"], "--warmup-lr"),
    ("dkd-beta", ["--dkd-beta", "-1"], "--dkd-beta"),
    ("ofa-eps", ["--ofa-eps", "-1"], "--ofa-eps"),
    ("reprob", ["--reprob", "5"], "--reprob"),
    # item 8: tracebacks in the middle of training
    ("drop-path", ["--drop-path", "2"], "--drop-path"),
    ("threads", ["--threads", "-1"], "--threads"),
    # item 10: errors that named another flag, and a 0 that silently meant "no cap"
    ("momentum", ["--momentum", "-5"], "--momentum"),
    ("max-steps-negative", ["--max-steps-per-epoch", "-1"], "--max-steps-per-epoch"),
    ("max-steps-zero", ["--max-steps-per-epoch", "0"], "--max-steps-per-epoch"),
]


@pytest.mark.parametrize("argv, flag", [pytest.param(a, f, id=i) for i, a, f in BAD_FLAGS])
def test_flag_out_of_range_exits_2_naming_it_before_anything_is_built(tmp_path, capsys, argv, flag):
    out = tmp_path / "o"
    code, _, err = cli(capsys, digits(out) + argv)
    assert_exit2_naming(code, err, flag)
    assert not out.exists()  # refused before the first step: nothing written


# ------------------------------------------------------------------------ 2: DDP ranks agree on skips
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid):
    """Every live descendant of ``pid`` (torchrun starts its ranks in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc):
    for pid in _descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_with_timeout(cmd, timeout, **kw):
    """subprocess.run; on timeout the process and all its descendants are killed and the test fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"hung for {timeout} s: {shlex.join(cmd)}\n{err[-3000:]}")
    return proc.returncode, out, err


@pytest.mark.slow
def test_ddp_rank_left_with_one_image_does_not_hang(tmp_path):
    """2 gloo ranks, 2 classes x 8 train images, one unreadable, global batch 4 (2 per rank): the rank whose
    batch keeps 1 readable image must not skip alone (the other would wait in DDP's all-reduce forever)."""
    data = make_folder(tmp_path / "ds", classes=2, per_class=8)
    bad = data / "train" / "c1" / "5.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "o"
    flags = folder(data, out, "--batch-size", "4", "--max-steps-per-epoch", "4", "--seed", "0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "hcd_fast.distill", *flags]
    code, _, err = _run_with_timeout(cmd, timeout=180)
    assert "Traceback" not in err, err[-3000:]
    if code == 2:  # the other allowed outcome: every rank stops, naming the file
        assert str(bad) in err
    else:
        assert code == 0, err[-3000:]
        s = summary(out)
        assert s["global_step"] == 4 and s["skipped_steps"] >= 1 and str(bad) in s["bad_files"]
    assert not (out / ".hcd-distill.lock").exists()


# ---------------------------------------------------------- 3: the lock is taken before the results check
def test_run_started_during_another_runs_setup_cannot_overwrite_it(tmp_path, capsys, monkeypatch):
    """Run B starts while run A builds its models (A has checked the folder already): B must find the folder
    taken, and A's results must be A's. Before the fix B finished and A then replaced its results."""
    import timm
    out = tmp_path / "race"
    create = timm.create_model
    seen = {}

    def create_and_start_b(*a, **k):
        if "b" not in seen:  # once, in A's model build
            seen["b"] = "running"
            seen["b"] = cli(capsys, digits(out, "--lr", "0.01"))
        return create(*a, **k)
    monkeypatch.setattr(timm, "create_model", create_and_start_b)
    code_a, _, err_a = cli(capsys, digits(out, "--seed", "3"))
    code_b, _, err_b = seen["b"]
    assert code_b == 2 and "in use by another hcd-distill run" in err_b, err_b[-2000:]
    assert code_a == 0, err_a[-2000:]
    ckpt = torch.load(out / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["args"]["seed"] == 3 and ckpt["args"]["lr"] == 0.05


# -------------------------------------------------------------------- 4, 8: cache-teacher's output folder
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("faults") / "ds")


def test_cache_teacher_refuses_a_folder_of_other_files(tmp_path, capsys, tiny_data):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "feats.npy").write_bytes(b"my own features")
    (out / "views.npy").write_bytes(b"my own views")
    code, _, err = cli(capsys, cache_flags(tiny_data, out))
    assert_exit2_naming(code, err, "--output", "--overwrite")
    assert (out / "feats.npy").read_bytes() == b"my own features"
    assert (out / "views.npy").read_bytes() == b"my own views"
    assert sorted(os.listdir(out)) == ["feats.npy", "views.npy"]
    code, _, err = cli(capsys, cache_flags(tiny_data, out, "--overwrite"))
    assert code == 0, err[-2000:]
    assert (out / "meta.json").is_file() and np.load(out / "feats.npy").shape[:2] == (24, 2)


def test_cache_teacher_refused_build_leaves_no_partial_files(tmp_path, capsys):
    data = make_folder(tmp_path / "ds")
    bad = data / "train" / "c2" / "7.jpg"  # not the first image: found while the views are drawn
    bad.write_bytes(b"garbage")
    out = tmp_path / "cache"
    code, _, err = cli(capsys, cache_flags(data, out))
    assert_exit2_naming(code, err, str(bad))
    assert not out.exists() or not [n for n in os.listdir(out) if n.endswith(".partial")], os.listdir(out)


def test_cache_teacher_output_naming_a_file(tmp_path, capsys, tiny_data):
    target = tmp_path / "a_file"
    target.write_text("x")
    code, _, err = cli(capsys, cache_flags(tiny_data, target))
    assert_exit2_naming(code, err, "--output", str(target))
    assert target.read_text() == "x"


# ------------------------------------------------------------------------------- 5: directory symlink loop
def test_symlink_loop_counts_each_file_once_and_warns(tmp_path, capsys):
    data = make_folder(tmp_path / "ds", classes=2, per_class=6)
    os.symlink(".", data / "train" / "c1" / "loop")
    code, _, err = cli(capsys, folder(data, tmp_path / "o", "--batch-size", "4", "--max-steps-per-epoch", "100"))
    assert code == 0, err[-2000:]
    assert summary(tmp_path / "o")["global_step"] == 3  # 12 real files / 4, not (6 + 6 * 41) / 4
    warnings = [line for line in err.splitlines() if "warning" in line and "loop" in line]
    assert len(warnings) >= 1 and str(data / "train" / "c1") in warnings[0], err[-2000:]


# ------------------------------------------------------------- 6: changed pixels under the same file name
def test_cache_notices_a_file_rewritten_under_the_same_name(tmp_path, capsys):
    from PIL import Image
    data = make_folder(tmp_path / "ds")
    cache = tmp_path / "cache"
    code, _, err = cli(capsys, cache_flags(data, cache))
    assert code == 0, err[-2000:]
    run = folder(data, tmp_path / "a", "--teacher-cache", str(cache), *TEACHER, "--allow-random-teacher",
                 method="kd")
    code, _, err = cli(capsys, run)
    assert code == 0, err[-2000:]  # the cache fits the data as built
    path = data / "train" / "c0" / "3.jpg"
    stat = path.stat()
    Image.fromarray(np.full((24, 24, 3), 200, dtype=np.uint8)).save(path, quality=90)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    run[run.index("--output") + 1] = str(tmp_path / "b")
    code, _, err = cli(capsys, run)
    assert_exit2_naming(code, err, "--teacher-cache", "files")


# ------------------------------------------------------------------------------------ 7: damaged caches
@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("cache") / "cache"
    assert main(cache_flags(tiny_data, out)) == 0
    return out


def _damage(folder, case):
    if case in ("feats", "views"):
        path = folder / f"{case}.npy"
        path.write_bytes(path.read_bytes()[:200])
        return path
    path = folder / "meta.json"
    path.write_text({"meta-nonsense": "{not json", "meta-list": "[1, 2, 3]", "meta-empty": "{}"}[case])
    return path


@pytest.mark.parametrize("case", ["feats", "views", "meta-nonsense", "meta-list", "meta-empty"])
def test_damaged_cache_exits_2_naming_the_file(tmp_path, capsys, tiny_data, built_cache, case):
    import shutil
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    path = _damage(cache, case)
    code, _, err = cli(capsys, folder(tiny_data, tmp_path / "o", "--teacher-cache", str(cache), *TEACHER,
                                      "--allow-random-teacher", method="kd"))
    assert_exit2_naming(code, err, str(path) if case in ("feats", "views") else "meta.json")


# --------------------------------------------------------------------------------------- 8: a full disk
@pytest.mark.slow
def test_full_disk_is_one_error_line(tmp_path):
    """Writes beyond 64 KiB fail (RLIMIT_FSIZE with SIGXFSZ ignored: EFBIG, as a full disk's ENOSPC): the
    first checkpoint cannot be written."""
    out = tmp_path / "o"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    code, _, err = _run_with_timeout([sys.executable, "-m", "hcd_fast.distill", *digits(out)], timeout=300,
                                     preexec_fn=limit)
    assert code in (1, 2) and "Traceback" not in err, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "last.pt" in lines[0], err[-3000:]
    assert not (out / ".hcd-distill.lock").exists()


@pytest.mark.slow
def test_full_disk_under_torchrun_stops_every_rank(tmp_path):
    """Rank 0 cannot write last.pt: every rank stops with the error line (no rank waits alone at a barrier)."""
    out = tmp_path / "o"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    flags = digits(out, "--batch-size", "4", "--freeze-bn")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "hcd_fast.distill", *flags]
    code, _, err = _run_with_timeout(cmd, timeout=180, preexec_fn=limit)
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("hcd-distill: error:")]
    assert len(lines) == 2 and all("cannot write" in line and "last.pt" in line for line in lines), err[-3000:]
    assert not (out / ".hcd-distill.lock").exists()


# ------------------------------------------------------------------------------------------- 9: SIGINT
@pytest.mark.slow
def test_sigint_prints_one_line_with_the_resume_command(tmp_path, capsys):
    out = tmp_path / "o"
    flags = STUDENT + QUIET + ["--method", "ce", "--img-size", "16", "--batch-size", "32", "--epochs", "2",
                               "--ckpt-interval", "5", "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "hcd_fast.distill", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(out / "last.pt") in lines[0] and "--resume auto" in lines[0], err
    command = shlex.split(lines[0].split("--resume auto")[0].rsplit("hcd-distill ", 1)[1] + "--resume auto")
    code, stdout, err = cli(capsys, command)
    assert code == 0 and "resuming" in stdout, err[-2000:]
    assert summary(out)["epochs"] == 2


# ------------------------------------------------------------------------------- 10: wrong or weak messages
def test_corrupt_last_pt_gives_one_line_and_advice_that_works(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = cli(capsys, digits(out, "--epochs", "2"))
    assert code == 0, err[-2000:]
    # Random bytes reach torch's unpickler as one of several errors (seeds 2 and 20: IndexError and KeyError).
    for seed in (0, 2, 20):
        (out / "last.pt").write_bytes(random.Random(seed).randbytes(4096))
        code, _, err = cli(capsys, digits(out, "--epochs", "2", "--resume", "auto"))
        assert_exit2_naming(code, err, "--resume", str(out / "last.pt"), "best.pt")
        assert "weights_only" not in err
    code, _, err = cli(capsys, digits(out, "--epochs", "2", "--resume", str(out / "best.pt")))
    assert code == 0, err[-2000:]


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_teacher_checkpoint_with_non_finite_weights_is_named_at_load(tmp_path, capsys, value):
    import timm
    t = timm.create_model("vit_tiny_patch16_224", num_classes=10, **json.loads(VIT))
    state = t.state_dict()
    state["blocks.0.attn.qkv.weight"][0, 0] = float(value)
    torch.save(state, tmp_path / "t.pt")
    out = tmp_path / "o"
    code, _, err = cli(capsys, STUDENT + TEACHER + TINY + ["--method", "kd", "--teacher-checkpoint",
                                                            str(tmp_path / "t.pt"), "--output", str(out)])
    assert_exit2_naming(code, err, "--teacher-checkpoint", str(tmp_path / "t.pt"), "blocks.0.attn.qkv.weight")
    assert not out.exists()


def test_val_classes_of_other_names_are_named(tmp_path, capsys):
    data = make_folder(tmp_path / "ds", names=["cat", "dog", "emu"])
    os.rename(data / "val" / "emu", data / "val" / "elk")
    code, _, err = cli(capsys, folder(data, tmp_path / "o"))
    assert_exit2_naming(code, err, "emu", "elk")


# ------------------------------------------------------------------------ 11: epoch time with checkpoints
def test_epoch_seconds_cover_the_whole_epoch_with_mid_epoch_checkpoints(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = cli(capsys, digits(out, "--max-steps-per-epoch", "6", "--ckpt-interval", "1"))
    assert code == 0, err[-2000:]
    row, s = metrics(out)[0], summary(out)
    assert row["epoch_seconds"] == pytest.approx(s["train_seconds"], rel=1e-6)
    assert row["images_per_s"] == pytest.approx(6 * 8 / row["epoch_seconds"], rel=1e-6)


# ------------------------------------------------------------------------------------------ the CLI fuzz
def _numeric_flags(parser):
    flags = []
    for action in parser._actions:
        if action.option_strings and action.type in (int, float):
            flags.append((action.option_strings[0], action.type))
    return flags


def _train_flags():
    from hcd_fast.distill.cli import build_parser
    return _numeric_flags(build_parser()) + [("--cfm-hidden", int)]


def _cache_flags():
    from hcd_fast.distill.cli import build_cache_parser
    return _numeric_flags(build_cache_parser())


def _values(kind):
    return ["-1", "0", "nan", "inf", "1e30"] if kind is float else ["-1", "0", "nan", "inf", str(10 ** 12)]


def _method_of(flag):
    if flag.startswith("--dkd"):
        return "dkd"
    if flag in ("--ofa-eps", "--w-ofa"):
        return "ofa"
    from hcd_fast.config import HCDConfig
    import dataclasses
    hcd = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(HCDConfig)}
    return "hcd" if flag in hcd - {"--temperature", "--label-smoothing", "--w-gt"} else \
        ("kd" if flag in ("--temperature", "--w-kd") else "ce")


def _fuzz_cases(flags):
    return [pytest.param(flag, value, id=f"{flag[2:]}={value}") for flag, kind in flags for value in _values(kind)]


# A run that did not diverge: after 2 SGD steps from a random start the student's cross-entropy on the 10
# digit classes stays near chance (ln 10 = 2.3); a wrecked one (a negative or huge learning rate) gives 1e19.
CE_BOUND = 10 * math.log(10)


def _check_outcome(flag, code, err, out):
    """exit 0 with finite metrics and a student that did not diverge, or exit 2 with one error line naming the
    flag; never a traceback."""
    assert "Traceback" not in err, err[-3000:]
    if code == 2:
        lines = error_lines(err)
        assert len(lines) == 1 and flag in lines[0], err[-3000:]
        return
    assert code == 0, err[-3000:]
    if out is not None and (out / "metrics.jsonl").exists():
        for row in metrics(out):
            for key, v in row.items():
                assert not isinstance(v, float) or math.isfinite(v), (key, v)
            for key in ("val_loss", "train_ce"):
                assert row.get(key) is None or row[key] < CE_BOUND, (key, row[key])


@pytest.mark.slow
@pytest.mark.parametrize("flag, value", _fuzz_cases(_train_flags()))
def test_fuzz_every_numeric_training_flag(tmp_path, capsys, flag, value):
    out = tmp_path / "o"
    base = digits(out, method=_method_of(flag))
    if flag in ("--img-size", "--batch-size", "--epochs", "--max-steps-per-epoch", "--threads"):
        i = base.index(flag)
        del base[i:i + 2]
    argv = base + ([] if flag == "--stop-after-steps" else ["--stop-after-steps", "3"]) + [flag, value]
    code, _, err = cli(capsys, argv)
    _check_outcome(flag, code, err, out)


@pytest.mark.slow
@pytest.mark.parametrize("flag, value", _fuzz_cases(_cache_flags()))
def test_fuzz_every_numeric_cache_teacher_flag(tmp_path, capsys, flag, value):
    argv = ["cache-teacher", *TEACHER, "--allow-random-teacher", "--views", "2", "--img-size", "16",
            "--output", str(tmp_path / "c"), "--no-progress", "--device", "cpu", "--threads", "1",
            "--val-fraction", "0.9", "--batch-size", "64"]
    if flag in argv:
        i = argv.index(flag)
        del argv[i:i + 2]
    code, _, err = cli(capsys, argv + ["--digits-aug", flag, value])
    _check_outcome(flag, code, err, None)
