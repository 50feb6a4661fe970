"""Triton form of the Titans memory update (Behrouz et al. 2025, eqs. 8-15; the specification: ``naive.py``).

Same contract as ``memory_update_ref``: ``(q, k, v, theta, eta, alpha, weights, momentum, anchor, *,
chunk_size, offset=0, max_grad_norm=None) -> (y, weights, momentum, anchor)``, for a linear memory
(depth 1: W (Dv, Dk)) and a 2-layer MLP with residual (depth 2: W_1 (Dh, Dk), W_2 (Dv, Dh),
M(x) = x + W_2 silu(W_1 x)). Other depths, and heads wider than ``MAX_BLOCK_IN`` /
``MAX_BLOCK_HIDDEN``, fall back to ``memory_update_chunked``.

Forward (one kernel launch). One program per (batch, head) walks the chunks in order, keeping that
head's weights W and momentum S in fp32 registers (transposed, (in, out), so every product is a
plain ``tl.dot``). Per chunk of C tokens it runs exactly ``_chunk`` of ``chunked.py``: the
forward at the anchor (the chunk-start weights) on the keys, the closed-form per-token gradients
delta_l x_l^T, their clipping (``max_grad_norm``: theta_t is scaled by
min(1, max_grad_norm / ||g_t||), where ||g_t||^2 = sum_l ||delta_l||^2 ||x_l||^2 as each layer's
gradient is rank one), the decays beta, E, D_beta, D_E, Cm from cumulative log-decays (masked
exponents, so nothing overflows), the per-token reads y_t = M_{W_t}(q_t) in attention form, and the
state after the chunk's last real token. A short last chunk is masked (padded tokens have no
update, and the state is read off the last real row). A call that starts inside a chunk
(``offset > 0``) runs that first partial span in PyTorch (``memory_update_chunked``: at most C - 1
tokens, with the given anchor) and the kernel on the chunk-aligned rest.

Backward (exact, by recomputation). The forward also stores the state (W, S) at the start of every
``CHECKPOINT_EVERY``-th chunk (G). The backward walks these groups of G chunks in reverse: it reruns
the group with ``memory_update_chunked`` under autograd from its saved state and back-propagates the
incoming gradients (of y, and of the state leaving the group) to the group's inputs and to its
starting state, which is carried to the group before. Memory: the saved states, O(T / (G C)) times
the state size in fp32, plus one group's activations. Without autograd (inference) no state is saved.

Products use ``tl.dot`` with ``INPUT_PRECISION`` (default "ieee": exact fp32, to match the reference;
"tf32" is faster on GPUs at ~1e-3 relative error). Offsets are int64. Triton is imported only if
installed; calling ``memory_update_triton`` without it raises ``RuntimeError``.
"""

from __future__ import annotations

import torch

from titans_lnn.kernels.titans_memory.chunked import memory_update_chunked, stable_steps_sequence
from titans_lnn.kernels.titans_memory.naive import check_inputs, join_anchor, split_anchor
from titans_lnn.kernels.triton_utils import (
    autotune,
    cdiv,
    check_device,
    check_dtype,
    device_guard,
    empty,
    next_power_of_2,
    require_triton,
    triton_available,
)

CHECKPOINT_EVERY = 1  # G: chunks between states saved for the backward (memory / recompute trade)
INPUT_PRECISION = "ieee"  # tl.dot precision for fp32 operands
MAX_BLOCK_IN = 128  # widest Dk = Dv (rounded up to a power of two) kept in registers
MAX_BLOCK_HIDDEN = 256  # widest hidden layer (depth 2)

