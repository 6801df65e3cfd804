"""hcd-distill --cuda-graph: what cannot be captured is refused up front (exit 2, the reason named); on a GPU
(marked cuda, run by gpu_check) a captured run ends with the weights of an eager run of the same steps."""
import pytest
import torch

from hcd_fast.distill.cli import main
from hcd_fast.distill.engine.graph_step import problems

STUDENT = ["--student", "resnet10t", "--student-kwargs", '{"channels": [8, 16, 32, 64], "stem_width": 8}']
TEACHER = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs",
           '{"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}',
           "--allow-random-teacher"]
FAST = ["--img-size", "16", "--batch-size", "32", "--no-progress", "--no-plots", "--epochs", "1"]


def test_problems_name_each_reason():
    cuda = torch.device("cuda")
    assert problems(cuda, False, 0, False, False) == []
    found = problems(torch.device("cpu"), True, 3, True, True)
    assert len(found) == 5
    for words in ("CUDA device", "DDP", "--skip-nonfinite", "--compile", "--teacher-compile"):
        assert any(words in f for f in found), words


@pytest.mark.parametrize("extra, words", [
    (["--device", "cpu"], "it needs a CUDA device"),
    (["--device", "cpu", "--skip-nonfinite", "2"], "--skip-nonfinite reads the loss on the host"),
    (["--device", "cpu", "--compile"], "--compile brings its own CUDA graphs"),
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
@pytest.mark.parametrize("amp, rtol", [("off", 1e-4), ("bf16", 5e-2)])
def test_captured_run_matches_eager_run(tmp_path, amp, rtol):
    """10 steps (3 eager warm-up steps, the capture, 7 replays) with and without --cuda-graph, same seed and
    batches: every weight and BatchNorm statistic of the student and the HCD head ends equal, within fp32
    summation-order noise (amp off) or bf16 rounding (bf16)."""
    common = STUDENT + TEACHER + FAST + ["--device", "cuda", "--amp", amp, "--max-steps-per-epoch", "10",
                                          "--workers", "0", "--teacher-compile", "off"]
    assert main(common + ["--output", str(tmp_path / "eager")]) == 0
    assert main(common + ["--output", str(tmp_path / "graph"), "--cuda-graph"]) == 0
    eager, graph = _final_weights(tmp_path / "eager"), _final_weights(tmp_path / "graph")
    assert eager.keys() == graph.keys() and any(k.startswith("criterion.cfms.") for k in eager)
    start = torch.load(tmp_path / "eager" / "last.pt", map_location="cpu", weights_only=False)
    assert start["global_step"] == 10
    for k in eager:
        scale = eager[k].abs().max().item() + 1e-12
        err = (eager[k] - graph[k]).abs().max().item()
        assert err <= rtol * scale + 1e-6, (k, err, scale)


# ------------------------------------------------------------------ the wrapper's plumbing on the CPU
class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: capture records the callable (running nothing), replay
    re-runs it the way a replay rewrites the static gradients (set, not accumulated)."""

    current = None

    def __init__(self):
        self.fn, self.params = None, []

    def replay(self):
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()  # a replayed backward writes the gradients; it does not add to them
        self.fn()


class _FakeCapture:
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


def _fake_cuda(monkeypatch, task):
    """torch.cuda's graph API replaced by CPU stand-ins: the wrapper's captured function is recorded at capture
    (GraphedTrainStep._captured is run once there by the real API; here it runs at each replay)."""
    import contextlib

    from hcd_fast.distill.engine import graph_step

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)
    real = graph_step.GraphedTrainStep._captured

    def captured(self, x, y, cached_feat):
        graph = _FakeCapture.active
        if graph is None:
            return real(self, x, y, cached_feat)
        outs = []

        def run():
            outs[:] = [real(self, x, y, cached_feat)]
            for static, new in zip(self.static_out, outs[0]):
                static.copy_(new)
        graph.fn, graph.params = run, list(task.trainable_module.parameters())
        self.static_out = None
        # The static outputs' shapes from one run whose effects are undone (a capture runs nothing): the
        # gradients it left and the BatchNorm statistics it moved.
        buffers = [(b, b.clone()) for b in task.buffers()]
        first = real(self, x, y, cached_feat)
        for p in graph.params:
            p.grad = None
        for b, saved in buffers:
            b.copy_(saved)
        return tuple(torch.empty_like(t) for t in first)

    monkeypatch.setattr(graph_step.GraphedTrainStep, "_captured", captured)


def test_graphed_step_plumbing_equals_train_step_on_cpu(monkeypatch):
    """With the CUDA graph API faked on the CPU (capture records, replay re-runs), GraphedTrainStep over 6 steps
    (3 warm-up, capture, 2 replays) leaves the weights, BatchNorm statistics and per-step outputs of TrainStep:
    the batch reaches the static buffers, the optimizer steps after each replay on the static gradients, and
    each call returns fresh tensors. A batch of another size after the capture is refused."""
    import copy

    import timm

    from hcd_fast import HCDConfig
    from hcd_fast.distill import Distiller, DistillTask, TeacherTap, TrainStep, build_criterion, probe_student
    from hcd_fast.distill.engine.graph_step import GraphedTrainStep
    from hcd_fast.distill.errors import UserError

    torch.manual_seed(0)
    student = timm.create_model("resnet10t", num_classes=7, channels=(8, 16, 32, 64), stem_width=8)
    teacher = TeacherTap(timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=16, patch_size=4,
                                           depth=1, embed_dim=16, num_heads=2))
    channels, _ = probe_student(student, 4, (3, 16, 16))
    crit = build_criterion("hcd", channels, 16, 7, HCDConfig(num_sub_logits=3), backend="reference")
    task = DistillTask(Distiller(student, crit), teacher).train()
    ref_task = copy.deepcopy(task)
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_task.trainable_module.parameters(), lr=0.1, momentum=0.9)
    _fake_cuda(monkeypatch, task)
    graphed, ref = GraphedTrainStep(TrainStep(task, opt, device=torch.device("cpu"))), TrainStep(ref_task, ref_opt)
    previous = None
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 7, (6,), generator=g)
        got, want = graphed(x, y), ref(x, y)
        assert torch.allclose(got.vals, want.vals, rtol=1e-5, atol=1e-6), seed
        assert int(got.correct) == int(want.correct) and bool(got.nonfinite) == bool(want.nonfinite)
        if previous is not None:
            assert got.vals.data_ptr() != previous.data_ptr()
        previous = got.vals
    assert graphed.graph is not None and graphed.calls == 6
    for (name, a), (_, b) in zip(task.state_dict().items(), ref_task.state_dict().items()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    with pytest.raises(UserError, match="variable batch"):
        graphed(torch.randn(5, 3, 16, 16), torch.randint(0, 7, (5,)))
