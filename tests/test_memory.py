"""The Titans memory: chunked form == per-token reference (forward and backward), C = 1 is the exact
per-token update, the closed-form gradient equals autograd, and the module streams."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from titans_lnn.kernels.titans_memory import memory_update_chunked, memory_update_ref, mlp_forward
from titans_lnn.memory import NeuralMemory, PersistentMemory


def _inputs(B=2, H=2, T=13, D=5, depth=2, hidden=7, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k = F.normalize(r(B, H, T, D), dim=-1), F.normalize(r(B, H, T, D), dim=-1)
    v = r(B, H, T, D)
    u = lambda: torch.rand(B, H, T, generator=g, dtype=torch.float64)  # noqa: E731
    theta, eta, alpha = 0.1 * u(), u(), 0.1 * u()
    shapes = [(D, D)] if depth == 1 else [(hidden, D)] + [(hidden, hidden)] * (depth - 2) + [(D, hidden)]
    W = tuple(0.3 * r(B, H, *s) for s in shapes)
    S = tuple(0.05 * r(B, H, *s) for s in shapes)
    A = tuple(w + 0.05 * r(*w.shape) for w in W)
    tensors = [q, k, v, theta, eta, alpha, *W, *S, *A]
    if grad:
        for t in tensors:
            t.requires_grad_()
    n = len(shapes)
    return tensors, n


def _call(fn, tensors, n, C, offset, **kw):
    q, k, v, theta, eta, alpha = tensors[:6]
    W, S, A = tensors[6:6 + n], tensors[6 + n:6 + 2 * n], tensors[6 + 2 * n:]
    y, W, S, A = fn(q, k, v, theta, eta, alpha, tuple(W), tuple(S), tuple(A), chunk_size=C, offset=offset, **kw)
    return [y, *W, *S, *A]


def _assert_same(ref, got, tensors, close):
    """Outputs equal, and the gradients of a random weighted sum of them w.r.t. every input."""
    for i, (a, b) in enumerate(zip(ref, got)):
        close(a, b, 1e-9, f"output {i}")
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in ref]
    g_ref = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ref, ws)), tensors, allow_unused=True)
    g_got = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, ws)), tensors, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_ref, g_got)):
        if a is None:
            assert b is None or b.abs().max() == 0
            continue
        close(a, b, 1e-9, f"grad {i}")


CASES = [(1, 1, 0), (13, 1, 0), (13, 4, 0), (13, 4, 3), (20, 5, 2), (65, 8, 0), (63, 16, 0), (3, 8, 5)]


@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("depth", [1, 2, 3], ids=lambda d: f"depth{d}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-C{}-off{}".format(*c))
def test_chunked_matches_reference(depth, case, clip, close):
    T, C, offset = case
    tensors, n = _inputs(T=T, depth=depth, grad=True)
    ref = _call(memory_update_ref, tensors, n, C, offset, max_grad_norm=clip)
    got = _call(memory_update_chunked, tensors, n, C, offset, max_grad_norm=clip)
    _assert_same(ref, got, tensors, close)


def test_chunk_one_is_the_exact_per_token_update():
    """With C = 1 every gradient is taken at the previous token's weights: a hand-written loop."""
    tensors, n = _inputs(T=9, depth=2, seed=3)
    q, k, v, theta, eta, alpha = tensors[:6]
    W, S = list(tensors[6:6 + n]), list(tensors[6 + n:6 + 2 * n])
    ys = []
    for t in range(q.shape[2]):
        Wg = [w.clone().requires_grad_() for w in W]
        loss = (mlp_forward(Wg, k[:, :, t:t + 1]) - v[:, :, t:t + 1]).pow(2).sum()
        grads = torch.autograd.grad(loss, Wg)
        S = [eta[:, :, t, None, None] * s - theta[:, :, t, None, None] * g for s, g in zip(S, grads)]
        W = [(1 - alpha[:, :, t, None, None]) * w + s for w, s in zip(W, S)]
        ys.append(mlp_forward(W, q[:, :, t:t + 1]))
    got = _call(memory_update_chunked, tensors, n, 1, 0)
    torch.testing.assert_close(got[0], torch.cat(ys, 2))
    for a, b in zip(got[1:1 + n], W):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_closed_form_gradient_equals_autograd(depth):
    """One token, theta = 1, eta = alpha = 0, S = 0: the update is W - grad, so the chunked form's
    closed-form gradient can be read off and compared with autograd's."""
    tensors, n = _inputs(B=1, H=3, T=1, depth=depth, seed=7)
    q, k, v = tensors[:3]
    ones, zeros = torch.ones(1, 3, 1, dtype=torch.float64), torch.zeros(1, 3, 1, dtype=torch.float64)
    W = tuple(tensors[6:6 + n])
    S = tuple(torch.zeros_like(w) for w in W)
    _, W_new, _, _ = memory_update_chunked(q, k, v, ones, zeros, zeros, W, S, W, chunk_size=4)
    Wg = [w.clone().requires_grad_() for w in W]
    grads = torch.autograd.grad((mlp_forward(Wg, k) - v).pow(2).sum(), Wg)
    for w, w_new, g in zip(W, W_new, grads):
        torch.testing.assert_close(w - w_new, g)


