"""hcd-distill end to end on tiny models: early errors, outputs (kill and resume: test_distill_resume.py)."""
import json
import os

import pytest
import torch

from hcd_fast.distill.cli import build_parser, main, parse_args
from hcd_fast.distill.errors import UserError
from hcd_fast.distill.engine.run import run

STUDENT = ["--student", "resnet10t", "--student-kwargs", '{"channels": [8, 16, 32, 64], "stem_width": 8}']
TEACHER = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs",
           '{"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}']
FAST = ["--img-size", "16", "--batch-size", "32", "--no-progress", "--no-plots", "--threads", "2"]


def args_for(out, *extra):
    return parse_args(STUDENT + TEACHER + FAST + ["--output", str(out), *extra])


def test_help_documents_every_flag():
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 8, action.option_strings
    text = parser.format_help()
    for flag in ("--teacher-checkpoint", "--method", "--preset", "--resume", "--ckpt-interval", "--compile"):
        assert flag in text


def test_module_entry_point_help():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "hcd_fast.distill", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "usage: hcd-distill" in res.stdout and "--teacher-checkpoint" in res.stdout


def test_preset_sets_recipe_and_flags_override():
    a = parse_args(["--student", "resnet18", "--preset", "cifar100", "--epochs", "5"])
    assert (a.dataset, a.img_size, a.lr, a.weight_decay, a.min_lr, a.warmup_epochs, a.batch_size, a.momentum) == \
        ("cifar100", 224, 0.05, 2e-3, 1e-3, 3, 128, 0.9)
    assert a.epochs == 5
    b = parse_args(["--student", "resnet18", "--preset", "imagenet"])
    assert b.dataset == "imagefolder" and b.ofa_eps == 1.5 and b.epochs == 300


@pytest.mark.parametrize("extra, message", [
    (["--student", "resnet_does_not_exist"], "not a timm model"),
    (["--teacher", "vit_nope_patch4"], "not a timm model"),
    (["--teacher-checkpoint", "/nonexistent/t.pt"], "no such file"),
    ([], "needs a trained teacher"),
    (["--allow-random-teacher", "--dataset", "cifar100"], "needs --data-dir"),
    (["--allow-random-teacher", "--dataset", "cifar100", "--data-dir", "/tmp"], "cifar-100-python"),
    (["--allow-random-teacher", "--dataset", "imagefolder", "--data-dir", "/nonexistent"], "ImageNet layout"),
    (["--allow-random-teacher", "--num-classes", "100"], "has 10 classes"),
    (["--allow-random-teacher", "--batch-size", "5000"], "larger than the training set"),
    (["--allow-random-teacher", "--resume", "/nonexistent/last.pt"], "no such file"),
    (["--allow-random-teacher", "--teacher-kwargs", '{"no_such_kwarg": 1}'], "rejected the kwargs"),
    (["--allow-random-teacher", "--indices", "0,9"], "--indices"),
    (["--allow-random-teacher", "--sync-bn", "--device", "cpu"], "CUDA only"),
])
def test_bad_input_fails_before_training(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        run(parse_args(STUDENT + TEACHER + FAST + ["--output", str(tmp_path / "o")] + extra))
    assert not os.path.exists(tmp_path / "o")


def test_bad_json_kwargs_rejected_by_the_parser(capsys):
    for text in ("[1]", "{x"):
        with pytest.raises(SystemExit):
            parse_args(STUDENT[:2] + ["--student-kwargs", text])
        assert "--student-kwargs" in capsys.readouterr().err


def test_teacher_checkpoint_class_mismatch(tmp_path):
    import timm
    t = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=16, patch_size=4, depth=1,
                          embed_dim=16, num_heads=2)
    path = tmp_path / "teacher7.pt"
    torch.save({"state_dict": t.state_dict()}, path)
    with pytest.raises(UserError, match="trained for 7 classes.*dataset has 10"):
        run(args_for(tmp_path / "o", "--teacher-checkpoint", str(path)))


