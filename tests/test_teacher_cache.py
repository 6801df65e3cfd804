"""Teacher feature cache (hcd_fast.distill.teacher.cache, teacher.build) and teacher speed switches (teacher.speed).

The replayed view is checked against timm's own RandomResizedCrop given the stored window, the stored f_t
against a fresh teacher forward on that view, the recomputed logits against the teacher's forward_head;
a cached run against an online run; every refusal exits 2 with a message naming what differs. The test
teacher (a ViT: timm mean = std = 0.5) and student (ImageNet statistics) normalise differently, so the
cache's f_t (the teacher on views normalised with its own statistics) is checked against the online
teacher, which converts the student's input.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

from benchmarks.pipeline import synthetic_imagefolder
from hcd_fast.distill.cli import main, parse_args
from hcd_fast.distill.data.datasets import BadSample, DataConfig, build_data, collate_skip_bad
from hcd_fast.distill.teacher.tap import TeacherTap, probe_teacher
from hcd_fast.distill.teacher.cache import (RATIO, SCALE, CachedViewDataset, RawSource, TeacherCache,
                                            open_for_training, replay_choice, sample_view)
from hcd_fast.distill.teacher.speed import (TeacherSpeed, apply_teacher_speed, is_cnn,
                                            resolve_teacher_speed)
from hcd_fast.distill.engine.state import seed_everything

TKW = '{"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}'
TEACHER = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs", TKW]
STUDENT = ["--student", "resnet10t", "--student-kwargs", '{"channels": [8, 16, 32, 64], "stem_width": 8}']
COMMON = ["--img-size", "16", "--threads", "2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return synthetic_imagefolder(str(tmp_path_factory.mktemp("data")), classes=2, per_class=3,
                                 sizes=((40, 30), (30, 44), (36, 36)))


def _cache(tmp_path_factory, folder, dtype, views=3):
    out = str(tmp_path_factory.mktemp(f"cache_{dtype}") / "c")
    rc = main(["cache-teacher", *TEACHER, *COMMON, "--allow-random-teacher", "--dataset", "imagefolder",
               "--data-dir", folder, "--views", str(views), "--cache-dtype", dtype, "--output", out,
               "--workers", "0", "--batch-size", "4", "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def cache32(tmp_path_factory, folder):
    return _cache(tmp_path_factory, folder, "fp32")


@pytest.fixture(scope="module")
def cache16(tmp_path_factory, folder):
    return _cache(tmp_path_factory, folder, "fp16")


STUDENT_CFG = DataConfig.of_model("resnet10t")
TEACHER_CFG = DataConfig.of_model("vit_tiny_patch16_224")


def test_student_and_teacher_normalise_differently():
    assert STUDENT_CFG.stats() != TEACHER_CFG.stats()  # else the normalisation tests below prove nothing


def _teacher(num_classes, seed=0, teacher_stats=TEACHER_CFG.stats()):
    """The run's teacher as the trainer builds it: seeded random weights, the student's input converted to
    the teacher's statistics."""
    import timm
    seed_everything(seed)  # as cache-teacher and the trainer build a random teacher
    tap = TeacherTap(timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **json.loads(TKW)),
                     STUDENT_CFG.stats(), teacher_stats)
    dim, _ = probe_teacher(tap, (3, 16, 16))
    return tap, dim


def _replay(folder, cache, *extra, teacher_stats=TEACHER_CFG.stats()):
    args = parse_args(STUDENT + TEACHER + COMMON + ["--allow-random-teacher", "--dataset", "imagefolder",
                                                     "--data-dir", folder, "--teacher-cache", cache, *extra])
    data = build_data("imagefolder", folder, 16, cfg=STUDENT_CFG)
    tap, dim = _teacher(data.num_classes, teacher_stats=teacher_stats)
    ds = open_for_training(args.teacher_cache, data.train, tap, dim, STUDENT_CFG, seed=args.seed, dataset=args.dataset,
                           img_size=args.img_size, no_aug=args.no_aug, digits_aug=args.digits_aug,
                           val_fraction=args.val_fraction, teacher_name=args.teacher,
                           teacher_kwargs=args.teacher_kwargs)
    return ds, tap, data