@given(T=st.integers(1, 60), C=st.integers(1, 12), split=st.integers(0, 60), seed=st.integers(0, 50))
def test_streamed_calls_equal_one_call(T, C, split, seed):
    """Two calls carrying (weights, momentum, anchor) and the offset equal one call, at any split."""
    split = min(split, T)
    tensors, n = _inputs(T=T, depth=2, seed=seed)
    q, k, v, theta, eta, alpha = tensors[:6]
    W, S = tuple(tensors[6:6 + n]), tuple(tensors[6 + n:6 + 2 * n])
    y, W1, S1, _ = memory_update_chunked(q, k, v, theta, eta, alpha, W, S, W, chunk_size=C)
    part = lambda x, s: x[:, :, s]  # noqa: E731
    a, b = slice(0, split), slice(split, T)
    ya, Wa, Sa, Aa = memory_update_chunked(*(part(x, a) for x in (q, k, v, theta, eta, alpha)), W, S, W, chunk_size=C)
    yb, Wb, Sb, _ = memory_update_chunked(*(part(x, b) for x in (q, k, v, theta, eta, alpha)), Wa, Sa, Aa,
                                          chunk_size=C, offset=split % C)
    torch.testing.assert_close(torch.cat([ya, yb], 2), y)
    for x1, x2 in zip(W1 + S1, Wb + Sb):
        torch.testing.assert_close(x1, x2)


@pytest.mark.parametrize("depth", [1, 2])
def test_module_streams_and_learns_at_test_time(depth):
    torch.manual_seed(0)
    mem = NeuralMemory(16, heads=2, depth=depth, chunk_size=4).double()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    whole, state = mem(x)
    s = mem.init_state(2, dtype=torch.float64)
    y1, s = mem(x[:, :10], s)
    y2, s = mem(x[:, 10:], s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), whole)
    assert s.pos == 23
    assert not torch.equal(state.weights[0], mem.init_state(2, dtype=torch.float64).weights[0])  # it wrote something


def test_max_forget_bounds_the_decay():
    """alpha = max_forget * sigmoid(.): with no learning (theta = 0) the weights decay by prod(1 - alpha),
    and with max_forget = 0 they never change."""
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    for max_forget in (0.0, 0.5):
        mem = NeuralMemory(16, heads=2, depth=1, chunk_size=4, max_forget=max_forget).double()
        with torch.no_grad():
            mem.w_gates.weight.zero_()
            mem.w_gates.bias.view(3, 2)[0].fill_(-1e4)  # theta = 0
            mem.w_gates.bias.view(3, 2)[2].fill_(0.0)  # sigmoid = 1/2
        _, state = mem(x)
        w0 = mem.init_weights_[0].detach()[None]
        torch.testing.assert_close(state.weights[0], w0 * (1 - max_forget / 2) ** 40)
    with pytest.raises(ValueError, match="max_forget=2"):
        NeuralMemory(16, heads=2, max_forget=2)


