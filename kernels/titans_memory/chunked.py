"""The Titans memory update, chunk-parallel in plain PyTorch (Behrouz et al. 2025, eqs. 8-15).

Same contract as ``memory_update_ref`` (``naive.py``: the update rule, the stable step, the shapes).
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

from titans_lnn.kernels.titans_memory.naive import (
    anchor_forward,
    check_inputs,
    clip_scale,
    curvature,
    join_anchor,
    silu_grad,
    split_anchor,
    stable_steps,
)


def stable_steps_sequence(theta, eta, kappa, k, spent, *, chunk_size, offset=0):
    """``stable_steps`` over a whole sequence split in chunks, all chunks at once (for a curvature that
    does not depend on the anchor, as a linear memory's 2 ||k||^2). theta, eta, kappa: (B, H, T);
    k: (B, H, T, Dk); spent: (B, H, Dk, Dk), Q of the chunk that the first ``offset`` tokens (read by
    an earlier call) belong to. Returns (theta', Q at the end)."""
    B, H, T = theta.shape
    Dk = k.shape[-1]
    C = chunk_size
    n = -(-(offset + T) // C) * C

    def chunks(x):  # (B, H, T, ...) -> (B, H, n / C, C, ...), offset zeros in front, zeros at the end
        x = x.movedim(2, -1)
        x = F.pad(x, (offset, n - offset - T)).movedim(-1, 2)
        return x.reshape(B, H, n // C, C, *x.shape[3:])

    start = torch.zeros(B, H, n // C, Dk, Dk, dtype=theta.dtype, device=theta.device)
    if offset:
        start[:, :, 0] = spent
    # Padded rows have theta = 0 (u = 0) and k = 0: they change nothing.
    scaled, ends = stable_steps(chunks(theta), chunks(eta), chunks(kappa), chunks(F.normalize(k, dim=-1)), start)
    return scaled.reshape(B, H, n)[..., offset:offset + T], ends[:, :, -1]


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


def _chunk(q, k, kh, v, theta, eta, coeffs, W0, S0, A, last, max_grad_norm, spent):
    """One chunk of L tokens (row ``last`` is the last real token; later rows are padding); ``spent``:
    the chunk's Q before its first row (``stable``), or None.

    q, k: (B, H, L, Dk); v: (B, H, L, Dv); coeffs from ``_chunk_coefficients`` for this chunk.
    Returns y (B, H, L, Dv), the weights and momentum after token ``last``, and Q after it.
    """
    beta, E, dbe, dd, d_e = coeffs
    n = len(A)
    # Forward at the anchor on the keys; keep each layer's input x_l and pre-activation z_l.
    out, xs, zs = anchor_forward(A, k)
    if spent is not None:  # padded rows have theta = 0, so u = 0: Q after ``last`` is Q after the last row
        theta, spent = stable_steps(theta, eta, curvature(A, xs, zs), kh, spent)
    # Backward in closed form: delta_l = dLoss/dz_l per token; the gradient of W_l is delta_l x_l^T.
    delta = 2 * (out - v)
    deltas = [None] * n
    for i in range(n - 1, -1, -1):
        deltas[i] = delta
        if i:
            delta = torch.einsum("bhoi,bhlo->bhli", A[i], delta) * silu_grad(zs[i - 1])
    # Clip each token's gradient: sum over layers of ||delta_l||^2 ||x_l||^2 is ||g||^2.
    sq = sum(d.pow(2).sum(-1) * x.pow(2).sum(-1) for d, x in zip(deltas, xs))  # (B, H, L)
    theta = theta * clip_scale(sq, max_grad_norm)
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
    return y, W, S, spent


def memory_update_chunked(q, k, v, theta, eta, alpha, weights, momentum, anchor, *, chunk_size, offset=0,
                          max_grad_norm=None, stable=False):
    """Chunk-parallel form of ``memory_update_ref``: same contract, a Python loop over chunks only."""
    check_inputs(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size, offset)
    B, H, T, _ = q.shape
    W, S = list(weights), list(momentum)
    A, spent = split_anchor(anchor, len(weights), stable, k)
    if T == 0:
        return v[:, :, :0], tuple(W), tuple(S), join_anchor(A, spent)
    ys = []
    start = 0
    khat = F.normalize(k, dim=-1) if stable else k  # once for the sequence, not once per chunk
    if offset:  # finish the chunk that an earlier call started, with its anchor
        L = min(T, chunk_size - offset)
        sl = slice(0, L)
        coeffs = _chunk_coefficients(eta[:, :, sl], alpha[:, :, sl])
        y, W, S, spent = _chunk(q[:, :, sl], k[:, :, sl], khat[:, :, sl], v[:, :, sl], theta[:, :, sl], eta[:, :, sl],
                                coeffs, W, S, A, L - 1, max_grad_norm, spent)
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
        qc, kc, vc, th, et = (chunks(x).unbind(2) for x in (q, k, v, theta, eta))
        khc = chunks(khat).unbind(2) if stable else kc
        # Decay bookkeeping for every chunk at once; padded tokens have theta = 0 and are never read.
        coeffs = [x.unbind(2) for x in _chunk_coefficients(chunks(eta), chunks(alpha))]
        for c in range(N):
            last = C - 1 if c < N - 1 else (rest - 1) % C
            A = W
            spent = None if spent is None else torch.zeros_like(spent)
            y, W, S, spent = _chunk(qc[c], kc[c], khc[c], vc[c], th[c], et[c], tuple(x[c] for x in coeffs), W, S, A,
                                    last, max_grad_norm, spent)
            ys.append(y if c < N - 1 else y[:, :, :last + 1])
    return torch.cat(ys, dim=2), tuple(W), tuple(S), join_anchor(A, spent)
