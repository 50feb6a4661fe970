"""Triton form of the liquid scan ``h_t = exp(log_a_t) * h_{t-1} + b_t`` (the specification: ``naive.py``).

Same contract as ``liquid_scan_ref``: ``(log_a, b, h0) -> (h, h_last)``, with a Triton backward:

    g_t = dh_t + a_{t+1} g_{t+1}   (+ dh_last at t = T)     d_log_a_t = g_t a_t h_{t-1}
    db_t = g_t                                                dh0 = a_1 g_1

Layout of the work (fla's ``fused_recurrent`` design). Each program owns one batch row, one block
of BD channels and one span of time, and walks its span step by step with the state in fp32
registers: every step loads one BD-row of each input (coalesced; loads do not depend on the state,
so they pipeline) and stores one row of output. Channels are independent, so the grid is
parallel over (D-blocks, spans, B) and sequential only inside a span.

- ``splits = 1`` (the default when B * D fills the GPU, and always on CPU): one span, one pass.
- ``splits > 1`` (parallel over time when B * D is small): the span's effect on the state is
  affine, ``h_out = P h_in + E``, with P the product of its decays (<= 1, never divided by, so no
  overflow). Pass 1 computes (P, E) of every span from a zero state; a carry pass (sequential over
  the few spans) gives each span its incoming state; pass 2 reruns each span from that state and
  stores h. Inputs are read twice. The backward does the same in reverse time with the carry
  ``c_t = a_t g_t`` (so ``dh0`` is the carry leaving the first span).

The backward reads the saved output ``h`` for ``h_{t-1}`` instead of recomputing it: ``h`` is
kept alive by autograd anyway, so this costs no memory. With bf16 outputs ``d_log_a`` therefore
sees ``h_{t-1}`` rounded to bf16 (relative error ~2^-9, below bf16 gradient noise).

Offsets are int64 (B*T*D passes 2^31 near 1M tokens); D need not be a power of two (masks) and
any T >= 1 works (T = 0 is handled without a kernel). Triton is imported only if installed;
calling ``liquid_scan_triton`` without it raises ``RuntimeError``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from titans_lnn.kernels.liquid.naive import check_inputs
from titans_lnn.kernels.triton_utils import (
    autotune,
    cdiv,
    check_device,
    check_dtype,
    device_guard,
    empty,
    is_interpreting,
    next_power_of_2,
    num_sms,
    require_triton,
    triton_available,
)

_MIN_SPAN = 256  # steps per span at least when splitting over time: the carry pass stays cheap

if triton_available():
    import triton
    import triton.language as tl

    _CONFIGS = [triton.Config({}, num_warps=w) for w in (1, 2, 4)]

    @autotune(configs=_CONFIGS, key=["BD", "HAS_INIT", "SUMMARY"])
    @triton.jit
    def _liquid_scan_fwd_kernel(
        log_a, b, h_init, h, h_last, span_decay, span_end,
        T, D, S, NS,
        HAS_INIT: tl.constexpr, SUMMARY: tl.constexpr, BD: tl.constexpr,
    ):
        """One (D-block, span, batch) per program. h_init, span_*: (B, NS, D) fp32 (h0 when NS = 1).

        SUMMARY: run from a zero state and store only (P, E) of the span; else store h (and h_last
        from the final span).
        """
        i_d, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_b64 = i_b.to(tl.int64)
        o_d = i_d * BD + tl.arange(0, BD)
        m_d = o_d < D
        t_first = i_s.to(tl.int64) * S
        o_span = (i_b64 * NS + i_s) * D + o_d
        o_row = (i_b64 * T + t_first) * D + o_d
        p_log_a = log_a + o_row
        p_b = b + o_row
        p_h = h + o_row

        b_h = tl.zeros([BD], dtype=tl.float32)
        if HAS_INIT:
            b_h = tl.load(h_init + o_span, mask=m_d, other=0.).to(tl.float32)
        b_decay = tl.full([BD], 1.0, dtype=tl.float32)
        for i_t in range(S):
            # Past T (the last span's tail) loads give a = 1, b = 0: the state is left as is.
            # (tl.where, not `m_d & scalar`: the interpreter turns the latter into int32.)
            m_t = tl.where(t_first + i_t < T, m_d, False)
            b_a = tl.exp(tl.load(p_log_a, mask=m_t, other=0.).to(tl.float32))
            b_h = b_a * b_h + tl.load(p_b, mask=m_t, other=0.).to(tl.float32)
            if SUMMARY:
                b_decay = b_decay * b_a
            else:
                tl.store(p_h, b_h.to(p_h.dtype.element_ty), mask=m_t)
            p_log_a += D
            p_b += D
            p_h += D
        if SUMMARY:
            tl.store(span_decay + o_span, b_decay, mask=m_d)
            tl.store(span_end + o_span, b_h, mask=m_d)
        else:
            p_last = h_last + i_b64 * D + o_d
            tl.store(p_last, b_h.to(p_last.dtype.element_ty), mask=tl.where(i_s == NS - 1, m_d, False))

    @autotune(configs=_CONFIGS, key=["BD", "HAS_H0", "SUMMARY"])
    @triton.jit
    def _liquid_scan_bwd_kernel(
        log_a, h, h0, dh, c_init, d_log_a, db, dh0, span_decay, span_end,
        T, D, S, NS,
        HAS_H0: tl.constexpr, HAS_INIT: tl.constexpr, STORE_DH0: tl.constexpr, SUMMARY: tl.constexpr,
        BD: tl.constexpr,
    ):
        """Reverse scan of one (D-block, span, batch). c_init, span_*: (B, NS, D) fp32 (dh_last when NS = 1).

        The carry c = a_t g_t flows right to left; g_t = dh_t + c_{t+1}.
        """
        i_d, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_b64 = i_b.to(tl.int64)
        o_d = i_d * BD + tl.arange(0, BD)
        m_d = o_d < D
        t_last = (i_s.to(tl.int64) + 1) * S - 1  # may lie past T in the last span (masked)
        o_span = (i_b64 * NS + i_s) * D + o_d
        o_row = (i_b64 * T + t_last) * D + o_d
        p_log_a = log_a + o_row
        p_dh = dh + o_row
        p_hp = h + o_row - D  # h_{t-1}
        p_dla = d_log_a + o_row
        p_db = db + o_row

        b_c = tl.zeros([BD], dtype=tl.float32)
        if HAS_INIT:
            b_c = tl.load(c_init + o_span, mask=m_d, other=0.).to(tl.float32)
        b_h0 = tl.zeros([BD], dtype=tl.float32)
        if HAS_H0:
            b_h0 = tl.load(h0 + i_b64 * D + o_d, mask=m_d, other=0.).to(tl.float32)
        b_decay = tl.full([BD], 1.0, dtype=tl.float32)
        for i_t in range(S):
            t = t_last - i_t
            m_t = tl.where(t < T, m_d, False)
            b_g = b_c + tl.load(p_dh, mask=m_t, other=0.).to(tl.float32)
            b_a = tl.exp(tl.load(p_log_a, mask=m_t, other=0.).to(tl.float32))
            b_c = b_a * b_g
            if SUMMARY:
                b_decay = b_decay * b_a
            else:
                b_hp = tl.load(p_hp, mask=tl.where(t > 0, m_t, False), other=0.).to(tl.float32)
                b_hp = tl.where(t > 0, b_hp, b_h0)
                tl.store(p_dla, (b_c * b_hp).to(p_dla.dtype.element_ty), mask=m_t)
                tl.store(p_db, b_g.to(p_db.dtype.element_ty), mask=m_t)
            p_log_a -= D
            p_dh -= D
            p_hp -= D
            p_dla -= D
            p_db -= D
        if SUMMARY:
            tl.store(span_decay + o_span, b_decay, mask=m_d)
            tl.store(span_end + o_span, b_c, mask=m_d)
        elif STORE_DH0:
            p_dh0 = dh0 + i_b64 * D + o_d
            tl.store(p_dh0, b_c.to(p_dh0.dtype.element_ty), mask=tl.where(i_s == 0, m_d, False))

    @triton.jit
    def _liquid_scan_carry_kernel(
        span_decay, span_end, init, span_in, D, NS,
        HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BD: tl.constexpr,
    ):
        """State entering each span: s <- P s + E over the spans, left to right (or right to left)."""
        i_d, i_b = tl.program_id(0), tl.program_id(1)
        i_b64 = i_b.to(tl.int64)
        o_d = i_d * BD + tl.arange(0, BD)
        m_d = o_d < D
        b_s = tl.zeros([BD], dtype=tl.float32)
        if HAS_INIT:
            b_s = tl.load(init + i_b64 * D + o_d, mask=m_d, other=0.).to(tl.float32)
        for i_k in range(NS):
            if REVERSE:
                i_s = NS - 1 - i_k
            else:
                i_s = i_k
            o_span = (i_b64 * NS + i_s) * D + o_d
            tl.store(span_in + o_span, b_s, mask=m_d)
            b_p = tl.load(span_decay + o_span, mask=m_d, other=1.)
            b_s = b_p * b_s + tl.load(span_end + o_span, mask=m_d, other=0.)


def _block_d(D: int) -> int:
    return min(max(next_power_of_2(D), 16), 64)


def _num_spans(B: int, T: int, D: int, splits: int | None, device: torch.device) -> int:
    """Spans of time run in parallel: ``splits`` when given, else enough to fill the GPU."""
    if splits is None:
        programs = B * cdiv(D, _block_d(D))
        if device.type != "cuda" or is_interpreting() or programs >= 2 * num_sms(device):
            return 1
        splits = min(cdiv(4 * num_sms(device), programs), T // _MIN_SPAN)
    S = cdiv(T, max(1, min(splits, T, 65535)))  # steps per span (65535: the grid's y limit)
    return cdiv(T, S)


def _forward(log_a, b, h0, NS):
    B, T, D = b.shape
    BD = _block_d(D)
    S = cdiv(T, NS)
    h = empty((B, T, D), dtype=b.dtype, device=b.device)
    h_last = empty((B, D), dtype=b.dtype, device=b.device)
    if NS == 1:
        _liquid_scan_fwd_kernel[(cdiv(D, BD), 1, B)](
            log_a, b, h0 if h0 is not None else h, h, h_last, h_last, h_last, T, D, S, NS,
            HAS_INIT=h0 is not None, SUMMARY=False, BD=BD)
        return h, h_last
    decay, end, h_in = (empty((B, NS, D), dtype=torch.float32, device=b.device) for _ in range(3))
    _liquid_scan_fwd_kernel[(cdiv(D, BD), NS, B)](
        log_a, b, h_in, h, h_last, decay, end, T, D, S, NS, HAS_INIT=False, SUMMARY=True, BD=BD)
    _liquid_scan_carry_kernel[(cdiv(D, BD), B)](
        decay, end, h0 if h0 is not None else decay, h_in, D, NS,
        HAS_INIT=h0 is not None, REVERSE=False, BD=BD)
    _liquid_scan_fwd_kernel[(cdiv(D, BD), NS, B)](
        log_a, b, h_in, h, h_last, decay, end, T, D, S, NS, HAS_INIT=True, SUMMARY=False, BD=BD)
    return h, h_last


def _backward(log_a, h, h0, dh, dh_last, NS, need_dh0):
    B, T, D = h.shape
    BD = _block_d(D)
    S = cdiv(T, NS)
    d_log_a = empty((B, T, D), dtype=log_a.dtype, device=h.device)
    db = empty((B, T, D), dtype=h.dtype, device=h.device)
    dh0 = empty((B, D), dtype=h0.dtype, device=h.device) if need_dh0 else None
    h0_ = h0 if h0 is not None else h
    dh0_ = dh0 if dh0 is not None else db
    c_init = dh_last
    if NS > 1:
        decay, end, c_init = (empty((B, NS, D), dtype=torch.float32, device=h.device) for _ in range(3))
        _liquid_scan_bwd_kernel[(cdiv(D, BD), NS, B)](
            log_a, h, h0_, dh, dh_last, d_log_a, db, dh0_, decay, end, T, D, S, NS,
            HAS_H0=False, HAS_INIT=False, STORE_DH0=False, SUMMARY=True, BD=BD)
        _liquid_scan_carry_kernel[(cdiv(D, BD), B)](
            decay, end, dh_last, c_init, D, NS, HAS_INIT=True, REVERSE=True, BD=BD)
    _liquid_scan_bwd_kernel[(cdiv(D, BD), NS, B)](
        log_a, h, h0_, dh, c_init, d_log_a, db, dh0_, d_log_a, d_log_a, T, D, S, NS,
        HAS_H0=h0 is not None, HAS_INIT=True, STORE_DH0=need_dh0, SUMMARY=False, BD=BD)
    return d_log_a, db, dh0


class _LiquidScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_a, b, h0, NS):
        with device_guard(b):
            h, h_last = _forward(log_a, b, h0, NS)
        ctx.save_for_backward(log_a, h, h0)
        ctx.NS = NS
        return h, h_last

    @staticmethod
    @once_differentiable
    def backward(ctx, dh, dh_last):
        log_a, h, h0 = ctx.saved_tensors
        need_dh0 = h0 is not None and ctx.needs_input_grad[2]
        with device_guard(h):
            d_log_a, db, dh0 = _backward(log_a, h, h0, dh.contiguous(), dh_last.contiguous(), ctx.NS, need_dh0)
        return d_log_a, db, dh0, None


def liquid_scan_triton(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, *,
                       splits: int | None = None):
    """Triton scan, same contract as ``liquid_scan_ref``. log_a, b: (B, T, D); h0: (B, D) or None.

    Returns h: (B, T, D) and h_last: (B, D) in b's dtype; computes in fp32. ``splits`` pins the
    number of time spans run in parallel (1 = one sequential pass; None = chosen from the GPU size).
    """
    require_triton("liquid_scan_triton")
    check_inputs(log_a, b, h0)
    check_device("liquid_scan_triton", log_a, b, h0)
    check_dtype("liquid_scan_triton", log_a, b, h0)
    B, T, D = b.shape
    if T == 0 or B * D == 0:
        h_last = b.new_zeros(B, D) if h0 is None else h0.to(b.dtype)
        return b.new_zeros(B, T, D), h_last
    NS = _num_spans(B, T, D, splits, b.device)
    h0 = h0.contiguous() if h0 is not None else None
    return _LiquidScanTriton.apply(log_a.contiguous(), b.contiguous(), h0, NS)
