"""The CUDA attention front end (``kernels/window_attention/cuda.py``) on CPU: its fallback, and its FlexAttention
backend against ``sliding_window_attention_ref``.

FlexAttention runs on CPU tensors without gradients (eagerly: unfused; compiled: block-sparse), so the
FlexAttention path (mask, block mask, sinks, k2, segment mode, cached keys, grouped heads) is checked
here in fp32; flash-attn and xformers need a GPU and are checked by the same comparisons there.
"""

import warnings

import pytest
import torch

from titans_lnn.kernels import dispatch, sliding_window_attention
from titans_lnn.kernels.window_attention import cuda as ac
from titans_lnn.kernels.window_attention import (
    flash,
    flex,
    sliding_window_attention_blocked,
    sliding_window_attention_ref,
)

RTOL = 1e-5

needs_flex = pytest.mark.skipif(not flex.flex_available(), reason="torch has no FlexAttention")


def make(B=2, H=4, G=2, T=37, P=0, D=16, Np=0, k2=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g)

    kw = {}
    q = r(B, H, T, D)
    k, v = r(B, G, P + T, D), r(B, G, P + T, D)
    if Np:
        kw.update(sink_k=r(1, G, Np, D), sink_v=r(1, G, Np, D))
    if k2:
        kw.update(k2=r(B, G, P + T, D), v2=r(B, G, P + T, D))
    return q, k, v, kw


# (id, window, segment, Np, k2, P, pos0): each feature alone, then together; awkward T, cache offsets.
CASES = [
    ("sliding", 8, False, 0, False, 0, 0),
    ("sliding-wide", 50, False, 0, False, 0, 0),
    ("full", None, False, 0, False, 0, 0),
    ("sinks", 8, False, 3, False, 0, 0),
    ("k2", 8, False, 0, True, 0, 0),
    ("segment", 8, True, 0, False, 0, 0),
    ("segment-cache", 8, True, 2, True, 5, 11),
    ("sliding-cache", 8, False, 2, False, 7, 40),
    ("full-cache-all", None, False, 4, True, 6, 3),
    ("mac-like", 16, True, 4, True, 0, 0),
]


