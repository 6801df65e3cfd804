"""Unit tests of the benchmarks' parts: the timing engine, the head providers and the step configurations
(which must be hcd-distill's own TrainStep). Timings are never asserted."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import timing
from benchmarks.cases import Case
from benchmarks.head import HeadRunner
from benchmarks.steps import StepModels, fast_config, published_config, variant_config
from hcd_fast.distill import TrainStep

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_HEAD = {"B": 3, "K": 11, "Dt": 24, "n": 3, "img": 32, "channels": 4}


def test_cpu_timing_interleaves_providers_round_robin():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    policy = timing.Policy(warmup=1, min_reps=3, max_reps=3, target_s=0.0)
    out = timing.time_cpu_interleaved(fns, policy)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # who goes first rotates
    for res in out.values():
        assert res["reps"] == 3 and len(res["round_ms"]) == 3
        assert res["min_ms"] <= res["p25_ms"] <= res["median_ms"] <= res["p75_ms"]
        assert res["iqr_ms"] == pytest.approx(res["p75_ms"] - res["p25_ms"])


def test_cpu_timing_keeps_going_past_a_failing_provider():
    def boom():
        raise RuntimeError("boom")
    out = timing.time_cpu_interleaved({"ok": lambda: None, "bad": boom}, timing.Policy(warmup=1, min_reps=2,
                                                                                        max_reps=2, target_s=0.0))
    assert isinstance(out["bad"], RuntimeError) and out["ok"]["reps"] == 2


def test_cpu_timing_takes_a_clock():
    ticks = iter(range(100))
    out = timing.time_cpu_interleaved({"a": lambda: None}, timing.Policy(warmup=0, min_reps=4, max_reps=4,
                                                                         target_s=0.0), clock=lambda: next(ticks))
    assert out["a"]["round_ms"] == [1000.0] * 4  # each call: one tick of the given clock (seconds -> ms)


def test_cuda_timing_uses_do_bench(monkeypatch):
    import triton.testing
    seen = {}

    def fake(fn, warmup, rep, return_mode="mean", quantiles=None):
        seen.update(warmup=warmup, rep=rep, return_mode=return_mode, quantiles=quantiles)
        return [3.0, 1.0, 2.0, 4.0]
    monkeypatch.setattr(triton.testing, "do_bench", fake)
    res = timing.time_cuda(lambda: None, timing.Policy(warmup_ms=7, rep_ms=9))
    assert seen == {"warmup": 7, "rep": 9, "return_mode": "all", "quantiles": None}
    assert res["median_ms"] == 2.5 and res["min_ms"] == 1.0 and res["reps"] == 4

    def old(fn, warmup, rep, return_mode="mean", quantiles=None):  # a triton without return_mode="all"
        assert return_mode in ("min", "max", "mean", "median")
        return [1.0, 2.0, 3.0, 4.0] if quantiles else 2.5
    monkeypatch.setattr(triton.testing, "do_bench", old)
    assert timing.cuda_times(lambda: None, timing.Policy()) == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_head_inputs_as_hcd_distill_feeds_them(dtype):
    r = HeadRunner(Case("head", "quick", dtype, dict(TINY_HEAD)), CPU)
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert all(f.dtype == want and f.is_contiguous() for f in r.feats)  # CPU: --channels-last auto is off
    assert r.zs.dtype == want and r.ft.dtype == want  # CPU: no bf16 teacher weights, f_t in autocast's dtype
    assert r.describe_inputs().startswith(f"stage maps {dtype} contiguous")


def test_head_graph_provider_needs_cuda():
    r = HeadRunner(Case("head", "quick", "fp32", dict(TINY_HEAD)), CPU)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        r.fn("cpu+graph")


@pytest.mark.slow
def test_head_compiled_backend_computes_the_eager_loss():
    r = HeadRunner(Case("head", "quick", "fp32", dict(TINY_HEAD)), CPU)
    eager = r.fn("eager")().detach()
    grads = [t.grad.clone() for t in r.leaves]
    torch._dynamo.reset()
    compiled = r.fn("cpu+compile")().detach()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for t, g in zip(r.leaves, grads):
        torch.testing.assert_close(t.grad, g, rtol=1e-4, atol=1e-5)


def tiny_step_models() -> StepModels:
    import timm
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=16, patch_size=8, depth=1,
                                embed_dim=32, num_heads=2)
    student = timm.create_model("resnet10t", num_classes=5, channels=(8, 16, 32, 64), stem_width=8)
    return StepModels(student, teacher, torch.randn(2, 3, 16, 16), torch.tensor([1, 3]), CPU)


def test_step_variants_are_configurations_of_hcd_distills_step(monkeypatch):
    bench = tiny_step_models()
    made = {}
    for v in ("kd", "hcd", "hcd_ref"):
        step = made[v] = bench.train_step(variant_config(v, CPU))
        assert isinstance(step, TrainStep)
    crit = {v: s.task.trainable_module.criterion for v, s in made.items()}
    assert crit["hcd"].backend == "auto" and crit["hcd_ref"].backend == "reference"
    assert made["hcd_ref"].sync_loss and not made["hcd"].sync_loss  # published: loss.item() every step
    # the same initial head for both HCD variants
    for a, b in zip(crit["hcd"].state_dict().values(), crit["hcd_ref"].state_dict().values()):
        assert torch.equal(a, b)
    calls = []
    real = TrainStep.__call__
    monkeypatch.setattr(TrainStep, "__call__", lambda self, *a: calls.append(self) or real(self, *a))
    bench.fn(variant_config("hcd", CPU))()
    assert len(calls) == 1 and calls[0].task.teacher is not None  # the timed call is the trainer's step


def test_teacher_compiled_variant_is_hcd_distills_switches():
    """hcd_tc is the hcd step with hcd-distill's --teacher-bf16 on --teacher-compile on (the tap's forward
    wrapped by torch.compile, weights in bf16; nothing compiles until its first call); hcd keeps the eager
    teacher. The variant runs in the gpu profile only, and --teacher-compile auto still follows --compile
    (hcd-distill's default waits for the GPU rows)."""
    from benchmarks.steps import COMPILED_VARIANTS, default_variants
    from hcd_fast.distill.teacher.speed import teacher_compile_auto
    bench = tiny_step_models()
    tc = variant_config("hcd_tc", CPU)
    assert tc.teacher == "compiled" and tc.method == "hcd" and "teacher bf16 compiled" in tc.precision()
    taps = {v: bench.train_step(variant_config(v, CPU)).task.teacher for v in ("hcd", "hcd_tc")}
    assert taps["hcd_tc"].compiled and not taps["hcd"].compiled
    assert next(taps["hcd_tc"].model.parameters()).dtype == torch.bfloat16
    assert next(taps["hcd"].model.parameters()).dtype == torch.float32  # CPU default: fp32 teacher
    assert "hcd_tc" in COMPILED_VARIANTS and "hcd_tc" in default_variants("gpu")
    assert "hcd_tc" not in default_variants("cpu") and "hcd_tc" not in default_variants("quick")
    for device in (CPU, torch.device("cuda")):
        assert teacher_compile_auto(device, False) is False and teacher_compile_auto(device, True) is True


def test_teacher_line_reads_the_compiled_teacher_rows():
    """The results' "teacher compiled+bf16 vs eager teacher" line: hcd's median over hcd_tc's, per step case."""
    from benchmarks import report
    rows = [{"suite": "steps", "case": "step/vit_s->resnet18", "provider": p, "status": "ok", "median_ms": t,
             "device": "cuda"} for p, t in (("hcd", 120.0), ("hcd_tc", 100.0))]
    rows[1]["speedup_vs_eager_teacher"] = rows[0]["median_ms"] / rows[1]["median_ms"]
    lines = [t for t in report.evaluate_targets(rows) if t["target"] == report.TEACHER_LINE]
    assert [(t["case"], t["measured"], t["verdict"]) for t in lines] == [("step/vit_s->resnet18", "1.20x", "info")]


def test_published_config_on_cuda_is_fp16_with_grad_scaling():
    cuda = torch.device("cuda")
    pub, fast = published_config("hcd", cuda), fast_config("hcd", cuda)
    assert (pub.backend, pub.amp, pub.channels_last, pub.sync_loss, pub.teacher) == (
        "reference", "fp16", False, True, "published")
    assert (fast.backend, fast.amp, fast.channels_last, fast.sync_loss) == ("auto", "bf16", True, False)
    assert fast_config("hcd", CPU).precision() == "fp32"


@pytest.mark.slow
def test_runner_head_providers_on_cpu(tmp_path):
    """The head case with the new providers: the CUDA-only ones are rows skipped with their reason."""
    root = ROOT
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--cases", "head",
                           "--providers", "eager,compile-ro,fused,fused+graph", "--no-plots", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["provider"]: r for r in json.load(open(tmp_path / "results.json"))["rows"]}
    assert set(rows) == {"eager", "compile-ro", "cpu", "cpu+graph"}
    assert rows["cpu+graph"]["status"] == "skipped" and "CUDA graphs" in rows["cpu+graph"]["reason"]
    assert rows["compile-ro"]["status"] == "skipped" and "reduce-overhead" in rows["compile-ro"]["reason"]
    assert rows["cpu"]["status"] == "ok" and rows["cpu"]["speedup_vs_stock"] is None  # no stock row ran
    assert rows["cpu"]["inputs"].startswith("stage maps fp32 contiguous")


