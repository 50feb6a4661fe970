"""The Titans neural memory over a sequence (Behrouz et al. 2025, eqs. 8-15).

The memory is an MLP whose weights W = (W_1, ..., W_L) are the state, one per (batch, head):
    M(x) = W_1 x                                    (L = 1: a linear matrix memory)
    M(x) = x + W_L s(W_{L-1} ... s(W_1 x))          (L >= 2: MLP with residual, s = SiLU)
For each token t, with data-dependent gates theta_t (learning rate), eta_t (momentum), alpha_t
(forgetting):
    g_t = grad_W ||M_A(k_t) - v_t||^2            at the anchor A (see below)
    g_t <- g_t * min(1, max_grad_norm / ||g_t||)  (each token's gradient clipped in norm, all layers)
    S_t = eta_t S_{t-1} - theta_t g_t             (surprise with momentum)
    W_t = (1 - alpha_t) W_{t-1} + S_t             (update with forgetting)
    y_t = M_{W_t}(q_t)                            (read after the write, no update)
The sequence is split into chunks of C tokens and the anchor A is the weights at the start of the
token's chunk (mini-batch gradient descent, as in the paper); C = 1 is the exact per-token update.
Clipping each token's gradient (as titans-pytorch's ``max_grad_norm``) bounds every step: without
it, an outer training run that raises theta drives the inner descent unstable (an MLP's curvature
grows with its own weights) and the memory's weights blow up. Clipping only rescales theta_t, so the
closed form below is unchanged. ``max_grad_norm=None`` turns it off.
A call may start inside a chunk (streaming): ``offset`` tokens of the current chunk were consumed
by earlier calls, whose anchor is passed in.

Shapes: q, k (B, H, T, Dk); v (B, H, T, Dv); theta, eta, alpha (B, H, T);
weights, momentum, anchor: tuples of (B, H, out_l, in_l), one per layer.
Returns y (B, H, T, Dv), and the new (weights, momentum, anchor).

``memory_update_ref`` is the per-token loop (gradients by autograd: the specification).
``memory_update_chunked`` computes a chunk at once: every per-token gradient is a rank-one outer
product delta_i x_i^T per layer, so the weights after token t of the chunk are
    W_t = beta_t W_0 + (D_beta E)_t S_0 - sum_i Cm[t, i] delta_i x_i^T,
with beta_t, E_t the products of (1 - alpha) and eta since the chunk start, D_beta[t, s] = beta_t / beta_s
and D_E[s, i] = E_s / E_i for i <= s <= t (formed from log-decays, so they never overflow) and
Cm = (D_beta @ D_E) * theta (theta after clipping). Reading W_t x for every t is then attention-like:
beta_t W_0 x_t + (D_beta E)_t S_0 x_t - ((Cm * (X_hat X^T)) @ Delta)_t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mlp_forward(weights, x):
    """M_W(x). weights: tuple of (B, H, out, in); x: (B, H, N, Dk) -> (B, H, N, Dv)."""
    h = x
    for i, w in enumerate(weights):
        h = torch.einsum("bhoi,bhni->bhno", w, h)
        if i < len(weights) - 1:
            h = F.silu(h)
    return h if len(weights) == 1 else x + h


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _clip_scale(sq_norm: torch.Tensor, max_grad_norm: float | None) -> torch.Tensor:
    """min(1, max_grad_norm / ||g||) from the squared norm ||g||^2 (any shape)."""
    if max_grad_norm is None:
        return torch.ones_like(sq_norm)
    # Only the clipped entries go through rsqrt: at a zero gradient (padded tokens), rsqrt's own
    # gradient is inf, and inf * 0 would poison the backward with NaN.
    clipped = sq_norm > max_grad_norm**2
    safe = torch.where(clipped, sq_norm, torch.ones_like(sq_norm))
    return torch.where(clipped, max_grad_norm * torch.rsqrt(safe), torch.ones_like(sq_norm))


def _check(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size, offset):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"memory_update: q, k must be (B, H, T, Dk) and v (B, H, T, Dv); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if g.shape != q.shape[:3]:
            raise ValueError(f"memory_update: {name} must be (B, H, T) = {tuple(q.shape[:3])}; got {tuple(g.shape)}")
    if not (len(weights) == len(momentum) == len(anchor)) or not weights:
        raise ValueError("memory_update: weights, momentum and anchor must be non-empty tuples of equal length")
    if not 0 <= offset < chunk_size:
        raise ValueError(f"memory_update: offset={offset} must be in [0, chunk_size={chunk_size})")


def memory_update_ref(q, k, v, theta, eta, alpha, weights, momentum, anchor, *, chunk_size, offset=0,
                      max_grad_norm=None):
    """Per-token reference; gradients of the inner loss by autograd (differentiable end to end)."""
    _check(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size, offset)
    W, S, A = list(weights), list(momentum), list(anchor)
    ys = []
    for t in range(q.shape[2]):
        if (offset + t) % chunk_size == 0:
            A = list(W)
        with torch.enable_grad():
            A_ = [a if a.requires_grad else a.detach().requires_grad_() for a in A]
            pred = mlp_forward(A_, k[:, :, t:t + 1])
            loss = (pred - v[:, :, t:t + 1]).pow(2).sum()
            grads = torch.autograd.grad(loss, A_, create_graph=torch.is_grad_enabled())
        sq = sum(g.pow(2).sum((-2, -1)) for g in grads)  # (B, H)
        grads = [g * _clip_scale(sq, max_grad_norm)[..., None, None] for g in grads]
        th, et, al = (g[:, :, t, None, None] for g in (theta, eta, alpha))
        S = [et * s - th * g for s, g in zip(S, grads)]
        W = [(1 - al) * w + s for w, s in zip(W, S)]
        ys.append(mlp_forward(W, q[:, :, t:t + 1]))
    y = torch.cat(ys, dim=2) if ys else v[:, :, :0]
    return y, tuple(W), tuple(S), tuple(A)


def _chunk_coefficients(eta, alpha):
    """Decay bookkeeping for chunks. eta, alpha: (..., L) -> beta, E, DbE, D, D_E.

    beta_t = prod_{j<=t}(1 - alpha_j), E_t = prod_{j<=t} eta_j: (..., L);
    DbE[t] = sum_{s<=t} beta_t / beta_s E_s: (..., L);
    D[t, i] = sum_{i<=s<=t} (beta_t/beta_s)(E_s/E_i): (..., L, L), so that Cm = D * theta.
    """
    L = eta.shape[-1]
    tiny = torch.finfo(eta.dtype).tiny
    log_b = torch.log1p(-alpha.clamp(max=1 - 1e-7)).cumsum(-1)
    log_e = torch.log(eta.clamp_min(tiny)).cumsum(-1)
    causal = torch.ones(L, L, dtype=torch.bool, device=eta.device).tril()
    d_beta = torch.where(causal, log_b[..., :, None] - log_b[..., None, :], float("-inf")).exp()  # (..., L, L)
    d_e = torch.where(causal, log_e[..., :, None] - log_e[..., None, :], float("-inf")).exp()
    E = log_e.exp()
    dbe = (d_beta @ E[..., None])[..., 0]
    return log_b.exp(), E, dbe, d_beta @ d_e, d_e


def _chunk(q, k, v, theta, coeffs, W0, S0, A, last, max_grad_norm):
    """One chunk of L tokens (row ``last`` is the last real token; later rows are padding).

    q, k: (B, H, L, Dk); v: (B, H, L, Dv); coeffs from ``_chunk_coefficients`` for this chunk.
    Returns y (B, H, L, Dv) and the weights and momentum after token ``last``.
    """
    beta, E, dbe, dd, d_e = coeffs
    n = len(A)
    # Forward at the anchor on the keys; keep each layer's input x_l and pre-activation z_l.
    xs, zs = [], []
    h = k
    for i, a in enumerate(A):
        xs.append(h)
        z = torch.einsum("bhoi,bhli->bhlo", a, h)
        zs.append(z)
        h = F.silu(z) if i < n - 1 else z
    out = h if n == 1 else k + h
    # Backward in closed form: delta_l = dLoss/dz_l per token; the gradient of W_l is delta_l x_l^T.
    delta = 2 * (out - v)
    deltas = [None] * n
    for i in range(n - 1, -1, -1):
        deltas[i] = delta
        if i:
            delta = torch.einsum("bhoi,bhlo->bhli", A[i], delta) * _silu_grad(zs[i - 1])
    # Clip each token's gradient: sum over layers of ||delta_l||^2 ||x_l||^2 is ||g||^2.
    sq = sum(d.pow(2).sum(-1) * x.pow(2).sum(-1) for d, x in zip(deltas, xs))  # (B, H, L)
    theta = theta * _clip_scale(sq, max_grad_norm)
    cm = dd * theta[..., None, :]
    # Read y_t = M_{W_t}(q_t) at the per-token weights.
    h = q
    for i in range(n):
        base = torch.einsum("bhoi,bhli->bhlo", W0[i], h) * beta[..., None] \
            + torch.einsum("bhoi,bhli->bhlo", S0[i], h) * dbe[..., None]
        scores = cm * torch.einsum("bhti,bhli->bhtl", h, xs[i])  # (B, H, L, L)
        z = base - scores @ deltas[i]
        h = F.silu(z) if i < n - 1 else z
    y = h if n == 1 else q + h
    # State after token ``last``.
    cm_last, de_last = cm[:, :, last], d_e[:, :, last] * theta  # (B, H, L)
    W, S = [], []
    for i in range(n):
        upd = torch.einsum("bhl,bhlo,bhli->bhoi", cm_last, deltas[i], xs[i])
        mom = torch.einsum("bhl,bhlo,bhli->bhoi", de_last, deltas[i], xs[i])
        W.append(beta[:, :, last, None, None] * W0[i] + dbe[:, :, last, None, None] * S0[i] - upd)
        S.append(E[:, :, last, None, None] * S0[i] - mom)
    return y, W, S


def memory_update_chunked(q, k, v, theta, eta, alpha, weights, momentum, anchor, *, chunk_size, offset=0,
                          max_grad_norm=None):
    """Chunk-parallel form of ``memory_update_ref``: same contract, a Python loop over chunks only."""
    _check(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size, offset)
    B, H, T, _ = q.shape
    W, S, A = list(weights), list(momentum), list(anchor)
    if T == 0:
        return v[:, :, :0], tuple(W), tuple(S), tuple(A)
    ys = []
    start = 0
    if offset:  # finish the chunk that an earlier call started, with its anchor
        L = min(T, chunk_size - offset)
        sl = slice(0, L)
        coeffs = _chunk_coefficients(eta[:, :, sl], alpha[:, :, sl])
        y, W, S = _chunk(q[:, :, sl], k[:, :, sl], v[:, :, sl], theta[:, :, sl], coeffs, W, S, A, L - 1,
                         max_grad_norm)
        ys.append(y)
        start = L
    rest = T - start
    if rest:
        C = chunk_size
        N = -(-rest // C)
        pad = N * C - rest

        def chunks(x):  # (B, H, rest, ...) -> (B, H, N, C, ...), zero-padded at the end
            x = x[:, :, start:]
            if pad:
                x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)
            return x.reshape(B, H, N, C, *x.shape[3:])

        # unbind, not x[:, :, c]: indexing once per chunk makes autograd build a zero gradient of the
        # whole tensor for every chunk (a backward quadratic in T); unbind's backward is one stack.
        qc, kc, vc, th = (chunks(x).unbind(2) for x in (q, k, v, theta))
        # Decay bookkeeping for every chunk at once; padded tokens have theta = 0 and are never read.
        coeffs = [x.unbind(2) for x in _chunk_coefficients(chunks(eta), chunks(alpha))]
        for c in range(N):
            last = C - 1 if c < N - 1 else (rest - 1) % C
            A = W
            y, W, S = _chunk(qc[c], kc[c], vc[c], th[c], tuple(x[c] for x in coeffs), W, S, A, last,
                             max_grad_norm)
            ys.append(y if c < N - 1 else y[:, :, :last + 1])
    return torch.cat(ys, dim=2), tuple(W), tuple(S), tuple(A)
