"""hcd-distill --loader dali (hcd_fast.distill.data.dali) on DALI's CPU backend.

The DALI loader is compared with the timm/PIL loader it replaces, sample by sample: the same (seed, epoch,
index) must give the same view. Tolerance, in grey levels of the 0..255 image (|dx| * std * 255): DALI's CPU
decoder is libjpeg-turbo as PIL's is (ROI decoding included), so the decoded pixels agree; what differs is
the resampler (PIL: fixed point, rounded to uint8; DALI: float, rounded to uint8): +-1 level on rounding
boundaries, up to 2 at the window's borders, which ColorJitter's three truncating stages (factors up to
1.4) can grow to 4. So: max <= 2 levels and mean <= 0.25 without jitter, max <= 5 and mean <= 0.5 with it.
A wrong view (another epoch's) is checked to exceed these by far, so the comparison can fail.

Tests skip only when nvidia.dali cannot be imported; the refusal tests that do not need DALI always run.
"""
import os

import numpy as np
import pytest
import torch

from benchmarks.pipeline import synthetic_imagefolder
from hcd_fast.distill.data import dali as DL
from hcd_fast.distill.cli import main, parse_args
from hcd_fast.distill.data.datasets import IMAGENET_STD, DataConfig, build_data
from hcd_fast.distill.data.samplers import ResumableDistributedSampler, ShardSampler

