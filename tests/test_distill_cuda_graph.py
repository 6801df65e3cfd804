"""hcd-distill --cuda-graph: what cannot be captured is refused up front (exit 2, the reason named); the
capture-ready optimizers (fused, lr in a device tensor) make the eager optimizers' updates on the CPU; the
whole-step wrapper's plumbing on the CPU with the graph API faked; on a GPU (marked cuda, run by gpu_check) a
captured run ends with the weights of an eager run of the same steps, and the captured step follows the lr
schedule."""
import copy
import warnings

import pytest
import torch

from hcd_fast.distill.cli import main
from hcd_fast.distill.engine.graph_step import (CAPTURE_READY, DeviceLR, build_optimizer_options,
                                                keep_own_implementation, not_capture_ready, problems)

STUDENT = ["--student", "resnet10t", "--student-kwargs", '{"channels": [8, 16, 32, 64], "stem_width": 8}']
TEACHER = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs",
           '{"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}',
           "--allow-random-teacher"]
FAST = ["--img-size", "16", "--batch-size", "32", "--no-progress", "--no-plots", "--epochs", "1"]


def test_problems_name_each_reason():
    cuda = torch.device("cuda")
    assert problems(cuda, False, 0, False, False) == []
    assert all(problems(cuda, False, 0, False, False, opt) == [] for opt in ("sgd", "Nesterov", "adamw"))
    found = problems(torch.device("cpu"), True, 3, True, True, "lamb")
    assert len(found) == 6
    for words in ("CUDA device", "DDP", "--skip-nonfinite", "--compile", "--teacher-compile", "--opt lamb"):
        assert any(words in f for f in found), words


@pytest.mark.parametrize("extra, words", [
    (["--device", "cpu"], "it needs a CUDA device"),
    (["--device", "cpu", "--skip-nonfinite", "2"], "--skip-nonfinite reads the loss on the host"),
    (["--device", "cpu", "--compile"], "--compile brings its own CUDA graphs"),
    (["--device", "cpu", "--opt", "lamb"], "--opt lamb has no capturable step"),
])
def test_cli_refuses_what_cannot_be_captured(tmp_path, capsys, extra, words):
    code = main(STUDENT + TEACHER + FAST + ["--output", str(tmp_path / "run"), "--cuda-graph", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "--cuda-graph:" in err and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def _final_weights(out):
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["distiller"]
    return {k: v.float() for k, v in state.items() if v.is_floating_point()}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp, rtol, extra", [
    ("off", 1e-4, []), ("bf16", 5e-2, []), ("fp16", 5e-2, ["--opt", "adamw", "--lr", "1e-3", "--clip-grad", "0.5"]),
])
def test_captured_run_matches_eager_run(tmp_path, amp, rtol, extra):
    """10 steps (3 eager warm-up steps, the capture, 7 replays of the whole step, optimizer included) with and
    without --cuda-graph, same seed and batches, the lr warming up every step: every weight and BatchNorm
    statistic of the student and the HCD head ends equal, within fp32 summation-order noise (amp off) or bf16 /
    fp16 rounding; the eager run uses timm's foreach optimizer, the captured one PyTorch's fused one."""
    common = STUDENT + TEACHER + FAST + ["--device", "cuda", "--amp", amp, "--max-steps-per-epoch", "10",
                                          "--workers", "0", "--teacher-compile", "off", *extra]
    assert main(common + ["--output", str(tmp_path / "eager")]) == 0
    assert main(common + ["--output", str(tmp_path / "graph"), "--cuda-graph"]) == 0
    eager, graph = _final_weights(tmp_path / "eager"), _final_weights(tmp_path / "graph")
    assert eager.keys() == graph.keys() and any(k.startswith("criterion.cfms.") for k in eager)
    start = torch.load(tmp_path / "eager" / "last.pt", map_location="cpu", weights_only=False)
    captured = torch.load(tmp_path / "graph" / "last.pt", map_location="cpu", weights_only=False)
    assert start["global_step"] == captured["global_step"] == 10
    assert start["history"][-1]["lr"] == captured["history"][-1]["lr"]
    for k in eager:
        scale = eager[k].abs().max().item() + 1e-12
        err = (eager[k] - graph[k]).abs().max().item()
        assert err <= rtol * scale + 1e-6, (k, err, scale)




# ------------------------------------------------------------------ capture-ready optimizers, on the CPU
def _small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _timm_optim(model, opt, steps, extra):
    import timm.optim
    import timm.scheduler
    optimizer = timm.optim.create_optimizer_v2(model, opt=opt, lr=0.05 if "sgd" in opt or opt in (
        "nesterov", "momentum") else 3e-3, weight_decay=2e-3, momentum=0.9, **extra)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, min_lr=1e-4,
                                                      warmup_lr=1e-5, warmup_epochs=1, step_on_epochs=False,
                                                      updates_per_epoch=steps // 2)
    return optimizer, scheduler


