"""The Titans memory update, chunk-parallel in plain PyTorch (Behrouz et al. 2025, eqs. 8-15).

Same contract as ``memory_update_ref`` (``naive.py``: the update rule, the stable step, the shapes).
``memory_update_chunked`` computes a chunk at once: every per-token gradient is a rank-one outer
product delta_i x_i^T per layer, so the weights after token t of the chunk are
    W_t = beta_t W_0 + (D_beta E)_t S_0 - sum_i Cm[t, i] delta_i x_i^T,
with beta_t, E_t the products of (1 - alpha) and eta since the chunk start, D_beta[t, s] = beta_t / beta_s
and D_E[s, i] = E_s / E_i for i <= s <= t (formed from log-decays, so they never overflow) and
Cm = (D_beta @ D_E) * theta (theta after clipping). Reading W_t x for every t is then attention-like:
beta_t W_0 x_t + (D_beta E)_t S_0 x_t - ((Cm * (X_hat X^T)) @ Delta)_t.

The chunks follow each other (a chunk's gradients are taken at the weights the previous one left), so
the loop stays; what does not depend on a chunk's anchor is done for all chunks at once before it. The
cost of a chunk is then the overhead of its small ops, and under autograd mostly that of its backward
(~450 ops through the autograd engine per chunk). So for depth 1 and 2 (the presets) the whole chunks
run through ``chunk_loop.py``: the forward without recording and a hand-written backward, one autograd
node for the loop (about 2.4x faster forward + backward on the tiny model's memory at 4K-16K; the same
values and gradients, tested against this file's ``_chunk`` under autograd, which deeper memories,
$TITANS_LNN_MEMORY_BACKWARD=autograd and $TITANS_LNN_COMPILE=1 still run). With ``TITANS_LNN_COMPILE=1``
every whole chunk runs through ``torch.compile`` (inductor; C++ kernels that fuse the elementwise ops),
after a compilation of a minute or two per process. Off by default: eager needs no compiler and no warm-up.
Without a gradient (inference), depth 2 with the stable step hands the raw rows to ``chunk_loop.run_infer``
(``csrc/chunk_infer.h``), which makes each chunk's inputs (the padding, ``_chunk_inputs``,
``_chunk_coefficients``) inside its loop.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from titans_lnn.kernels.titans_memory.chunk_loop import run_chunks, run_infer
from titans_lnn.kernels.titans_memory.naive import (
    check_inputs,
    clip_scale,
    curvature_from,
    join_anchor,
    residual_curvature,
    split_anchor,
    stable_steps,
)

COMPILE_ENV = "TITANS_LNN_COMPILE"  # "1": whole chunks through torch.compile; unset or "0": eager (default)
# "hand" (default): depth 1 and 2 run the whole chunks through chunk_loop.py (hand-written backward);
# "autograd": every depth runs ``_chunk`` under autograd (the form chunk_loop.py is tested against).
BACKWARD_ENV = "TITANS_LNN_MEMORY_BACKWARD"
_compiled_chunk = None


def _hand_backward() -> bool:
    """Whether $TITANS_LNN_MEMORY_BACKWARD picks chunk_loop.py's hand-written backward (read at each call)."""
    flag = os.environ.get(BACKWARD_ENV, "hand") or "hand"
    if flag not in ("hand", "autograd"):
        raise ValueError(f"${BACKWARD_ENV}={flag!r} is invalid: expected 'hand' (chunk_loop.py) or 'autograd'")
    return flag == "hand"


def _chunk_fn():
    """``_chunk`` for whole chunks (fixed shapes; a call's first chunk, finishing an earlier call's, stays
    eager): compiled when $TITANS_LNN_COMPILE is "1", else eager. Read at each call, like $TITANS_LNN_IMPL."""
    flag = os.environ.get(COMPILE_ENV, "0") or "0"
    if flag not in ("0", "1"):
        raise ValueError(f"${COMPILE_ENV}={flag!r} is invalid: expected '0' (eager) or '1' (torch.compile)")
    if flag == "0":
        return _chunk
    global _compiled_chunk
    if _compiled_chunk is None:
        # One graph per (grad mode, requires_grad pattern of the state, last row, Q wanted): more than
        # dynamo's default of 8 recompilations, all of them bounded by the chunk size.
        compiled = torch.compile(_chunk, dynamic=False)
        _compiled_chunk = torch._dynamo.config.patch(recompile_limit=64)(compiled)
    return _compiled_chunk


