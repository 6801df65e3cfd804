"""DDP through the real trainer: two gloo processes on CPU equal one process on the same global batch.

What this proves: with per-sample-independent losses, hcd-distill's DDP path (Distiller wrapped, teacher
not; DistributedSampler sharding of the global batch; gradient averaging; metrics summed over ranks; rank 0
writing) gives the same weights, optimizer state and validation metrics as one process. The BatchNorm layers
(student and HCD projectors) run with --freeze-bn here: SyncBatchNorm does not run on CPU, and with batch
statistics each rank would normalise by its own half-batch, which no DDP setup makes equal to one process.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from hcd_fast.distill.checkpoint import safe_load
from hcd_fast.distill.cli import parse_args
from hcd_fast.distill.engine.run import run

ARGS = ["--student", "resnet10t", "--student-kwargs", '{"channels": [8, 16, 32, 64], "stem_width": 8}',
        "--teacher", "vit_tiny_patch16_224", "--teacher-kwargs",
        '{"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}',
        "--allow-random-teacher", "--method", "hcd", "--indices", "3", "--freeze-bn", "--img-size", "16",
        "--batch-size", "16", "--epochs", "1", "--max-steps-per-epoch", "2", "--warmup-epochs", "0",
        "--no-progress", "--no-plots", "--threads", "1", "--seed", "5", "--backend", "reference"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    run(parse_args(ARGS + ["--output", out]))


def test_two_gloo_processes_equal_one(tmp_path):
    single = run(parse_args(ARGS + ["--output", str(tmp_path / "single")]))
    mp.start_processes(worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True,
                       start_method="spawn")
    a = safe_load(str(tmp_path / "single" / "last.pt"), "test")
    b = safe_load(str(tmp_path / "ddp" / "last.pt"), "test")
    assert single["global_step"] == b["global_step"] == 2
    assert len(b["rng"]) == 2  # every rank's RNG state is kept for an exact resume
    changed = 0
    for k, v in a["distiller"].items():
        torch.testing.assert_close(b["distiller"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["momentum_buffer"], sa["momentum_buffer"], rtol=1e-5, atol=1e-6)
        changed += int(sa["momentum_buffer"].abs().sum() > 0)
    assert changed > 10  # gradients reached student and heads
    ra, rb = a["history"][0], b["history"][0]
    assert rb["val_top1"] == ra["val_top1"] and rb["val_top5"] == ra["val_top5"]
    for key in ("train_loss", "train_ce", "train_sub_kl", "train_ortho", "val_loss"):
        assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
