"""The liquid scan ``h_t = exp(log_a_t) * h_{t-1} + b_t`` in plain PyTorch, parallel over time.

Same contract as ``liquid_scan_ref`` (``naive.py``, the specification): a short loop inside chunks
of length L, run for all chunks at once (each chunk's summary), the carried state between chunks
(itself a scan, solved the same way), then the chunks rerun from their true incoming states, writing
the output in place (``_scan_forward``; the Triton kernel's two-pass layout). Every op works on
strided views of the inputs: no (B, T, D) temporaries besides the output, which at T = 16K, D = 1024
(64 MB each) were the cost (the first form, with permuted copies and a fix-up pass, ran at half the
loop's speed there). It multiplies decays (all <= 1) and never divides by a cumulative product, so
it cannot overflow the way the closed form ``cumprod``/``cumsum`` does by T ~ 4K. Its backward is
the reverse scan, by the same code (a custom autograd function), so the activations it keeps are
O(T D), not O(T D) per loop step. Long inputs run in blocks of ``BLOCK`` elements, the state carried
from block to block (forward) and the gradient from block to block (backward, in reverse): each
block's decays and temporaries stay in cache, where whole-sequence ones (64 MB each at T = 16K,
D = 1024) went to memory and back once per pass.
"""

from __future__ import annotations

import math

import torch

from titans_lnn.kernels.liquid.naive import check_inputs

SHORT = 64  # up to this many steps, one loop over time (T small ops) beats the two passes
BLOCK = 1 << 19  # (B, T_b, D) elements per block: 2 MB in fp32, in cache (as the liquid core's blocks)


