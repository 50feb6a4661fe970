"""The loop over whole chunks of ``memory_update_chunked``, with a hand-written backward (depth 1 and 2).

Why: the chunks follow each other, so the loop stays, and its cost is the number of small ops per chunk
(tensors of (B*H, C, 128): each op is microseconds of overhead and almost no arithmetic). Under autograd
the tiny memory's chunk was ~300 ops forward and ~450 backward through the autograd engine, whose
backward was 84% of forward + backward at 16K (issue 12's profile). Here:
- the forward runs without recording, and what does not depend on a chunk's anchor is computed for all
  chunks at once before the loop (``prepare``: k - v, beta q, dbe q, ||k||^2, 2 theta / (1 - eta), ...);
- the backward is the chain rule written out once per chunk, in reverse, and only what the recursion
  needs (the gradient of the state before the chunk) is computed inside the loop: the gradients of the
  chunk inputs (q, k, v, the gates, the decay coefficients) are kept per chunk and finished for all
  chunks at once after it (``_finish``).
The math is ``chunked._chunk``'s (the closed form of ``naive.memory_update_ref``): the same forward and
the same gradient, the step bound's included (kappa with the residual curvature, the chunk's overlaps,
the clip). ``tests/test_memory_speed.py`` checks both against autograd through ``chunked._chunk``.

The loops over the chunks (``_loop``, ``_loop_backward``) run by default in C++ (``csrc/chunk_loop.cpp``, built
on first use by ``cpp.py``): the same per-chunk ops in one call for all chunks, the elementwise chains fused
into loops (forward + backward of the tiny memory 1.8x faster at 4K, 1.5x at 16K). The Python loops here are its
reference and its fallback ($TITANS_LNN_MEMORY_LOOP=python, CUDA, bf16, no compiler);
``tests/test_memory_cpp.py`` checks that both give the same values and gradients. Without a tape (no gradient
wanted: inference), depth 2 with the stable step runs ``run_infer``: ``csrc/chunk_infer.h`` from the raw rows,
each chunk's inputs made inside the loop, in buffers allocated once per call, its matmuls on raw BLAS pointers
(one 128-token call of the tiny memory ~0.95 ms where the Python preparation and the loop took ~1.4).

Per chunk, with G = B*H memories, L rows, and half gradient factors d_l (the gradient of W_l at the
anchor is 2 d_l x_l^T; the 2 is folded into the decay matrices, dd2 = 2 D and de2 = 2 D_E), depth 2
(M(x) = x + W_2 silu(W_1 x)):
    z = k W_1^T, h = silu(z), r = (k - v) + h W_2^T, e = r W_2,  d_2 = r, d_1 = e silu'(z)
    kappa / 2 = |h|^2 + |r| max|silu'(z)| |k| + |k|^2 (silu'(z)^2 . col(W_2) + max|e silu''(z)|)
    u = 2 theta / (1 - eta) kappa / 2, theta' = theta / ((1 + P)(1 + P + u)), P = overlap u    (stable)
    theta'' = theta' min(1, max_grad_norm / (2 sqrt(sum_l |d_l|^2 |x_l|^2)))                    (clip)
    Cm = dd2 theta''; y = the read at the per-token weights; (W, S) after the chunk's row ``last``.
Depth 1 (M(x) = W_1 x): r = -v + k W_1^T, d_1 = r, kappa / 2 = |k|^2.
"""

from __future__ import annotations

import contextlib
import gc

import torch
from torch.linalg import vecdot

from titans_lnn.kernels.titans_memory import cpp

# The chunk inputs, each (G, N, L, ...): N chunks, chunk i is t[:, i]. overlap and kh are None unless stable.
FIELDS = ("q", "k", "v", "theta", "eta", "qk", "overlap", "kh", "beta", "E", "dbe", "dd", "d_e")


def _last_rows(t, last):
    """t[:, i, L - 1] for every chunk i but the final one, t[:, -1, last] for it: (G, N, ...)."""
    rows = t[:, :, -1].clone()
    rows[:, -1] = t[:, -1, last]
    return rows