class _UnitRows(torch.autograd.Function):
    """x / max(||x||, eps) over the last dim (``F.normalize(x, dim=-1)``, the same values) with a hand-written
    backward: (g - y (g . y)) / n, four ops on the whole tensor where autograd's norm, clamp and division take
    about a dozen. The output is contiguous whatever x's strides (the chunked loop reshapes it for free)."""

    @staticmethod
    def forward(ctx, x, eps):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
        n = norm.clamp_min(eps)
        y = torch.div(x, n, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
        ctx.save_for_backward(y, n, norm < eps)  # below eps the clamp passes no gradient to the norm
        return y

    @staticmethod
    def backward(ctx, g):
        y, n, clamped = ctx.saved_tensors
        dot = (g * y).sum(-1, keepdim=True).masked_fill_(clamped, 0)  # (..., 1)
        return torch.addcmul(g, y, dot, value=-1).div_(n), None


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=-1, eps=eps)``: x (..., D) -> (..., D) contiguous, rows of unit length (a row
    shorter than eps divided by eps), with ``_UnitRows``' backward where a gradient is wanted (``F.normalize``
    itself under torch.compile)."""
    if torch.compiler.is_compiling():
        return F.normalize(x, dim=-1, eps=eps)
    if torch.is_grad_enabled() and x.requires_grad:
        return _UnitRows.apply(x, eps)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(eps)
    return torch.div(x, norm, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))


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
    scaled, ends = stable_steps(chunks(theta), chunks(eta), chunks(kappa), chunks(unit_rows(k)), start)
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


class _Chunk(NamedTuple):
    """One chunk's inputs (L rows). q, k: (B, H, L, Dk); v: (B, H, L, Dv); theta, eta: (B, H, L);
    qk: q k^T, the first layer's read scores (its inputs are the keys, whatever the anchor): (B, H, L, L);
    ``stable`` only (else None): kh the unit keys (B, H, L, Dk) and overlap = tril(cos^2(k_t, k_s), -1) (B, H, L, L)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    theta: torch.Tensor
    eta: torch.Tensor
    qk: torch.Tensor
    kh: torch.Tensor | None
    overlap: torch.Tensor | None


def _chunk_inputs(q, k, v, theta, eta, khat, stable):
    """``_Chunk`` for one chunk or many at once (leading dims (B, H) or (B, H, N)); the anchor-free parts
    (q k^T, the keys' overlaps) as one batched product each."""
    kt = k.transpose(-1, -2)
    overlap = (khat @ khat.transpose(-1, -2)).pow(2).tril(-1) if stable else None
    return _Chunk(q, k, v, theta, eta, q @ kt, khat if stable else None, overlap)


def _stable_theta(x: _Chunk, kappa, spent, want_spent):
    """``stable_steps`` for one chunk with its overlaps precomputed; spent None is Q = 0 (a chunk that
    starts here). Returns (theta', Q after the chunk, or None unless ``want_spent``)."""
    u = x.theta * kappa / (1 - x.eta).clamp_min(torch.finfo(x.theta.dtype).tiny)
    before = (x.overlap @ u[..., None])[..., 0]  # (B, H, L)
    if spent is not None:
        before = before + ((x.kh @ spent) * x.kh).sum(-1)
    if want_spent:
        spent = (0 if spent is None else spent) + x.kh.transpose(-1, -2) @ (u[..., None] * x.kh)
    return x.theta / ((1 + before) * (1 + before + u)), spent if want_spent else None


