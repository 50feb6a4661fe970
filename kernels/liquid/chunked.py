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
O(T D), not O(T D) per loop step.
"""

from __future__ import annotations

import math

import torch

from titans_lnn.kernels.liquid.naive import check_inputs

SHORT = 64  # up to this many steps, one loop over time (T small ops) beats the two passes
IN_CACHE = 1 << 23  # elements of b up to which exp(log_a) is taken once (32 MB in fp32; measured), else per step


def chunk_len(T: int) -> int:
    """The chunk length L for T steps: the two passes run L ops each over (B, T/L, D), the carry scan
    about T/L (a loop while T/L <= SHORT), so L ~ sqrt(T/2) has the fewest ops (~2 sqrt(2T)); at least
    16 keeps each op large for short T."""
    return max(16, math.isqrt(T // 2))


def _scan_forward(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, *, a: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """h_t = exp(log_a_t) h_{t-1} + b_t. log_a, b: (B, T, D) contiguous; h0: (B, D) -> h: (B, T, D).

    ``a`` (B, T, D), contiguous: the decays exp(log_a) when the caller has them already (then no exp is
    taken here). ``out`` (B, T, D), contiguous: where h goes; it may be ``b`` itself (each step reads
    b_t before it writes h_t at the same place).

    Two passes over chunks of L steps, all chunks at once, on strided views of the inputs (no copies
    of (B, T, D) tensors besides the output):
      1. each chunk's effect on the state, h_out = P h_in + E, from a zero state: E by L fused
         multiply-adds over (B, N, D), P = exp(sum of the chunk's log-decays) (one reduction);
      2. the state entering each chunk: the same scan over the N chunks (recursively), from h0;
      3. each chunk rerun from its incoming state, writing h in place.
    Past ``IN_CACHE`` elements the decays exp(log_a) are taken step by step inside the passes, on
    (B, N, D) slices that stay in cache, rather than as one more (B, T, D) tensor. The steps past the
    last whole chunk (fewer than L) are a short loop. Only decays are multiplied (never divided by), so
    nothing overflows however long T is.
    """
    B, T, D = b.shape
    out = torch.empty_like(b) if out is None else out
    # Step views come from one unbind (indexing b[:, t] in Python costs more than the step's arithmetic).
    if T <= SHORT:
        a = log_a.exp() if a is None else a  # one op for all steps: each step is then one op
        h = h0
        for b_t, a_t, o_t in zip(b.unbind(1), a.unbind(1), out.unbind(1)):
            h = torch.addcmul(b_t, a_t, h, out=o_t)
        return out
    L = chunk_len(T)
    N = T // L
    la_c, b_c = log_a[:, :N * L].view(B, N, L, D), b[:, :N * L].view(B, N, L, D)  # chunk views, no copies
    b_j = b_c.unbind(2)  # step j of every chunk: (B, N, D)
    if a is not None or b.numel() <= IN_CACHE:  # given, or small enough to stay in cache: one exp for both passes
        a_j = (la_c.exp() if a is None else a[:, :N * L].view(B, N, L, D)).unbind(2)

        def decay(j):
            return a_j[j]
    else:  # one more (B, T, D) tensor would be written and read twice from memory: exp per step instead
        def decay(j):
            return la_c.select(2, j).exp()
    end = b_j[0].clone()  # (B, N, D): E of each chunk, built step by step in place
    for j in range(1, L):
        torch.addcmul(b_j[j], decay(j), end, out=end)
    ends = _scan_forward(la_c.sum(dim=2), end, h0)  # (B, N, D): the state after each chunk
    h = torch.cat([h0[:, None], ends[:, :-1]], dim=1)  # (B, N, D): the state entering each chunk
    for j, o_j in enumerate(out[:, :N * L].view(B, N, L, D).unbind(2)):
        h = torch.addcmul(b_j[j], decay(j), h, out=o_j)
    h = ends[:, -1]
    a_tail = log_a[:, N * L:].exp() if a is None else a[:, N * L:]  # the last T - N L < L steps
    for b_t, a_t, o_t in zip(b[:, N * L:].unbind(1), a_tail.unbind(1), out[:, N * L:].unbind(1)):
        h = torch.addcmul(b_t, a_t, h, out=o_t)
    return out


class _LiquidScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_a, b, h0):
        log_a = log_a.contiguous()
        h = _scan_forward(log_a, b.contiguous(), h0)
        ctx.save_for_backward(log_a, h, h0)
        return h

    @staticmethod
    def backward(ctx, dh):
        log_a, h, h0 = ctx.saved_tensors
        B, T, D = h.shape
        # g_t = dL/dh_t in total: g_t = dh_t + a_{t+1} g_{t+1}, a reverse scan.
        log_a_next = torch.cat([log_a[:, 1:], log_a.new_zeros(B, 1, D)], dim=1)
        g = _scan_forward(log_a_next.flip(1), dh.flip(1), torch.zeros_like(h0)).flip(1)
        a = torch.exp(log_a)
        h_prev = torch.cat([h0[:, None], h[:, :-1]], dim=1)
        d_log_a = g * a * h_prev
        dh0 = a[:, 0] * g[:, 0]
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
    return _scan_forward(log_a, b, h0.to(b.dtype), a=a, out=b)