def prepare(f, last, n, stable):
    """What does not depend on the anchors, for all N chunks at once (no autograd): a dict of
    (G, N, L, ...) tensors, from ``FIELDS`` ``f``; ``last`` is the final chunk's last real row."""
    q, k, v, theta, eta = f["q"], f["k"], f["v"], f["theta"], f["eta"]
    G, N, L, D = q.shape
    bd = torch.stack((f["beta"], f["dbe"]), -1)  # (G, N, L, 2): the read's base is beta W + dbe S
    p = dict(q=q, k=k, theta=theta, qk=f["qk"], bd=bd, xsq0=vecdot(k, k), r0=k - v if n == 2 else -v,
             qbd=(q[..., None, :] * bd[..., None]).view(G, N, L, 2 * D), dd2=2 * f["dd"])
    # The rows ``last`` of D and D_E, times 2: Cm[last] and De[last] are these times theta'': (G, N, 2, L)
    p["dl2"] = 2 * torch.stack((_last_rows(f["dd"], last), _last_rows(f["d_e"], last)), 2)
    # The state's decay: [W; S] <- mix [W; S], mix = [[beta_l, dbe_l], [0, E_l]]: (G, N, 2, 2)
    b_l, dbe_l, e_l = (_last_rows(f[name], last) for name in ("beta", "dbe", "E"))
    p["mix"] = torch.stack((torch.stack((b_l, dbe_l), -1), torch.stack((torch.zeros_like(e_l), e_l), -1)), -2)
    if stable:
        p["den"] = (1 - eta).clamp_min(torch.finfo(theta.dtype).tiny)
        p["tw"] = 2 * theta / p["den"]  # u = tw kappa / 2
        p["ov"] = f["overlap"]
        if n == 2:
            p["knorm"] = p["xsq0"].sqrt()
    return p


