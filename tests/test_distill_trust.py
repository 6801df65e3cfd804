"""hcd-distill under bad inputs and faults: every defect a user met has a test here.

Tiny models, 1-4 steps, the embedded digits or a tiny generated ImageFolder in tmp_path.
"""
import argparse
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from hcd_fast.distill.checkpoint import atomic_save, safe_load
from hcd_fast.distill.cli import main, parse_args
from hcd_fast.distill.errors import TrainingError, UserError
from hcd_fast.distill.engine.checks import default_output
from hcd_fast.distill.engine.run import run

STUDENT = ["--student", "resnet10t", "--student-kwargs", '{"channels": [8, 16, 32, 64], "stem_width": 8}']
VIT = '{"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}'
TEACHER = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs", VIT]
FAST = ["--img-size", "16", "--batch-size", "16", "--no-progress", "--no-plots", "--threads", "2"]
TINY = ["--epochs", "1", "--max-steps-per-epoch", "2"]


def ce_args(out, *extra):
    return parse_args(STUDENT + FAST + TINY + ["--method", "ce", "--output", str(out), *extra])


def hcd_args(out, *extra):
    return parse_args(STUDENT + TEACHER + FAST + ["--method", "hcd", "--output", str(out), *extra])


def make_folder(root, classes=2, per_class=6, size=20, splits=("train", "val")):
    """A tiny ImageFolder of random JPEGs: root/<split>/c<k>/<i>.jpg."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in splits:
        for k in range(classes):
            d = root / split / f"c{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"{i}.jpg", quality=90)
    return root


def folder_args(data, out, *extra):
    return parse_args(STUDENT + FAST + ["--method", "ce", "--dataset", "imagefolder", "--data-dir", str(data),
                                        "--workers", "0", "--output", str(out), *extra])


def weights(path):
    return safe_load(str(path), "test")["distiller"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------- 1: the CLI's own example
def test_cli_example_runs_at_default_img_size(tmp_path, capsys):
    """vit_tiny_patch16_224 -> resnet18 at the default --img-size 32: timm's ViT is built for 32 px."""
    code = main(["--teacher", "vit_tiny_patch16_224", "--student", "resnet18", "--method", "hcd",
                 "--allow-random-teacher", "--epochs", "1", "--max-steps-per-epoch", "1", "--no-progress",
                 "--no-plots", "--threads", "2", "--output", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "summary.json").is_file()


def test_teacher_that_cannot_take_the_size_fails_early(tmp_path, capsys):
    code = main(STUDENT + ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs", '{"img_size": 224}',
                           "--allow-random-teacher", "--output", str(tmp_path / "o")] + FAST)
    err = capsys.readouterr().err
    assert code == 2 and "--img-size" in err and "--teacher" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ 2: never overwrite results
@pytest.fixture(scope="module")
def ce_done(tmp_path_factory):
    """A finished 2-step ce run's folder (tests copy it: it stays as it is)."""
    out = tmp_path_factory.mktemp("ce_done") / "o"
    run(ce_args(out))
    return out


def copy_of(folder, tmp_path):
    import shutil
    return shutil.copytree(folder, tmp_path / "o")


