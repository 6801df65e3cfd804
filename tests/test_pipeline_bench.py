"""Smoke test of the whole-pipeline benchmark (``python -m benchmarks pipeline --profile quick``): the JSON,
markdown and plot are written, every component is measured or says why not, the ratios and the time
breakdown agree with the rows, and the synthetic ImageFolder is deterministic. Timings are never asserted.
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from benchmarks.pipeline import synthetic_imagefolder
from hcd_fast.distill.data.dali import dali_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENTS = ["cache/build", "loader/timm", "loader/cache", "loader/dali", "loader/dali_cache", "teacher/published",
              "teacher/ours", "teacher/bf16_weights", "teacher/channels_last", "teacher/compiled", "step/ce",
              "step/kd", "step/hcd_published", "step/hcd_ours", "step/hcd_cache", "e2e/published", "e2e/ours",
              "e2e/cache", "e2e/ours_dali", "e2e/cache_dali"]
DALI_ROWS = ("loader/dali", "loader/dali_cache", "e2e/ours_dali", "e2e/cache_dali")
HAVE_DALI = dali_status()[0]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out, data = tmp_path_factory.mktemp("pipe"), tmp_path_factory.mktemp("pipe_data")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "pipeline", "--profile", "quick", "--device", "cpu",
                           "--out", str(out), "--data-root", str(data)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| component | img/s |" in proc.stdout
    with open(out / "pipeline.json") as f:
        return out, data, json.load(f)


@pytest.mark.slow
def test_outputs_and_rows(quick):
    out, _, res = quick
    assert res["complete"] is True and res["suite"] == "pipeline" and res["profile"] == "quick"
    assert os.path.isfile(out / "pipeline.md") and os.path.getsize(out / "pipeline.png") > 1000
    assert [r["component"] for r in res["rows"]] == COMPONENTS
    by = {r["component"]: r for r in res["rows"]}
    for name, r in by.items():
        if name in ("teacher/channels_last", "teacher/compiled"):  # a ViT teacher; quick skips compile
            assert r["status"] == "skipped" and r["reason"]
        elif name in DALI_ROWS and not HAVE_DALI:
            assert r["status"] == "skipped" and r["reason"] == "DALI not installed"
        else:
            assert r["status"] == "ok", (name, r["reason"])
            assert r["images_per_s"] > 0
    for name in ("teacher/published", "step/hcd_published", "step/hcd_cache"):
        assert by[name]["median_ms"] > 0 and by[name]["first_call_s"] > 0


@pytest.mark.slow
def test_ratios_and_breakdown_follow_the_rows(quick):
    _, _, res = quick
    by = {r["component"]: r for r in res["rows"] if r["status"] == "ok"}
    ips = {k: r["images_per_s"] for k, r in by.items()}
    rt = res["ratios"]
    assert rt["hcd_ours_vs_published"] == pytest.approx(ips["step/hcd_ours"] / ips["step/hcd_published"])
    assert rt["hcd_cache_vs_ours"] == pytest.approx(ips["step/hcd_cache"] / ips["step/hcd_ours"])
    assert rt["e2e_cache_vs_published"] == pytest.approx(ips["e2e/cache"] / ips["e2e/published"])
    # per-round ratios: the median over the interleaved rounds of the ratio within each round
    rounds = by["step/hcd_ours"]["round_ms"], by["step/hcd_published"]["round_ms"]
    assert len(rounds[0]) == len(rounds[1]) == by["step/hcd_ours"]["reps"]
    per_round = sorted(p / o for o, p in zip(*rounds))
    assert rt["hcd_ours_vs_published_per_round"] == pytest.approx(
        (per_round[(len(per_round) - 1) // 2] + per_round[len(per_round) // 2]) / 2)
    bd = {b["pipeline"]: b for b in res["breakdown"]}
    assert set(bd) == {"published", "ours", "ours + cache"} | ({"ours, DALI", "ours + cache, DALI"} if HAVE_DALI else set())
    if HAVE_DALI:
        assert rt["e2e_ours_dali_vs_ours"] == pytest.approx(ips["e2e/ours_dali"] / ips["e2e/ours"])
        assert bd["ours, DALI"]["loader_ms_per_img"] == pytest.approx(1e3 / ips["loader/dali"])
        assert bd["ours + cache, DALI"]["e2e_ms_per_img"] == pytest.approx(1e3 / ips["e2e/cache_dali"])
    assert bd["ours + cache"]["teacher_ms_per_img"] == 0.0
    assert bd["published"]["teacher_ms_per_img"] == pytest.approx(1e3 / ips["teacher/published"])
    assert bd["ours"]["step_ms_per_img"] == pytest.approx(1e3 / ips["step/hcd_ours"])
    for b in bd.values():
        assert b["teacher_ms_per_img"] + b["student_head_ms_per_img"] >= b["step_ms_per_img"] - 1e-9


@pytest.mark.slow
def test_synthetic_imagefolder_is_deterministic_and_reused(quick, tmp_path):
    _, data, res = quick
    folder = res["data"]["root"]
    assert folder.startswith(str(data)) and os.path.isfile(os.path.join(folder, "DONE"))
    again = synthetic_imagefolder(str(tmp_path), classes=2, per_class=4)

    def digest(root):
        h = hashlib.sha256()
        for dirpath, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                if name.endswith(".jpg"):
                    h.update(os.path.relpath(os.path.join(dirpath, name), root).encode())
                    with open(os.path.join(dirpath, name), "rb") as f:
                        h.update(f.read())
        return h.hexdigest()
    assert digest(folder) == digest(again)
    mtime = os.path.getmtime(os.path.join(again, "DONE"))
    assert synthetic_imagefolder(str(tmp_path), classes=2, per_class=4) == again  # reused, not regenerated
    assert os.path.getmtime(os.path.join(again, "DONE")) == mtime
