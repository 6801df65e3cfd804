"""Kill and resume: a run stopped mid-epoch and continued with --resume auto equals an uninterrupted one
(weights, optimizer state, every metric). One uninterrupted and one killed-then-resumed run are shared by
every check here."""
import contextlib
import io

import pytest
import torch

from hcd_fast.distill.checkpoint import safe_load
from hcd_fast.distill.cli import parse_args
from hcd_fast.distill.engine.run import run

STUDENT = ["--student", "resnet10t", "--student-kwargs", '{"channels": [8, 16, 32, 64], "stem_width": 8}']
TEACHER = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs",
           '{"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}']
# hcd with a random teacher, 2 epochs of 5 steps; drop-path makes the RNG state matter.
COMMON = STUDENT + TEACHER + ["--img-size", "16", "--batch-size", "32", "--no-progress", "--no-plots", "--threads",
                              "2", "--method", "hcd", "--allow-random-teacher", "--epochs", "2",
                              "--max-steps-per-epoch", "5", "--drop-path", "0.1", "--seed", "3"]
# The killed run checkpoints every 3 steps (3, 6), by time at every 2nd step of an epoch (2, 4; 7) and at the
# epoch end (5); killed after step 8, it keeps step 7's time-based, mid-epoch checkpoint and loses step 8.
KILLED = ["--ckpt-interval", "3", "--ckpt-minutes", "1e-9", "--log-interval", "2"]


def load(path):
    return safe_load(str(path), "test")  # our own checkpoints load with weights_only=True


def run_quietly(argv):
    """(summary, what the run printed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = run(parse_args(argv))
    return summary, buf.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    capture = {}
    capture["full"], _ = run_quietly(COMMON + ["--output", str(root / "full")])
    capture["killed"], capture["killed_out"] = run_quietly(
        COMMON + KILLED + ["--output", str(root / "part"), "--resume", "auto", "--stop-after-steps", "8"])
    capture["killed_ckpt"] = load(root / "part" / "last.pt")
    capture["resumed"], capture["resumed_out"] = run_quietly(
        COMMON + KILLED + ["--output", str(root / "part"), "--resume", "auto"])
    return root, capture


@pytest.mark.slow
def test_killed_run_keeps_its_last_time_based_checkpoint(runs):
    _, r = runs
    ckpt = r["killed_ckpt"]
    assert r["killed"]["stopped"] and (ckpt["global_step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (7, 1, 2)
    assert ckpt["accum"] is not None  # mid-epoch running sums travel with it


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one(runs):
    root, r = runs
    assert r["resumed"]["global_step"] == r["full"]["global_step"] == 10
    a, b = load(root / "full" / "last.pt"), load(root / "part" / "last.pt")
    assert a["distiller"].keys() == b["distiller"].keys()
    for k, v in a["distiller"].items():
        torch.testing.assert_close(b["distiller"][k], v, rtol=0, atol=0, msg=k)
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(y["momentum_buffer"], x["momentum_buffer"], rtol=0, atol=0)
    assert len(a["history"]) == len(b["history"]) == 2
    for ra, rb in zip(a["history"], b["history"]):
        for key in ("train_loss", "train_top1", "val_top1", "val_loss", "train_sub_kl", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-6), key


@pytest.mark.slow
def test_resume_auto_says_what_it_does(runs):
    """--resume auto without OUTPUT/last.pt starts from scratch (the killed run's start), with one it resumes."""
    _, r = runs
    assert "--resume auto: no" in r["killed_out"] and "starting from scratch" in r["killed_out"]
    assert "resuming" in r["resumed_out"] and "global step 7" in r["resumed_out"]