def test_existing_results_are_refused_then_overwritten_on_request(tmp_path, capsys, ce_done):
    out = copy_of(ce_done, tmp_path)
    best = (out / "best.pt").read_bytes()
    assert main(STUDENT + FAST + TINY + ["--method", "ce", "--lr", "0.5", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds another run's results" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "best.pt").read_bytes() == best
    run(ce_args(out, "--overwrite", "--epochs", "1"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_lock_refuses_a_live_run_and_clears_a_stale_one(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    lock = out / ".hcd-distill.lock"
    import socket
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")  # this process: alive
    with pytest.raises(UserError, match="in use by another hcd-distill run"):
        run(ce_args(out))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid} {socket.gethostname()}\n")  # a finished process: stale
    (out / "last.pt.tmp4242").write_bytes(b"x" * 100)  # an interrupted save
    run(ce_args(out))
    assert not lock.exists() and not (out / "last.pt.tmp4242").exists() and (out / "last.pt").is_file()


def test_interrupted_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": torch.zeros(1)}, str(tmp_path / "last.pt"))
    assert os.listdir(tmp_path) == []


def test_default_output_names_the_hyper_parameters():
    a = parse_args(STUDENT + ["--method", "ce"])
    b = parse_args(STUDENT + ["--method", "ce", "--lr", "0.01"])
    c = parse_args(STUDENT + ["--method", "ce", "--workers", "0", "--no-progress"])
    assert default_output(a) != default_output(b) and default_output(a) == default_output(c)


# ------------------------------------------------------------------------------- 3: non-finite loss
def _poison_loss_at(monkeypatch, call):
    from hcd_fast.distill.distiller import DistillTask
    forward = DistillTask.forward
    calls = {"n": 0}

    def poisoned(self, input, target, cached_feat=None):  # cached_feat: the teacher cache's f_t
        out = forward(self, input, target, cached_feat)
        calls["n"] += 1
        if calls["n"] == call:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(DistillTask, "forward", poisoned)


def test_nonfinite_loss_stops_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch, capsys):
    _poison_loss_at(monkeypatch, 3)
    out = tmp_path / "o"
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3 .*loss=nan.*ce=.*last finite state \(step 2\)"):
        run(ce_args(out, "--max-steps-per-epoch", "4", "--ckpt-interval", "1"))
    ckpt = safe_load(str(out / "last.pt"), "test")
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["distiller"].values() if v.is_floating_point())
    assert not (out / "summary.json").exists() and not (out / ".hcd-distill.lock").exists()
    _poison_loss_at(monkeypatch, 2)
    assert main(STUDENT + FAST + TINY + ["--method", "ce", "--output", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err and "no checkpoint had been written" in err
    assert not (tmp_path / "p" / "last.pt").exists()


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch):
    _poison_loss_at(monkeypatch, 2)
    s = run(ce_args(tmp_path / "o", "--max-steps-per-epoch", "3", "--skip-nonfinite", "1"))
    assert s["skipped_steps"] == 1 and s["global_step"] == 3
    row = json.loads((tmp_path / "o" / "metrics.jsonl").read_text())
    assert row["train_loss"] == row["train_loss"]  # finite: the skipped step is not in the sums


def test_nan_learning_rate_is_a_flag_error(tmp_path, capsys):
    assert main(STUDENT + FAST + ["--method", "ce", "--lr", "nan", "--output", str(tmp_path / "o")]) == 2
    assert "--lr nan" in capsys.readouterr().err


# ------------------------------------------------------------------------------- 4: data and folders
def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    (data / "train" / "c1" / "3.jpg").write_bytes(b"not a jpeg at all")
    val = data / "val" / "c0" / "2.jpg"
    val.write_bytes(val.read_bytes()[:200])  # truncated
    s = run(folder_args(data, tmp_path / "o", "--epochs", "2", "--batch-size", "4"))
    err = capsys.readouterr().err
    assert s["epochs"] == 2 and s["skipped_images"] == 2
    assert set(s["bad_files"]) == {str(data / "train" / "c1" / "3.jpg"), str(val)}
    warnings = [line for line in err.splitlines() if line.startswith("hcd-distill: warning: skipped")]
    assert len(warnings) == 2 and "3.jpg" in warnings[0] + warnings[1]  # one warning per file
    assert s["final_top1"] is not None


def test_unreadable_split_and_empty_class_fail_before_training(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    (data / "val" / "c1").mkdir(exist_ok=True)
    for f in (data / "val" / "c1").iterdir():
        f.unlink()
    assert main(STUDENT + FAST + ["--method", "ce", "--dataset", "imagefolder", "--data-dir", str(data),
                                  "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(data / "val") in err and "Traceback" not in err
    data2 = make_folder(tmp_path / "data2")
    (data2 / "train" / "c0" / "0.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="0.jpg"):
        run(folder_args(data2, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_unwritable_output_fails_before_the_first_step(tmp_path, monkeypatch):
    from hcd_fast.distill.engine import loop
    monkeypatch.setattr(loop.Trainer, "fit", lambda self, state: pytest.fail("training started"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--output .*cannot write there"):
        run(ce_args(tmp_path / "file" / "o"))


# ------------------------------------------------------------------------------ 5: safe checkpoints
def _make_marker(path):
    with open(path, "w") as f:
        f.write("code ran")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_make_marker, (self.marker,))


@pytest.mark.parametrize("flag", ["--teacher-checkpoint", "--resume"])
def test_crafted_pickle_never_runs(tmp_path, flag, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil(str(marker))}, evil)
    extra = ["--teacher-checkpoint", str(evil)] if flag == "--teacher-checkpoint" else \
        ["--allow-random-teacher", "--resume", str(evil)]
    assert main(STUDENT + TEACHER + FAST + ["--output", str(tmp_path / "o")] + extra) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert flag in err and "never unpickles" in err and "Traceback" not in err


def test_timm_and_safetensors_teacher_files_load(tmp_path):
    from safetensors.torch import save_file
    t = timm.create_model("vit_tiny_patch16_224", num_classes=10, **json.loads(VIT))
    torch.save({"state_dict": t.state_dict(), "args": argparse.Namespace(model="vit", lr=0.1), "epoch": 3},
               tmp_path / "timm.pth.tar")
    save_file(t.state_dict(), str(tmp_path / "t.safetensors"))
    for path in ("timm.pth.tar", "t.safetensors"):
        s = run(hcd_args(tmp_path / path.replace(".", "_"), *TINY, "--teacher-checkpoint", str(tmp_path / path)))
        assert s["global_step"] == 2


@pytest.mark.parametrize("case, message", [
    ("truncated", "cannot be read"), ("foreign", "not an hcd-distill checkpoint"),
    ("method", "--method 'ce' run"), ("lr", "--lr 0.05 -> 0.01")])
def test_bad_resume_files_and_changes_are_refused(tmp_path, case, message, capsys, ce_done):
    out = copy_of(ce_done, tmp_path)
    last = out / "last.pt"
    flags = STUDENT + FAST + TINY + ["--method", "ce", "--output", str(out), "--resume", str(last)]
    if case == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif case == "foreign":
        torch.save({"fc.weight": torch.zeros(2, 2)}, last)
    elif case == "method":
        flags = STUDENT + TEACHER + FAST + TINY + ["--method", "kd", "--allow-random-teacher", "--output", str(out),
                                                  "--resume", "auto"]
    else:
        flags += ["--lr", "0.01"]
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert message in err and "--resume" in err and "Traceback" not in err
    if case == "lr":
        assert main(flags + ["--allow-changed-args"]) == 0
        assert "resuming with changed flags: --lr 0.05 -> 0.01" in capsys.readouterr().err


# ------------------------------------------------------------------------------- 6: teacher inputs
def test_teacher_gets_its_own_normalisation_in_the_trainer(tmp_path, monkeypatch):
    """The ViT teacher (timm: mean = std = 0.5) of a resnet student (ImageNet statistics) sees its own
    statistics: its logits in the run equal the model's on digits normalised with 0.5/0.5."""
    from hcd_fast.distill.data.datasets import DataConfig, build_digits
    from hcd_fast.distill.engine import loop
    seen = {}
    fit = loop.Trainer.fit

    def spy(self, state):
        seen["tap"] = self.parts.task.teacher
        seen["x"] = self.parts.data.train.tensors[0][:4]
        return fit(self, state)
    monkeypatch.setattr(loop.Trainer, "fit", spy)
    run(hcd_args(tmp_path / "o", *TINY, "--allow-random-teacher"))
    tap = seen["tap"]
    assert tap.renormalize
    x_teacher = build_digits(16, cfg=DataConfig.of_model("vit_tiny_patch16_224")).train.tensors[0][:4]
    with torch.no_grad():
        torch.testing.assert_close(tap(seen["x"])[1], tap.model(x_teacher), rtol=1e-4, atol=1e-4)


def test_pretrained_from_a_local_file(tmp_path):
    """--student-pretrained FILE goes through timm's pretrained_cfg_overlay: the body is the file's; a head
    of another class count is re-initialised. --teacher-pretrained of the wrong class count is refused."""
    from hcd_fast.distill.models import create_model
    kwargs = {"channels": [8, 16, 32, 64], "stem_width": 8}
    src = timm.create_model("resnet10t", num_classes=7, **kwargs)
    torch.save(src.state_dict(), tmp_path / "r.pth")
    m = create_model("--student", "resnet10t", 10, kwargs, 16, pretrained=str(tmp_path / "r.pth"))
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=0, msg=k)
    same = create_model("--student", "resnet10t", 7, kwargs, 16, pretrained=str(tmp_path / "r.pth"))
    torch.testing.assert_close(same.fc.weight, src.fc.weight)
    with pytest.raises(UserError, match="--teacher-pretrained.*7 classes, the dataset has 10"):
        run(parse_args(STUDENT + ["--teacher", "resnet10t", "--teacher-kwargs", json.dumps(kwargs),
                                  "--teacher-pretrained", str(tmp_path / "r.pth")] + FAST + TINY
                       + ["--output", str(tmp_path / "o")]))
    with pytest.raises(UserError, match="--teacher-pretrained.*1000 classes"):  # the hub's: refused offline too
        run(parse_args(STUDENT + TEACHER + ["--teacher-pretrained"] + FAST + ["--output", str(tmp_path / "o")]))


def test_imagefolder_evaluates_with_the_models_crop_pct(tmp_path):
    data = make_folder(tmp_path / "data")
    s = run(folder_args(data, tmp_path / "o", *TINY, "--batch-size", "4"))
    assert s["data_config"]["crop_pct"] == 0.875 and s["data_config"]["mean"] == [0.485, 0.456, 0.406]
    s = run(folder_args(data, tmp_path / "p", *TINY, "--batch-size", "4", "--crop-pct", "1.0"))
    assert s["data_config"]["crop_pct"] == 1.0
    from hcd_fast.distill.data.datasets import DataConfig, build_data
    val = build_data("imagefolder", str(data), 16, cfg=DataConfig(crop_pct=0.875)).val.base.transform
    assert "Resize(size=18" in repr(val) and "CenterCrop(size=(16, 16))" in repr(val)


# --------------------------------------------------------------------------------- 7: clear errors
@pytest.mark.parametrize("extra, flag", [
    (["--opt", "nope"], "--opt"), (["--sched", "nope"], "--sched"), (["--backend", "nope"], "--backend"),
    (["--device", "foo"], "--device"), (["--device", "cuda:7"], "--device"), (["--batch-size", "1"], "--batch-size"),
    (["--val-fraction", "1.5"], "--val-fraction"), (["--crop-pct", "0"], "--crop-pct"),
    (["--overwrite", "--resume", "auto"], "--overwrite"),
])
def test_bad_flags_exit_2_without_traceback(tmp_path, capsys, extra, flag):
    assert main(STUDENT + FAST + ["--method", "ce", "--output", str(tmp_path / "o")] + extra) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_cli_subprocess_bad_flag_has_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "hcd_fast.distill", *STUDENT, "--method", "ce", "--opt", "nope",
                          "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert res.returncode == 2 and "--opt 'nope'" in res.stderr and "Traceback" not in res.stderr


def test_batch_size_one_runs_with_frozen_bn(tmp_path):
    s = run(ce_args(tmp_path / "o", "--batch-size", "1", "--freeze-bn"))
    assert s["global_step"] == 2


def test_val_fraction_zero_reports_no_accuracy(tmp_path, capsys):
    s = run(ce_args(tmp_path / "o", "--val-fraction", "0"))
    assert s["best_top1"] is None and s["final_top1"] is None and not (tmp_path / "o" / "best.pt").exists()
    assert "n/a (no validation data)" in capsys.readouterr().out


# ------------------------------------------------------------------------ 8: workers and exactness
def test_workers_do_not_change_the_data_and_resume_is_exact(tmp_path):
    """Augmented ImageFolder data: --workers 0 and 2 give the same weights, and a run killed mid-epoch and
    resumed with 2 workers equals both (each image's augmentation is seeded by (seed, epoch, index))."""
    data = make_folder(tmp_path / "data", per_class=8)
    common = ["--epochs", "1", "--batch-size", "4", "--ckpt-interval", "2", "--seed", "1", "--reprob", "0.5"]
    run(folder_args(data, tmp_path / "w0", *common))
    # Killed and resumed with 2 workers: equal weights prove both (a 2-worker run's data are the 0-worker run's).
    run(folder_args(data, tmp_path / "k", *common, "--workers", "2", "--stop-after-steps", "3"))
    run(folder_args(data, tmp_path / "k", *common, "--workers", "2", "--resume", "auto"))
    assert_same_weights(weights(tmp_path / "w0" / "last.pt"), weights(tmp_path / "k" / "last.pt"))


def test_teacher_checkpoint_of_another_input_size_names_the_flag(tmp_path):
    t = timm.create_model("vit_tiny_patch16_224", num_classes=10, **{**json.loads(VIT), "img_size": 32})
    torch.save(t.state_dict(), tmp_path / "t32.pt")
    with pytest.raises(UserError, match="pos_embed.*another input size: set --img-size"):
        run(hcd_args(tmp_path / "o", *TINY, "--teacher-checkpoint", str(tmp_path / "t32.pt")))
