"""pytest-benchmark suite of the four ops and the HCD head, the same cases as ``python -m benchmarks``.

    .venv/bin/python -m pytest benchmarks/bench_ops.py                       # the device's profile
    HCD_BENCH_PROFILE=quick .venv/bin/python -m pytest benchmarks/bench_ops.py -k "eager or cpu"

Not collected by ``pytest tests`` (it lives outside tests/ and its name is not test_*.py). Each test times
one fwd+bwd of one case with one provider; compile happens in the warm-up rounds, excluded from timing.
"""
import os

import pytest
import torch

from benchmarks import cases as C
from benchmarks.common import provider_unavailable_reason, select_providers, synchronize

DEVICE = torch.device(os.environ.get("HCD_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
PROFILE = os.environ.get("HCD_BENCH_PROFILE") or ("gpu" if DEVICE.type == "cuda" else "cpu")
CASES = C.profile_cases(PROFILE)
PROVIDERS = select_providers(os.environ.get("HCD_BENCH_PROVIDERS"), DEVICE)

_RUNNERS = {}


def _runner(case):
    if case.id not in _RUNNERS:
        _RUNNERS.clear()  # one case's inputs alive at a time
        _RUNNERS[case.id] = C.Runner(case, DEVICE)
    return _RUNNERS[case.id]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op(benchmark, case, provider):
    why = provider_unavailable_reason(provider, DEVICE)
    if why is not None:
        pytest.skip(why)
    if provider == "compile":
        torch._dynamo.reset()
    fn = _runner(case).fn(provider)

    def call():
        fn()
        synchronize(DEVICE)

    benchmark.group = case.id
    benchmark.extra_info.update({"device": DEVICE.type, "dtype": case.dtype, "shape": case.shape_str(),
                                 "bytes": C.design_bytes(case), "essential_bytes": C.essential_bytes(case),
                                 "flops": C.flops(case)})
    rounds = 2 if PROFILE == "quick" else 10
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=2 if provider == "compile" else 1, iterations=1)
