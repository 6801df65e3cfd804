"""Smoke test of the benchmark runner (``python -m benchmarks``): tiny shapes, two repetitions.

Checks the JSON schema, that the numbers in a row agree with each other (ratios, bandwidth), that the
markdown and the PNG plots are written, and the case/provider selection. Timings are never asserted.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import cases as C
from benchmarks import steps as ST
from benchmarks.env import SCHEMA_VERSION
from benchmarks.providers import fused_providers, select_providers, unavailable_reason
from benchmarks.runner import selected as _selected

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args):
    """``python -m benchmarks ARGS`` in a fresh process (as ``make bench`` runs it: the benchmarks package
    sets passive OpenMP waiting before torch loads, which this test process can no longer do); returns
    the results.json it wrote."""
    out = args[args.index("--out") + 1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wrote " in proc.stdout and "| case | shape | provider |" in proc.stdout  # the table is printed
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)

ROW_KEYS = {"schema_version", "suite", "case", "op", "group", "provider", "mode", "dtype", "shape", "status",
            "reason", "device", "device_name", "torch", "triton", "python", "git_commit", "threads"}
TIMED_KEYS = {"median_ms", "p25_ms", "p75_ms", "iqr_ms", "min_ms", "reps", "first_call_s", "peak_mem_bytes"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # No torch.compile here (compiling costs tens of seconds per case on 2 cores); the compile provider
    # has its own test below on one tiny case.
    result = run(["--quick", "--device", "cpu", "--providers", "eager,fused", "--variants", "kd,hcd_ref,hcd",
                  "--out", str(out)])
    return out, result


@pytest.mark.slow
def test_json_schema(quick_run):
    out, result = quick_run
    with open(out / "results.json") as f:
        data = json.load(f)
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["complete"] is True
    assert data["profile"] == "quick"
    assert data["copy_bandwidth"]["gbps"] > 0
    for key in ("created", "env", "providers", "backends", "rows", "targets", "plots", "elapsed_s"):
        assert key in data, key
    assert set(data["backends"]) == {"reference", "triton", "cuda", "cpu"}
    rows = data["rows"]
    expected_cases = {c.id for c in C.profile_cases("quick")} | {c.id for c in ST.profile_step_cases("quick")}
    assert {r["case"] for r in rows} == expected_cases
    for r in rows:
        missing = ROW_KEYS - set(r)
        assert not missing, (r["case"], r["provider"], missing)
        assert r["schema_version"] == SCHEMA_VERSION
        assert r["device"] == "cpu"
        if r["status"] == "ok":
            assert not TIMED_KEYS - set(r), (r["case"], r["provider"])
            assert r["reps"] == 2
            assert r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
            assert r["min_ms"] <= r["median_ms"]
            assert r["peak_mem_bytes"] is None  # CPU: no honest per-call number
        else:
            assert r["status"] in ("error", "skipped") and r["reason"]


@pytest.mark.slow
def test_eager_and_steps_ran(quick_run):
    _, result = quick_run
    rows = result["rows"]
    eager = [r for r in rows if r["suite"] == "ops" and r["provider"] == "eager"]
    assert len(eager) == len(C.profile_cases("quick"))
    assert all(r["status"] == "ok" for r in eager), [(r["case"], r["reason"]) for r in eager if r["status"] != "ok"]
    steps = {r["provider"]: r for r in rows if r["suite"] == "steps"}
    assert set(steps) == {"kd", "hcd_ref", "hcd"}
    assert steps["kd"]["status"] == "ok" and steps["hcd_ref"]["status"] == "ok"
    # CPU defaults: the fast variants stay fp32 and contiguous (see benchmarks/steps.py)
    assert steps["hcd_ref"]["precision"] == "fp32" and steps["hcd"]["precision"] == "fp32"
    assert steps["hcd"]["status"] == "ok", steps["hcd"]["reason"]
    # The runner includes every fused backend hcd_fast reports available for CPU tensors.
    for name in fused_providers(torch.device("cpu")):
        assert any(r["provider"] == name for r in rows if r["suite"] == "ops")


@pytest.mark.slow
def test_derived_numbers(quick_run):
    _, result = quick_run
    rows = [r for r in result["rows"] if r["suite"] == "ops" and r["status"] == "ok"]
    copy_gbps = result["copy_bandwidth"]["gbps"]
    for r in rows:
        eager = next(e for e in rows if e["case"] == r["case"] and e["provider"] == "eager")
        assert r["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / r["median_ms"])
        if r["op"] == "sub_logit_loss" and r["mode"] == "fwd":
            s = r["shape"]
            R, Z, B = s["S"] * s["B"] * s["n"] * s["K"], s["B"] * s["K"], s["B"]
            # the forward alone: read zf, z_s, z_t and the targets once; the design adds the statistics it
            # writes (fp64 row/sample statistics, fp32 M and partials)
            nbytes = 4 * (R + 2 * Z) + 8 * B
            stats = 8 * (3 * s["S"] * B * s["n"] + 3 * B) + 4 * (s["S"] * B * s["n"] ** 2 + 5 * s["S"] * B)
            assert (r["essential_bytes"], r["bytes"]) == (nbytes, nbytes + stats)
            assert r["floor_ms"] == pytest.approx(1e3 * nbytes / 3.35e12)
        elif r["op"] == "sub_logit_loss":
            s = r["shape"]
            R, Z, B = s["S"] * s["B"] * s["n"] * s["K"], s["B"] * s["K"], s["B"]
            # essential: read zf, write d zf; read z_s, z_t, write d z_s (fp32: 4 bytes); int64 targets
            nbytes = 4 * (2 * R + 3 * Z) + 8 * B
            assert r["essential_bytes"] == nbytes
            # the design (kernels/sub_logit_loss.py): zf read twice and d zf written once; z_s, z_t read twice,
            # d z_s written once; targets read twice; fp64 row/sample statistics and fp32 M and partials,
            # each written and read once
            stats = 2 * (8 * (3 * s["S"] * B * s["n"] + 3 * B) + 4 * (s["S"] * B * s["n"] ** 2 + 5 * s["S"] * B))
            design = 4 * (3 * R + 5 * Z) + 16 * B + stats
            assert r["bytes"] == design
            assert r["gbps"] == pytest.approx(design / (r["median_ms"] * 1e-3) / 1e9)
            assert r["copy_fraction"] == pytest.approx(r["gbps"] / copy_gbps)
            # the H100 floor: the essential bytes at 3.35 TB/s (memory-bound)
            assert r["floor_ms"] == pytest.approx(1e3 * nbytes / 3.35e12)
            assert r["floor_fraction"] == pytest.approx(r["floor_ms"] / r["median_ms"])
        if r["op"] == "cfm":
            s = r["shape"]
            fwd = 2 * s["B"] * ((s["D"] + s["Dt"]) * s["hidden"] + s["hidden"] * s["n"] * s["K"])
            assert r["flops"] == 3 * fwd
            # the H100 floor: the FLOPs at the dense peak of the dtype (tensor cores for bf16/fp16)
            peak = {"fp32": 67e12, "fp64": 67e12, "bf16": 990e12, "fp16": 990e12}[r["dtype"]]
            assert r["floor_ms"] == pytest.approx(1e3 * 3 * fwd / peak)
        if r["op"] == "head":
            assert r["floor_ms"] is None  # not modelled


@pytest.mark.slow
def test_markdown_and_plots(quick_run):
    pytest.importorskip("matplotlib")  # an optional dependency (pyproject extra "bench")
    out, result = quick_run
    md = (out / "results.md").read_text()
    assert "| case | shape | provider | median ms |" in md
    assert "H100 floor ms (computed, not this device)" in md  # the floor column, marked on a CPU run
    assert "## Whole distillation steps" in md and "## sub_logit_loss batch sweep" in md
    assert "## sub_logit_loss forward alone" in md
    for c in C.profile_cases("quick"):
        assert c.id in md
    names = sorted(os.path.basename(p) for p in result["plots"])
    assert names == ["ops_speedup.png", "steps.png", "sub_logit_loss_sweep.png"]
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow
def test_compile_provider(tmp_path):
    result = run(["--quick", "--device", "cpu", "--cases", "pool_linear", "--providers", "eager,compile",
                  "--no-plots", "--out", str(tmp_path)])
    rows = {r["provider"]: r for r in result["rows"]}
    assert set(rows) == {"eager", "compile"}
    assert rows["compile"]["status"] == "ok", rows["compile"]["reason"]
    assert rows["compile"]["speedup_vs_eager"] == pytest.approx(rows["eager"]["median_ms"] / rows["compile"]["median_ms"])
    assert rows["eager"]["speedup_vs_compile"] == pytest.approx(rows["compile"]["median_ms"] / rows["eager"]["median_ms"])


def test_bandwidth_targets_read_their_own_threshold():
    """The bandwidth targets name their goal: 72% of copy bandwidth meets the fwd+bwd sweep's 70% and misses the
    forward's 75%; the gpu profile has the forward cases at B >= 4096, K = 1000 with that target."""
    from benchmarks import report
    fwd = [c for c in C.profile_cases("gpu") if c.mode == "fwd"]
    assert fwd and all(c.shape["B"] >= 4096 and c.shape["K"] == 1000 and c.target == C.GPU_FWD_BW_TARGET
                       for c in fwd)
    row = {"case": fwd[0].id, "provider": "cuda", "copy_fraction": 0.72}
    assert report._op_target(C.GPU_FWD_BW_TARGET, row, "cuda")["verdict"] == "not met"
    assert report._op_target(C.GPU_BW_TARGET, row, "cuda")["verdict"] == "met"
    # B = 4096, K = 1000, S = n = 4, bf16: 147.49 MB read + 3.05 MB of statistics (the kernels' headers)
    essential, design = C.sub_logit_loss_fwd_bytes(4, 4096, 4, 1000, 2)
    assert round(essential / 1e4) / 100 == 147.49 and round((design - essential) / 1e4) / 100 == 3.05