if triton_available():
    import triton
    import triton.language as tl

    _CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8)]

    @triton.jit
    def _clip_scale(b_sq, max_norm, CLIP: tl.constexpr):
        """min(1, max_norm / ||g_t||) per token from b_sq = ||g_t||^2 (BC,); ones when not CLIP."""
        b_scale = tl.full(b_sq.shape, 1., tl.float32)
        if CLIP:  # constexpr: resolved when the kernel is compiled
            b_scale = tl.minimum(max_norm / tl.sqrt(tl.maximum(b_sq, 1e-30)), 1.)
        return b_scale

    @triton.jit
    def _chunk_decays(b_th, eta, alpha, o_g, m_t, o_c, last, PRECISION: tl.constexpr):
        """Decay bookkeeping of one chunk (``_chunk_coefficients``); rows t, columns s or i.
        b_th: the chunk's theta (BC,), already scaled by the clipping factor (0 on padded rows).

        Returns beta_t, DbE_t (BC,), Cm (BC, BC), and at row ``last``: Cm[last, :], D_E[last, :] theta,
        beta, DbE and E (scalars).
        """
        b_eta = tl.load(eta + o_g, mask=m_t, other=1.).to(tl.float32)
        b_al = tl.load(alpha + o_g, mask=m_t, other=0.).to(tl.float32)
        # Padded tokens get alpha = 0, eta = 1, theta = 0: their log-decays are 0 and they add nothing.
        b_lb = tl.cumsum(tl.log(1. - tl.minimum(b_al, 1. - 1e-7)), axis=0)
        b_le = tl.cumsum(tl.log(tl.maximum(b_eta, 1.1754943508222875e-38)), axis=0)
        m_causal = o_c[:, None] >= o_c[None, :]
        b_dbeta = tl.exp(tl.where(m_causal, b_lb[:, None] - b_lb[None, :], float("-inf")))  # D_beta[t, s]
        b_de = tl.exp(tl.where(m_causal, b_le[:, None] - b_le[None, :], float("-inf")))  # D_E[s, i]
        b_beta = tl.exp(b_lb)
        b_e = tl.exp(b_le)
        b_dbe = tl.sum(b_dbeta * b_e[None, :], axis=1)
        b_cm = tl.dot(b_dbeta, b_de, input_precision=PRECISION) * b_th[None, :]
        m_last = o_c == last
        b_cm_last = tl.sum(tl.where(m_last[:, None], b_cm, 0.), axis=0)
        b_de_last = tl.sum(tl.where(m_last[:, None], b_de, 0.), axis=0) * b_th
        beta_last = tl.sum(tl.where(m_last, b_beta, 0.), axis=0)
        dbe_last = tl.sum(tl.where(m_last, b_dbe, 0.), axis=0)
        e_last = tl.sum(tl.where(m_last, b_e, 0.), axis=0)
        return b_beta, b_dbe, b_cm, b_cm_last, b_de_last, beta_last, dbe_last, e_last

    @autotune(configs=_CONFIGS, key=["BC", "BK", "BV", "STORE_CKPT", "CLIP"])
    @triton.jit
    def _memory_linear_fwd_kernel(
        q, k, v, theta, eta, alpha, w_init, s_init, y, w_out, s_out, a_out, ckpt_w, ckpt_s,
        T, T0, NC, NG, DK, DV, max_norm,
        C: tl.constexpr, G: tl.constexpr, STORE_CKPT: tl.constexpr, CLIP: tl.constexpr,
        BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Depth 1, M(x) = W x. One (batch, head) per program; chunks of C tokens from token T0 on.

        q, k: (BH, T, DK); v: (BH, T, DV); gates: (BH, T); states: (BH, DV, DK); y: (BH, T - T0, DV);
        checkpoints: (BH, NG, DV, DK), the state entering chunks 0, G, 2G, ...
        """
        i_bh = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, BC)
        o_k = tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        m_k = o_k < DK
        m_v = o_v < DV
        # The state is held transposed, (in, out): element (i, o) of W^T is W[o, i] at o * DK + i.
        o_w = o_k[:, None] + o_v[None, :] * DK
        m_w = m_k[:, None] & m_v[None, :]
        o_state = i_bh * DV * DK
        b_w = tl.load(w_init + o_state + o_w, mask=m_w, other=0.).to(tl.float32)
        b_s = tl.load(s_init + o_state + o_w, mask=m_w, other=0.).to(tl.float32)
        for i_c in range(NC):
            t0 = T0 + i_c * C
            last = tl.minimum(T - t0, C) - 1  # the chunk's last real row
            m_t = o_c <= last
            # (tl.where, not `mask & scalar`: the interpreter turns the latter into int32.)
            if STORE_CKPT:
                o_ck = (i_bh * NG + i_c // G) * DV * DK
                m_ck = tl.where(i_c % G == 0, m_w, False)
                tl.store(ckpt_w + o_ck + o_w, b_w, mask=m_ck)
                tl.store(ckpt_s + o_ck + o_w, b_s, mask=m_ck)
            p_a = a_out + o_state + o_w
            tl.store(p_a, b_w.to(p_a.dtype.element_ty), mask=tl.where(i_c == NC - 1, m_w, False))

            o_tok = i_bh * T + t0 + o_c  # (BC,) int64
            m_tk = m_t[:, None] & m_k[None, :]
            m_tv = m_t[:, None] & m_v[None, :]
            b_q = tl.load(q + o_tok[:, None] * DK + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
            b_k = tl.load(k + o_tok[:, None] * DK + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
            b_v = tl.load(v + o_tok[:, None] * DV + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)

            # Forward at the anchor (= the chunk-start W) and the loss gradient w.r.t. its output.
            b_d = 2. * (tl.dot(b_k, b_w, input_precision=PRECISION) - b_v)  # (BC, BV)
            # Clipping rescales theta_t: ||g_t||^2 = ||delta_t||^2 ||k_t||^2 (padded rows: theta = 0).
            b_th = tl.load(theta + o_tok, mask=m_t, other=0.).to(tl.float32)
            b_th *= _clip_scale(tl.sum(b_d * b_d, axis=1) * tl.sum(b_k * b_k, axis=1), max_norm, CLIP)
            b_beta, b_dbe, b_cm, b_cm_last, b_de_last, beta_last, dbe_last, e_last = _chunk_decays(
                b_th, eta, alpha, o_tok, m_t, o_c, last, PRECISION)
            # Reads at the per-token weights, attention-like.
            b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * b_cm  # (BC, BC)
            b_y = tl.dot(b_q, b_w, input_precision=PRECISION) * b_beta[:, None] \
                + tl.dot(b_q, b_s, input_precision=PRECISION) * b_dbe[:, None] \
                - tl.dot(b_qk, b_d, input_precision=PRECISION)
            o_y = i_bh * (T - T0) + t0 - T0 + o_c
            p_y = y + o_y[:, None] * DV + o_v[None, :]
            tl.store(p_y, b_y.to(p_y.dtype.element_ty), mask=m_tv)

            # State after the last real token.
            b_kt = tl.trans(b_k)  # (BK, BC)
            b_upd = tl.dot(b_kt, b_d * b_cm_last[:, None], input_precision=PRECISION)
            b_mom = tl.dot(b_kt, b_d * b_de_last[:, None], input_precision=PRECISION)
            b_w = beta_last * b_w + dbe_last * b_s - b_upd
            b_s = e_last * b_s - b_mom
        p_w = w_out + o_state + o_w
        p_s = s_out + o_state + o_w
        tl.store(p_w, b_w.to(p_w.dtype.element_ty), mask=m_w)
        tl.store(p_s, b_s.to(p_s.dtype.element_ty), mask=m_w)

    @autotune(configs=_CONFIGS, key=["BC", "BK", "BH", "STORE_CKPT", "CLIP"])
    @triton.jit
    def _memory_mlp_fwd_kernel(
        q, k, v, theta, eta, alpha, w1_init, s1_init, w2_init, s2_init, y,
        w1_out, s1_out, w2_out, s2_out, a1_out, a2_out, ckpt_w1, ckpt_s1, ckpt_w2, ckpt_s2,
        T, T0, NC, NG, D, DH, max_norm,
        C: tl.constexpr, G: tl.constexpr, STORE_CKPT: tl.constexpr, CLIP: tl.constexpr,
        BC: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Depth 2, M(x) = x + W_2 silu(W_1 x), Dk = Dv = D. One (batch, head) per program.

        q, k, v: (BH, T, D); gates: (BH, T); W_1: (BH, DH, D); W_2: (BH, D, DH); y: (BH, T - T0, D);
        checkpoints: (BH, NG, ...) of the states entering chunks 0, G, 2G, ...
        """
        i_bh = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, BC)
        o_k = tl.arange(0, BK)
        o_h = tl.arange(0, BH)
        m_k = o_k < D
        m_h = o_h < DH
        # Transposed states: W_1^T (BK, BH) with W_1[o, i] at o * D + i; W_2^T (BH, BK) at o * DH + i.
        o_w1 = o_k[:, None] + o_h[None, :] * D
        o_w2 = o_h[:, None] + o_k[None, :] * DH
        m_w1 = m_k[:, None] & m_h[None, :]
        m_w2 = m_h[:, None] & m_k[None, :]
        o_state = i_bh * DH * D
        b_w1 = tl.load(w1_init + o_state + o_w1, mask=m_w1, other=0.).to(tl.float32)
        b_s1 = tl.load(s1_init + o_state + o_w1, mask=m_w1, other=0.).to(tl.float32)
        b_w2 = tl.load(w2_init + o_state + o_w2, mask=m_w2, other=0.).to(tl.float32)
        b_s2 = tl.load(s2_init + o_state + o_w2, mask=m_w2, other=0.).to(tl.float32)
        for i_c in range(NC):
            t0 = T0 + i_c * C
            last = tl.minimum(T - t0, C) - 1
            m_t = o_c <= last
            if STORE_CKPT:
                o_ck = (i_bh * NG + i_c // G) * DH * D
                m_ck1 = tl.where(i_c % G == 0, m_w1, False)
                m_ck2 = tl.where(i_c % G == 0, m_w2, False)
                tl.store(ckpt_w1 + o_ck + o_w1, b_w1, mask=m_ck1)
                tl.store(ckpt_s1 + o_ck + o_w1, b_s1, mask=m_ck1)
                tl.store(ckpt_w2 + o_ck + o_w2, b_w2, mask=m_ck2)
                tl.store(ckpt_s2 + o_ck + o_w2, b_s2, mask=m_ck2)
            p_a1 = a1_out + o_state + o_w1
            p_a2 = a2_out + o_state + o_w2
            tl.store(p_a1, b_w1.to(p_a1.dtype.element_ty), mask=tl.where(i_c == NC - 1, m_w1, False))
            tl.store(p_a2, b_w2.to(p_a2.dtype.element_ty), mask=tl.where(i_c == NC - 1, m_w2, False))

            o_tok = i_bh * T + t0 + o_c
            m_tk = m_t[:, None] & m_k[None, :]
            o_x = o_tok[:, None] * D + o_k[None, :]
            b_q = tl.load(q + o_x, mask=m_tk, other=0.).to(tl.float32)
            b_k = tl.load(k + o_x, mask=m_tk, other=0.).to(tl.float32)
            b_v = tl.load(v + o_x, mask=m_tk, other=0.).to(tl.float32)

            # Forward at the anchor on the keys, then delta_l = dLoss/dz_l per token in closed form.
            b_z1 = tl.dot(b_k, b_w1, input_precision=PRECISION)  # (BC, BH)
            b_sig = tl.sigmoid(b_z1)
            b_x2 = b_z1 * b_sig  # input of layer 2
            b_d2 = 2. * (b_k + tl.dot(b_x2, b_w2, input_precision=PRECISION) - b_v)  # (BC, BK)
            b_d1 = tl.dot(b_d2, tl.trans(b_w2), input_precision=PRECISION) * (b_sig * (1. + b_z1 * (1. - b_sig)))
            # Clipping rescales theta_t: ||g_t||^2 = sum over layers of ||delta_l||^2 ||x_l||^2.
            b_sq = tl.sum(b_d1 * b_d1, axis=1) * tl.sum(b_k * b_k, axis=1) \
                + tl.sum(b_d2 * b_d2, axis=1) * tl.sum(b_x2 * b_x2, axis=1)
            b_th = tl.load(theta + o_tok, mask=m_t, other=0.).to(tl.float32)
            b_th *= _clip_scale(b_sq, max_norm, CLIP)
            b_beta, b_dbe, b_cm, b_cm_last, b_de_last, beta_last, dbe_last, e_last = _chunk_decays(
                b_th, eta, alpha, o_tok, m_t, o_c, last, PRECISION)

            # Reads at the per-token weights, layer by layer.
            b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * b_cm  # (BC, BC)
            b_zq = tl.dot(b_q, b_w1, input_precision=PRECISION) * b_beta[:, None] \
                + tl.dot(b_q, b_s1, input_precision=PRECISION) * b_dbe[:, None] \
                - tl.dot(b_qk, b_d1, input_precision=PRECISION)  # (BC, BH)
            b_hq = b_zq * tl.sigmoid(b_zq)
            b_hx = tl.dot(b_hq, tl.trans(b_x2), input_precision=PRECISION) * b_cm  # (BC, BC)
            b_y = b_q + tl.dot(b_hq, b_w2, input_precision=PRECISION) * b_beta[:, None] \
                + tl.dot(b_hq, b_s2, input_precision=PRECISION) * b_dbe[:, None] \
                - tl.dot(b_hx, b_d2, input_precision=PRECISION)
            o_y = i_bh * (T - T0) + t0 - T0 + o_c
            p_y = y + o_y[:, None] * D + o_k[None, :]
            tl.store(p_y, b_y.to(p_y.dtype.element_ty), mask=m_tk)

            # State after the last real token.
            b_kt = tl.trans(b_k)  # (BK, BC)
            b_x2t = tl.trans(b_x2)  # (BH, BC)
            b_upd1 = tl.dot(b_kt, b_d1 * b_cm_last[:, None], input_precision=PRECISION)
            b_mom1 = tl.dot(b_kt, b_d1 * b_de_last[:, None], input_precision=PRECISION)
            b_upd2 = tl.dot(b_x2t, b_d2 * b_cm_last[:, None], input_precision=PRECISION)
            b_mom2 = tl.dot(b_x2t, b_d2 * b_de_last[:, None], input_precision=PRECISION)
            b_w1 = beta_last * b_w1 + dbe_last * b_s1 - b_upd1
            b_s1 = e_last * b_s1 - b_mom1
            b_w2 = beta_last * b_w2 + dbe_last * b_s2 - b_upd2
            b_s2 = e_last * b_s2 - b_mom2
        tl.store(w1_out + o_state + o_w1, b_w1.to(w1_out.dtype.element_ty), mask=m_w1)
        tl.store(s1_out + o_state + o_w1, b_s1.to(s1_out.dtype.element_ty), mask=m_w1)
        tl.store(w2_out + o_state + o_w2, b_w2.to(w2_out.dtype.element_ty), mask=m_w2)
        tl.store(s2_out + o_state + o_w2, b_s2.to(s2_out.dtype.element_ty), mask=m_w2)


def _blocks(C: int, dims) -> list[int]:
    """Power-of-two block sizes, at least 16 (the smallest ``tl.dot`` operand)."""
    return [max(16, next_power_of_2(d)) for d in (C, *dims)]


def _forward(q, k, v, theta, eta, alpha, W, S, T0, C, G, store_ckpt, max_grad_norm):
    """Launch the kernel on tokens [T0, T), chunk-aligned there. Returns y (B, H, T - T0, Dv), the
    new weights, momentum and anchor (lists), and the checkpoints (ckpt W, ckpt S lists; fp32)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    NC = cdiv(T - T0, C)
    NG = cdiv(NC, G)
    dev = q.device
    y = empty((B, H, T - T0, Dv), dtype=q.dtype, device=dev)
    W_out = [empty(w.shape, dtype=w.dtype, device=dev) for w in W]
    S_out = [empty(s.shape, dtype=s.dtype, device=dev) for s in S]
    A_out = [empty(w.shape, dtype=w.dtype, device=dev) for w in W]
    if store_ckpt:
        ck_w = [empty((B, H, NG, *w.shape[2:]), dtype=torch.float32, device=dev) for w in W]
        ck_s = [empty((B, H, NG, *w.shape[2:]), dtype=torch.float32, device=dev) for w in W]
    else:  # never written (STORE_CKPT=False): any pointer will do
        ck_w = ck_s = [y] * len(W)
    grid = (B * H,)
    clip = max_grad_norm is not None
    common = {"C": C, "G": G, "STORE_CKPT": store_ckpt, "CLIP": clip, "PRECISION": INPUT_PRECISION}
    max_norm = float(max_grad_norm) if clip else 1.0
    if len(W) == 1:
        BC, BK, BV = _blocks(C, (Dk, Dv))
        _memory_linear_fwd_kernel[grid](
            q, k, v, theta, eta, alpha, W[0], S[0], y, W_out[0], S_out[0], A_out[0], ck_w[0], ck_s[0],
            T, T0, NC, NG, Dk, Dv, max_norm, BC=BC, BK=BK, BV=BV, **common)
    else:
        Dh = W[0].shape[2]
        BC, BK, BH = _blocks(C, (Dk, Dh))
        _memory_mlp_fwd_kernel[grid](
            q, k, v, theta, eta, alpha, W[0], S[0], W[1], S[1], y,
            W_out[0], S_out[0], W_out[1], S_out[1], A_out[0], A_out[1], ck_w[0], ck_s[0], ck_w[1], ck_s[1],
            T, T0, NC, NG, Dk, Dh, max_norm, BC=BC, BK=BK, BH=BH, **common)
    return y, W_out, S_out, A_out, (ck_w, ck_s) if store_ckpt else None


class _MemoryUpdateTriton(torch.autograd.Function):
    """Tokens [T0, T) of a call, chunk-aligned at T0. Inputs: the six sequences, then W..., S...;
    outputs: y, W..., S..., A... (A = the weights entering the last chunk)."""

    @staticmethod
    def forward(ctx, T0, C, G, max_grad_norm, q, k, v, theta, eta, alpha, *state):
        n = len(state) // 2
        with device_guard(q):
            y, W, S, A, (ck_w, ck_s) = _forward(q, k, v, theta, eta, alpha, state[:n], state[n:], T0, C, G, True,
                                                max_grad_norm)
        ctx.save_for_backward(q, k, v, theta, eta, alpha, *ck_w, *ck_s)
        ctx.T0, ctx.C, ctx.G, ctx.n, ctx.max_grad_norm = T0, C, G, n, max_grad_norm
        ctx.state_dtypes = [x.dtype for x in state]
        return (y, *W, *S, *A)

    @staticmethod
    def backward(ctx, dy, *d_state):
        T0, C, G, n = ctx.T0, ctx.C, ctx.G, ctx.n
        q, k, v, theta, eta, alpha, *ck = ctx.saved_tensors
        ck_w, ck_s = ck[:n], ck[n:]
        T = q.shape[2]
        seqs = (q, k, v, theta, eta, alpha)
        # The inputs are whole sequences; tokens before T0 belong to the caller's PyTorch span.
        d_seqs = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in seqs]
        dW = [g.float() for g in d_state[:n]]
        dS = [g.float() for g in d_state[n:2 * n]]
        dA = [g.float() for g in d_state[2 * n:]]
        NG = ck_w[0].shape[2]
        span = G * C  # tokens per group
        for g in range(NG - 1, -1, -1):
            t0, t1 = T0 + g * span, min(T0 + (g + 1) * span, T)
            with torch.enable_grad():
                ins = [x[:, :, t0:t1].detach().float().requires_grad_() for x in seqs]
                W0 = [w[:, :, g].detach().requires_grad_() for w in ck_w]
                S0 = [s[:, :, g].detach().requires_grad_() for s in ck_s]
                y_g, W_g, S_g, A_g = memory_update_chunked(*ins, tuple(W0), tuple(S0), tuple(W0), chunk_size=C,
                                                           max_grad_norm=ctx.max_grad_norm)
                outs = [y_g, *W_g, *S_g]
                grad_outs = [dy[:, :, t0 - T0:t1 - T0].float(), *dW, *dS]
                if g == NG - 1:  # the anchor leaving the call is the weights entering the last chunk
                    outs += list(A_g)
                    grad_outs += dA
                grads = torch.autograd.grad(outs, [*ins, *W0, *S0], grad_outs, allow_unused=True)
            for d, gr in zip(d_seqs, grads[:6]):
                if gr is not None:
                    d[:, :, t0:t1] = gr
            dW = [gr if gr is not None else torch.zeros_like(w) for gr, w in zip(grads[6:6 + n], W0)]
            dS = [gr if gr is not None else torch.zeros_like(s) for gr, s in zip(grads[6 + n:], S0)]
        d_inputs = [d.to(x.dtype) for d, x in zip(d_seqs, seqs)]
        d_init = [d.to(dt) for d, dt in zip(dW + dS, ctx.state_dtypes)]
        return (None, None, None, None, *d_inputs, *d_init)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def memory_update_triton(q, k, v, theta, eta, alpha, weights, momentum, anchor, *, chunk_size, offset=0,
                         max_grad_norm=None, stable=False):
    """Triton memory update, same contract as ``memory_update_ref`` (see the module docstring).

    Depths 1 and 2 run the kernel on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``),
    fp32/fp16/bf16 inputs, computing in fp32; y has q's dtype and the states keep their dtypes.
    Other depths and over-wide heads run ``memory_update_chunked``. ``stable=True``: a linear memory's
    curvature 2 ||k_t||^2 does not depend on the weights, so theta is rescaled here and the kernel runs
    as usual; a deeper memory's depends on the anchor, which the kernel does not compute yet, so it
    runs ``memory_update_chunked``.
    """
    require_triton("memory_update_triton")
    check_inputs(q, k, v, theta, eta, alpha, weights, momentum, anchor, chunk_size, offset)
    spent = None
    if stable and len(weights) == 1 and q.shape[2]:
        anchor, spent = split_anchor(anchor, 1, True, k)
        kf = k.to(theta.dtype)
        dtype = spent.dtype
        theta, spent = stable_steps_sequence(theta, eta, 2 * kf.pow(2).sum(-1), kf, spent.to(theta.dtype),
                                             chunk_size=chunk_size, offset=offset)
        spent = spent.to(dtype)
        stable = False
    args = (q, k, v, theta, eta, alpha, weights, momentum, anchor)
    T, Dk = q.shape[2:]
    depth = len(weights)
    if depth == 1:
        fits = next_power_of_2(max(Dk, v.shape[-1])) <= MAX_BLOCK_IN
    elif depth == 2:
        fits = next_power_of_2(Dk) <= MAX_BLOCK_IN and next_power_of_2(weights[0].shape[2]) <= MAX_BLOCK_HIDDEN
    else:
        fits = False
    if not fits or T == 0 or stable:
        y, W, S, A = memory_update_chunked(*args, chunk_size=chunk_size, offset=offset, max_grad_norm=max_grad_norm,
                                           stable=stable)
        return y, W, S, join_anchor(A, spent)
    state = (*weights, *momentum, *anchor)
    check_device("memory_update_triton", q, k, v, theta, eta, alpha, *state)
    check_dtype("memory_update_triton", q, k, v, theta, eta, alpha, *state)
    if depth == 2 and not (v.shape[-1] == Dk and weights[0].shape[3] == Dk and weights[1].shape[2:] ==
                           (Dk, weights[0].shape[2])):
        raise ValueError("memory_update_triton: depth 2 needs Dk = Dv and weights (Dh, Dk), (Dv, Dh); got "
                         f"{[tuple(w.shape) for w in weights]} with Dk={Dk}, Dv={v.shape[-1]}")

    W, S, A = tuple(weights), tuple(momentum), tuple(anchor)
    ys = []
    T0 = 0
    if offset:  # finish the chunk an earlier call started (<= C - 1 tokens, its own anchor) in PyTorch
        T0 = min(T, chunk_size - offset)
        y0, W, S, A = memory_update_chunked(q[:, :, :T0], k[:, :, :T0], v[:, :, :T0], theta[:, :, :T0],
                                            eta[:, :, :T0], alpha[:, :, :T0], W, S, A,
                                            chunk_size=chunk_size, offset=offset, max_grad_norm=max_grad_norm)
        ys.append(y0)
    if T0 < T:
        seqs = [x.contiguous() for x in (q, k, v, theta, eta, alpha)]
        W, S = [w.contiguous() for w in W], [s.contiguous() for s in S]
        if _needs_grad(*seqs, *W, *S):
            out = _MemoryUpdateTriton.apply(T0, chunk_size, max(1, int(CHECKPOINT_EVERY)), max_grad_norm, *seqs, *W, *S)
            y1, W, S, A = out[0], out[1:1 + depth], out[1 + depth:1 + 2 * depth], out[1 + 2 * depth:]
        else:  # inference: no checkpoints kept
            with device_guard(q):
                y1, W, S, A, _ = _forward(*seqs, W, S, T0, chunk_size, 1, False, max_grad_norm)
        ys.append(y1)
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)
    return y, tuple(W), tuple(S), join_anchor(A, spent)