@pytest.mark.parametrize("opt", sorted(CAPTURE_READY))
def test_capture_ready_optimizer_makes_the_eager_update(opt):
    """Each --opt that --cuda-graph accepts, built capture-ready (fused, capturable for Adam) with its lr in a
    DeviceLR tensor synced after every scheduler update, run eagerly on the CPU for 8 steps of timm's warm-up +
    cosine schedule: the lr each step reads from the tensor is the schedule's float, and the weights end equal
    to timm's default (foreach / single-tensor) optimizer's, weight decay and momentum included."""
    steps = 8
    ref_model, model = _small_model(), _small_model()
    ref_opt, ref_sched = _timm_optim(ref_model, opt, steps, {})
    cap_opt, cap_sched = _timm_optim(model, opt, steps, build_optimizer_options(opt))
    assert not_capture_ready(cap_opt) is None and not_capture_ready(ref_opt) is not None
    lr = DeviceLR(cap_opt, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    seen, schedule = [], []
    for step in range(steps):
        x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
        lr.sync()
        seen.append(lr.values())
        schedule.append([group["lr"] for group in ref_opt.param_groups])
        assert all(group["lr"] is t for group, t in zip(cap_opt.param_groups, lr.tensors))
        for m, o in ((ref_model, ref_opt), (model, cap_opt)):
            o.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # capturable=True outside a capture
                o.step()
        ref_sched.step_update(num_updates=step + 1)
        cap_sched.step_update(num_updates=step + 1)
        assert isinstance(cap_opt.param_groups[0]["lr"], float)  # the scheduler wrote a float again
    assert len({round(v[0], 9) for v in schedule}) == steps  # the lr changed at every step
    for got, want in zip(seen, schedule):
        assert got == pytest.approx(want, rel=1e-6)  # float32 of the schedule's float
    for (name, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_build_optimizer_options_refuses_other_optimizers():
    with pytest.raises(ValueError, match="--opt lamb"):
        build_optimizer_options("lamb")
    assert build_optimizer_options("AdamW") == {"fused": True, "capturable": True}


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("saved_ready", [False, True])
def test_resume_across_cuda_graph_keeps_own_implementation(opt, saved_ready):
    """A checkpoint written with (or without) --cuda-graph resumes without it (or with it): the loaded
    optimizer keeps its own fused / capturable / foreach flags and lr form, Adam's step counters land where its
    step reads them, and 3 + 3 steps across the save equal 6 uninterrupted steps."""
    steps = 6
    loaded_ready = not saved_ready
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(steps)]

    def build(ready):
        model = _small_model()
        o, sched = _timm_optim(model, opt, steps, build_optimizer_options(opt) if ready else {})
        keep_own_implementation(o)
        return model, o, sched, DeviceLR(o, torch.device("cpu")) if ready else None

    def run(model, o, sched, lr, lo, hi):
        for step in range(lo, hi):
            if lr is not None:
                lr.sync()
            o.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(batches[step][0]), batches[step][1]).backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                o.step()
            sched.step_update(num_updates=step + 1)

    ref = build(saved_ready)
    run(*ref, 0, steps)
    first = build(saved_ready)
    run(*first, 0, 3)
    if first[3] is not None:
        first[3].sync()  # --sched none would leave the device tensor in the group: the saved lr is a tensor
    saved = copy.deepcopy({"model": first[0].state_dict(), "opt": first[1].state_dict(),
                           "sched": first[2].state_dict()})
    second = build(loaded_ready)
    own_flags = [{k: grp.get(k) for k in ("fused", "capturable", "foreach")} for grp in second[1].param_groups]
    second[0].load_state_dict(saved["model"])
    second[1].load_state_dict(saved["opt"])
    second[2].load_state_dict(saved["sched"])
    assert [{k: grp.get(k) for k in ("fused", "capturable", "foreach")} for grp in second[1].param_groups] == own_flags
    if not loaded_ready:
        assert all(isinstance(grp["lr"], float) for grp in second[1].param_groups)
    run(*second, 3, steps)
    for (name, a), (_, b) in zip(ref[0].state_dict().items(), second[0].state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("opt", ["lookahead_sgd", "lamb"])
def test_keep_own_implementation_leaves_other_optimizers_alone(opt):
    """Every hcd-distill run registers the resume hook; optimizers that cannot be captured (timm's Lookahead
    lacks torch's hook tables) are left as they are and still save and load."""
    import timm.optim
    model = _small_model()
    o = timm.optim.create_optimizer_v2(model, opt=opt, lr=0.1, weight_decay=1e-3)
    keep_own_implementation(o)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    o.step()
    o.load_state_dict(copy.deepcopy(o.state_dict()))


# ------------------------------------------------------------------ the wrapper's plumbing
class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: capture records the callable (running nothing), replay
    re-runs it the way a replay rewrites the static gradients (set, not accumulated)."""

    def __init__(self):
        self.fn, self.params = None, []

    def replay(self):
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()  # a replayed backward writes the gradients; it does not add to them
        self.fn()


class _FakeCapture:
    active = None

    def __init__(self, graph):
        self.graph = graph

    def __enter__(self):
        _FakeCapture.active = self.graph
        return self

    def __exit__(self, *exc):
        _FakeCapture.active = None
        return False


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


def _fake_cuda(monkeypatch, task, optimizer, scaler):
    """torch.cuda's graph API replaced by CPU stand-ins: the wrapper's captured function is recorded at capture
    (GraphedTrainStep._captured is run once there by the real API; here it runs at each replay)."""
    import contextlib

    from hcd_fast.distill.engine import graph_step

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)
    real = graph_step.GraphedTrainStep._captured

    def captured(self, x, y, cached_feat):
        graph = _FakeCapture.active
        if graph is None:
            return real(self, x, y, cached_feat)
        outs = []
        # A graph reads the lr objects the capture saw (the DeviceLR tensors), whatever the groups hold later.
        captured_lrs = [group["lr"] for group in optimizer.param_groups]

        def run():
            now = [group["lr"] for group in optimizer.param_groups]
            for group, lr in zip(optimizer.param_groups, captured_lrs):
                group["lr"] = lr
            outs[:] = [real(self, x, y, cached_feat)]
            for group, lr in zip(optimizer.param_groups, now):
                group["lr"] = lr
            for static, new in zip(self.static_out, outs[0]):
                static.copy_(new)
        graph.fn, graph.params = run, list(task.trainable_module.parameters())
        self.static_out = None
        # The static outputs' shapes from one run whose effects are undone (a capture runs nothing): the
        # gradients it left, the weights and optimizer state it updated, the BatchNorm statistics it moved, the
        # scale it moved.
        tensors = list(task.buffers()) + graph.params + [
            v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        saved = [(t, t.detach().clone()) for t in tensors]
        scaler_state = scaler.state_dict() if scaler is not None else None
        first = real(self, x, y, cached_feat)
        for p in graph.params:
            p.grad = None
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)
        if scaler is not None:
            scaler._scale.fill_(scaler_state["scale"])
            scaler._growth_tracker.fill_(scaler_state["_growth_tracker"])
        return tuple(torch.empty_like(t) for t in first)

    monkeypatch.setattr(graph_step.GraphedTrainStep, "_captured", captured)


def _tiny_task(method, device):
    import timm

    from hcd_fast import HCDConfig
    from hcd_fast.distill import Distiller, DistillTask, TeacherTap, build_criterion, probe_student
    from hcd_fast.distill.methods import DKDOptions

    torch.manual_seed(0)
    student = timm.create_model("resnet10t", num_classes=7, channels=(8, 16, 32, 64), stem_width=8)
    teacher = TeacherTap(timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=16, patch_size=4,
                                           depth=1, embed_dim=16, num_heads=2))
    channels, _ = probe_student(student, 4, (3, 16, 16))
    options = DKDOptions(dkd_warmup=4.0) if method == "dkd" else None
    crit = build_criterion(method, channels, 16, 7, HCDConfig(num_sub_logits=3), backend="reference",
                           options=options)
    return DistillTask(Distiller(student, crit), teacher, device=torch.device(device)).to(device).train()


CASES = {  # (method, --opt, fp16 GradScaler init scale or None, clip_grad)
    "hcd-sgd": ("hcd", "sgd", None, None),
    "hcd-sgd-fp16scaler-clip": ("hcd", "sgd", 2.0 ** 127, 1.0),  # the first scaled losses overflow
    "dkd-adamw-clip": ("dkd", "adamw", None, 0.5),
}


def _graphed_vs_eager(device, case, monkeypatch=None, rtol=1e-4, atol=1e-5):
    """GraphedTrainStep (capture-ready optimizer, DeviceLR) against TrainStep (timm's default optimizer) over
    8 steps of a warm-up + cosine schedule, the criterion's epoch moving after step 5 (DKD's ramp: a
    recapture): per-step outputs, the weights, BatchNorm statistics and the GradScaler's scale agree."""
    import timm.optim
    import timm.scheduler

    from hcd_fast.distill import TrainStep
    from hcd_fast.distill.distiller import unwrap
    from hcd_fast.distill.engine.graph_step import GraphedTrainStep

    method, opt, init_scale, clip = CASES[case]
    task = _tiny_task(method, device)
    ref_task = copy.deepcopy(task)

    def optim(t, extra):
        o = timm.optim.create_optimizer_v2(t.trainable_module, opt=opt, lr=0.05 if opt == "sgd" else 3e-3,
                                           weight_decay=2e-3, momentum=0.9, **extra)
        sched, _ = timm.scheduler.create_scheduler_v2(o, sched="cosine", num_epochs=2, min_lr=1e-4, warmup_lr=1e-3,
                                                      warmup_epochs=1, step_on_epochs=False, updates_per_epoch=4)
        return o, sched

    opt_g, sched_g = optim(task, build_optimizer_options(opt))
    opt_r, sched_r = optim(ref_task, {})
    scalers = [torch.amp.GradScaler(device, init_scale=init_scale, growth_interval=100) if init_scale else None
               for _ in range(2)]
    if monkeypatch is not None:
        _fake_cuda(monkeypatch, task, opt_g, scalers[0])
    dev = torch.device(device)
    graphed = GraphedTrainStep(TrainStep(task, opt_g, device=dev, scaler=scalers[0], clip_grad=clip))
    ref = TrainStep(ref_task, opt_r, device=dev, scaler=scalers[1], clip_grad=clip)
    previous = None
    for step in range(8):
        if step == 5:  # a new epoch: DKD's ramp min(epoch / 4, 1) moves from 0.25 to 0.5
            for t in (task, ref_task):
                crit = unwrap(t.trainable_module).criterion
                if hasattr(crit, "set_epoch"):  # as the trainer does
                    crit.set_epoch(2)
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 7, (6,), generator=g)
        got, want = graphed(x, y), ref(x, y)
        assert torch.allclose(got.vals.cpu(), want.vals.cpu(), rtol=rtol, atol=atol), step
        assert int(got.correct) == int(want.correct) and bool(got.nonfinite) == bool(want.nonfinite)
        if previous is not None:
            assert got.vals.data_ptr() != previous.data_ptr()
        previous = got.vals
        for s in (sched_g, sched_r):
            s.step_update(num_updates=step + 1)
    assert graphed.graph is not None and graphed.calls == 8
    assert graphed.captures == (2 if method == "dkd" else 1)
    graphed.lr.sync()  # what the next step reads: the schedule's value after the last update
    assert graphed.lr.values() == pytest.approx([grp["lr"] for grp in opt_r.param_groups], rel=1e-6)
    if init_scale:
        assert scalers[0].get_scale() == scalers[1].get_scale() < init_scale  # overflowed steps were skipped
    for (name, a), (_, b) in zip(task.state_dict().items(), ref_task.state_dict().items()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=rtol, atol=atol), name
    return graphed


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_graphed_step_plumbing_equals_train_step_on_cpu(monkeypatch, case):
    """With the CUDA graph API faked on the CPU (capture records, replay re-runs), the whole graphed step
    (optimizer, clipping, fp16 scaling inside) leaves TrainStep's outputs and weights (_graphed_vs_eager): the
    batch reaches the static buffers, the lr reaches the step through its device tensor, an overflowed fp16
    step is skipped, a new DKD epoch recaptures, each call returns fresh tensors. A batch of another size after
    the capture is refused."""
    from hcd_fast.distill.errors import UserError
    graphed = _graphed_vs_eager("cpu", case, monkeypatch)
    with pytest.raises(UserError, match="variable batch"):
        graphed(torch.randn(5, 3, 16, 16), torch.randint(0, 7, (5,)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", sorted(CASES))
def test_graphed_step_equals_train_step_on_gpu(case):
    """The real capture on a GPU (fp32, no autocast): _graphed_vs_eager's per-step outputs, final weights,
    lr read back from the device tensors, fp16 scale, and the DKD recapture; the tolerance covers TF32
    convolutions, atomics in the backward and the fused kernels' rounding (a frozen lr or a lost update moves
    weights by lr * grad, far more)."""
    _graphed_vs_eager("cuda", case, rtol=1e-3, atol=1e-5)


def test_graphed_step_refuses_an_optimizer_that_is_not_capture_ready():
    from hcd_fast.distill import TrainStep
    from hcd_fast.distill.engine.graph_step import GraphedTrainStep
    task = _tiny_task("kd", "cpu")
    for o in (torch.optim.SGD(task.trainable_module.parameters(), lr=0.1, momentum=0.9),
              torch.optim.Adam(task.trainable_module.parameters(), lr=0.1, fused=True),
              torch.optim.RMSprop(task.trainable_module.parameters(), lr=0.1)):
        with pytest.raises(ValueError, match="cannot be captured"):
            GraphedTrainStep(TrainStep(task, o, device=torch.device("cpu")))