def chunk_len(T: int) -> int:
    """The chunk length L for T steps: the two passes run L ops each over (B, T/L, D), the carry scan
    about T/L (a loop while T/L <= SHORT), so L ~ sqrt(T/2) has the fewest ops (~2 sqrt(2T)); at least
    16 keeps each op large for short T."""
    return max(16, math.isqrt(T // 2))


def block_steps(B: int, D: int, T: int, device: torch.device) -> int:
    """Steps per block for (B, T, D) inputs: BLOCK elements, at least 16 steps (when B D alone passes
    BLOCK: every op still spans B D elements), at most T. Off the CPU one block (the blocks are for
    CPU caches; a GPU wants few, large launches)."""
    if device.type != "cpu":
        return max(1, T)
    return max(1, min(T, max(16, BLOCK // (B * D))))


def _scan_forward(log_a: torch.Tensor, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, out: torch.Tensor, *,
                  reverse: bool = False) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t, a = exp(log_a). log_a, a, b, out: (B, T, D), each contiguous in (T, D);
    h0: (B, D) -> h written into ``out`` (which may be ``b`` itself: each step reads b_t before it
    writes h_t at the same place) and returned. ``reverse``: h_t = a_t h_{t+1} + b_t from the end,
    h0 after the last step (the backward's gradient scan, without flipped copies: a flip costs ~3 exps).

    Two passes over chunks of L steps, all chunks at once, on strided views of the inputs (no copies
    of (B, T, D) tensors):
      1. each chunk's effect on the state, h_out = P h_in + E, from a zero state: E by L fused
         multiply-adds over (B, N, D), P = exp(sum of the chunk's log-decays) (one reduction);
      2. the state entering each chunk: the same scan over the N chunks (recursively), from h0;
      3. each chunk rerun from its incoming state, writing h in place.
    The steps outside whole chunks (fewer than L: last going forward, first going backward) are a short
    loop. Only decays are multiplied (never divided by), so nothing overflows however long T is.
    """
    B, T, D = b.shape

    def in_order(steps):  # the steps in the order the recurrence takes them
        return list(reversed(steps) if reverse else steps)

    # Step views come from one unbind (indexing b[:, t] in Python costs more than the step's arithmetic).
    if T <= SHORT:
        h = h0
        for b_t, a_t, o_t in in_order(list(zip(b.unbind(1), a.unbind(1), out.unbind(1)))):
            h = torch.addcmul(b_t, a_t, h, out=o_t)
        return out
    L = chunk_len(T)
    N = T // L
    rest = T - N * L
    whole, part = (slice(rest, T), slice(0, rest)) if reverse else (slice(0, N * L), slice(N * L, T))
    la_c = log_a[:, whole].view(B, N, L, D)  # chunk views, no copies
    b_j, a_j, o_j = (in_order(t[:, whole].view(B, N, L, D).unbind(2)) for t in (b, a, out))  # step j: (B, N, D)
    end = b_j[0].clone()  # (B, N, D): E of each chunk, built step by step in place
    for j in range(1, L):
        torch.addcmul(b_j[j], a_j[j], end, out=end)
    chunk_log = la_c.sum(dim=2)  # (B, N, D): log P
    # the state at each chunk's last step in scan order, then the state entering each chunk
    ends = _scan_forward(chunk_log, chunk_log.exp(), end, h0, end, reverse=reverse)  # (B, N, D)
    if reverse:
        h = torch.cat([ends[:, 1:], h0[:, None]], dim=1)
    else:
        h = torch.cat([h0[:, None], ends[:, :-1]], dim=1)
    for j in range(L):
        h = torch.addcmul(b_j[j], a_j[j], h, out=o_j[j])
    h = ends[:, 0] if reverse else ends[:, -1]
    for b_t, a_t, o_t in in_order(list(zip(b[:, part].unbind(1), a[:, part].unbind(1), out[:, part].unbind(1)))):
        h = torch.addcmul(b_t, a_t, h, out=o_t)
    return out


def _scan_blocks(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The forward scan over blocks of ``block_steps`` steps, the state carried; each block's decays
    exp(log_a) taken once, in cache. log_a, b: (B, T, D) contiguous; h0: (B, D) -> h: (B, T, D)."""
    B, T, D = b.shape
    out = torch.empty_like(b)
    Tb = block_steps(B, D, T, b.device)
    h = h0
    for s in range(0, T, Tb):
        la = log_a[:, s:s + Tb]
        h = _scan_forward(la, la.exp(), b[:, s:s + Tb], h, out[:, s:s + Tb])[:, -1]
    return out


class _LiquidScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_a, b, h0):
        log_a = log_a.contiguous()
        h = _scan_blocks(log_a, b.contiguous(), h0)
        ctx.save_for_backward(log_a, h, h0)
        return h

    @staticmethod
    def backward(ctx, dh):
        log_a, h, h0 = ctx.saved_tensors
        B, T, D = h.shape
        dh = dh.contiguous()
        # g_t = dL/dh_t in total: g_t = dh_t + a_{t+1} g_{t+1}, a reverse scan, run block by block from
        # the end, with g at the next block's first step carried.
        g, d_log_a = torch.empty_like(h), torch.empty_like(h)
        Tb = block_steps(B, D, T, h.device)
        g_next = torch.zeros_like(h0)  # g_e, the gradient entering from after the block (0 after the end)
        for s in reversed(range(0, T, Tb)):
            e = min(s + Tb, T)
            # a_s .. a_e, one exp: a_{t+1} carries g_{t+1} into g_t (t = s .. e-1; a_T: none, log 0), a_t
            # enters d log a_t
            la = log_a[:, s:e + 1] if e < T else torch.cat([log_a[:, s:], log_a.new_zeros(B, 1, D)], 1)
            a = la.exp()  # (B, e - s + 1, D)
            g_blk = _scan_forward(la[:, 1:], a[:, 1:], dh[:, s:e], g_next, g[:, s:e], reverse=True)
            h_prev = torch.cat([(h0 if s == 0 else h[:, s - 1])[:, None], h[:, s:e - 1]], dim=1)
            torch.mul(g_blk, a[:, :-1], out=d_log_a[:, s:e]).mul_(h_prev)
            g_next = g_blk[:, 0]
        dh0 = a[:, 0] * g_next  # the first block's: exp(log_a_0) g_0
        return d_log_a, g, dh0


def liquid_scan_chunked(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
    """Chunked parallel scan, same contract as ``liquid_scan_ref``. Computes in fp32 at least."""
    check_inputs(log_a, b, h0)
    B, T, D = b.shape
    dtype = torch.promote_types(b.dtype, torch.float32)
    h0 = b.new_zeros(B, D, dtype=dtype) if h0 is None else h0.to(dtype)
    if T == 0:
        return b.new_zeros(B, 0, D), h0.to(b.dtype)
    h = _LiquidScan.apply(log_a.to(dtype), b.to(dtype), h0)
    return h.to(b.dtype), h[:, -1].to(b.dtype)


def liquid_scan_chunked_(log_a: torch.Tensor, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The scan in place, without autograd, for a caller that holds the decays already (the liquid core
    has a = 1 + expm1(log_a) from its input term): h over b, returned. log_a, a, b: (B, T, D)
    contiguous, of one floating dtype, fp32 or wider; h0: (B, D). Saves the exp pass and the output
    tensor of ``liquid_scan_chunked``; for inputs that need no gradient only (it raises otherwise)."""
    check_inputs(log_a, b, h0)
    if a.shape != b.shape or any(not t.is_contiguous() for t in (log_a, a, b)):
        raise ValueError(f"liquid_scan_chunked_: log_a, a, b must be contiguous (B, T, D) tensors of one shape; "
                         f"got {tuple(log_a.shape)}, {tuple(a.shape)}, {tuple(b.shape)}")
    if any(t.requires_grad for t in (log_a, a, b, h0)):
        raise ValueError("liquid_scan_chunked_ writes over b and records no gradient: use liquid_scan_chunked "
                         "for inputs that require grad")
    return _scan_forward(log_a, a, b, h0.to(b.dtype), b)
