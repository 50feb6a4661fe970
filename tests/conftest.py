import os
from types import SimpleNamespace

import torch

# Without a GPU, Triton kernels are tested through Triton's CPU interpreter. Triton picks the interpreter when
# it is imported and when a kernel is decorated, and libraries other test modules import at collection
# (transformers, fla) import triton too: so the flag is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import settings

from titans_lnn import TitansLNN, TitansLNNConfig

# Two CPU cores on CI: keep torch from oversubscribing them, and give hypothesis a budget that fits.
torch.set_num_threads(min(2, os.cpu_count() or 1))
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")


def assert_close(ref: torch.Tensor, got: torch.Tensor, rtol: float, name: str = "", scale: float = 1e-12) -> None:
    """Relative-RMS closeness (as fla's tests): ||got - ref||_rms <= rtol * max(||ref||_rms, scale). ``scale``: the
    size below which ref counts as zero, e.g. the size of the values a gradient that is exactly zero in ref
    (rounding is all the other side can differ by there) is computed from."""
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref.double()).pow(2).mean().sqrt()
    base = ref.double().pow(2).mean().sqrt()
    floor = max(float(base), scale)
    assert err <= rtol * floor, f"{name}: relative rms error {float(err / floor):.3e} > {rtol}"


@pytest.fixture
def close():
    return assert_close


class _Counter(torch.nn.Module):
    """A stand-in model whose greedy continuation of token x is x + 1 (mod 256): "a" -> "bcdef..."."""

    stream = TitansLNN.stream  # the model's own streaming, over this forward
    stream_pieces = TitansLNN.stream_pieces

    def __init__(self):
        super().__init__()
        self.config = TitansLNNConfig.from_preset("debug")
        self.embed = torch.nn.Embedding(1, 1)  # where stream_pieces finds the device

    def forward(self, input_ids, state=None, dt=None):
        logits = F.one_hot((input_ids + 1) % 256, 256).double()  # (B, T, V)
        return SimpleNamespace(logits=logits, state=(state or 0) + input_ids.shape[1])

    def _forward(self, input_ids, labels=None, state=None, dt=None):
        return self(input_ids, state=state)


@pytest.fixture
def counter_model():
    """The stand-in model above: its greedy output is known, so stop strings and scoring can be tested."""
    return _Counter()


@pytest.fixture(scope="session")
def cpp_loop():
    """The memory's C++ chunk loop, built once per test session (torch caches it on disk afterwards); a failed
    build fails the tests that ask for it (CI has g++ and ninja)."""
    from titans_lnn.kernels.titans_memory import cpp

    ext = cpp.load()
    assert ext is not None, f"the C++ chunk loop did not build: {cpp.build_error()}"
    return ext
