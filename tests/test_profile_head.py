"""benchmarks/profile_head.py (gpu_check's profile stage) on the CPU at tiny shapes: the tables have the
documented structure, every range its counts, and the per-range attribution covers the forward and backward
of every module of the head."""
import json

import pytest

from benchmarks import profile_head


def _check_profile(p):
    assert p["status"] == "ok", p
    assert p["wall_ms"] > 0 and p["busy_ms"] > 0 and p["kernels"] > 0
    assert 0 <= p["host_bound_share"] <= 1
    for name, r in p["ranges"].items():
        assert set(r) == {"kernel_ms", "kernels", "wall_ms"}, name
        assert r["kernels"] >= 0 and r["kernel_ms"] >= 0 and r["wall_ms"] >= 0


def test_profile_head_quick_cpu(tmp_path):
    assert profile_head.main(["--device", "cpu", "--quick", "--no-step", "--providers", "reference,cpu",
                              "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    assert [p["name"] for p in result["profiles"]] == ["head/reference", "head/cpu"]
    for p in result["profiles"]:
        _check_profile(p)
        ranges = p["ranges"]
        for g in range(3):  # the 6 SepConv blocks of ResNet widths as 3 grouped blocks, forward and backward
            assert ranges[f"projector/group{g}"]["kernels"] > 0 and ranges[f"projector/group{g} [bwd]"]["kernels"] > 0
            # Through their modules (the cpu backend's grouped blocks; the reference's one-member group 0): depthwise,
            # pointwise, BN; the reference's members of groups 1 and 2 run alone on parameter slices (no modules).
            for part in ("dw", "pw", "bn") if p["name"] == "head/cpu" or g == 0 else ():
                assert ranges[f"projector/group{g}/{part}"]["kernels"] > 0
                assert ranges[f"projector/group{g}/{part} [bwd]"]["kernels"] > 0
        assert ranges["projector/linear"]["kernels"] > 0  # pool_linear
        assert ranges["projector/pool"]["kernels"] > 0 and ranges["projector/pool [bwd]"]["kernels"] > 0
        for name in ("cfm", "sub_logit_loss"):
            assert ranges[name]["kernels"] > 0 and ranges[name + " [bwd]"]["kernels"] > 0
    ref, fused = (p["ranges"] for p in result["profiles"])
    assert fused["cfm"]["kernels"] < ref["cfm"]["kernels"]  # one batched op for the S CFMs vs 4 eager ones
    md = (tmp_path / "profile.md").read_text()
    assert "## head/cpu" in md and "| projector/group0/dw |" in md and "host-bound share" in md


@pytest.mark.slow
def test_profile_step_quick_cpu(tmp_path):
    """The Swin-T -> ResNet18 step at 32 px, B=2: ranges teacher, student forward, head, backward, optimizer."""
    assert profile_head.main(["--device", "cpu", "--quick", "--providers", "cpu", "--out", str(tmp_path)]) == 0
    step = json.loads((tmp_path / "profile.json").read_text())["profiles"][-1]
    assert step["name"] == "step/swin_t->resnet18"
    _check_profile(step)
    for name in ("teacher", "student_forward", "head", "backward", "optimizer"):
        assert step["ranges"][name]["kernels"] > 0, name