def run_flex(q, k, v, window, segment, pos0, compiled=False, block=8, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex.flex_sliding_window_attention(q, k, v, window=window, segment=segment, pos0=pos0,
                                                compiled=compiled, block=block, **kw)


@needs_flex
@pytest.mark.parametrize("name,window,segment,Np,k2,P,pos0", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("block", [8, 128])
def test_flex_matches_reference(close, name, window, segment, Np, k2, P, pos0, block):
    q, k, v, kw = make(T=37, P=P, Np=Np, k2=k2)
    ref = sliding_window_attention_ref(q, k, v, window=window, segment=segment, pos0=pos0, **kw)
    got = run_flex(q, k, v, window, segment, pos0, block=block, **kw)
    close(ref, got, RTOL, name)


def dense_blocks(num, idx, NKV):
    """(1, 1, NQ) counts and (1, 1, NQ, NKV) indices -> (NQ, NKV) bool."""
    NQ = num.shape[-1]
    out = torch.zeros(NQ, NKV, dtype=torch.bool)
    for i in range(NQ):
        out[i, idx[0, 0, i, :num[0, 0, i]].long()] = True
    return out


@needs_flex
@pytest.mark.parametrize("name,window,segment,Np,k2,P,pos0", CASES, ids=[c[0] for c in CASES])
def test_block_mask_covers_mask(name, window, segment, Np, k2, P, pos0):
    """Every visible (query, key) lies in a computed block; full blocks are visible everywhere;
    partial and full blocks never overlap. (Eager FlexAttention may not use the block structure.)"""
    T, block = 45, 8
    bm = flex._block_mask(T, P, Np, k2, window, segment, pos0, torch.device("cpu"), block)
    L = P + T
    KV = Np + L * (2 if k2 else 1)
    mask = flex._mask_mod(P, Np, L, KV, k2, window, segment, pos0)(
        0, 0, torch.arange(T)[:, None], torch.arange(KV)[None, :])  # (T, KV)
    NKV = -(-KV // block)
    partial = dense_blocks(bm.kv_num_blocks, bm.kv_indices, NKV)
    full = dense_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, NKV)
    assert not (partial & full).any()
    pad = torch.zeros(-(-T // block) * block, NKV * block, dtype=torch.bool)
    pad[:T, :KV] = mask
    blocks = pad.view(-(-T // block), block, NKV, block)
    seen_any = blocks.any(3).any(1)
    assert not (seen_any & ~(partial | full)).any(), "a visible key lies in a skipped block"
    for i, j in full.nonzero().tolist():
        rows = slice(i * block, min(T, (i + 1) * block))
        assert mask[rows, j * block:(j + 1) * block].all(), f"full block ({i}, {j}) is not all visible"
    # The mask_mod is the specification's mask: dense attention under it equals the reference.
    q, k, v, kw = make(B=1, H=2, G=1, T=T, P=P, Np=Np, k2=k2, D=4)
    ref = sliding_window_attention_ref(q, k, v, window=window, segment=segment, pos0=pos0, **kw)
    scores = torch.cat([x for x in (kw.get("sink_k"), k, kw.get("k2")) if x is not None], 2)
    s = torch.einsum("bhtd,bhkd->bhtk", q, scores.expand(1, 2, -1, -1)) / 2.0
    vals = torch.cat([x for x in (kw.get("sink_v"), v, kw.get("v2")) if x is not None], 2)
    dense = torch.einsum("bhtk,bhkd->bhtd", s.masked_fill(~mask, float("-inf")).softmax(-1),
                         vals.expand(1, 2, -1, -1))
    torch.testing.assert_close(dense, ref, rtol=1e-5, atol=1e-6)


@needs_flex
def test_flex_compiled_cpu(close):
    """Compiled FlexAttention (block-sparse kernel on CPU) on a case with every feature (~15 s cold)."""
    q, k, v, kw = make(T=400, P=5, Np=3, k2=True)  # several 128-blocks: some skipped, some full
    ref = sliding_window_attention_ref(q, k, v, window=100, segment=True, pos0=9, **kw)
    got = run_flex(q, k, v, 100, True, 9, compiled=True, block=128, **kw)
    close(ref, got, RTOL, "compiled")


@pytest.mark.parametrize("name,window,segment,Np,k2,P,pos0", CASES[:6], ids=[c[0] for c in CASES[:6]])
def test_cpu_falls_back_to_blocked(name, window, segment, Np, k2, P, pos0):
    """CPU tensors take the blocked form: identical results, gradients included."""
    q, k, v, kw = make(P=P, Np=Np, k2=k2)
    assert ac.choose_backend(q, k, v, window=window, **kw) == "blocked"
    leaves = [q, k, v, *kw.values()]
    for x in leaves:
        x.requires_grad_()
    got = ac.sliding_window_attention_cuda(q, k, v, window=window, segment=segment, pos0=pos0, **kw)
    ref = sliding_window_attention_blocked(q, k, v, window=window, segment=segment, pos0=pos0, **kw)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    g = torch.randn_like(ref)
    g_got = torch.autograd.grad(got, leaves, g)
    g_ref = torch.autograd.grad(ref, leaves, g)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dispatch_triton_runs_on_cpu(monkeypatch):
    """Forcing the "triton" implementation reaches this module and works on CPU tensors."""
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.get("sliding_window_attention", None, False) is ac.sliding_window_attention_cuda
    q, k, v, kw = make(Np=2)
    got = sliding_window_attention(q, k, v, window=8, **kw)
    torch.testing.assert_close(got, sliding_window_attention_ref(q, k, v, window=8, **kw), rtol=1e-5, atol=1e-6)


@needs_flex
def test_forced_backend(monkeypatch):
    q, k, v, kw = make(Np=2, k2=True)
    monkeypatch.setenv(ac.BACKEND_ENV, "flex")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        got = ac.sliding_window_attention_cuda(q, k, v, window=8, segment=True, **kw)
    ref = sliding_window_attention_ref(q, k, v, window=8, segment=True, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="k2"):
        ac.sliding_window_attention_cuda(q, k, v, window=8, backend="flash", **kw)
    with pytest.raises(ValueError, match="invalid"):
        ac.sliding_window_attention_cuda(q, k, v, window=8, backend="nope")


def test_merge_sinks_is_one_softmax():
    """The log-sum-exp merge used with flash-attn equals attention over [sinks | window]."""
    q, k, v, kw = make(Np=3)
    window = 8
    ref = sliding_window_attention_ref(q, k, v, window=window, **kw)
    win = sliding_window_attention_ref(q, k, v, window=window)
    # The window-only log-sum-exp, as flash-attn returns it: (B, H, T).
    B, H, T, D = q.shape
    kr = k.repeat_interleave(H // k.shape[1], 1)
    s = torch.einsum("bhtd,bhkd->bhtk", q, kr) / D ** 0.5
    i = torch.arange(T)
    m = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    lse = s.masked_fill(~m, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(flash.merge_sinks(win, lse, q, kw["sink_k"], kw["sink_v"]), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,window,segment,Np,k2,P,pos0", CASES, ids=[c[0] for c in CASES])
def test_cuda_auto_matches_reference(close, dtype, name, window, segment, Np, k2, P, pos0):
    q, k, v, kw = make(T=300, P=P, Np=Np, k2=k2, D=64)
    q, k, v = (x.cuda().to(dtype).requires_grad_() for x in (q, k, v))
    kw = {n: x.cuda().to(dtype).requires_grad_() for n, x in kw.items()}
    leaves = [q, k, v, *kw.values()]
    ref = sliding_window_attention_ref(*(x.float() for x in (q, k, v)), window=window, segment=segment, pos0=pos0,
                                       **{n: x.float() for n, x in kw.items()})
    got = ac.sliding_window_attention_cuda(q, k, v, window=window, segment=segment, pos0=pos0, **kw)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    close(ref, got.float(), tol, name)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, leaves, g), torch.autograd.grad(got.float(), leaves, g)):
        close(a.float(), b.float(), tol * 5, name + " grad")