def chunk_forward(c, X, max_grad_norm, stable, want_q, keep):
    """One chunk. c: ``prepare``'s tensors for this chunk (G, L, ...) (and kh when ``want_q``); X: the state,
    per layer [W_l^T; S_l^T] (G, 2, in_l, out_l). Returns (y (G, L, Dv), X after, Q (G, Dk, Dk) or None,
    the intermediates that ``chunk_backward`` needs, or None unless ``keep``)."""
    n = len(X)
    G, L, _ = c["k"].shape
    k, Wt1 = c["k"], X[0][:, 0]  # W_1^T: (G, Dk, out_1)
    sv = {}
    if n == 2:
        Wt2 = X[1][:, 0]  # W_2^T: (G, hidden, Dv)
        z = torch.bmm(k, Wt1)  # (G, L, hidden)
        s = torch.sigmoid(z)
        h = z * s
        a = 1 - s
        slope = torch.addcmul(s, h, a)  # silu'(z) = s (1 + z (1 - s))
        r = torch.baddbmm(c["r0"], h, Wt2)  # M(k) - v: (G, L, Dv)
        e = torch.bmm(r, Wt2.mT)  # W_2^T r
        ds, xs = [e * slope, r], [k, h]
        sv.update(z=z, s=s, a=a, slope=slope, e=e)
    else:
        r = torch.baddbmm(c["r0"], k, Wt1)
        ds, xs = [r], [k]
    xsq = [c["xsq0"]] + [vecdot(x, x) for x in xs[1:]]  # ||x_l||^2: (G, L)
    dsq = [vecdot(d, d) for d in ds]
    th1 = c["theta"]
    if stable:
        if n == 2:
            col = vecdot(Wt2, Wt2)  # ||W_2[:, j]||^2: (G, hidden)
            sl2 = slope * slope
            reach = vecdot(sl2, col[:, None, :])
            sa = s * a
            bend = sa * (2 + z * (a - s))  # silu''(z)
            tsl = slope.abs().amax(-1)
            t1 = dsq[1].sqrt() * tsl * c["knorm"]  # |r| max|silu'| |k|
            eb = e * bend
            teb = eb.abs().amax(-1)
            rt = reach + teb
            khalf = torch.addcmul(xsq[1] + t1, xsq[0], rt)  # kappa / 2 (naive.curvature_from + residual_curvature)
            sv.update(col=col, sl2=sl2, sa=sa, bend=bend, tsl=tsl, t1=t1, eb=eb, teb=teb, rt=rt)
        else:
            khalf = xsq[0]
        u = c["tw"] * khalf
        d1 = torch.bmm(c["ov"], u[..., None])[..., 0] + 1
        d2 = d1 + u
        th1 = c["theta"] / (d1 * d2)
        sv.update(khalf=khalf, u=u, d1=d1, d2=d2)
    th2 = th1
    if max_grad_norm is not None:
        sqp = dsq[0] * xsq[0] if n == 1 else torch.addcmul(dsq[0] * xsq[0], dsq[1], xsq[1])  # ||g||^2 / 4
        scale = (0.5 * max_grad_norm * sqp.rsqrt()).clamp_(max=1)  # (at sqp = 0: inf, clamped to 1)
        th2 = th1 * scale
        sv.update(sqp=sqp, scale=scale)
    cm = c["dd2"] * th2[:, None, :]  # (G, L, L)
    # Read y_t = M_{W_t}(q_t): the base (beta_t W + dbe_t S) q_t minus the chunk's writes up to t.
    sc0 = cm * c["qk"]
    zr = torch.bmm(c["qbd"], X[0].view(G, -1, X[0].shape[-1])).baddbmm_(sc0, ds[0], alpha=-1)
    if n == 2:
        sr = torch.sigmoid(zr)
        hr = zr * sr
        hrbd = (hr[..., None, :] * c["bd"][..., None]).view(G, L, -1)  # [beta hr, dbe hr]: (G, L, 2 hidden)
        p1 = torch.bmm(hr, h.mT)  # (G, L, L)
        sc1 = cm * p1
        y = torch.baddbmm(c["q"], hrbd, X[1].view(G, -1, X[1].shape[-1])).baddbmm_(sc1, r, alpha=-1)
        sv.update(sr=sr, hr=hr, hrbd=hrbd, p1=p1, sc1=sc1)
    else:
        y = zr
    # State after row ``last``: [W; S]^T <- mix [W; S]^T - Y d, Y = [Cm[last] x; De[last] x]^T (G, 2, in_l, L).
    cd = c["dl2"] * th2[:, None, :]  # (G, 2, L)
    Ys = [torch.mul(x.mT[:, None], cd[:, :, None, :], out=x.new_empty(G, 2, x.shape[-1], L)) for x in xs]
    X_new = []
    for Xl, Y, d in zip(X, Ys, ds):
        _, _, i_l, o_l = Xl.shape
        Xn = torch.bmm(c["mix"], Xl.view(G, 2, -1)).view(G, 2 * i_l, o_l)
        X_new.append(Xn.baddbmm_(Y.view(G, 2 * i_l, L), d, alpha=-1).view(G, 2, i_l, o_l))
    Q = torch.bmm(c["kh"].mT, u[..., None] * c["kh"]) if want_q else None
    if not keep:
        return y, X_new, Q, None
    sv.update(X=X, Ys=Ys, xs=xs, ds=ds, xsq=xsq, dsq=dsq, th1=th1, th2=th2, cm=cm, sc0=sc0, r=r, cd=cd)
    return y, X_new, Q, sv


