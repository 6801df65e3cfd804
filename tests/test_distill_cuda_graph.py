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
