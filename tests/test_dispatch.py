import subprocess
import sys

import pytest
import torch

import hcd_fast
from hcd_fast import functional as HF
from hcd_fast import HCDConfig
from hcd_fast.ops import dispatch


def test_backends_report_every_backend_with_a_reason():
    report = hcd_fast.backends()
    assert set(report) == {"reference", "triton", "cuda", "cpu"}
    assert report["reference"].available
    for status in report.values():
        assert isinstance(status.reason, str) and status.reason


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backend_available():
    """On a GPU machine the compiled CUDA backend must be there (a failed extension build fails here)."""
    status = hcd_fast.backends()["cuda"]
    assert status.available, status.reason


@pytest.mark.slow
def test_python_m_hcd_fast_prints_the_report():
    out = subprocess.run([sys.executable, "-m", "hcd_fast"], capture_output=True, text=True, check=True).stdout
    for name in ("reference", "triton", "cuda", "cpu"):
        assert name in out
    assert "available" in out


def test_auto_on_cpu_picks_cpu_or_reference():
    expected = "cpu" if hcd_fast.backends()["cpu"].available else "reference"
    if dispatch._ENV_BACKEND not in (None, "auto"):
        pytest.skip("HCD_FAST_BACKEND is set in this environment")
    assert dispatch.resolve("auto", torch.device("cpu")) == expected


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        hcd_fast.HCDLoss((4,), 4, 3, backend="tpu")
    with pytest.raises(ValueError, match="backend"):
        dispatch.resolve("tpu", torch.device("cpu"))


def test_unavailable_backend_says_why():
    for name, status in hcd_fast.backends().items():
        if not status.available:
            with pytest.raises(RuntimeError, match=f"{name}.*not available"):
                dispatch.resolve(name, torch.device("cpu"))


def test_cuda_backend_refuses_cpu_tensors():
    # Not built/no GPU -> RuntimeError (not available); available -> ValueError (wrong device).
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        HF.pool_linear(torch.randn(1, 2, 3, 3), torch.randn(4, 2), torch.randn(4), backend="cuda")


@pytest.mark.slow
def test_env_var_overrides_auto():
    code = ("import torch, hcd_fast.ops.dispatch as d; "
            "print(d.resolve('auto', torch.device('cpu')))")
    env = {"HCD_FAST_BACKEND": "reference", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "reference"
    env["HCD_FAST_BACKEND"] = "nonsense"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "HCD_FAST_BACKEND" in bad.stderr


def test_functional_reference_equals_reference_module():
    torch.manual_seed(0)
    zf, zs, zt, y = torch.randn(2, 3, 4, 5), torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 4, 2])
    a = HF.sub_logit_loss(zf, zs, zt, y, HCDConfig(), backend="reference")
    b = hcd_fast.reference.sub_logit_loss(zf, zs, zt, y, HCDConfig())
    assert torch.equal(a[0], b[0])


def test_auto_on_cuda_picks_the_faster_backend_per_op(monkeypatch):
    """With both GPU backends available, "auto" takes triton for sub_logit_loss and cuda for the other ops
    (what the H100 run measured); with only one available, that one for every op."""
    cuda = torch.device("cuda")

    def fake_status(available):
        return {name: dispatch.BackendStatus(name, name in available, "test", ("cuda",) if name in available else ())
                for name in ("triton", "cuda")}

    monkeypatch.setattr(dispatch, "_ENV_BACKEND", None)
    for available, expected in [(("triton", "cuda"), {"sub_logit_loss": "triton"}),
                                (("cuda",), {"sub_logit_loss": "cuda"}),
                                (("triton",), {op: "triton" for op in dispatch.OPS})]:
        monkeypatch.setattr(dispatch, "_STATUS", {**dispatch._STATUS, **fake_status(available)})
        for op in dispatch.OPS:
            want = expected.get(op, "cuda" if "cuda" in available else "triton")
            assert dispatch.resolve("auto", cuda, op) == want, (available, op)
    # an explicit backend is never re-routed
    monkeypatch.setattr(dispatch, "_STATUS", {**dispatch._STATUS, **fake_status(("triton", "cuda"))})
    assert dispatch.resolve("cuda", cuda, "sub_logit_loss") == "cuda"
