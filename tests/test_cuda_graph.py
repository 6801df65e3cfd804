"""The HCD head captured in a CUDA graph, forward and backward, on every GPU backend and the reference: with
``torch.cuda.graph`` (PyTorch's whole-network capture recipe), with ``torch.cuda.make_graphed_callables``, and
under ``torch.compile(mode="reduce-overhead")``. After warm-up, replays with new inputs copied into the static
buffers give the eager loss, every gradient (parameters and inputs) and the BatchNorm running statistics.
All marked ``cuda`` (run by benchmarks/gpu_check.sh's test stages); the CPU side (torch.compile fullgraph over
HCDLoss per CPU backend) is in test_hcd_loss.py.
"""
import copy

import pytest
import torch
import torch.nn as nn

from hcd_fast import HCDConfig, HCDLoss
from helpers import Backend, assert_close, backend_marks

pytestmark = pytest.mark.usefixtures("no_tf32")

CHANNELS, MAPS, DT, K, B = (8, 16, 32, 64), (16, 8, 4, 2), 24, 37, 8
GPU_BACKENDS = [pytest.param(b, id=b.id, marks=backend_marks(b))
                for b in (Backend("cuda", "cuda"), Backend("triton", "cuda", jit=True))] + [
    pytest.param(Backend("reference", "cuda"), id="reference-cuda",
                 marks=[pytest.mark.cuda,
                        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]
MODES = ["fp32", "bf16-autocast"]


def new_inputs(seed, channels_last):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, c, m, m, generator=g) for c, m in zip(CHANNELS, MAPS)]
    if channels_last:
        feats = [f.cuda().contiguous(memory_format=torch.channels_last) for f in feats]
    else:
        feats = [f.cuda() for f in feats]
    return (feats, torch.randn(B, K, generator=g).cuda(), torch.randn(B, DT, generator=g).cuda(),
            torch.randn(B, K, generator=g).cuda(), torch.randint(0, K, (B,), generator=g).cuda())


def leaves(inputs):
    feats, zs, ft, zt, y = inputs
    return [f.clone().requires_grad_() for f in feats], zs.clone().requires_grad_(), ft, zt, y


def step(crit, inputs, mode):
    """One forward+backward; returns the loss."""
    feats, zs, ft, zt, y = inputs
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode != "fp32"):
        loss = crit(feats, zs, ft, zt, y)
    loss.backward()
    return loss


def make(backend, mode):
    torch.manual_seed(0)
    return HCDLoss(CHANNELS, DT, K, HCDConfig(), backend=backend.name, validate=True).cuda().train()


def compare(tag, got_loss, got_crit, got_inputs, want_loss, want_crit, want_inputs, mode):
    rtol = 1e-5 if mode == "fp32" else 2e-2
    assert_close(f"{tag} loss", got_loss, want_loss, rtol, atol=1e-6)
    for (name, p), (_, q) in zip(got_crit.named_parameters(), want_crit.named_parameters()):
        assert_close(f"{tag} grad {name}", p.grad, q.grad, rtol, atol=1e-6)
    for i, (a, b) in enumerate(zip(got_inputs[0] + [got_inputs[1]], want_inputs[0] + [want_inputs[1]])):
        assert_close(f"{tag} grad input {i}", a.grad, b.grad, rtol, atol=1e-6)
    for (name, a), (_, b) in zip(got_crit.named_buffers(), want_crit.named_buffers()):
        assert_close(f"{tag} buffer {name}", a, b, rtol, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_head_captured_with_torch_cuda_graph(backend, mode):
    """PyTorch's recipe: warm up on a side stream, capture forward+backward with torch.cuda.graph, replay with new
    inputs copied into the static ones; validate=True (the target check is a device-side assert under capture)."""
    crit = make(backend, mode)
    static = leaves(new_inputs(0, channels_last=True))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # Triton JIT, cuBLAS(Lt) handles and workspaces, the weight-cast cache
            crit.zero_grad(set_to_none=True)
            step(crit, static, mode)
    torch.cuda.current_stream().wait_stream(side)
    eager = copy.deepcopy(crit)
    g = torch.cuda.CUDAGraph()
    crit.zero_grad(set_to_none=True)
    for t in static[0] + [static[1]]:
        t.grad = None
    with torch.cuda.graph(g):
        static_loss = step(crit, static, mode)
    for i in range(1, 4):
        fresh = new_inputs(i, channels_last=True)
        for dst, src in zip(static[0] + list(static[1:]), fresh[0] + list(fresh[1:])):
            dst.detach().copy_(src)
        g.replay()
        eager.zero_grad(set_to_none=True)
        want_inputs = leaves(fresh)
        want = step(eager, want_inputs, mode)
        torch.cuda.synchronize()
        compare(f"replay {i}", static_loss, crit, static, want, eager, want_inputs, mode)


class FlatHead(nn.Module):
    """HCDLoss with tensors-only positional arguments, as make_graphed_callables takes them."""

    def __init__(self, crit):
        super().__init__()
        self.crit = crit

    def forward(self, *args):
        s = len(CHANNELS)
        return self.crit(list(args[:s]), *args[s:])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_head_with_make_graphed_callables(backend):
    crit = make(backend, "fp32")
    eager = copy.deepcopy(crit)
    sample = leaves(new_inputs(0, channels_last=True))
    sample_args = tuple(sample[0]) + tuple(sample[1:])
    graphed = torch.cuda.make_graphed_callables(FlatHead(crit), sample_args, num_warmup_iters=3)
    with torch.no_grad():
        for _ in range(3):  # the warm-up forwards moved the running statistics
            eager(*sample)
    for i in range(1, 3):
        fresh = new_inputs(i, channels_last=True)
        got_inputs, want_inputs = leaves(fresh), leaves(fresh)
        crit.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        loss = graphed(*got_inputs[0], *got_inputs[1:])
        loss.backward()
        want = step(eager, want_inputs, "fp32")
        torch.cuda.synchronize()
        compare(f"call {i}", loss, crit, got_inputs, want, eager, want_inputs, "fp32")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_head_compiled_reduce_overhead(backend):
    """torch.compile(mode="reduce-overhead") over HCDLoss (inductor's CUDA graphs) equals eager step by step."""
    crit = make(backend, "bf16-autocast")
    eager = copy.deepcopy(crit)
    torch._dynamo.reset()
    compiled = torch.compile(crit, mode="reduce-overhead")
    for i in range(4):
        fresh = new_inputs(i, channels_last=True)
        got_inputs, want_inputs = leaves(fresh), leaves(fresh)
        crit.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        loss = step(compiled, got_inputs, "bf16-autocast").detach().clone()
        want = step(eager, want_inputs, "bf16-autocast")
        torch.cuda.synchronize()
        compare(f"step {i}", loss, crit, got_inputs, want, eager, want_inputs, "bf16-autocast")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_momentum_none_refused_during_capture():
    crit = make(Backend("reference", "cuda"), "fp32")
    crit.projectors.group_of(0, len(crit.projectors) - 2)[0].bn2.momentum = None  # the last blocks' grouped BN
    inputs = leaves(new_inputs(0, channels_last=False))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(crit, inputs, "fp32")
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="momentum=None"):
        with torch.cuda.graph(g):
            step(crit, inputs, "fp32")
