import os

import pytest
import torch
from hypothesis import settings

# Two CPU cores on CI: keep torch from oversubscribing them, and give hypothesis a budget that fits.
torch.set_num_threads(min(2, os.cpu_count() or 1))
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")


def assert_close(ref: torch.Tensor, got: torch.Tensor, rtol: float, name: str = "") -> None:
    """Relative-RMS closeness (as fla's tests): ||got - ref||_rms <= rtol * (||ref||_rms + 1e-12)."""
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref.double()).pow(2).mean().sqrt()
    base = ref.double().pow(2).mean().sqrt()
    assert err <= rtol * (base + 1e-12), f"{name}: relative rms error {float(err / (base + 1e-12)):.3e} > {rtol}"


@pytest.fixture
def close():
    return assert_close