def chunk_backward(c, sv, gy, GX, gQ, max_grad_norm, stable, keep):
    """The chain rule through ``chunk_forward`` for what the recursion needs: from the gradients of y
    (G, L, Dv), of the state after the chunk (GX, as X) and of Q (or None), the gradient of the state
    before it (the anchor's included). What the chunk inputs' gradients need goes into ``keep`` (per-chunk
    values, finished for all chunks by ``_finish``); names with a leading n hold minus a gradient."""
    X, Ys, xs, ds, xsq, dsq = sv["X"], sv["Ys"], sv["xs"], sv["ds"], sv["xsq"], sv["dsq"]
    n, cm, th2, cd = len(X), sv["cm"], sv["th2"], sv["cd"]
    G, L, _ = gy.shape
    # The state update X' = mix X - Y d.
    gX, ngxT, ngd = [], [], []
    g_mix = ngcd = None
    for Xl, GXl, Y, d, x in zip(X, GX, Ys, ds, xs):
        i_l, o_l = Xl.shape[-2:]
        flat, gflat = Xl.view(G, 2, -1), GXl.reshape(G, 2, -1)
        gX.append(torch.bmm(c["mix"].mT, gflat).view(G, 2, i_l, o_l))
        g_mix = torch.bmm(gflat, flat.mT) if g_mix is None else g_mix.baddbmm_(gflat, flat.mT)
        g2 = gflat.view(G, 2 * i_l, o_l)
        nGY = torch.bmm(g2, d.mT).view(G, 2, i_l, L)
        ngd.append(torch.bmm(Y.view(G, 2 * i_l, L).mT, g2))
        ngxT.append((nGY * cd[:, :, None, :]).sum(1))  # (G, in_l, L)
        t = (nGY * x.mT[:, None]).sum(2)  # (G, 2, L)
        ngcd = t if ngcd is None else ngcd.add_(t)
    ng_th2 = (ngcd * c["dl2"]).sum(1)
    keep.update(ngcd=ngcd, g_mix=g_mix)
    # The read, from the last layer back.
    ngcm = None
    gz = gy
    if n == 2:
        hr, h = sv["hr"], xs[1]
        nsc1 = torch.bmm(gy, sv["r"].mT)
        ngd[1].baddbmm_(sv["sc1"].mT, gy)
        ngcm = nsc1 * sv["p1"]
        ngp = nsc1 * cm
        gX[1].view(G, -1, X[1].shape[-1]).baddbmm_(sv["hrbd"].mT, gy)
        g_hrbd = torch.bmm(gy, X[1].view(G, -1, X[1].shape[-1]).mT)  # (G, L, 2 hidden)
        ghr = (g_hrbd.view(G, L, 2, -1) * c["bd"][..., None]).sum(-2).baddbmm_(ngp, h, alpha=-1)
        ngxT[1].baddbmm_(hr.mT, ngp)
        sr = sv["sr"]
        gz = ghr * torch.addcmul(sr, hr, 1 - sr)  # silu'(z_read)
        keep["g_bd1"] = (g_hrbd.view(G, L, 2, -1) * hr[:, :, None, :]).sum(-1)  # d/d(beta, dbe) via hrbd: (G, L, 2)
    nsc0 = torch.bmm(gz, ds[0].mT)
    ngd[0].baddbmm_(sv["sc0"].mT, gz)
    ngcm = nsc0 * c["qk"] if ngcm is None else ngcm.addcmul_(nsc0, c["qk"])
    gX[0].view(G, -1, X[0].shape[-1]).baddbmm_(c["qbd"].mT, gz)
    ng_th2 = ng_th2 + vecdot(ngcm, c["dd2"], dim=-2)
    keep.update(nsc0=nsc0, ngcm=ngcm, g_qbd=torch.bmm(gz, X[0].view(G, -1, X[0].shape[-1]).mT))
    # The clip: theta'' = theta' scale(sqp).
    ng_th1 = ng_th2
    g_xsq = [None] * n
    if max_grad_norm is not None:
        scale, sqp = sv["scale"], sv["sqp"]
        ng_th1 = ng_th2 * scale
        gsq = torch.where(scale < 1, 0.5 * ng_th2 * th2 / sqp, 0.0)  # d scale / d sqp = -scale / (2 sqp)
        for i in range(n):
            ngd[i].addcmul_(ds[i], (gsq * xsq[i])[..., None], value=-2)
            g_xsq[i] = gsq * dsq[i]
    keep["ng_th1"] = ng_th1

    def add_xsq(i, val):
        g_xsq[i] = val if g_xsq[i] is None else g_xsq[i] + val

    # The stable step: theta' = theta / (d1 d2), d1 = 1 + overlap u, d2 = d1 + u, u = tw kappa / 2.
    if stable:
        u, d1, d2 = sv["u"], sv["d1"], sv["d2"]
        t = ng_th1 * sv["th1"]
        g_d2 = t / d2
        g_before = g_d2 + t / d1
        g_u = torch.baddbmm(g_d2[..., None], c["ov"].mT, g_before[..., None])[..., 0]
        if gQ is not None:
            kh = c["kh"]
            g_u = g_u + vecdot(torch.bmm(kh, gQ), kh)
            keep["g_kh"] = u[..., None] * torch.bmm(kh, gQ + gQ.mT)
        keep.update(g_before=g_before, g_u=g_u)
        g_kappa = g_u * c["tw"]  # d/d(kappa / 2)
        if n == 2:
            add_xsq(1, g_kappa)
            add_xsq(0, g_kappa * sv["rt"])
            g_rt = g_kappa * xsq[0]  # d/d reach = d/d max|e silu''|
            g_t1 = g_kappa
        else:
            add_xsq(0, g_kappa)
    # The anchor's forward and its gradient factors; the weights' gradients go to gX[l][:, 0] (W_l^T).
    k, Wt1 = c["k"], X[0][:, 0]
    if n == 2:
        Wt2, gWt2 = X[1][:, 0], gX[1][:, 0]
        z, s, a, h, slope, e, r = sv["z"], sv["s"], sv["a"], xs[1], sv["slope"], sv["e"], sv["r"]
        gd0 = ngd[0].neg()
        ge = gd0 * slope
        g_slope = gd0 * e
        gr = ngd[1].neg_()
        gz_ = None
        if stable:
            col, bend, tsl, t1 = sv["col"], sv["bend"], sv["tsl"], sv["t1"]
            g_slope.addcmul_(slope, g_rt[..., None] * col[:, None, :], value=2)
            g_col = torch.bmm(sv["sl2"].mT, g_rt[..., None])  # (G, hidden, 1)
            gWt2.addcmul_(Wt2, g_col, value=2)
            # t1 = sqrt(|r|^2 tsl^2 |k|^2), with a zero gradient where it is 0 (as naive._sqrt)
            coef = torch.where(t1 > 0, g_t1 / t1, 0.0)
            tsl2 = tsl * tsl
            gr.addcmul_(r, (coef * tsl2 * xsq[0])[..., None])
            g_tsl = coef * dsq[1] * tsl * xsq[0]
            add_xsq(0, 0.5 * coef * dsq[1] * tsl2)
            g_slope += _amax_abs_backward(slope, tsl, g_tsl)
            g_eb = _amax_abs_backward(sv["eb"], sv["teb"], g_rt)
            ge.addcmul_(g_eb, bend)
            sa, t = sv["sa"], a - s
            gz_ = g_eb * e * sa * (t * (3 + z * t) - 2 * z * sa)  # d silu''(z) / dz = silu'''(z)
        else:
            bend = s * a * (2 + z * (a - s))
        gr.baddbmm_(ge, Wt2)
        gWt2.baddbmm_(ge.mT, r)
        gh = torch.baddbmm(ngxT[1].mT.neg(), gr, Wt2.mT)
        if g_xsq[1] is not None:
            gh.addcmul_(h, g_xsq[1][..., None], value=2)
        gWt2.baddbmm_(h.mT, gr)
        gzz = torch.addcmul(g_slope * bend, gh, slope)
        gz_ = gzz if gz_ is None else gzz.add_(gz_)
    else:
        gr = ngd[0].neg_()
        gz_ = gr
    gX[0][:, 0].baddbmm_(k.mT, gz_)
    keep.update(gr=gr, g_k=torch.baddbmm(ngxT[0].mT.neg(), gz_, Wt1.mT), g_xsq0=g_xsq[0])
    return gX


