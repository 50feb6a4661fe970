"""The Titans neural memory over a sequence, per token: the specification (Behrouz et al. 2025, eqs. 8-15).

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
chunked closed form (``chunked.py``) is unchanged. ``max_grad_norm=None`` turns it off.

``stable=True`` bounds the step by the curvature (issue 17: at the paper's settings a deep memory's
inner descent with momentum amplifies perturbations ~10x per 100 tokens). With kappa_t an upper
bound on the largest eigenvalue of the Gauss-Newton curvature of the token's loss at the anchor,
    kappa_t = 2 sum_l ||x_l||^2 ||P_l||^2,   P_l = d M / d z_l  (||P_L|| = 1; for l < L the Frobenius
              norm of W_{l+1} diag(silu'(z_l)) times ||P_{l+1}||, a bound on the spectral norm).
For a deep memory (L >= 2) that is not the whole Hessian: ||M(k) - v||^2 has also the residual term
2 sum_i r_i grad^2 M_i (r = M_A(k) - v), indefinite (the bilinear W_L s(W_{L-1} ...) saddle) and large
where values are unpredictable (random bytes, DNA), and heavy-ball momentum amplifies motion along
its negative curvature. So kappa_t also counts mu_t, a bound on that term's spectral norm
(``residual_curvature``; 0 at L = 1): kappa_t bounds the whole Hessian's spectral norm. (With the
Gauss-Newton part alone, ``titans-lnn stability --preset tiny --variant mac --tokens 16k --block 2048
--text random`` measured growth 57, UNSTABLE; with mu, 0.47.)
u_t = theta_t kappa_t / (1 - eta_t) is the token's momentum-amplified step in units of the curvature.
Every gradient of a chunk is taken at the same anchor, so the chunk's steps add up where their keys
overlap: 16 steps along one key from one anchor overshoot 16 times. So each token's step is cut by
the steps the chunk has already taken along its key,
    P_t = sum_{s < t in the chunk} u_s cos^2(k_s, k_t) = k^_t^T Q k^_t,   Q = sum_s u_s k^_s k^_s^T
    theta_t <- theta_t / ((1 + P_t) (1 + P_t + u_t))
Along one repeated key this telescopes: the chunk's steps sum to 1 - 1 / (1 + U) < 1 (U = sum u),
half the stability limit (2) of the inner loss, at any gate value; keys orthogonal to the earlier
ones keep their whole step u / (1 + u), so a needle of several tokens is written in full (with
U alone, the fifth digit of a passkey got a fiftieth of the first's step). With C = 1 this is
Longhorn's implicit step theta / (1 + u): for a linear memory with unit keys and eta = 0 the delta
update shrinks the error on k by 1 / (1 + 2 theta), a contraction for every theta >= 0. In between
(partly overlapping keys) it is a heuristic, checked by the perturbation tests (stability.py). Q
travels with the anchor (its last entry, (B, H, Dk, Dk)) so that a call starting inside a chunk
continues it; it uses the keys (the first layer's inputs) for every depth.
It is applied before clipping, and like clipping it only rescales theta_t, from quantities known at
the anchor and the chunk's earlier tokens, so the chunked closed form is unchanged.
A call may start inside a chunk (streaming): ``offset`` tokens of the current chunk were consumed
by earlier calls, whose anchor is passed in.

Shapes: q, k (B, H, T, Dk); v (B, H, T, Dv); theta, eta, alpha (B, H, T);
weights, momentum, anchor: tuples of (B, H, out_l, in_l), one per layer (``stable``: anchor has one more
entry, the chunk's Q, (B, H, Dk, Dk); a weights-only anchor counts as Q = 0).
Returns y (B, H, T, Dv), and the new (weights, momentum, anchor).

``memory_update_ref`` is the per-token loop (gradients by autograd): the oracle that
``memory_update_chunked`` (``chunked.py``) and ``memory_update_triton`` (``triton.py``) are tested
against. The memory MLP, its curvature bound and the stable step live here too, shared by all forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mlp_forward(weights, x):
    """M_W(x). weights: tuple of (B, H, out, in); x: (B, H, N, Dk) -> (B, H, N, Dv)."""
    h = x
    for i, w in enumerate(weights):
        h = torch.matmul(h, w.transpose(-1, -2))  # (B, H, N, out): one bmm (an einsum took ~20 ops to get there)
        if i < len(weights) - 1:
            h = F.silu(h)
    return h if len(weights) == 1 else x + h


def silu_grad(z):
    """d silu(z) / dz, elementwise."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def clip_scale(sq_norm: torch.Tensor, max_grad_norm: float | None) -> torch.Tensor:
    """min(1, max_grad_norm / ||g||) from the squared norm ||g||^2 (any shape)."""
    if max_grad_norm is None:
        return torch.ones_like(sq_norm)
    # Only the clipped entries go through rsqrt: at a zero gradient (padded tokens), rsqrt's own
    # gradient is inf, and inf * 0 would poison the backward with NaN.
    clipped = sq_norm > max_grad_norm**2
    safe = torch.where(clipped, sq_norm, torch.ones_like(sq_norm))
    return torch.where(clipped, max_grad_norm * torch.rsqrt(safe), torch.ones_like(sq_norm))