def test_selection():
    assert _selected("sub_logit_loss/imagenet/fp32", "ops", ["sub_logit_loss"])
    assert _selected("sweep/sub_logit_loss/B=512/fp32", "ops", ["sweep"])
    assert _selected("head/cifar/bf16", "ops", ["head/cifar"])
    assert _selected("step/swin_t->resnet18", "steps", ["steps"])
    assert _selected("step/swin_t->resnet18", "steps", ["step/swin*"])
    assert not _selected("head/cifar/bf16", "ops", ["sub_logit_loss", "steps"])
    assert not _selected("cfm/imagenet/fp32", "ops", ["cifar"])
    cpu = torch.device("cpu")
    assert select_providers("eager,compile", cpu) == ["eager", "compile"]
    assert select_providers(None, cpu)[:2] == ["eager", "compile"]
    assert "triton" not in select_providers(None, cpu)  # the interpreter is not timed
    with pytest.raises(ValueError, match="unknown provider"):
        select_providers("eager,fast", cpu)
    # every provider by default: the stock baselines, each backend alone, under torch.compile, in a CUDA graph
    assert select_providers(None, cpu) == ["eager", "compile", "compile-ro", "cpu", "cpu+compile", "cpu+graph"]
    assert select_providers("fused+graph,cuda+compile", cpu) == ["cpu+graph", "cuda+compile"]
    assert "CUDA graphs" in unavailable_reason("cpu+graph", cpu)
    assert "reduce-overhead" in unavailable_reason("compile-ro", cpu)
    assert unavailable_reason("cpu+compile", cpu) is None