HAVE_DALI = DL.dali_status()[0]
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali is not importable (pip install 'hcd_fast[dali]')")
CPU = torch.device("cpu")
IMG = 24
TKW = '{"img_size": 24, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}'
TEACHER = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs", TKW]
STUDENT = ["--student", "resnet10t", "--student-kwargs", '{"channels": [8, 16, 32, 64], "stem_width": 8}']
COMMON = ["--img-size", str(IMG), "--threads", "2", "--no-progress", "--no-plots"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return synthetic_imagefolder(str(tmp_path_factory.mktemp("dali_data")), classes=2, per_class=7,
                                 sizes=((52, 40), (40, 58), (48, 48), (64, 30)))


def _data(folder, seed=3, no_aug=False, crop_pct=0.875):
    return build_data("imagefolder", folder, IMG, cfg=DataConfig(crop_pct=crop_pct), seed=seed, no_aug=no_aug)


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised images in grey levels of the 0..255 image."""
    return (a - b).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0


def _dali(ds, indices, batch=4, threads=2, drop_last=False):
    loader = DL.DaliLoader(ds, indices, batch, CPU, threads, drop_last=drop_last)
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), batches


def _timm(ds, indices):
    items = [ds[i] for i in indices]
    return torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items])


def _no_jitter(ds):
    tf = ds.base.transform
    tf.transforms = [t for t in tf.transforms if type(t).__name__ != "ColorJitter"]
    return ds


# ------------------------------------------------------------------------------ plan and host params
def test_plan_reads_the_timm_transforms(folder):
    data = _data(folder)
    plan = DL.view_plan(data.train.base.transform)
    assert plan.kind == "window" and plan.size == IMG and plan.interpolation == "bicubic"
    assert plan.rrc.scale == (0.08, 1.0) and plan.flip.p == 0.5 and plan.jitter is not None
    ev = DL.view_plan(data.val.base.transform)
    assert ev.kind == "resize_crop" and ev.size == IMG and ev.resize == int(IMG / 0.875)
    assert ev.mean == pytest.approx(DataConfig().mean) and ev.std == pytest.approx(DataConfig().std)


def test_plan_refuses_what_dali_cannot_apply(folder):
    for extra in (dict(aa="rand-m9-mstd0.5"), dict(reprob=0.25)):
        data = build_data("imagefolder", folder, IMG, seed=0, **extra)
        with pytest.raises(DL.UserError, match="--loader dali"):
            DL.view_plan(data.train.base.transform)


def test_resize_crop_params_follow_torchvision():
    import torchvision.transforms as T
    from PIL import Image
    for w, h in ((52, 40), (40, 58), (48, 48), (101, 37), (37, 100)):
        img = Image.new("RGB", (w, h))
        resized = T.Resize(27)(img)
        (nh, nw), (top, left) = DL.resize_crop_params(27, 24, w, h)
        assert (nw, nh) == resized.size
        # CenterCrop's offsets: the crop of a ramp image shows where it starts
        ramp = Image.fromarray(np.add.outer(np.arange(nh), np.zeros(nw)).astype(np.uint8)).convert("RGB")
        col = Image.fromarray(np.add.outer(np.zeros(nh), np.arange(nw)).astype(np.uint8)).convert("RGB")
        assert np.asarray(T.CenterCrop(24)(ramp))[0, 0, 0] == top
        assert np.asarray(T.CenterCrop(24)(col))[0, 0, 0] == left


def test_jitter_coefficients_follow_the_order():
    rows = DL.jitter_coefficients(torch.tensor([3, 2, 0, 1]), 1.1, 0.9, 1.3)
    np.testing.assert_allclose(rows, [[1.3, 1, 0], [1.1, 0, 0], [0.9, 0, 1]], rtol=1e-6)
    np.testing.assert_allclose(DL.jitter_coefficients(torch.tensor([0, 1, 2, 3]), None, None, None),
                               DL.IDENTITY_JITTER)


# ------------------------------------------------------------------------------ DALI vs the timm loader
@needs_dali
def test_train_view_matches_timm_without_jitter(folder):
    ds = _no_jitter(_data(folder).train)
    ds.set_epoch(2)
    idx = list(range(len(ds)))
    x, y, _ = _dali(ds, idx)
    ref, ref_y = _timm(ds, idx)
    d = _levels(x, ref)
    assert torch.equal(y, ref_y)
    assert d.max() <= 2.0 + 1e-3 and d.mean() <= 0.25, (d.max(), d.mean())
    ds.set_epoch(3)  # another epoch's views are far outside the tolerance: the comparison can fail
    other, _ = _timm(ds, idx)
    assert _levels(x, other).mean() > 10.0


@needs_dali
def test_train_view_matches_timm_with_colour_jitter(folder):
    ds = _data(folder).train
    ds.set_epoch(1)
    idx = list(range(len(ds)))
    x, _, _ = _dali(ds, idx)
    ref, _ = _timm(ds, idx)
    d = _levels(x, ref)
    assert d.max() <= 5.0 + 1e-3 and d.mean() <= 0.5, (d.max(), d.mean())
    assert (d.amax((1, 2, 3)) > 0).any()  # floats did go through two different pipelines


@needs_dali
def test_eval_and_no_aug_transforms_match_timm(folder):
    for no_aug, split in ((False, "val"), (True, "train")):
        ds = getattr(_data(folder, no_aug=no_aug), split)
        idx = list(range(len(ds)))
        x, _, _ = _dali(ds, idx)
        ref, _ = _timm(ds, idx)
        d = _levels(x, ref)
        assert d.max() <= 2.0 + 1e-3 and d.mean() <= 0.25, (split, d.max(), d.mean())


@needs_dali
def test_deterministic_whatever_threads_and_batch(folder):
    ds = _data(folder).train
    ds.set_epoch(4)
    idx = list(range(len(ds)))[::-1]
    a, _, _ = _dali(ds, idx, batch=4, threads=0)  # host inputs in this process
    b, _, _ = _dali(ds, idx, batch=3, threads=2)  # in 2 worker processes
    c, _, _ = _dali(ds, idx, batch=4, threads=1)
    assert torch.equal(a, b) and torch.equal(a, c)
    ds.set_epoch(5)
    assert not torch.equal(a, _dali(ds, idx)[0])  # the views depend on the epoch


# ------------------------------------------------------------------------------ order, sharding, resume
class _Recorder(DL.DaliLoader):
    """A DaliLoader that records the host parameters it feeds (per sample, in the order fed)."""

    def host_batches(self):
        self.params = []
        for batch in super().host_batches():
            self.params += [it[1] for it in batch]
            yield batch


@needs_dali
def test_sharding_covers_the_epoch_once_in_the_samplers_order(folder):
    ds = _data(folder).train
    ds.set_epoch(1)
    full, _, _ = _dali(ds, list(range(len(ds))), batch=1)  # row n: the view of index n
    world, seen = 3, []
    for rank in range(world):
        sampler = ResumableDistributedSampler(ds, world, rank, seed=3, drop_last=True)
        sampler.set_epoch(1)
        order = list(iter(sampler))
        x = torch.cat([b[0] for b in DL.DaliLoader(ds, sampler, 2, CPU, 2, drop_last=True)])
        n = len(order) // 2 * 2
        assert len(x) == n and torch.equal(x, full[order[:n]])  # the sampler's order, batches of 2, drop_last
        seen += order[:n]
        sampler.set_start(2)  # resume after the first batch: the rest, identical
        rest = torch.cat([b[0] for b in DL.DaliLoader(ds, sampler, 2, CPU, 2, drop_last=True)])
        assert torch.equal(rest, x[2:])
    assert len(seen) == len(set(seen)) and len(seen) >= len(ds) - world * 2  # each at most once, drop_last
    val = _data(folder).val
    full_val, _, _ = _dali(val, list(range(len(val))))
    for world in (1, 2):  # validation: every image exactly once over the ranks, no padding
        parts = [list(DL.DaliLoader(val, ShardSampler(val, world, r), 64, CPU, 1)) for r in range(world)]
        for r, batches in enumerate(parts):
            assert torch.equal(torch.cat([b[0] for b in batches]), full_val[r::world])


@needs_dali
def test_unreadable_file_is_skipped_and_reported(folder, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    victim = sorted((root / "train" / "c001").iterdir())[2]
    victim.write_bytes(b"this is not a JPEG")
    ds = _data(str(root)).train
    path_index = [p for p, _ in ds.base.samples].index(str(victim))
    _, y, batches = _dali(ds, list(range(len(ds))), batch=4)
    assert len(y) == len(ds) - 1
    bad = [b for batch in batches for b in batch[2]]
    assert [b.path for b in bad] == [str(victim)] and path_index >= 0


# ------------------------------------------------------------------------------ teacher cache replay
@pytest.fixture(scope="module")
def cache(tmp_path_factory, folder):
    out = str(tmp_path_factory.mktemp("dali_cache") / "c")
    rc = main(["cache-teacher", *TEACHER, "--img-size", str(IMG), "--threads", "2", "--allow-random-teacher",
               "--dataset", "imagefolder", "--data-dir", folder, "--views", "3", "--cache-dtype", "fp32",
               "--output", out, "--workers", "0", "--batch-size", "4", "--no-progress"])
    assert rc == 0
    return out


@needs_dali
def test_cache_replay_feeds_the_stored_windows(folder, cache):
    from hcd_fast.distill.teacher.cache import CachedViewDataset, RawSource, TeacherCache, replay_choice
    data = _data(folder, seed=5)
    ds = CachedViewDataset(RawSource(data.train), TeacherCache(cache), 5, *DataConfig().stats())
    ds.set_epoch(2)
    idx = list(range(len(ds)))
    loader = _Recorder(ds, idx, 4, CPU, 2)
    batches = list(loader)
    x, y, feats = (torch.cat([b[i] for b in batches]) for i in (0, 1, 3))
    views = ds.cache.views
    ks = [replay_choice(5, 2, n, 3) for n in idx]
    assert len(set(ks)) > 1  # several views are replayed, so the choice is exercised
    fed = loader.params  # (anchor, shape, flip) per sample
    for n, k, (anchor, shape, flip) in zip(idx, ks, fed):
        assert list(anchor) + list(shape) + [int(flip)] == [int(v) for v in views[n, k]]
    np.testing.assert_array_equal(feats.numpy(), np.stack([ds.cache.feats[n, k] for n, k in zip(idx, ks)]))
    items = [ds[n] for n in idx]  # the timm/PIL replay of the same views
    ref = torch.stack([it[0] for it in items])
    assert torch.equal(y, torch.tensor([it[1] for it in items]))
    d = _levels(x, ref)
    assert d.max() <= 2.0 + 1e-3 and d.mean() <= 0.25, (d.max(), d.mean())


# ------------------------------------------------------------------------------ hcd-distill end to end
def _run(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


@needs_dali
def test_hcd_distill_trains_with_the_dali_loader(folder, cache, tmp_path, capsys):
    import json
    base = STUDENT + TEACHER + COMMON + ["--allow-random-teacher", "--dataset", "imagefolder", "--data-dir", folder,
                                         "--loader", "dali", "--epochs", "1", "--batch-size", "4", "--workers", "2"]
    for name, extra in (("online", []), ("cached", ["--teacher-cache", cache])):
        rc, err = _run(base + ["--output", str(tmp_path / name), *extra], capsys)
        assert rc == 0, err
        with open(tmp_path / name / "summary.json") as f:
            summary = json.load(f)
        assert summary["epochs"] == 1 and summary["global_step"] == 14 // 4 and summary["final_top1"] is not None


def _refused(args, capsys, *words):
    rc, err = _run(args, capsys)
    assert rc == 2, err
    assert "--loader" in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_refused_without_dali(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(DL, "dali_status", lambda: (False, "nvidia.dali cannot be imported (ImportError: test)"))
    _refused(STUDENT + TEACHER + COMMON + ["--allow-random-teacher", "--dataset", "imagefolder", "--data-dir",
                                           folder, "--loader", "dali", "--output", str(tmp_path / "o")],
             capsys, "hcd_fast[dali]")
    assert not os.path.exists(tmp_path / "o")


def test_refused_options_dali_cannot_honour(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(DL, "dali_status", lambda: (True, "test"))  # the checks come before any DALI use
    base = STUDENT + TEACHER + COMMON + ["--allow-random-teacher", "--loader", "dali"]
    img = ["--dataset", "imagefolder", "--data-dir", folder]
    _refused(base + ["--dataset", "digits", "--output", str(tmp_path / "a")], capsys, "imagefolder")
    _refused(base + img + ["--aa", "rand-m9-mstd0.5", "--output", str(tmp_path / "b")], capsys, "--aa")
    _refused(base + img + ["--reprob", "0.25", "--output", str(tmp_path / "c")], capsys, "--reprob")


def test_refused_for_files_that_are_not_jpegs(folder, tmp_path, capsys, monkeypatch):
    import shutil
    from PIL import Image
    monkeypatch.setattr(DL, "dali_status", lambda: (True, "test"))
    root = tmp_path / "png"
    shutil.copytree(folder, root)
    Image.new("RGB", (40, 40)).save(root / "train" / "c000" / "extra.png")
    _refused(STUDENT + TEACHER + COMMON + ["--allow-random-teacher", "--loader", "dali", "--dataset", "imagefolder",
                                           "--data-dir", str(root), "--output", str(tmp_path / "o")],
             capsys, "extra.png")
    assert parse_args(STUDENT + ["--dataset", "imagefolder"]).loader == "timm"  # the default


# ------------------------------------------------------------------------------ CUDA (nvJPEG, "mixed")
@needs_dali
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pipeline_matches_timm_within_nvjpeg_tolerance(folder, cache):
    """The "mixed" decoder (nvJPEG / the hardware decoder) and GPU operators against the timm loader.
    nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's, so the bounds are wider than the CPU
    backend's: mean <= 2 grey levels, max <= 32 (not yet confirmed on a GPU: the measured values are
    printed). Outputs are on the GPU and deterministic."""
    from hcd_fast.distill.teacher.cache import CachedViewDataset, RawSource, TeacherCache
    gpu = torch.device("cuda", torch.cuda.current_device())
    data = _data(folder)
    cached = CachedViewDataset(RawSource(data.train), TeacherCache(cache), 5, *DataConfig().stats())
    for name, ds in (("train", data.train), ("val", data.val), ("cache", cached)):
        ds.set_epoch(1) if hasattr(ds, "set_epoch") else None
        idx = list(range(len(ds)))
        out = [b for b in DL.DaliLoader(ds, idx, 4, gpu, 2)]
        x = torch.cat([b[0] for b in out])
        assert x.device == gpu
        again = torch.cat([b[0] for b in DL.DaliLoader(ds, idx, 3, gpu, 0)])
        assert torch.equal(x, again)
        ref = torch.stack([ds[i][0] for i in idx])
        d = _levels(x.cpu(), ref)
        print(f"cuda {name}: max {d.max().item():.2f} mean {d.mean().item():.3f} grey levels")
        assert d.max() <= 32.0 and d.mean() <= 2.0, (name, d.max(), d.mean())