def test_sample_view_is_a_random_resized_crop():
    rng = np.random.default_rng(0)
    for height, width in ((30, 40), (44, 30), (375, 500), (3, 200)):
        for _ in range(50):
            i, j, h, w, flip = sample_view(rng, height, width)
            assert 0 <= i and 0 <= j and 0 < h and 0 < w and i + h <= height and j + w <= width
            assert flip in (0, 1)
            if (h, w) != (height, width) and h * w >= 20 * 20:  # a sampled window, not the fallback
                assert SCALE[0] * 0.9 <= h * w / (height * width) <= SCALE[1]
                assert RATIO[0] * 0.9 <= w / h <= RATIO[1] * 1.1
    a = [sample_view(np.random.default_rng([0, 5, k]), 30, 40) for k in range(8)]
    b = [sample_view(np.random.default_rng([0, 5, k]), 30, 40) for k in range(8)]
    assert a == b and len(set(a)) > 1


def test_replay_choice_deterministic_and_varied():
    picks = [[replay_choice(0, e, n, 4) for n in range(32)] for e in range(3)]
    assert picks == [[replay_choice(0, e, n, 4) for n in range(32)] for e in range(3)]
    assert picks[0] != picks[1] and set(sum(picks, [])) == {0, 1, 2, 3}
    assert replay_choice(0, 7, 3, 1) == 0


def test_replayed_view_and_logits_equal_a_fresh_teacher_forward(folder, cache32):
    from timm.data.transforms import RandomResizedCropAndInterpolation
    import torchvision.transforms.functional as TF

    ds, tap, data = _replay(folder, cache32)
    cache = TeacherCache(cache32)
    assert cache.meta["num_views"] == 3 and cache.meta["dtype"] == "fp32"
    assert cache.meta["teacher_input"] == {"mean": list(TEACHER_CFG.mean), "std": list(TEACHER_CFG.std)}
    timm_rrc = RandomResizedCropAndInterpolation(16, interpolation="bicubic")
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for n in range(len(ds)):
            x, y, f = ds[n]
            k = replay_choice(0, epoch, n, 3)
            i, j, h, w, flip = (int(v) for v in cache.views[n, k])
            seen.add((n, k))
            # The student's input: timm's online crop with the stored window, then the stored flip.
            base = data.train.base  # the ImageFolder inside hcd-distill's SampleDataset
            image, label = base.loader(base.samples[n][0]), base.samples[n][1]
            timm_rrc.get_params = lambda img, scale, ratio: (i, j, h, w)
            ref = timm_rrc(image)
            ref = TF.hflip(ref) if flip else ref
            ref = TF.normalize(TF.to_tensor(ref), STUDENT_CFG.mean, STUDENT_CFG.std)  # the student's stats
            assert y == label and torch.equal(x, ref)
            # The stored f_t (the teacher on the view normalised with its own statistics) is the online
            # teacher's feature of the student's input (converted to the teacher's statistics); z_t =
            # classifier(f_t).
            feat, logits = tap(x[None])
            torch.testing.assert_close(f[None], feat, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(tap.logits_from_feat(f[None]), logits, rtol=1e-4, atol=1e-5)
    assert len({k for _, k in seen}) == 3  # every view is replayed somewhere


def test_teacher_normalisation_is_part_of_the_identity(folder, cache32):
    """A run whose teacher expects other statistics (e.g. its checkpoint's) is refused: its online teacher
    would not see the input the cached f_t came from."""
    from hcd_fast.distill.errors import UserError
    with pytest.raises(UserError, match="teacher_input"):
        _replay(folder, cache32, teacher_stats=STUDENT_CFG.stats())


def test_unreadable_file_is_a_bad_sample(tmp_path, folder, cache32):
    """Replay keeps SampleDataset's semantics: an unreadable image is a BadSample, dropped by the collate,
    which returns the cached f_t of the readable ones."""
    import shutil
    copy = str(tmp_path / "data")
    shutil.copytree(folder, copy)
    data = build_data("imagefolder", copy, 16, cfg=STUDENT_CFG)
    bad_path = data.train.base.samples[-1][0]
    with open(bad_path, "wb") as f:
        f.write(b"not an image")
    ds = CachedViewDataset(RawSource(data.train), TeacherCache(cache32), 0, STUDENT_CFG.mean, STUDENT_CFG.std)
    n = len(ds) - 1
    bad = ds[n]
    assert isinstance(bad, BadSample) and bad.path == bad_path
    x, y, skipped, feat = collate_skip_bad([ds[0], bad, ds[1]])
    assert x.shape == (2, 3, 16, 16) and y.shape == (2,) and skipped == [bad]
    assert torch.equal(feat[0], ds[0][2]) and torch.equal(feat[1], ds[1][2])
    assert collate_skip_bad([bad]) == (None, None, [bad])


def test_fp16_store_close_to_fp32(cache32, cache16):
    a, b = TeacherCache(cache32), TeacherCache(cache16)
    assert b.feats.dtype == np.float16 and np.array_equal(a.views, b.views)
    np.testing.assert_allclose(b.feats.astype(np.float32), a.feats, rtol=2e-3, atol=2e-3)


def _train(tmp_path, name, *extra):
    out = tmp_path / name
    rc = main(STUDENT + TEACHER + COMMON + ["--allow-random-teacher", "--batch-size", "32", "--epochs", "2",
                                            "--max-steps-per-epoch", "3", "--no-progress", "--no-plots",
                                            "--output", str(out), *extra])
    assert rc == 0
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_cached_run_equals_online_run_without_augmentation(tmp_path):
    """digits (never augmented), fp32 storage: the same losses and accuracies as the online teacher."""
    cache = str(tmp_path / "digits_cache")
    assert main(["cache-teacher", *TEACHER, *COMMON, "--allow-random-teacher", "--cache-dtype", "fp32",
                 "--views", "4", "--output", cache, "--no-progress"]) == 0
    assert TeacherCache(cache).meta["num_views"] == 1  # no augmentation: one view
    online = _train(tmp_path, "online")
    cached = _train(tmp_path, "cached", "--teacher-cache", cache)
    # Not bitwise: the cache's teacher saw the view normalised with the teacher's own statistics, the online
    # teacher the student-normalised view converted on the device (equal up to fp32 rounding, ~1e-7), and
    # six SGD steps carry that into the metrics (measured: 3.3e-4 relative on train_sub_kl, CI machine).
    assert len(online) == len(cached) == 2
    for a, b in zip(online, cached):
        for key in ("train_loss", "train_sub_kl", "train_ortho", "val_loss", "val_top1"):
            assert math.isclose(a[key], b[key], rel_tol=2e-3, abs_tol=1e-5), (key, a[key], b[key])


@pytest.mark.slow
def test_cached_run_resumes_exactly(tmp_path, folder, cache32):
    extra = ["--dataset", "imagefolder", "--data-dir", folder, "--teacher-cache", cache32, "--workers", "0",
             "--batch-size", "2", "--epochs", "2", "--max-steps-per-epoch", "3"]
    full = _train(tmp_path, "full", *extra)
    out = tmp_path / "killed"
    base = STUDENT + TEACHER + COMMON + ["--allow-random-teacher", "--no-progress", "--no-plots", "--output",
                                         str(out), "--ckpt-interval", "1", *extra]
    assert main(base + ["--stop-after-steps", "4"]) == 0
    assert main(base + ["--resume", "auto"]) == 0
    with open(out / "metrics.jsonl") as f:
        resumed = [json.loads(line) for line in f]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]