def test_readme_summary_renders_from_committed_results():
    """The README's performance summary is generated from results.json (benchmarks/readme.py)."""
    import os

    from benchmarks.readme import render

    path = "benchmarks/results/cpu/results.json"
    if not os.path.exists(path):
        pytest.skip("no committed CPU results")
    text = render(path)
    assert "| sub_logit_loss/imagenet/fp32 | S=4 B=256 n=4 K=1000 |" in text
    assert "sweep/" not in text.split("Whole optimizer steps")[0]


def test_git_commit_prefers_the_callers_commit(monkeypatch):
    # A tree copied to a GPU machine can carry a stale .git: the caller's HCD_GIT_COMMIT wins, dirty unknown.
    from benchmarks.env import git_commit
    monkeypatch.setenv("HCD_GIT_COMMIT", "0123abcd")
    assert git_commit() == {"git_commit": "0123abcd", "git_dirty": None}
    monkeypatch.delenv("HCD_GIT_COMMIT")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    got = git_commit()
    assert got["git_commit"] == (head or "unknown") and got["git_dirty"] in (True, False, None)


# ------------------------------------------------------------------ python -m benchmarks compare
COMMITTED_CPU = os.path.join(ROOT, "benchmarks", "results", "cpu", "results.json")


def _perturbed(data, factors):
    """A copy of a results.json with the median (and quartiles) of (case, provider) rows scaled."""
    import copy

    out = copy.deepcopy(data)
    for r in out["rows"]:
        f = factors.get((r["case"], r["provider"]))
        if f is not None:
            for key in ("median_ms", "p25_ms", "p75_ms", "iqr_ms", "min_ms"):
                if r.get(key) is not None:
                    r[key] *= f
    return out