def test_module_rejects_bad_sizes():
    with pytest.raises(ValueError, match="heads=3 must divide dim=16"):
        NeuralMemory(16, heads=3)
    with pytest.raises(ValueError, match="n_tokens=0"):
        PersistentMemory(0, 8)


def test_clipping_bounds_every_step():
    """With clipping, one token moves the weights by at most theta * max_grad_norm (eta = alpha = 0)."""
    tensors, n = _inputs(B=1, H=2, T=1, depth=2, seed=9)
    q, k, v = tensors[:3]
    v = 100 * v  # a huge error, so an unclipped gradient is huge
    ones, zeros = torch.ones(1, 2, 1, dtype=torch.float64), torch.zeros(1, 2, 1, dtype=torch.float64)
    W = tuple(tensors[6:6 + n])
    S = tuple(torch.zeros_like(w) for w in W)
    _, W_new, _, _ = memory_update_chunked(q, k, v, ones, zeros, zeros, W, S, W, chunk_size=1, max_grad_norm=0.25)
    step = sum((a - b).pow(2).sum((-2, -1)) for a, b in zip(W, W_new)).sqrt()
    torch.testing.assert_close(step, torch.full_like(step, 0.25))


def test_offset_out_of_range_is_named():
    tensors, n = _inputs(T=3, depth=1)
    with pytest.raises(ValueError, match="offset=4"):
        _call(lambda *a, **k: memory_update_chunked(*a, **{**k, "offset": 4}), tensors, n, 4, 0)


