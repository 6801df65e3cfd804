"""cache_study --merge: the runs of separate seed folders in one table (no training here: the study itself
takes minutes per run; its folders are written by hand in the study's results.json format)."""
import json
import statistics

from experiments.cache_study import main

SETTINGS = ("online", "cache K=16")


def _folder(tmp_path, name, seed, accs, **over):
    d = tmp_path / name
    d.mkdir()
    study = {"results": {s: [{"seed": seed, "top1": a, "seconds": 10.0 + seed}] for s, a in zip(SETTINGS, accs)},
             "cache_build_seconds": {}, "epochs": 6, "lr": 0.01, "batch_size": 64, "threads": 1,
             "teacher_checkpoint": "/t.pt", "teacher_trained_here": False, "seeds": [seed], "total_seconds": 1.0}
    study.update(over)
    (d / "results.json").write_text(json.dumps(study))
    return str(d)


def test_merge_pools_the_seeds(tmp_path, capsys):
    a = _folder(tmp_path, "s0", 0, (90.0, 88.5))
    b = _folder(tmp_path, "s1", 1, (92.0, 89.25))
    c = _folder(tmp_path, "s2", 2, (91.0, 90.0))
    out = tmp_path / "merged"
    assert main(["--merge", a, b, c, "--out", str(out)]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert merged["seeds"] == [0, 1, 2]
    assert [r["top1"] for r in merged["results"]["cache K=16"]] == [88.5, 89.25, 90.0]
    md = (out / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| online |"))
    assert row.split(" | ")[1:6] == ["91.00", f"{statistics.stdev([90.0, 92.0, 91.0]):.2f}", "90.00", "92.00", "3"]


def test_merge_refuses_other_settings_or_a_repeated_seed(tmp_path, capsys):
    a = _folder(tmp_path, "s0", 0, (90.0, 88.5))
    b = _folder(tmp_path, "s1", 1, (92.0, 89.0), epochs=3)
    c = _folder(tmp_path, "s0b", 0, (91.0, 90.0))
    assert main(["--merge", a, b, "--out", str(tmp_path / "m1")]) == 2
    assert "epochs" in capsys.readouterr().err
    assert main(["--merge", a, c, "--out", str(tmp_path / "m2")]) == 2
    assert "seed appears twice" in capsys.readouterr().err