def _amax_abs_backward(x, top, grad):
    """d/dx of max_j |x_j| (last dim) times ``grad``: autograd's rule (shared evenly among ties)."""
    hit = x.abs() == top[..., None]
    return x.sign() * hit * (grad / hit.sum(-1))[..., None]


def _stack(per_chunk, keys=None):
    """A list over chunks of dicts name -> (G, ...) -> one dict name -> (G, N, ...) (absent or None skipped)."""
    keys = [key for key in (per_chunk[0] if keys is None else keys) if per_chunk[0].get(key) is not None]
    return {key: torch.stack([d[key] for d in per_chunk], 1) for key in keys}


def _finish(f, p, sv, st, g_kh_final, gy, n, last, stable, needs):
    """The chunk inputs' gradients, for all chunks at once, from what the forward saved (``sv``: th2, cm and,
    when stable, d1, d2, u, khalf) and what ``chunk_backward`` kept (``st``), each stacked over the chunks
    (G, N, ...); ``g_kh_final``: the final chunk's gradient of kh, or None. Returns a dict name ->
    (G, N, L, ...) for the ``FIELDS`` in ``needs``."""
    th2, cm = sv["th2"], sv["cm"]
    G, N, L, D = p["q"].shape

    def add_last(t, rows):  # t (G, N, L, ...) += rows (G, N, ...) at each chunk's last row
        t[:, :-1, -1] += rows[:, :-1]
        t[:, -1, last] += rows[:, -1]
        return t

    g = {}
    g_qbd = st["g_qbd"].view(G, N, L, 2, D)
    g_bd = (g_qbd * p["q"][..., None, :]).sum(-1)  # (G, N, L, 2): d/d(beta, dbe)
    g_q = (g_qbd * p["bd"][..., None]).sum(-2)
    g["q"] = g_q + gy if n == 2 else g_q
    if n == 2:
        g_bd = g_bd + st["g_bd1"]
    g_mix = st["g_mix"]  # (G, N, 2, 2)
    g["beta"] = add_last(g_bd[..., 0].contiguous(), g_mix[..., 0, 0])
    g["dbe"] = add_last(g_bd[..., 1].contiguous(), g_mix[..., 0, 1])
    g["E"] = add_last(torch.zeros_like(f["E"]), g_mix[..., 1, 1])
    g["qk"] = -st["nsc0"] * cm
    g_dl = -2 * st["ngcd"] * th2[:, :, None, :]  # (G, N, 2, L): d/d of the rows ``last`` of D and D_E
    g["dd"] = add_last(-2 * st["ngcm"] * th2[:, :, None, :], g_dl[:, :, 0])
    g["d_e"] = add_last(torch.zeros_like(f["d_e"]), g_dl[:, :, 1])
    theta = p["theta"]
    if stable:
        d1, d2, u, khalf = sv["d1"], sv["d2"], sv["u"], sv["khalf"]
        g_u, den = st["g_u"], p["den"]
        g["theta"] = -st["ng_th1"] / (d1 * d2) + 2 * g_u * khalf / den
        g["eta"] = g_u * u / den * ((1 - f["eta"]) >= torch.finfo(theta.dtype).tiny)
        g["overlap"] = st["g_before"][..., None] * u[:, :, None, :]
        if g_kh_final is not None:
            g_kh = torch.zeros_like(f["kh"])
            g_kh[:, -1] = g_kh_final
            g["kh"] = g_kh
    else:
        g["theta"] = -st["ng_th1"]
    g_k = st["g_k"]
    if "g_xsq0" in st:
        g_k = torch.addcmul(g_k, p["k"], st["g_xsq0"][..., None], value=2)
    g["k"] = g_k + st["gr"] if n == 2 else g_k
    g["v"] = -st["gr"]
    return {key: val for key, val in g.items() if needs[key]}