def _chunk(x: _Chunk, coeffs, W0, S0, A, last, max_grad_norm, spent, want_spent):
    """One chunk of L tokens (row ``last`` is the last real token; later rows are padding); ``spent``: the
    chunk's Q before its first row when ``stable`` and carried from an earlier call (None: Q = 0).
    coeffs from ``_chunk_coefficients`` for this chunk. Returns y (B, H, L, Dv), the weights and momentum
    after token ``last``, and Q after it (None unless ``want_spent``)."""
    beta, E, dbe, dd, d_e = coeffs
    n = len(A)
    # Forward at the anchor on the keys; keep each layer's input x_l, and silu'(z_l) for the hidden layers.
    xs, slopes, bends = [], [], []
    h = x.k
    for i, a in enumerate(A):
        xs.append(h)
        z = h @ a.transpose(-1, -2)  # (B, H, L, out_l)
        if i < n - 1:
            s = torch.sigmoid(z)
            h = z * s
            slopes.append(s * (1 + z * (1 - s)))  # silu'(z)
            if x.overlap is not None:
                bends.append(s * (1 - s) * (2 + z * (1 - 2 * s)))  # silu''(z)
        else:
            h = z
    out = h if n == 1 else x.k + h
    x_sq = [t.pow(2).sum(-1) for t in xs]  # ||x_l||^2: (B, H, L)
    theta = x.theta
    if x.overlap is not None:  # ``naive.curvature`` + ``naive.residual_curvature``, from the same x_l and z_l
        kappa = curvature_from(A, x_sq, slopes) + residual_curvature(A, xs, slopes, bends, out - x.v)
        theta, spent = _stable_theta(x._replace(theta=theta), kappa, spent, want_spent)
    # Backward in closed form: delta_l = dLoss/dz_l per token; the gradient of W_l is delta_l x_l^T.
    delta = 2 * (out - x.v)
    deltas = [delta] * n
    for i in range(n - 1, 0, -1):
        delta = (delta @ A[i]) * slopes[i - 1]
        deltas[i - 1] = delta
    # Clip each token's gradient: sum over layers of ||delta_l||^2 ||x_l||^2 is ||g||^2.
    sq = sum(d.pow(2).sum(-1) * s for d, s in zip(deltas, x_sq))  # (B, H, L)
    theta = theta * clip_scale(sq, max_grad_norm)
    cm = dd * theta[..., None, :]  # (B, H, L, L)
    # Read y_t = M_{W_t}(q_t) at the per-token weights.
    h = x.q
    for i in range(n):
        base = (h @ W0[i].transpose(-1, -2)) * beta[..., None] + (h @ S0[i].transpose(-1, -2)) * dbe[..., None]
        scores = cm * (x.qk if i == 0 else h @ xs[i].transpose(-1, -2))  # (B, H, L, L)
        z = base - scores @ deltas[i]
        h = F.silu(z) if i < n - 1 else z
    y = h if n == 1 else x.q + h
    # State after token ``last``: W = beta W0 + (D_beta E) S0 - sum_i Cm[last, i] delta_i x_i^T, and S alike.
    cm_last, de_last = cm[:, :, last, :, None], (d_e[:, :, last] * theta)[..., None]  # (B, H, L, 1)
    b_last, dbe_last, e_last = (t[:, :, last, None, None] for t in (beta, dbe, E))
    W, S = [], []
    for i in range(n):
        dt = deltas[i].transpose(-1, -2)  # (B, H, out_l, L)
        W.append(b_last * W0[i] + dbe_last * S0[i] - dt @ (cm_last * xs[i]))
        S.append(e_last * S0[i] - dt @ (de_last * xs[i]))
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
    if offset:  # finish the chunk that an earlier call started, with its anchor and its Q
        L = min(T, chunk_size - offset)
        sl = slice(0, L)
        coeffs = _chunk_coefficients(eta[:, :, sl], alpha[:, :, sl])
        x = _chunk_inputs(q[:, :, sl], k[:, :, sl], v[:, :, sl], theta[:, :, sl], eta[:, :, sl],
                          unit_rows(k[:, :, sl]) if stable else k[:, :, sl], stable)
        y, W, S, spent = _chunk(x, coeffs, W, S, A, L - 1, max_grad_norm, spent, stable)
        ys.append(y)
        start = L
    rest = T - start
    if rest:
        C = chunk_size
        if len(W) == 2 and stable and _hand_backward() and _chunk_fn() is _chunk:  # no gradient: chunk_infer.h
            out = run_infer(*(t[:, :, start:] for t in (q, k, v, theta, eta, alpha)), W, S, chunk_size=C,
                            max_grad_norm=max_grad_norm)
            if out is not None:
                y, W, S, A, spent = out
                ys.append(y)
                return _join(ys), tuple(W), tuple(S), join_anchor(A, spent)
        N = -(-rest // C)
        pad = N * C - rest
        khat = unit_rows(k) if stable else k  # once for the sequence, not once per chunk

        def chunks(x):  # (B, H, rest, ...) -> (B, H, N, C, ...), zero-padded at the end
            x = x[:, :, start:]
            if pad:
                x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)
            return x.reshape(B, H, N, C, *x.shape[3:])

        # Everything that does not depend on a chunk's anchor, for all chunks at once (few large ops):
        # the decay bookkeeping, q k^T and the keys' overlaps; padded tokens have theta = 0 and are never read.
        # unbind, not x[:, :, c]: indexing once per chunk makes autograd build a zero gradient of the
        # whole tensor for every chunk (a backward quadratic in T); unbind's backward is one stack.
        inputs = _chunk_inputs(*(chunks(t) for t in (q, k, v, theta, eta, khat)), stable)
        coeffs = _chunk_coefficients(chunks(eta), chunks(alpha))
        last = (rest - 1) % C
        if len(W) <= 2 and _hand_backward() and _chunk_fn() is _chunk:  # chunk_loop.py's loop
            y, W, S, A, spent = _run_loop(inputs, coeffs, W, S, last, max_grad_norm, stable)
            ys.append(y[:, :, :rest])
            return _join(ys), tuple(W), tuple(S), join_anchor(A, spent)
        per_chunk = [None if t is None else t.unbind(2) for t in inputs]
        coeffs = [t.unbind(2) for t in coeffs]
        chunk = _chunk_fn()
        for c in range(N):
            A = W
            x = _Chunk(*(None if t is None else t[c] for t in per_chunk))
            y, W, S, spent = chunk(x, tuple(t[c] for t in coeffs), W, S, A, C - 1 if c < N - 1 else last,
                                   max_grad_norm, None, stable and c == N - 1)
            ys.append(y if c < N - 1 else y[:, :, :last + 1])
    return _join(ys), tuple(W), tuple(S), join_anchor(A, spent)