def test_compare_committed_cpu_run_with_itself():
    from benchmarks import compare as CMP
    from benchmarks.providers import is_fused

    data = CMP.load(COMMITTED_CPU)
    records = CMP.compare(data, data)
    fused = [r for r in records if r["suite"] == "ops"]
    # the baselines (eager, compile) are not rows of their own: only the fused providers (cpu, cpu+compile, ...)
    assert fused and all(is_fused(r["provider"]) for r in fused)
    assert any(r["provider"] == "cpu" for r in fused)
    # rows of providers that do not run here (cpu+graph needs CUDA) compare as n/a; every measured row is ok
    status = {(r["case"], r["provider"]): r["status"] for r in data["rows"]}
    assert all(status[(r["case"], r["provider"])] != "ok" for r in records if r["verdict"] == "n/a")
    records = [r for r in records if r["verdict"] != "n/a"]
    assert records and {r["verdict"] for r in records} == {"ok"}
    for r in records:
        assert r["change_vs_eager"] == 0 and r["old_vs_eager"] == r["new_vs_eager"] > 0
        assert r["band"] >= CMP.DEFAULT_BAND
    # the ratios are the run's own (speedup_vs_eager / _vs_compile / _vs_hcd_ref fields)
    stored = {(r["case"], r["provider"]): r for r in data["rows"]}
    for r in records:
        row = stored[(r["case"], r["provider"])]
        assert r["old_vs_eager"] == pytest.approx(row.get("speedup_vs_eager") or row["speedup_vs_hcd_ref"])
        if r["old_vs_stock"] is not None:  # the committed run predates compile-ro: stock = compile
            assert r["old_vs_stock"] == pytest.approx(row["speedup_vs_compile"])