@pytest.mark.slow
def test_bad_provider_exits_2_naming_the_flag():
    root = ROOT
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--providers", "eager,fast"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--providers" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_step_parts_smoke(tmp_path):
    root = ROOT
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "step-parts", "--rounds", "1", "--img", "32",
                           "--batch", "4", "--out", str(tmp_path)], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.load(open(tmp_path / "step_parts.json"))
    assert set(res["cpu_ms"]) >= {"student", "step/published", "step/ours", "head/ours"}
    assert all(len(v) == 1 and v[0] > 0 for v in res["cpu_ms"].values())
    assert res["ratios"]["step: published / ours"] == pytest.approx(
        res["cpu_median_ms"]["step/published"] / res["cpu_median_ms"]["step/ours"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_head_graph_provider_replays_the_eager_loss(backend):
    """The +graph provider: capture after warm-up, replay with the runner's inputs copied in; the loss equals
    the eager fused head's on the same inputs and parameters (bf16 autocast: a bf16 tolerance)."""
    import hcd_fast
    if not hcd_fast.backends()[backend].available:
        pytest.skip(hcd_fast.backends()[backend].reason)
    r = HeadRunner(Case("head", "quick", "bf16", dict(TINY_HEAD)), torch.device("cuda"))
    eager = r.fn(backend)().detach().float()
    graphed = r.fn(f"{backend}+graph")
    first = graphed().detach().float().clone()
    torch.testing.assert_close(first, eager, rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        r.zs.mul_(0.5)  # new inputs: the replay must see them
    again = graphed().detach().float()
    torch.testing.assert_close(again, r.fn(backend)().detach().float(), rtol=2e-2, atol=2e-2)


def test_budget_drops_compiled_providers_checked_before_each(tmp_path):
    """A compiled provider is dropped once the run's budget is spent, even within a case that started
    before it was (the head's several compiles must not each run past the budget)."""
    from types import SimpleNamespace

    from benchmarks import runner
    run = runner.Run(SimpleNamespace(device=CPU, budget=0.05), str(tmp_path), {}, {"rows": []})
    rows = [{"provider": p, "status": "ok", "reason": None} for p in ("eager", "compile", "cpu+compile")]
    slow = lambda: time.sleep(0.06)  # noqa: E731  (its first call spends the budget)
    factories = {"eager": lambda: slow, "compile": lambda: (lambda: None), "cpu+compile": lambda: (lambda: None)}
    runner.time_case(run, rows, factories, timing.Policy(warmup=0, min_reps=1, max_reps=1, target_s=0.0))
    by = {r["provider"]: r for r in rows}
    assert by["eager"]["status"] == "ok" and by["eager"]["reps"] == 1
    for p in ("compile", "cpu+compile"):
        assert by[p]["status"] == "skipped" and "time budget" in by[p]["reason"]