@contextlib.contextmanager
def _no_gc():
    """Python's cyclic garbage collector paused (then restored): the loop keeps ~60 tensors per chunk for
    the backward, and as they pile up the collector's full passes over them took ~9% of the tiny memory's
    forward + backward at 16K. Nothing here makes reference cycles: reference counting frees it all."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _to_state(W, S):
    """Lists of (G, out_l, in_l) -> per layer [W_l^T; S_l^T]: (G, 2, in_l, out_l)."""
    return [torch.stack((w.mT, s_.mT), 1) for w, s_ in zip(W, S)]


def _weights(X):
    """The weights W_l (G, out_l, in_l) of the state X, contiguous."""
    return [x[:, 0].mT.contiguous() for x in X]


class ChunkLoop(torch.autograd.Function):
    """The loop over N whole chunks as one autograd node. forward(meta, *tensors): meta = (n layers,
    ``last`` of the final chunk, max_grad_norm, stable); tensors = the ``FIELDS`` (each (G, N, L, ...);
    overlap and kh None unless stable), then W (n), then S (n), each (G, out_l, in_l). Returns y
    (G, N, L, Dv), W and S after, the final chunk's anchor (the weights before it), and its Q (stable;
    else an empty tensor). The loop runs in C++ (``cpp.py``) or in Python, forward and backward alike."""

    @staticmethod
    def forward(ctx, meta, *tensors):
        n, last, max_grad_norm, stable = meta
        f = dict(zip(FIELDS, tensors[:len(FIELDS)]))
        W, S = list(tensors[len(FIELDS):len(FIELDS) + n]), list(tensors[len(FIELDS) + n:])
        p = prepare(f, last, n, stable)
        ext = _extension([*tensors[:len(FIELDS)], *W, *S])
        y, X, X_a, Q, tape, ctx.saved = _run_loop(ext, p, f["kh"], W, S, max_grad_norm, stable, keep=True)
        ctx.tape, sv = tape or (None, _stack(ctx.saved, ("th2", "cm", "d1", "d2", "u", "khalf")))
        ctx.meta, ctx.f, ctx.p, ctx.sv, ctx.ext, ctx.X_shapes = meta, f, p, sv, ext, [x.shape for x in X]
        S = [x[:, 1].mT.contiguous() for x in X]
        return (y, *_weights(X), *S, *_weights(X_a), W[0].new_zeros(0) if Q is None else Q)

    @staticmethod
    def backward(ctx, gy, *grads):
        n, last, max_grad_norm, stable = ctx.meta
        f, p = ctx.f, ctx.p
        gW_out, gS_out, gA_out, gQ = grads[:n], grads[n:2 * n], grads[2 * n:3 * n], grads[3 * n]
        gX = [p["q"].new_zeros(shape) for shape in ctx.X_shapes]
        for gx, gw, gs in zip(gX, gW_out, gS_out):
            if gw is not None:
                gx[:, 0] = gw.mT
            if gs is not None:
                gx[:, 1] = gs.mT
        if gy is None:
            gy = p["q"].new_zeros(*p["q"].shape[:3], ctx.X_shapes[-1][-1])
        gQ = gQ if stable and gQ is not None and gQ.numel() else None
        with _no_gc():
            if ctx.tape is not None:
                gA = [None if ga is None else ga.mT for ga in gA_out]
                gX, st, g_kh = ctx.ext.backward(ctx.tape, gy, gX, gA, gQ, max_grad_norm, stable)
            else:
                gX, st, g_kh = _loop_backward(p, f["kh"], ctx.saved, gy, gX, gA_out, gQ, max_grad_norm, stable)
            needs = {key: f[key] is not None and ctx.needs_input_grad[1 + j] for j, key in enumerate(FIELDS)}
            g = _finish(f, p, ctx.sv, st, g_kh, gy, n, last, stable, needs)
        ctx.saved = ctx.tape = ctx.sv = ctx.ext = None
        return (None, *(g.get(key) for key in FIELDS), *(x[:, 0].mT for x in gX), *(x[:, 1].mT for x in gX))


def _extension(tensors):
    """The C++ loop (``cpp.module_for``) for these tensors (None entries skipped), or None for the Python loop;
    also None when their dtypes differ (the Python loop promotes them, the C++ loop's fused passes cannot)."""
    q = tensors[0]
    if any(t is not None and t.dtype != q.dtype for t in tensors):
        return None
    return cpp.module_for(q)


def _run_loop(ext, p, kh, W, S, max_grad_norm, stable, keep):
    """The forward over the chunks in C++ (``ext``) or in Python (``_loop``; ext None), GC paused. Returns y, X
    after the final chunk, its anchor, its Q, then what the backward needs (``keep``): the C++ loop's
    (tape, saved values stacked over the chunks) or None, and the Python loop's per-chunk list or None."""
    with _no_gc():
        if ext is not None:
            y, X, X_a, Q, tape, sv = ext.forward(p, _final_kh(kh, stable), _to_state(W, S), max_grad_norm, stable,
                                                 keep)
            return y, X, X_a, Q, (tape, sv), None
        y, X, X_a, Q, saved = _loop(p, kh, _to_state(W, S), max_grad_norm, stable, keep=keep)
        return y, X, X_a, Q, None, saved


def _final_kh(kh, stable):
    """The final chunk's kh (G, L, Dk) when the loop computes its Q (stable), else None."""
    return kh[:, -1] if stable and kh is not None else None


def _loop_backward(p, kh, saved, gy, gX, gA_out, gQ, max_grad_norm, stable):
    """The backward over the chunks in reverse, in Python: from gy (G, N, L, Dv), the gradient gX of the state
    after the final chunk (as X), of its anchor (gA_out, W_l each (G, out_l, in_l) or None) and of its Q (or
    None). Returns (the gradient of the state before the first chunk, ``chunk_backward``'s kept values stacked
    over the chunks, the final chunk's gradient of kh or None)."""
    N = len(saved)
    views = {key: t.unbind(1) for key, t in p.items()}
    kept = [None] * N
    gys = gy.unbind(1)
    for i in range(N - 1, -1, -1):
        final = i == N - 1
        c = {key: t[i] for key, t in views.items()}
        if final and stable:
            c["kh"] = kh[:, i]
        kept[i] = {}
        gX = chunk_backward(c, saved[i], gys[i], gX, gQ if final else None, max_grad_norm, stable, kept[i])
        saved[i] = None
        if final:
            for gx, ga in zip(gX, gA_out):
                if ga is not None:
                    gx[:, 0] += ga.mT
    g_kh = kept[-1].pop("g_kh", None)
    return gX, _stack(kept), g_kh


def _loop(p, kh, X, max_grad_norm, stable, keep):
    """The forward over the chunks of ``prepare``'s p from the state X (``_to_state``). Returns y (G, N, L, Dv),
    X after the final chunk, X before it (its anchor), its Q (None unless stable) and the per-chunk
    intermediates (``keep``) or None."""
    N = p["q"].shape[1]
    views = {key: t.unbind(1) for key, t in p.items()}
    ys, saved = [], []
    Q, X_a = None, X
    for i in range(N):
        final = i == N - 1
        c = {key: t[i] for key, t in views.items()}
        if final and stable:
            c["kh"] = kh[:, i]
        X_a = X
        y, X, Q, sv = chunk_forward(c, X, max_grad_norm, stable, final and stable, keep)
        ys.append(y)
        saved.append(sv)
    return torch.stack(ys, 1), X, X_a, Q, (saved if keep else None)


def _wants_grad(tensors) -> bool:
    """Whether autograd records a call on ``tensors`` (None entries skipped): then the loop keeps a tape."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run_chunks(fields, W, S, *, last, max_grad_norm, stable):
    """The N chunks of ``fields`` (dict of ``FIELDS``, each (G, N, L, ...)) from the state W, S (lists of
    (G, out_l, in_l)). Returns y (G, N, L, Dv), W, S after row ``last`` of the final chunk, the final
    chunk's anchor, and its Q (None unless stable). Through ``ChunkLoop`` when a gradient is wanted."""
    n = len(W)
    tensors = [fields[key] for key in FIELDS]
    if _wants_grad((*tensors, *W, *S)):
        out = ChunkLoop.apply((n, last, max_grad_norm, stable), *tensors, *W, *S)
        y, W, S, A = out[0], list(out[1:1 + n]), list(out[1 + n:1 + 2 * n]), list(out[1 + 2 * n:1 + 3 * n])
        return y, W, S, A, (out[-1] if stable else None)
    p = prepare(fields, last, n, stable)
    ext = _extension([*tensors, *W, *S])
    y, X, X_a, Q, _, _ = _run_loop(ext, p, fields["kh"], W, S, max_grad_norm, stable, keep=False)
    return y, _weights(X), [x[:, 1].mT.contiguous() for x in X], _weights(X_a), Q


def run_infer(q, k, v, theta, eta, alpha, W, S, *, chunk_size, max_grad_norm):
    """Depth 2 with the stable step, no gradient wanted (inference), whole chunks from the chunk start: the
    forward of ``memory_update_chunked`` from its raw inputs (q, k, v (B, H, T, D); theta, eta, alpha (B, H, T);
    W, S lists of (B, H, out_l, in_l)) in one call of ``csrc/chunk_infer.h``, which makes each chunk's inputs
    (``_chunk_inputs``, ``_chunk_coefficients``, ``prepare``) in the loop itself. Returns y (B, H, T, Dv), W, S
    after the last row, the final chunk's anchor and its Q; or None where it does not apply (a gradient wanted,
    the Python loop chosen, dtypes other than fp32/fp64 or mixed, depth other than 2)."""
    tensors = (q, k, v, theta, eta, alpha, *W, *S)
    if _wants_grad(tensors):
        return None
    ext = _extension(tensors)
    if ext is None:
        return None
    B, H = q.shape[:2]

    def flat(t):  # (B, H, ...) -> (B * H, ...)
        return t.reshape(B * H, *t.shape[2:])

    out = ext.forward_infer(*(flat(t) for t in tensors[:6]), chunk_size, [flat(w) for w in W], [flat(s) for s in S],
                            max_grad_norm, True)
    if out is None:
        return None
    y, W, S, A, Q = out
    return (y.view(B, H, *y.shape[1:]), *([t.view(B, H, *t.shape[1:]) for t in ts] for ts in (W, S, A)),
            Q.view(B, H, *Q.shape[1:]))
