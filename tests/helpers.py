"""Comparison helpers shared by the backend test files."""
import torch


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float = 1e-12) -> None:
    """max |got - want| <= rtol * max |want| + atol, in float64, and got finite: a relative bound on the
    largest entry, which a kernel that forgets or corrupts any element fails."""
    got, want = got.double(), want.double().to(got.device)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if want.numel() == 0:
        return
    scale = max(want.abs().max().item(), 1e-30)
    err = (got - want).abs().max().item()
    assert err <= rtol * scale + atol, f"{name}: max error {err:.3e} vs scale {scale:.3e}"


def assert_close_to(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6,
                    what: str = "") -> None:
    """``assert_close`` with the argument order of the Triton test files."""
    assert_close(what, got, want, rtol, atol)