def test_clipped_backward_is_finite_in_fp32_with_padding():
    """A partial last chunk is zero-padded; the clip's backward at those zero gradients must not
    produce inf * 0 = NaN in fp32 (it once did, and NaN-ed a whole training run)."""
    tensors, n = _inputs(T=13, depth=2, seed=4)
    tensors = [t.float().requires_grad_() for t in tensors]
    out = _call(memory_update_chunked, tensors, n, 4, 0, max_grad_norm=0.5)
    grads = torch.autograd.grad(sum(o.sum() for o in out), tensors, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


# The curvature-bounded step (stable=True): chunked == reference with the chunk's spent step U carried.
STABLE_CASES = [(1, 1, 0), (13, 1, 0), (13, 4, 3), (20, 5, 2), (63, 16, 0), (3, 8, 5)]


@pytest.mark.parametrize("depth", [1, 2, 3], ids=lambda d: f"depth{d}")
@pytest.mark.parametrize("case", STABLE_CASES, ids=lambda c: "T{}-C{}-off{}".format(*c))
def test_stable_chunked_matches_reference(depth, case, close):
    T, C, offset = case
    tensors, n = _inputs(T=T, depth=depth, grad=True)
    r = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    spent = (0.3 * r @ r.transpose(-1, -2)).requires_grad_()  # Q of the chunk's earlier tokens (PSD)
    tensors = tensors + [spent]
    ref = _call(memory_update_ref, tensors, n, C, offset, max_grad_norm=0.5, stable=True)
    got = _call(memory_update_chunked, tensors, n, C, offset, max_grad_norm=0.5, stable=True)
    assert len(ref) == len(got) == 1 + 3 * n + 1
    _assert_same(ref, got, tensors, close)


@pytest.mark.parametrize("depth", [1, 2], ids=lambda d: f"depth{d}")
def test_stable_split_anywhere_equals_one_call(depth):
    """Carrying (W, S, anchor + U) across calls that cut chunks anywhere gives one call's result."""
    tensors, n = _inputs(T=29, depth=depth, seed=2)
    q, k, v, theta, eta, alpha = tensors[:6]
    W, S = tuple(tensors[6:6 + n]), tuple(tensors[6 + n:6 + 2 * n])
    whole = memory_update_chunked(q, k, v, theta, eta, alpha, W, S, W, chunk_size=4, stable=True)
    A, ys, t0 = W, [], 0
    for t1 in (3, 4, 11, 12, 13, 29):
        sl = slice(t0, t1)
        y, W, S, A = memory_update_chunked(q[:, :, sl], k[:, :, sl], v[:, :, sl], theta[:, :, sl], eta[:, :, sl],
                                           alpha[:, :, sl], W, S, A, chunk_size=4, offset=t0 % 4, stable=True)
        ys.append(y)
        t0 = t1
    torch.testing.assert_close(torch.cat(ys, 2), whole[0], rtol=1e-10, atol=1e-12)
    for a, b in zip((*W, *S, *A), (*whole[1], *whole[2], *whole[3])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # two compilations: a minute or two on 2 cores
@pytest.mark.parametrize("stable", [False, True], ids=["plain", "stable"])
def test_compiled_chunks_match_reference(stable, close, monkeypatch):
    """$TITANS_LNN_COMPILE=1 (whole chunks through torch.compile) == the per-token reference, forward and
    backward, with a call that starts inside a chunk and ends in a padded one."""
    from titans_lnn.kernels.titans_memory import chunked

    monkeypatch.setenv(chunked.COMPILE_ENV, "1")
    tensors, n = _inputs(T=23, depth=2, grad=True)
    ref = _call(memory_update_ref, tensors, n, 5, 2, max_grad_norm=0.5, stable=stable)
    got = _call(memory_update_chunked, tensors, n, 5, 2, max_grad_norm=0.5, stable=stable)
    assert chunked._compiled_chunk is not None  # the compiled path ran
    _assert_same(ref, got, tensors, close)


def test_compile_flag_is_checked(monkeypatch):
    from titans_lnn.kernels.titans_memory import chunked

    monkeypatch.setenv(chunked.COMPILE_ENV, "yes")
    tensors, n = _inputs(T=9)
    with pytest.raises(ValueError, match="TITANS_LNN_COMPILE='yes' is invalid"):
        _call(memory_update_chunked, tensors, n, 4, 0)


def _chunk_eigenvalue(theta, eta, k, C):
    """Largest eigenvalue, over the chunks, of sum_t u'_t k^_t k^_t^T (u' = the step in curvature units)."""
    from titans_lnn.kernels.titans_memory import stable_steps_sequence

    B, H, T, D = k.shape
    kappa = 2 * k.pow(2).sum(-1)
    scaled, _ = stable_steps_sequence(theta, eta, kappa, k, k.new_zeros(B, H, D, D), chunk_size=C)
    u = scaled * kappa / (1 - eta)
    kh = F.normalize(k, dim=-1)
    top = 0.0
    for c in range(0, T, C):
        M = torch.einsum("bht,bhtd,bhte->bhde", u[..., c:c + C], kh[:, :, c:c + C], kh[:, :, c:c + C])
        top = max(top, torch.linalg.eigvalsh(M).max().item())
    return top, scaled


def test_stable_chunk_steps_stay_inside_the_limit():
    """A chunk's steps, momentum-amplified and in units of the curvature, stay below 1 for any gates:
    exactly (telescoping) along one repeated key, and below the stability limit 2 for random keys."""
    g = torch.Generator().manual_seed(0)
    theta = 10 * torch.rand(3, 2, 48, generator=g, dtype=torch.float64)
    eta = torch.rand(3, 2, 48, generator=g, dtype=torch.float64)
    one_key = torch.randn(3, 2, 1, 6, generator=g, dtype=torch.float64).expand(-1, -1, 48, -1)
    top, _ = _chunk_eigenvalue(theta, eta, one_key, 8)
    assert top < 1
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(3, 2, 48, 6, generator=g, dtype=torch.float64).abs()  # a positive cone: overlapping keys
        top, _ = _chunk_eigenvalue(theta, eta, k, 16)
        assert top < 2, (seed, top)


def test_stable_orthogonal_keys_keep_their_whole_step():
    """Keys orthogonal to the chunk's earlier ones take Longhorn's whole step theta / (1 + u)."""
    k = torch.eye(4, dtype=torch.float64)[None, None]  # (1, 1, 4, 4): four orthogonal keys
    theta = torch.full((1, 1, 4), 0.7, dtype=torch.float64)
    eta = torch.zeros_like(theta)
    _, scaled = _chunk_eigenvalue(theta, eta, k, 4)
    torch.testing.assert_close(scaled, torch.full_like(theta, 0.7 / 2.4))


def test_curvature_bounds_the_gauss_newton_eigenvalue():
    """kappa >= the largest eigenvalue of 2 J^T J (J: the memory output's Jacobian w.r.t. all weights)."""
    from titans_lnn.kernels.titans_memory import anchor_forward, curvature

    g = torch.Generator().manual_seed(1)
    for depth in (1, 2, 3):
        shapes = [(5, 5)] if depth == 1 else [(7, 5)] + [(7, 7)] * (depth - 2) + [(5, 7)]
        W = [torch.randn(1, 1, *s, generator=g, dtype=torch.float64) for s in shapes]
        k = F.normalize(torch.randn(1, 1, 1, 5, generator=g, dtype=torch.float64), dim=-1)
        _, xs, zs = anchor_forward(W, k)
        kappa = curvature(W, xs, zs).item()
        flat = torch.cat([w.flatten() for w in W])

        def out(p, W=W, k=k):
            ws, i = [], 0
            for w in W:
                ws.append(p[i:i + w.numel()].view_as(w))
                i += w.numel()
            return mlp_forward(ws, k).flatten()

        J = torch.autograd.functional.jacobian(out, flat)  # (Dv, params)
        top = torch.linalg.eigvalsh(2 * J @ J.T).max().item()
        assert top <= kappa * (1 + 1e-9), (depth, top, kappa)
        assert top >= kappa / 20, (depth, top, kappa)  # and not uselessly loose


def test_relu_write_gate_skips_tokens_exactly():
    """write_gate="relu": tokens whose gate logit is negative write nothing, bit for bit (a sigmoid
    gate always writes a little), and their gradient passes straight through. (Without forgetting:
    alpha > 0 changes the weights on every token.)"""
    torch.manual_seed(0)
    mem = NeuralMemory(16, heads=2, depth=1, chunk_size=4, max_forget=0.0, write_gate="relu").double()
    with torch.no_grad():
        mem.w_gates.weight.zero_()
        mem.w_gates.bias.view(3, 2)[0].fill_(-1.0)  # theta logit < 0 everywhere
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    state = mem.init_state(2, dtype=torch.float64)
    w0 = mem.current_weights(state)[0].detach()
    out, new = mem(x, state)
    assert torch.equal(new.weights[0], w0) and (mem.last_theta == 0).all()
    theta_grad = torch.autograd.grad(mem.last_theta.sum(), mem.w_gates.bias, retain_graph=True)[0]
    assert (theta_grad == 0).all()  # a penalty on last_theta does not push closed gates further
    out.pow(2).sum().backward()
    assert mem.w_gates.bias.grad.view(3, 2)[0].abs().min() > 0  # the output's gradient passes straight through
    sig = NeuralMemory(16, heads=2, depth=1, chunk_size=4, max_forget=0.0).double()
    _, new = sig(x, sig.init_state(2, dtype=torch.float64))
    assert not torch.equal(new.weights[0], sig.current_weights(sig.init_state(2, dtype=torch.float64))[0])