def _join(ys: list[torch.Tensor]) -> torch.Tensor:
    """The pieces of y (B, H, T_i, Dv) in order along time: a lone piece as it is (no copy)."""
    return ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)


def _run_loop(inputs: _Chunk, coeffs, W, S, last, max_grad_norm, stable):
    """The whole chunks through ``chunk_loop.run_chunks`` (depth 1 or 2): inputs and coeffs for all N chunks,
    (B, H, N, C, ...); W, S lists of (B, H, out_l, in_l). Returns y (B, H, N * C, Dv), W, S after row
    ``last`` of the final chunk, the final chunk's anchor, and its Q (None unless stable)."""
    B, H, N, C = inputs.theta.shape

    def to_loop(t):  # (B, H, N, C, ...) -> (B * H, N, C, ...)
        return None if t is None else t.reshape(B * H, N, *t.shape[3:])

    beta, E, dbe, dd, d_e = coeffs
    fields = dict(q=inputs.q, k=inputs.k, v=inputs.v, theta=inputs.theta, eta=inputs.eta, qk=inputs.qk,
                  overlap=inputs.overlap, kh=inputs.kh, beta=beta, E=E, dbe=dbe, dd=dd, d_e=d_e)
    fields = {key: to_loop(t) for key, t in fields.items()}
    flat = [w.reshape(B * H, *w.shape[2:]) for w in (*W, *S)]
    n = len(W)
    y, W, S, A, Q = run_chunks(fields, flat[:n], flat[n:], last=last, max_grad_norm=max_grad_norm, stable=stable)
    y = y.reshape(B, H, N * C, -1)  # (B * H, N, C, Dv) -> (B, H, N * C, Dv)
    back = [w.reshape(B, H, *w.shape[1:]) for w in (*W, *S, *A)]
    return y, back[:n], back[n:2 * n], back[2 * n:], None if Q is None else Q.reshape(B, H, *Q.shape[1:])
