"""Sliding-window attention: the blocked form equals the per-query reference in every mode."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from titans_lnn.kernels.window_attention import sliding_window_attention_blocked, sliding_window_attention_ref

CASES = [  # (T, P cached keys, window, segment, sinks, second stream, H, G)
    (1, 0, 4, False, 0, False, 2, 1),
    (63, 0, 8, False, 3, False, 4, 2),
    (65, 5, 8, False, 0, False, 4, 4),
    (500, 7, 32, False, 2, False, 2, 1),
    (37, 0, None, False, 2, False, 2, 2),
    (40, 6, None, False, 0, False, 4, 2),
    (50, 3, 16, True, 2, True, 4, 2),
    (65, 0, 8, True, 0, True, 2, 1),
    (45, 13, 8, True, 2, True, 4, 2),  # more cached keys than the window looks back: the key windows crop
    (45, 13, 8, False, 1, True, 2, 1),
]


def _inputs(T, P, H, G, n_sink, second, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x = dict(q=r(2, H, T, D), k=r(2, G, P + T, D), v=r(2, G, P + T, D))
    if n_sink:
        x.update(sink_k=r(1, G, n_sink, D), sink_v=r(1, G, n_sink, D))
    if second:
        x.update(k2=r(2, G, P + T, D), v2=r(2, G, P + T, D))
    return x


def _assert_same_function(ref, got, x, close):
    """Outputs and the gradients of every input in ``x`` agree to 1e-12 (float64). A gradient that is exactly
    zero in the reference (dq with one visible key: softmax over one key is constant) is held to 1e-12 of the
    output's size: the blocked form reaches its zero through sums that round."""
    close(ref, got, 1e-12, "out")
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), list(x.values()))
    g_got = torch.autograd.grad((got * w).sum(), list(x.values()))
    size = float(ref.detach().pow(2).mean().sqrt())
    for name, a, b in zip(x, g_ref, g_got):
        close(a, b, 1e-12, f"d{name}", scale=size)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-P{}-W{}-seg{}-sink{}-k2{}-H{}G{}".format(*c))
def test_blocked_matches_reference(case, close):
    T, P, W, segment, n_sink, second, H, G = case
    x = _inputs(T, P, H, G, n_sink, second)
    kw = dict(window=W, segment=segment, pos0=11 if segment else 0)
    ref = sliding_window_attention_ref(**x, **kw)
    got = sliding_window_attention_blocked(**x, **kw, block=16)
    _assert_same_function(ref, got, x, close)


def test_window_one_sees_only_itself():
    x = _inputs(10, 0, 2, 2, 0, False)
    out = sliding_window_attention_blocked(x["q"], x["k"], x["v"], window=1)
    torch.testing.assert_close(out, x["v"])


@given(T=st.integers(1, 120), W=st.integers(1, 40), block=st.integers(1, 50), seed=st.integers(0, 100))
def test_random_shapes(T, W, block, seed):
    x = {k: v.detach() for k, v in _inputs(T, min(W - 1, 3), 2, 1, 1, False, seed=seed).items()}
    ref = sliding_window_attention_ref(**x, window=W)
    torch.testing.assert_close(sliding_window_attention_blocked(**x, window=W, block=block), ref)


def test_bad_shapes_are_named():
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match="G dividing H=3"):
        sliding_window_attention_blocked(q, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), window=4)
    with pytest.raises(ValueError, match="window=0"):
        sliding_window_attention_blocked(q, torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), window=0)


def _graph_ops(out: torch.Tensor) -> dict[str, int]:
    """How many nodes of each kind the autograd graph behind ``out`` has."""
    counts, seen, todo = {}, set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        counts[type(fn).__name__] = counts.get(type(fn).__name__, 0) + 1
        todo.extend(f for f, _ in fn.next_functions)
    return counts


@pytest.mark.parametrize("window,segment", [(8, False), (8, True)])
def test_blocked_backward_is_linear_in_T(window, segment, close):
    """Regression: slicing or indexing a tensor that needs a gradient once per block (x[:, :, s:e],
    out[..., s:e] = o) makes autograd build a zero gradient of the whole x for every block, a backward
    quadratic in T. The graph must hold no such node that grows with the number of blocks; and the
    result must still equal the reference at an awkward T with cached keys, sinks and a second stream."""
    def slicing_nodes(T):
        x = _inputs(T, 5, 4, 2, 2, True)
        out = sliding_window_attention_blocked(**x, window=window, segment=segment, pos0=3, block=8)
        ops = _graph_ops(out)
        return x, out, sum(n for name, n in ops.items()
                           if any(s in name for s in ("Slice", "Select", "Index", "AsStrided", "Narrow")))

    _, _, few = slicing_nodes(16)
    x, got, many = slicing_nodes(203)  # 26 blocks, the last one ragged
    assert many == few, f"per-block slicing in the backward: {few} slicing nodes at T=16, {many} at T=203"
    ref = sliding_window_attention_ref(**x, window=window, segment=segment, pos0=3)
    _assert_same_function(ref, got, x, close)


def test_training_after_inference_at_the_same_shapes(close):
    """Regression: the masks are cached per shape; one first built under inference_mode (streaming, evaluation)
    must not be an inference tensor when a later call at the same shapes trains (autograd saves the mask)."""
    from titans_lnn.kernels.window_attention import blocked

    blocked._additive_masks.cache_clear()
    x = _inputs(21, 4, 4, 2, 2, True, seed=3)
    kw = dict(window=8, segment=True, pos0=5)
    with torch.inference_mode():
        sliding_window_attention_blocked(**{n: t.detach() for n, t in x.items()}, **kw, block=8)
    got = sliding_window_attention_blocked(**x, **kw, block=8)
    _assert_same_function(sliding_window_attention_ref(**x, **kw), got, x, close)
