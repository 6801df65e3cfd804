"""pytest-benchmark suite of whole distillation steps (timm ResNet18 student, ViT-S / Swin-T teachers):
ce, kd, kd_ref, hcd_ref, hcd (see benchmarks/steps.py), the same cases as ``python -m benchmarks``.

    .venv/bin/python -m pytest benchmarks/bench_steps.py
    HCD_BENCH_PROFILE=quick .venv/bin/python -m pytest benchmarks/bench_steps.py

Not collected by ``pytest tests``. Each test times one optimizer step; warm-up steps excluded.
"""
import os

import pytest
import torch

from benchmarks import steps as ST
from benchmarks.common import synchronize

DEVICE = torch.device(os.environ.get("HCD_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
PROFILE = os.environ.get("HCD_BENCH_PROFILE") or ("gpu" if DEVICE.type == "cuda" else "cpu")
CASES = ST.profile_step_cases(PROFILE)

_BENCHES = {}


def _bench(case):
    if case.id not in _BENCHES:
        _BENCHES.clear()
        _BENCHES[case.id] = ST.StepBench(case, DEVICE)
    return _BENCHES[case.id]


@pytest.mark.parametrize("variant", ST.VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_step(benchmark, case, variant):
    step = _bench(case).fn(variant)

    def call():
        step()
        synchronize(DEVICE)

    benchmark.group = case.id
    benchmark.extra_info.update({"device": DEVICE.type, "shape": case.shape_str(),
                                 "precision": ST.variant_precision(variant, DEVICE)})
    benchmark.pedantic(call, rounds=2 if PROFILE == "quick" else 5, warmup_rounds=1 if PROFILE == "quick" else 2,
                       iterations=1)