def anchor_forward(weights, x):
    """The MLP at ``weights`` on x, keeping each layer's input x_l and pre-activation z_l.
    weights: tuple of (B, H, out_l, in_l); x: (B, H, N, Dk) -> (M(x), [x_l], [z_l])."""
    xs, zs = [], []
    h = x
    for i, w in enumerate(weights):
        xs.append(h)
        z = torch.einsum("bhoi,bhli->bhlo", w, h)
        zs.append(z)
        h = F.silu(z) if i < len(weights) - 1 else z
    return (h if len(weights) == 1 else x + h), xs, zs


def curvature(weights, xs, zs) -> torch.Tensor:
    """kappa: an upper bound on the largest eigenvalue of the Gauss-Newton curvature of
    ||M(x) - v||^2 w.r.t. all weights, per token, from ``anchor_forward``'s xs, zs: (B, H, N)."""
    return curvature_from(weights, [x.pow(2).sum(-1) for x in xs], [silu_grad(z) for z in zs[:-1]])


def curvature_from(weights, x_sq, slopes) -> torch.Tensor:
    """``curvature`` from the layers' squared input norms ||x_l||^2 (B, H, N) and the hidden layers'
    slopes silu'(z_l) (B, H, N, out_l): for the forms that have both already (chunked, the decode step)."""
    reach = None  # ||P_l||^2 bound, from the last layer back (1 at the last layer)
    kappa = x_sq[-1]
    for i in range(len(weights) - 2, -1, -1):
        col = weights[i + 1].pow(2).sum(-2)  # ||W_{l+1}[:, j]||^2: (B, H, in)
        r = (slopes[i].pow(2) @ col[..., None])[..., 0]  # (B, H, N)
        reach = r if reach is None else reach * r
        kappa = kappa + x_sq[i] * reach
    return 2 * kappa