def test_cli_main_reports_errors(capsys):
    assert main(STUDENT + ["--teacher", "vit_nope", "--method", "kd"]) == 2
    assert "not a timm model" in capsys.readouterr().err


def load(path):
    from hcd_fast.distill.checkpoint import safe_load
    return safe_load(str(path), "test")  # our own checkpoints load with weights_only=True


def test_outputs_and_teacher_from_own_checkpoint(tmp_path):
    """Train a tiny ViT with --method ce, then use its best.pt as the teacher of an hcd run."""
    teacher_out = tmp_path / "teacher"
    s = run(parse_args(["--student", "vit_tiny_patch16_224", "--student-kwargs",
                        '{"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}',
                        "--method", "ce", "--epochs", "1", "--max-steps-per-epoch", "3", "--indices", "1",
                        "--output", str(teacher_out)] + FAST))
    assert s["epochs"] == 1 and s["global_step"] == 3
    # The checkpoint really becomes the teacher: its accuracy on the validation split is the one recorded.
    import timm
    from hcd_fast.distill.checkpoint import load_weights
    from hcd_fast.distill.data.datasets import DataConfig, build_digits
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, depth=1,
                                embed_dim=16, num_heads=2)
    load_weights(teacher, str(teacher_out / "best.pt"), 10, "--teacher-checkpoint")
    xv, yv = build_digits(16, cfg=DataConfig.of_model("vit_tiny_patch16_224")).val.tensors
    with torch.no_grad():
        acc = 100.0 * (teacher.eval()(xv).argmax(-1) == yv).double().mean().item()
    assert acc == pytest.approx(s["best_top1"], abs=1e-9)
    out = tmp_path / "hcd"
    s = run(args_for(out, "--teacher-checkpoint", str(teacher_out / "best.pt"), "--epochs", "2",
                     "--max-steps-per-epoch", "2", "--backend", "auto"))
    for name in ("last.pt", "best.pt", "metrics.csv", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "train_sub_kl", "train_ortho", "val_top1", "val_top5", "lr"} <= set(rows[0])
    assert (out / "metrics.csv").read_text().count("\n") == 3
    assert 0.0 <= s["best_top1"] <= 100.0 and s["final_top1"] == rows[-1]["val_top1"]
    state = load(out / "last.pt")
    assert {"distiller", "optimizer", "scheduler", "rng", "epoch", "global_step", "args"} <= set(state)
    assert any(k.startswith("criterion.cfms.") for k in state["distiller"])


def test_plots_written(tmp_path):
    run(parse_args(STUDENT + ["--method", "ce", "--img-size", "16", "--batch-size", "32", "--no-progress",
                              "--epochs", "1", "--max-steps-per-epoch", "1", "--output", str(tmp_path)]))
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "accuracy.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["hcd", "ofa"])
def test_bf16_autocast_channels_last(tmp_path, method):
    """The CUDA defaults (bf16 autocast, channels_last, backend auto) exercised on the CPU."""
    import math
    s = run(args_for(tmp_path, "--method", method, "--allow-random-teacher", "--amp", "bf16", "--channels-last", "on",
                     "--epochs", "1", "--max-steps-per-epoch", "2", "--backend", "auto"))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert s["global_step"] == 2 and math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])


def test_every_hcd_option_has_a_flag():
    """Each HCDConfig field is a CLI flag and reaches HCDConfig."""
    import dataclasses

    from hcd_fast import HCDConfig

    text = build_parser().format_help()
    for f in dataclasses.fields(HCDConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    args = parse_args(STUDENT + TEACHER + ["--detach-sub-targets", "--ortho-eps", "1e-6", "--gt-mask", "none",
                                           "--w-ol", "2"])
    cfg = args.loss
    assert (cfg.detach_sub_targets, cfg.ortho_eps, cfg.gt_mask, cfg.w_ol) == (True, 1e-6, "none", 2.0)
