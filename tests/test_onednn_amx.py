"""PyTorch's oneDNN bf16 path on AMX CPUs (hcd_fast/distill/onednn_amx.py): the test suite's ISA cap takes effect,
and hcd-distill warns and names the cause and the workaround."""
import platform

import pytest
import torch

from hcd_fast.distill import onednn_amx
from hcd_fast.distill.errors import TrainingError


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's ISA cap is an x86 setting")
def test_conftest_cap_takes_effect_in_this_process(capfd):
    """conftest.py sets ONEDNN_MAX_CPU_ISA=AVX512_CORE before torch: oneDNN's own ISA line shows neither AMX nor
    bf16 instructions (without the cap, a CPU with avx512_bf16 reports 'bfloat16 support')."""
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON), torch.autocast("cpu", torch.bfloat16):
        torch.nn.functional.conv2d(x, w)
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ",info,cpu,isa:" in ln]
    assert lines, "oneDNN printed no ISA line"
    assert "AMX" not in lines[0] and "bfloat16" not in lines[0], lines[0]


def test_amx_detection(tmp_path):
    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    plain.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert onednn_amx.cpu_has_amx(str(amx)) and not onednn_amx.cpu_has_amx(str(plain))
    assert not onednn_amx.cpu_has_amx(str(tmp_path / "missing"))
    for cap, allowed in [(None, True), ("", True), ("ALL", True), ("avx10_1_512_amx", True),
                         ("AVX512_CORE", False), ("AVX512_CORE_BF16", False), ("AVX2", False)]:
        assert onednn_amx.amx_allowed({} if cap is None else {"ONEDNN_MAX_CPU_ISA": cap}) is allowed, cap
    assert not onednn_amx.amx_allowed({"DNNL_MAX_CPU_ISA": "AVX2"})
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert onednn_amx.amx_bf16_risk(cpu, bf16, str(amx), {})
    assert not onednn_amx.amx_bf16_risk(cpu, bf16, str(amx), {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})
    assert not onednn_amx.amx_bf16_risk(cpu, torch.float16, str(amx), {})
    assert not onednn_amx.amx_bf16_risk(cpu, None, str(amx), {})
    assert not onednn_amx.amx_bf16_risk(torch.device("cuda"), bf16, str(amx), {})
    assert not onednn_amx.amx_bf16_risk(cpu, bf16, str(plain), {})


@pytest.fixture
def pretend_amx(monkeypatch):
    """hcd-distill on a CPU that looks like one with AMX, oneDNN uncapped (this process keeps its real cap)."""
    monkeypatch.setattr(onednn_amx, "cpu_has_amx", lambda cpuinfo="/proc/cpuinfo": True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(onednn_amx, "_warned", False)


def test_distill_warns_once_and_names_the_cause_of_a_nonfinite_loss(tmp_path, monkeypatch, pretend_amx):
    from test_distill_trust import _poison_loss_at, ce_args

    from hcd_fast.distill.engine.run import run
    _poison_loss_at(monkeypatch, 2)
    with pytest.warns(RuntimeWarning, match="ONEDNN_MAX_CPU_ISA=AVX512_CORE") as record, \
            pytest.raises(TrainingError, match=r"non-finite loss at step 2 .*Possible cause: .*AMX.*PyTorch/oneDNN bug"):
        run(ce_args(tmp_path / "o", "--amp", "bf16"))
    assert sum("AMX" in str(w.message) for w in record) == 1


def test_distill_fp32_on_amx_does_not_warn(tmp_path, monkeypatch, pretend_amx, recwarn):
    from test_distill_trust import _poison_loss_at, ce_args

    from hcd_fast.distill.engine.run import run
    _poison_loss_at(monkeypatch, 2)
    with pytest.raises(TrainingError) as info:
        run(ce_args(tmp_path / "o", "--amp", "off"))
    assert "AMX" not in str(info.value) and not any("AMX" in str(w.message) for w in recwarn)