def silu_grad2(z):
    """d^2 silu(z) / dz^2, elementwise."""
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def _sqrt(x):
    """sqrt(x) for x >= 0 with a finite gradient at 0 (padded tokens have x = 0; sqrt's own gradient
    there is inf, and inf * 0 would poison the backward with NaN)."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def residual_curvature(weights, xs, slopes, bends, r) -> torch.Tensor:
    """mu: an upper bound on the spectral norm of the residual part 2 sum_i r_i grad^2 M_i(x) of the
    Hessian of ||M(x) - v||^2 w.r.t. all weights (r = M(x) - v), per token: (B, H, N); 0 for a linear
    memory. The Gauss-Newton part (``curvature``) is the whole Hessian only at depth 1; deeper, this
    part is indefinite (the bilinear W_L s(W_{L-1} ...) saddle) and large where values are
    unpredictable, and momentum amplifies steps along its negative curvature.
    From ``anchor_forward``'s layer inputs xs (B, H, N, in_l), slopes silu'(z_l) and bends silu''(z_l)
    of the hidden layers (B, H, N, out_l), and r (B, H, N, Dv). For a weight direction of unit norm,
    with Frobenius norms for the weights and Cauchy-Schwarz over the layers' shares of the direction:
        C_l = ||x_l||^2 + ||W_l||^2 A_{l-1}     (a bound on |dz_l|^2)
        A_l = max|silu'(z_l)|^2 C_l             (on |dh_l|^2; A_0 = 0)
        B_l = max|silu''(z_l)| C_l + max|silu'(z_l)| (A_{l-1}^1/2 + ||W_l|| B_{l-1})   (on |d^2 h_l|; B_0 = 0)
    and with g = W_L^T r, l = L - 1:
        mu / 2 = |r| A_l^1/2 + max|g silu''(z_l)| C_l + |g silu'(z_l)| (A_{l-1}^1/2 + ||W_l|| B_{l-1}).
    For depth 2 (M = x + W_2 s(W_1 x)): mu = 2 (|r| max|s'| |x| + max_j |(W_2^T r)_j s''(z_j)| |x|^2)."""
    n = len(weights)
    if n == 1:
        return torch.zeros_like(r[..., 0])
    a = c = b = torch.zeros_like(r[..., 0])  # A_0, (C_0 unused), B_0
    w_sq = [w.pow(2).sum((-2, -1))[..., None] for w in weights]  # ||W_l||_F^2: (B, H, 1)
    for i in range(n - 1):  # hidden layers; keep A_{l-1}, B_{l-1} of the last for the final step
        a_prev, b_prev = a, b
        c = xs[i].pow(2).sum(-1) + w_sq[i] * a_prev
        a = slopes[i].abs().amax(-1).pow(2) * c
        b = bends[i].abs().amax(-1) * c + slopes[i].abs().amax(-1) * (_sqrt(a_prev) + _sqrt(w_sq[i]) * b_prev)
    g = r @ weights[-1]  # W_L^T r: (B, H, N, out_{L-1})
    inner = _sqrt(a_prev) + _sqrt(w_sq[n - 2]) * b_prev
    mu = (_sqrt(r.pow(2).sum(-1) * a) + (g * bends[-1]).abs().amax(-1) * c
          + _sqrt((g * slopes[-1]).pow(2).sum(-1)) * inner)
    return 2 * mu


def stable_steps(theta, eta, kappa, kh, spent):
    """``stable=True``'s rescaled theta for the tokens of one chunk, in order. theta, eta, kappa:
    (..., N); kh: the unit keys (..., N, Dk); spent: (..., Dk, Dk), the chunk's Q before its first
    token (leading dims: (B, H), or (B, H, chunks) for many chunks at once). Returns (theta', Q after
    the last token)."""
    u = theta * kappa / (1 - eta).clamp_min(torch.finfo(theta.dtype).tiny)
    overlap = (kh @ kh.transpose(-1, -2)).pow(2).tril(-1)  # (..., N, N): cos^2 with the earlier tokens
    before = (overlap @ u[..., None])[..., 0] + torch.einsum("...nd,...de,...ne->...n", kh, spent, kh)
    spent = spent + torch.einsum("...n,...nd,...ne->...de", u, kh, kh)
    return theta / ((1 + before) * (1 + before + u)), spent


def split_anchor(anchor, n, stable, k):
    """(the anchor's n weights, its Q (B, H, Dk, Dk), or None when not stable)."""
    if not stable:
        return list(anchor[:n]), None
    B, H, _, Dk = k.shape
    spent = anchor[n] if len(anchor) > n else k.new_zeros(B, H, Dk, Dk)
    return list(anchor[:n]), spent


def join_anchor(A, spent):
    """The anchor as the ops return it: the weights, then Q when ``stable`` (the inverse of ``split_anchor``)."""
    return tuple(A) if spent is None else (*A, spent)


def check_inputs(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size, offset):
    """Raise ``ValueError`` unless the arguments have the shapes of the module docstring."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"memory_update: q, k must be (B, H, T, Dk) and v (B, H, T, Dv); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if g.shape != q.shape[:3]:
            raise ValueError(f"memory_update: {name} must be (B, H, T) = {tuple(q.shape[:3])}; got {tuple(g.shape)}")
    if not (len(weights) == len(momentum) and len(anchor) in (len(weights), len(weights) + 1)) or not weights:
        raise ValueError("memory_update: weights, momentum and anchor must be non-empty tuples of equal length "
                         "(anchor: one more with stable=True)")
    if not 0 <= offset < chunk_size:
        raise ValueError(f"memory_update: offset={offset} must be in [0, chunk_size={chunk_size})")


def memory_update_ref(q, k, v, theta, eta, alpha, weights, momentum, anchor, *, chunk_size, offset=0,
                      max_grad_norm=None, stable=False):
    """Per-token reference; gradients of the inner loss by autograd (differentiable end to end)."""
    check_inputs(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size, offset)
    W, S = list(weights), list(momentum)
    A, spent = split_anchor(anchor, len(weights), stable, k)
    ys = []
    for t in range(q.shape[2]):
        if (offset + t) % chunk_size == 0:
            A = list(W)
            spent = None if spent is None else torch.zeros_like(spent)
        with torch.enable_grad():
            A_ = [a if a.requires_grad else a.detach().requires_grad_() for a in A]
            pred = mlp_forward(A_, k[:, :, t:t + 1])
            loss = (pred - v[:, :, t:t + 1]).pow(2).sum()
            grads = torch.autograd.grad(loss, A_, create_graph=torch.is_grad_enabled())
        th, et, al = (g[:, :, t, None, None] for g in (theta, eta, alpha))
        if stable:
            out, xs, zs = anchor_forward(A, k[:, :, t:t + 1])
            kh = F.normalize(k[:, :, t:t + 1], dim=-1)
            kappa = curvature(A, xs, zs) + residual_curvature(
                A, xs, [silu_grad(z) for z in zs[:-1]], [silu_grad2(z) for z in zs[:-1]], out - v[:, :, t:t + 1])
            th, spent = stable_steps(th[..., 0], et[..., 0], kappa, kh, spent)
            th = th[..., None]
        sq = sum(g.pow(2).sum((-2, -1)) for g in grads)  # (B, H)
        grads = [g * clip_scale(sq, max_grad_norm)[..., None, None] for g in grads]
        S = [et * s - th * g for s, g in zip(S, grads)]
        W = [(1 - al) * w + s for w, s in zip(W, S)]
        ys.append(mlp_forward(W, q[:, :, t:t + 1]))
    y = torch.cat(ys, dim=2) if ys else v[:, :, :0]
    return y, tuple(W), tuple(S), join_anchor(A, spent)