@pytest.mark.slow
def test_compare_flags_a_regression_beyond_the_band(tmp_path):
    from benchmarks import compare as CMP
    from benchmarks.providers import is_fused

    data = CMP.load(COMMITTED_CPU)
    new = _perturbed(data, {("pool_linear/cifar/fp32", "cpu"): 1.5,    # 33% slower: a regression
                            ("cfm/cifar/fp32", "cpu"): 1.03,           # 3%: inside the noise band
                            ("sub_logit_loss/cifar/fp32", "eager"): 0.5,  # eager 2x faster: cpu's ratio halves
                            ("bn_relu_pool/imagenet/bf16", "cpu"): 0.5,   # 2x faster
                            ("step/swin_t->resnet18", "hcd"): 1.6})     # step regression (vs hcd_ref)
    verdicts = {(r["case"], r["provider"]): r for r in CMP.compare(data, new)}
    assert verdicts[("pool_linear/cifar/fp32", "cpu")]["verdict"] == "REGRESSION"
    assert verdicts[("pool_linear/cifar/fp32", "cpu")]["change_vs_eager"] == pytest.approx(1 / 1.5 - 1)
    assert verdicts[("cfm/cifar/fp32", "cpu")]["verdict"] == "ok"
    assert verdicts[("sub_logit_loss/cifar/fp32", "cpu")]["verdict"] == "REGRESSION"
    assert verdicts[("bn_relu_pool/imagenet/bf16", "cpu")]["verdict"] == "faster"
    assert verdicts[("step/swin_t->resnet18", "hcd")]["verdict"] == "REGRESSION"
    flagged = {k for k, r in verdicts.items() if r["verdict"] not in ("ok", "n/a")}
    assert flagged == {("pool_linear/cifar/fp32", "cpu"), ("sub_logit_loss/cifar/fp32", "cpu"),
                       ("bn_relu_pool/imagenet/bf16", "cpu"), ("step/swin_t->resnet18", "hcd")}
    # A noisy row (IQR ~1.5x its median in the committed run) gets a wider band than the 10% floor.
    assert verdicts[("sub_logit_loss/imagenet/fp32", "cpu")]["band"] > 0.5

    # The command line: exit 1 and the table, with a missing case and a failed one in the new run too.
    new["rows"] = [r for r in new["rows"] if r["case"] != "cfm/imagenet/bf16"]
    for r in new["rows"]:
        if r["case"] == "head/cifar/bf16" and r["provider"] == "cpu":
            r.update(status="error", reason="RuntimeError: boom", median_ms=None)
    old_path, new_path, md = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "cmp.md"
    old_path.write_text(json.dumps(data))
    new_path.write_text(json.dumps(new))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "compare", str(old_path), str(new_path), "--out",
                           str(md)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    old_ratio = next(r["speedup_vs_eager"] for r in data["rows"]
                     if (r["case"], r["provider"]) == ("pool_linear/cifar/fp32", "cpu"))
    assert f"| pool_linear/cifar/fp32 | cpu | {old_ratio:.2f}x | {old_ratio / 1.5:.2f}x | -33.3% |" in proc.stdout
    assert "**missing in new**" in proc.stdout and "**failed in new**" in proc.stdout
    assert md.read_text().strip() == proc.stdout.strip()
    assert "under load" not in proc.stdout  # the committed run was at load ~1 on 2 threads
    same = subprocess.run([sys.executable, "-m", "benchmarks", "compare", str(old_path), str(old_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert same.returncode == 0 and "no regression beyond the noise band" in same.stdout


@pytest.mark.parametrize("content,words", [(None, "cannot read"), ("{not json", "not a JSON file"),
                                            ('{"rows": 3}', "not a benchmarks results.json")])
@pytest.mark.slow
def test_compare_bad_file_exits_2_naming_it(tmp_path, content, words):
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "compare", COMMITTED_CPU, str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and words in proc.stderr and "Traceback" not in proc.stderr


def test_compare_warns_about_a_loaded_run():
    from benchmarks import compare as CMP
    from benchmarks.providers import is_fused

    data = CMP.load(COMMITTED_CPU)
    assert CMP.loaded(data) is None
    busy = _perturbed(data, {})
    for r in busy["rows"]:
        r["loadavg"] = 10.1
    assert CMP.loaded(busy) == (10.1, 2)
    md = CMP.markdown(CMP.compare(data, busy), "old.json", data, "new.json", busy, CMP.DEFAULT_BAND)
    assert "the new run was measured under load (1-min load average up to 10.1 on 2 threads)" in md
    assert "the old run" not in md
