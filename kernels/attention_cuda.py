"""Sliding-window attention on CUDA, through the fastest library that can express the call.

Same contract and mask as ``sliding_window_attention_blocked`` (see ``attention.py``): q (B, H, T, D);
k, v, k2, v2 (B, G, P + T, D) with P cached keys; sink_k, sink_v (B or 1, G, N_p, D) always visible.
The backends, in the order "auto" tries them for CUDA tensors:

- **flash-attn** (``flash_attn_func``, causal, ``window_size=(W - 1, 0)``, or ``(-1, -1)`` for full
  attention): fp16/bf16, head dim <= 256, no second key stream k2, not segment mode. Cached keys are
  fine: flash-attn aligns the causal mask bottom-right, so query i sees keys P+i-W+1 .. P+i. The
  persistent tokens (sinks) are merged in by log-sum-exp with a small dense attention over them, but
  only when no gradient is needed: flash-attn's backward drops the gradient of its log-sum-exp output,
  so a merge would get wrong gradients. Training calls with sinks go to FlexAttention.
- **xformers** (``memory_efficient_attention`` with a bottom-right causal local mask): no sinks, no
  k2, not segment mode. The window's off-by-one has changed between xformers versions, so it is
  checked once per device against the blocked form and skipped if it disagrees.
- **FlexAttention** (``torch.nn.attention.flex_attention``): every call. The keys are
  ``[sinks | k | k2]``; one ``mask_mod`` says what each query sees, and the block-sparse ``BlockMask``
  is built directly at block granularity (no T x T mask is ever formed): O(T/128 x (N_p + 2(P + T))/128)
  booleans. Exact gradients. Compiled with ``torch.compile`` when called eagerly on CUDA (eager
  FlexAttention is an unfused T x T computation).
- otherwise the blocked PyTorch form.

CPU tensors always take the blocked PyTorch form, so forcing the "triton" implementation in
``kernels.dispatch`` works on any machine. (FlexAttention runs on CPU only without gradients; the
tests call it there directly through ``flex_sliding_window_attention``.) The backend can be forced
with ``backend=`` or the environment variable ``TITANS_LNN_ATTN_BACKEND`` (auto, flash, xformers,
flex, blocked). flash-attn and xformers are imported only when used.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

from titans_lnn.kernels.attention import _check, _visible_from, sliding_window_attention_blocked

BACKENDS = ("auto", "flash", "xformers", "flex", "blocked")
BACKEND_ENV = "TITANS_LNN_ATTN_BACKEND"
FLEX_BLOCK = 128  # FlexAttention's sparse block size (queries and keys)


@functools.cache
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------------
# flash-attn


def _flash(q, k, v, *, window, sink_k, sink_v):
    """flash-attn on (B, T, H, D) views; sinks merged by log-sum-exp (forward only, see docstring)."""
    from flash_attn import flash_attn_func

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, T, H, D), (B, P+T, G, D)
    window_size = (-1, -1) if window is None else (window - 1, 0)
    if sink_k is None:
        return flash_attn_func(qt, kt, vt, causal=True, window_size=window_size).transpose(1, 2)
    out, lse, _ = flash_attn_func(qt, kt, vt, causal=True, window_size=window_size, return_attn_probs=True)
    return _merge_sinks(out.transpose(1, 2), lse[:, :, :q.shape[2]], q, sink_k, sink_v)


def _merge_sinks(out, lse, q, sink_k, sink_v):
    """Combine attention over the window (out (B, H, T, D), its log-sum-exp lse (B, H, T)) with
    attention over the sinks, as one softmax over both."""
    B, H, T, D = q.shape
    rep = H // sink_k.shape[1]
    sk = sink_k.float().expand(B, -1, -1, -1).repeat_interleave(rep, 1)  # (B, H, N_p, D)
    sv = sink_v.float().expand(B, -1, -1, -1).repeat_interleave(rep, 1)
    s = torch.einsum("bhtd,bhnd->bhtn", q.float(), sk) / math.sqrt(D)  # (B, H, T, N_p)
    lse_all = torch.logaddexp(lse.float(), s.logsumexp(-1))  # (B, H, T)
    o = out.float() * (lse.float() - lse_all).exp()[..., None] \
        + torch.einsum("bhtn,bhnd->bhtd", (s - lse_all[..., None]).exp(), sv)
    return o.to(q.dtype)


# ---------------------------------------------------------------------------------------------------
# xformers


def _xformers(q, k, v, *, window):
    """xformers' memory-efficient attention; grouped heads as its 5-D (B, M, G, H/G, D) layout."""
    from xformers.ops import fmha

    B, H, T, D = q.shape
    G, L = k.shape[1], k.shape[2]
    bias = fmha.attn_bias.LowerTriangularFromBottomRightMask()
    if window is not None:
        bias = bias.make_local_attention(window)
    qx = q.transpose(1, 2).reshape(B, T, G, H // G, D)  # head h = g * (H/G) + r, as repeat_interleave
    kx = k.transpose(1, 2)[:, :, :, None].expand(B, L, G, H // G, D)
    vx = v.transpose(1, 2)[:, :, :, None].expand(B, L, G, H // G, D)
    out = fmha.memory_efficient_attention(qx, kx, vx, attn_bias=bias)  # (B, T, G, H/G, D)
    return out.reshape(B, T, H, D).transpose(1, 2)


@functools.cache
def _xformers_window_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """True when xformers' local mask keeps exactly W keys (checked once on a tiny problem)."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, 2, 9, 16, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(1, 1, 11, 16, device=device, dtype=dtype, generator=g) for _ in range(2))
        with torch.no_grad():
            got = _xformers(q, k, v, window=3).float()
            ref = sliding_window_attention_blocked(q, k, v, window=3).float()
    except Exception:  # noqa: BLE001 - any failure (no kernel for this GPU or dtype) means "do not use"
        return False
    return bool((got - ref).abs().max() < 2e-2)


# ---------------------------------------------------------------------------------------------------
# FlexAttention


def _mask_mod(P: int, Np: int, L: int, KV: int, has_k2: bool, window: int | None, segment: bool, pos0: int):
    """FlexAttention's mask over the keys [sinks (Np) | k (L) | k2 (L)]; L = P + T, query i is key P + i."""

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx - Np  # index in k (or k2)
        if has_k2:
            j = torch.where(j >= L, j - L, j)
        qk = q_idx + P
        seen = j <= qk
        if window is not None:
            lo = (pos0 + qk) // window * window - pos0 if segment else qk - window + 1
            seen = seen & (j >= lo)
        return ((kv_idx < Np) | seen) & (kv_idx < KV)

    return mask_mod


def _block_mask(T, P, Np, has_k2, window, segment, pos0, device, block=FLEX_BLOCK):
    """The ``BlockMask`` of ``_mask_mod``, built at block granularity.

    For the queries of a block [qs, qe] the visible keys of k form one interval per query, [lo(q), P+q],
    with lo and P+q non-decreasing: some query sees [lo(qs), P+qe], every query sees [lo(qe), P+qs].
    A key block meeting the first set (or the sinks) is computed; one inside the second (or the sinks) is
    full (its mask is skipped); the rest are partial (masked). k2 repeats k's intervals L keys later.
    """
    from torch.nn.attention.flex_attention import BlockMask

    L = P + T
    KV = Np + L * (2 if has_k2 else 1)
    NQ, NKV = -(-T // block), -(-KV // block)
    qs = torch.arange(NQ, device=device) * block
    qe = torch.clamp(qs + block, max=T) - 1

    def lo(i):  # first visible key index of query i
        return (_visible_from(pos0 + P + i, window, segment) - pos0).clamp_min(0)

    some, every = [], []  # (start, end) key intervals, inclusive, each (NQ,)
    if Np:
        sinks = (torch.zeros_like(qs), torch.full_like(qs, Np - 1))
        some.append(sinks)
        every.append(sinks)
    for off in (Np, Np + L) if has_k2 else (Np,):
        some.append((off + lo(qs), off + P + qe))
        every.append((off + lo(qe), off + P + qs))
    ks = torch.arange(NKV, device=device) * block
    ke = torch.clamp(ks + block, max=KV) - 1
    any_ = torch.zeros(NQ, NKV, dtype=torch.bool, device=device)
    full = torch.zeros_like(any_)
    for s, e in some:
        any_ |= (ks[None] <= e[:, None]) & (ke[None] >= s[:, None])
    for s, e in every:
        full |= (ks[None] >= s[:, None]) & (ke[None] <= e[:, None])
    full &= (ks + block <= KV)[None]  # a ragged last key block always goes through the mask
    partial = any_ & ~full

    def ordered(m):  # (NQ, NKV) -> counts (1, 1, NQ), indices (1, 1, NQ, NKV), the set ones first
        m = m.to(torch.int32)
        idx = torch.argsort(m, dim=-1, descending=True, stable=True).to(torch.int32)
        return m.sum(-1, dtype=torch.int32)[None, None], idx[None, None]

    mask_mod = _mask_mod(P, Np, L, KV, has_k2, window, segment, pos0)
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=(block, block),
                                    mask_mod=mask_mod, seq_lengths=(T, KV))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_available() -> bool:
    return _installed("torch.nn.attention.flex_attention")


def flex_sliding_window_attention(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None,
                                  segment=False, pos0=0, compiled: bool | None = None, block: int = FLEX_BLOCK):
    """The FlexAttention backend, on any device (on CPU: forward only, as FlexAttention has no CPU
    backward). ``compiled`` (default: on CUDA when not already inside torch.compile) wraps
    ``flex_attention`` in ``torch.compile``; eager FlexAttention is unfused (dense T x (Np + 2L))."""
    from torch.nn.attention.flex_attention import flex_attention

    _check(q, k, v, k2, v2, sink_k, sink_v, window)
    B, H, T, D = q.shape
    G, L = k.shape[1], k.shape[2]
    keys, vals = [k], [v]
    if k2 is not None:
        keys.append(k2)
        vals.append(v2)
    Np = 0
    if sink_k is not None:
        Np = sink_k.shape[2]
        keys.insert(0, sink_k.expand(B, -1, -1, -1))
        vals.insert(0, sink_v.expand(B, -1, -1, -1))
    kk = torch.cat([x.to(q.dtype) for x in keys], dim=2)  # (B, G, Np + L [+ L], D)
    vv = torch.cat([x.to(q.dtype) for x in vals], dim=2)
    block_mask = _block_mask(T, L - T, Np, k2 is not None, window, segment, pos0, q.device, block)
    if compiled is None:
        compiled = q.is_cuda and not torch.compiler.is_compiling()
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, kk, vv, block_mask=block_mask, scale=1.0 / math.sqrt(D), enable_gqa=H != G)


# ---------------------------------------------------------------------------------------------------
# dispatch


def choose_backend(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None, segment=False,
                   pos0=0) -> str:
    """The backend "auto" runs for this call (see the module docstring)."""
    if not q.is_cuda:
        return "blocked"
    simple = k2 is None and not segment
    if (simple and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and (sink_k is None or not _needs_grad(q, k, v, sink_k, sink_v)) and _installed("flash_attn")):
        return "flash"
    if simple and sink_k is None and _installed("xformers") and _xformers_window_ok(q.device, q.dtype):
        return "xformers"
    if flex_available():
        return "flex"
    return "blocked"


def sliding_window_attention_cuda(q, k, v, *, window, sink_k=None, sink_v=None, k2=None, v2=None, segment=False,
                                  pos0=0, backend: str | None = None):
    """Same contract as ``sliding_window_attention_blocked``; picks a library backend (module docstring).

    CPU tensors run the blocked PyTorch form unless a backend is forced.
    """
    _check(q, k, v, k2, v2, sink_k, sink_v, window)
    kw = dict(window=window, sink_k=sink_k, sink_v=sink_v, k2=k2, v2=v2, segment=segment, pos0=pos0)
    choice = backend or os.environ.get(BACKEND_ENV, "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"attention backend {choice!r} is invalid: expected one of {', '.join(BACKENDS)} "
                         f"(from backend= or ${BACKEND_ENV})")
    if choice == "auto":
        choice = choose_backend(q, k, v, **kw)
    if choice in ("flash", "xformers"):
        if k2 is not None or segment:
            raise ValueError(f"attention backend {choice!r} cannot express k2/v2 or segment mode")
        if choice == "xformers" and sink_k is not None:
            raise ValueError("attention backend 'xformers' cannot express persistent tokens (sinks)")
        if choice == "flash" and sink_k is not None and _needs_grad(q, k, v, sink_k, sink_v):
            raise ValueError("attention backend 'flash' has no gradient for persistent tokens (sinks)")
    if choice == "flash":
        return _flash(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v)
    if choice == "xformers":
        return _xformers(q, k, v, window=window)
    if choice == "flex":
        return flex_sliding_window_attention(q, k, v, **kw)
    return sliding_window_attention_blocked(q, k, v, **kw)