@pytest.mark.parametrize("extra, message", [
    (["--aa", "rand-m9-mstd0.5"], "auto-augment"),
    (["--reprob", "0.25"], "random erasing"),
    (["--interpolation", "bilinear"], "transform"),
    (["--seed", "1"], "teacher_weights_sha256"),
    (["--teacher-kwargs", TKW.replace('"depth": 1', '"depth": 2')], "teacher_kwargs"),
])
def test_mismatched_run_is_refused(tmp_path, folder, cache32, capsys, extra, message):
    rc = main(STUDENT + TEACHER + COMMON + ["--allow-random-teacher", "--dataset", "imagefolder", "--data-dir",
                                            folder, "--teacher-cache", cache32, "--batch-size", "2", "--output",
                                            str(tmp_path / "r"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "r")


def test_other_data_and_missing_cache_refused(tmp_path, cache32, capsys):
    rc = main(STUDENT + TEACHER + COMMON + ["--allow-random-teacher", "--teacher-cache", cache32, "--output",
                                            str(tmp_path / "r")])
    assert rc == 2 and "dataset" in capsys.readouterr().err
    rc = main(STUDENT + TEACHER + COMMON + ["--allow-random-teacher", "--teacher-cache", str(tmp_path / "none"),
                                            "--output", str(tmp_path / "r")])
    assert rc == 2 and "no meta.json" in capsys.readouterr().err


def test_cache_teacher_never_overwrites(cache32, capsys):
    before = os.path.getmtime(os.path.join(cache32, "feats.npy"))
    rc = main(["cache-teacher", *TEACHER, *COMMON, "--allow-random-teacher", "--output", cache32])
    assert rc == 2 and "already holds a teacher cache" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(cache32, "feats.npy")) == before


def _cache_rank(rank: int, world: int, port: int, argv: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    assert main(argv) == 0


@pytest.mark.slow
def test_sharded_build_equals_single_process(tmp_path, folder, cache32):
    """cache-teacher under two gloo ranks (as torchrun starts them): 6 images x 3 views in batches of 4 (5
    batches, 3 to rank 0 and 2 to rank 1; images 0-2 and 3-5 for the views) give the single-process cache
    (cache32: the same flags), bit for bit, and meta.json is written once, by rank 0, after both ranks."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sock:  # a free port for the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "sharded")
    argv = ["cache-teacher", *TEACHER, *COMMON, "--allow-random-teacher", "--dataset", "imagefolder",
            "--data-dir", folder, "--views", "3", "--cache-dtype", "fp32", "--output", out, "--workers", "0",
            "--batch-size", "4", "--no-progress"]
    mp.start_processes(_cache_rank, args=(2, port, argv), nprocs=2, join=True, start_method="spawn")
    single, sharded = TeacherCache(cache32), TeacherCache(out)
    assert sorted(os.listdir(out)) == ["feats.npy", "meta.json", "views.npy"]  # no partial files left
    assert sharded.meta["ranks"] == 2 and single.meta["ranks"] == 1
    for key in set(single.meta) - {"created", "seconds", "ranks"}:
        assert sharded.meta[key] == single.meta[key], key
    assert single.views.shape == (6, 3, 5) and np.array_equal(sharded.views, single.views)
    assert len(np.unique(single.views.reshape(-1, 5), axis=0)) > 6  # the views differ (a test that can fail)
    assert np.array_equal(sharded.feats, single.feats) and np.abs(single.feats).sum() > 0


# ------------------------------------------------------------------------------------------ teacher speed
def test_speed_defaults():
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, **json.loads(TKW))
    cnn = timm.create_model("resnet10t", num_classes=10)
    assert not is_cnn(vit) and is_cnn(cnn)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_teacher_speed(cnn, cpu, "off") == TeacherSpeed()
    assert resolve_teacher_speed(cnn, cuda, "bf16") == TeacherSpeed(True, True, False, None)
    assert resolve_teacher_speed(vit, cuda, "bf16") == TeacherSpeed(True, False, False, None)
    assert resolve_teacher_speed(vit, cuda, "fp16").weights_bf16 is False
    assert resolve_teacher_speed(vit, cuda, "bf16", compile_all=True) == TeacherSpeed(True, False, True,
                                                                                       "reduce-overhead")
    assert resolve_teacher_speed(vit, cpu, "off", "on", "on", "on") == TeacherSpeed(True, True, True, None)


@pytest.mark.parametrize("speed, tol", [(TeacherSpeed(weights_bf16=True), 5e-2),
                                        (TeacherSpeed(channels_last=True), 1e-5)])
def test_speed_switches_keep_the_teacher(speed, tol):
    import timm
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, channels=[8, 16, 32, 64], stem_width=8)
    x = torch.randn(3, 3, 32, 32)
    ref_feat, ref_logits = TeacherTap(model)(x)
    tap = apply_teacher_speed(TeacherTap(model), speed)
    feat, logits = tap(x)
    assert feat.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(feat, ref_feat, rtol=tol, atol=tol)
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
    torch.testing.assert_close(tap.logits_from_feat(feat), logits, rtol=tol, atol=tol)


@pytest.mark.slow
def test_compiled_teacher_forward_equals_eager():
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **json.loads(TKW))
    x = torch.randn(2, 3, 16, 16)
    ref = TeacherTap(model)(x)
    tap = apply_teacher_speed(TeacherTap(model), TeacherSpeed(compile=True))
    for a, b in zip(tap(x), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_digits_aug_fresh_views_per_epoch():
    """--digits-aug online: a fresh crop + flip per image and epoch, a pure function of (seed, epoch, index)."""
    from hcd_fast.distill.errors import UserError
    from hcd_fast.distill.teacher.cache import online_views
    data = build_data("digits", None, 16)
    ds = online_views(data.train, STUDENT_CFG, dataset="digits", img_size=16, no_aug=False, seed=0)
    ds.set_epoch(0)
    x0, y0 = ds[3]
    assert x0.shape == (3, 16, 16) and y0 == int(data.train[3][1])
    assert torch.equal(ds[3][0], x0)
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], x0)
    assert online_views(data.train, STUDENT_CFG, dataset="digits", img_size=16, no_aug=True, seed=0) is data.train
    with pytest.raises(UserError, match="only for --dataset digits"):
        online_views(data.train, STUDENT_CFG, dataset="cifar100", img_size=16, no_aug=False, seed=0)
