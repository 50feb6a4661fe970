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

import torch
from torch.linalg import vecdot

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
    beta, dbe = f["beta"][..., None], f["dbe"][..., None]  # (G, N, L, 1)
    p = dict(q=q, k=k, theta=theta, qk=f["qk"], beta=beta, dbe=dbe, qb=q * beta, qd=q * dbe, xsq0=vecdot(k, k),
             r0=k - v if n == 2 else -v, dd2=2 * f["dd"])
    p["ddl"] = _last_rows(p["dd2"], last)  # Cm's row ``last`` is ddl * theta'': (G, N, L)
    p["del"] = 2 * _last_rows(f["d_e"], last)
    for name in ("beta", "dbe", "E"):
        p[name + "_l"] = _last_rows(f[name], last)[..., None, None]  # (G, N, 1, 1)
    if stable:
        p["den"] = (1 - eta).clamp_min(torch.finfo(theta.dtype).tiny)
        p["tw"] = 2 * theta / p["den"]  # u = tw kappa / 2
        p["ov"] = f["overlap"]
        if n == 2:
            p["knorm"] = p["xsq0"].sqrt()
    return p


def chunk_forward(c, W, S, max_grad_norm, stable, want_q, keep):
    """One chunk. c: ``prepare``'s tensors for this chunk (G, L, ...) (and kh when ``want_q``); W, S: lists
    of (G, out_l, in_l). Returns (y (G, L, Dv), W', S', Q (G, Dk, Dk) or None, the intermediates that
    ``chunk_backward`` needs, or None unless ``keep``)."""
    n = len(W)
    k, W1, S1 = c["k"], W[0], S[0]
    sv = {}
    if n == 2:
        W2, S2 = W[1], S[1]
        z = torch.bmm(k, W1.mT)  # (G, L, hidden)
        s = torch.sigmoid(z)
        h = z * s
        a = 1 - s
        slope = torch.addcmul(s, h, a)  # silu'(z) = s (1 + z (1 - s))
        r = torch.baddbmm(c["r0"], h, W2.mT)  # M(k) - v: (G, L, Dv)
        e = torch.bmm(r, W2)  # W_2^T r
        ds, xs = [e * slope, r], [k, h]
        sv.update(z=z, s=s, a=a, h=h, slope=slope, e=e)
    else:
        r = torch.baddbmm(c["r0"], k, W1.mT)
        ds, xs = [r], [k]
    xsq = [c["xsq0"]] + [vecdot(x, x) for x in xs[1:]]  # ||x_l||^2: (G, L)
    dsq = [vecdot(d, d) for d in ds]
    th1 = c["theta"]
    if stable:
        if n == 2:
            col = vecdot(W2, W2, dim=-2)  # ||W_2[:, j]||^2: (G, hidden)
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
    # Read y_t = M_{W_t}(q_t): the base (beta_t W_0 + dbe_t S_0) q_t minus the chunk's writes up to t.
    sc0 = cm * c["qk"]
    zr = torch.baddbmm(torch.baddbmm(torch.bmm(c["qd"], S1.mT), c["qb"], W1.mT), sc0, ds[0], alpha=-1)
    if n == 2:
        sr = torch.sigmoid(zr)
        hr = zr * sr
        hrb, hrd = hr * c["beta"], hr * c["dbe"]
        p1 = torch.bmm(hr, h.mT)  # (G, L, L)
        sc1 = cm * p1
        y = torch.baddbmm(torch.baddbmm(torch.baddbmm(c["q"], hrb, W2.mT), hrd, S2.mT), sc1, r, alpha=-1)
        sv.update(sr=sr, hr=hr, hrb=hrb, hrd=hrd, p1=p1, sc1=sc1)
    else:
        y = zr
    # State after row ``last``: W' = beta_l W + dbe_l S - d^T (Cm[last] x), S' = E_l S - d^T (De[last] x).
    cl = c["ddl"] * th2
    de = c["del"] * th2
    W_new = [torch.baddbmm(torch.addcmul(c["beta_l"] * w, c["dbe_l"], s_), d.mT, cl[..., None] * x, alpha=-1)
             for w, s_, d, x in zip(W, S, ds, xs)]
    S_new = [torch.baddbmm(c["E_l"] * s_, d.mT, de[..., None] * x, alpha=-1) for s_, d, x in zip(S, ds, xs)]
    Q = torch.bmm(c["kh"].mT, u[..., None] * c["kh"]) if want_q else None
    if not keep:
        return y, W_new, S_new, Q, None
    sv.update(W=W, S=S, xs=xs, ds=ds, xsq=xsq, dsq=dsq, th1=th1, th2=th2, cm=cm, sc0=sc0, r=r, cl=cl, de=de)
    return y, W_new, S_new, Q, sv


def chunk_backward(c, sv, gy, GW, GS, gQ, max_grad_norm, stable, keep):
    """The chain rule through ``chunk_forward`` for what the recursion needs: from the gradients of y
    (G, L, Dv), of the state after the chunk (GW, GS: lists of (G, out_l, in_l)) and of Q (or None),
    the gradients of the state before it (the anchor's included). What the chunk inputs' gradients need
    goes into ``keep`` (a dict of per-chunk values, finished by ``_finish``); names with a leading n hold
    minus a gradient (the writes enter with a minus sign)."""
    W, S, xs, ds, xsq, dsq = sv["W"], sv["S"], sv["xs"], sv["ds"], sv["xsq"], sv["dsq"]
    n, cm, th2 = len(W), sv["cm"], sv["th2"]
    cl_, de_ = sv["cl"][..., None], sv["de"][..., None]
    # The state update.
    gW = [c["beta_l"] * g for g in GW]
    gS = [torch.addcmul(c["E_l"] * gs, c["dbe_l"], gw) for gw, gs in zip(GW, GS)]
    ngx, ngd, ncl, nde = [], [], 0, 0
    for gw, gs, d, x in zip(GW, GS, ds, xs):
        pw, ps = torch.bmm(d, gw), torch.bmm(d, gs)  # (G, L, in)
        ngx.append(torch.addcmul(cl_ * pw, de_, ps))
        ncl = ncl + vecdot(pw, x)
        nde = nde + vecdot(ps, x)
        ngd.append(torch.addcmul(cl_ * torch.bmm(x, gw.mT), de_, torch.bmm(x, gs.mT)))
    ng_th2 = torch.addcmul(ncl * c["ddl"], nde, c["del"])
    keep.update(ncl=ncl, nde=nde, g_bl=_dots(GW, W), g_dbel=_dots(GW, S), g_el=_dots(GS, S))
    # The read, from the last layer back.
    ngcm = None
    gz = gy
    if n == 2:
        hr, h = sv["hr"], xs[1]
        nsc1 = torch.bmm(gy, sv["r"].mT)
        ngd[1] = torch.baddbmm(ngd[1], sv["sc1"].mT, gy)
        ngcm = nsc1 * sv["p1"]
        ngp = nsc1 * cm
        gW[1] = torch.baddbmm(gW[1], gy.mT, sv["hrb"])
        gS[1] = torch.baddbmm(gS[1], gy.mT, sv["hrd"])
        g_hrb, g_hrd = torch.bmm(gy, W[1]), torch.bmm(gy, S[1])
        ghr = torch.baddbmm(torch.addcmul(g_hrb * c["beta"], g_hrd, c["dbe"]), ngp, h, alpha=-1)
        ngx[1] = torch.baddbmm(ngx[1], ngp.mT, hr)
        sr = sv["sr"]
        gz = ghr * torch.addcmul(sr, hr, 1 - sr)  # silu'(z_read)
        keep.update(g_hrb=g_hrb, g_hrd=g_hrd)
    nsc0 = torch.bmm(gz, ds[0].mT)
    ngd[0] = torch.baddbmm(ngd[0], sv["sc0"].mT, gz)
    ngcm = nsc0 * c["qk"] if ngcm is None else torch.addcmul(ngcm, nsc0, c["qk"])
    gW[0] = torch.baddbmm(gW[0], gz.mT, c["qb"])
    gS[0] = torch.baddbmm(gS[0], gz.mT, c["qd"])
    ng_th2 = ng_th2 + vecdot(ngcm, c["dd2"], dim=-2)
    keep.update(nsc0=nsc0, ngcm=ngcm, g_qb=torch.bmm(gz, W[0]), g_qd=torch.bmm(gz, S[0]))
    # The clip: theta'' = theta' scale(sqp).
    ng_th1 = ng_th2
    g_xsq = [None] * n
    if max_grad_norm is not None:
        scale, sqp = sv["scale"], sv["sqp"]
        ng_th1 = ng_th2 * scale
        gsq = torch.where(scale < 1, 0.5 * ng_th2 * th2 / sqp, 0.0)  # d scale / d sqp = -scale / (2 sqp)
        for i in range(n):
            ngd[i] = torch.addcmul(ngd[i], ds[i], (gsq * xsq[i])[..., None], value=-2)
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
    # The anchor's forward and its gradient factors.
    if n == 2:
        W2, z, s, a, h, slope, e, r = W[1], sv["z"], sv["s"], sv["a"], xs[1], sv["slope"], sv["e"], sv["r"]
        gd0 = ngd[0].neg()
        ge = gd0 * slope
        g_slope = gd0 * e
        gr = ngd[1].neg()
        gz_ = 0
        if stable:
            col, bend, tsl, t1 = sv["col"], sv["bend"], sv["tsl"], sv["t1"]
            g_slope = torch.addcmul(g_slope, slope, g_rt[..., None] * col[:, None, :], value=2)
            g_col = torch.bmm(sv["sl2"].mT, g_rt[..., None])[..., 0]  # (G, hidden)
            gW[1] = torch.addcmul(gW[1], W2, g_col[:, None, :], value=2)
            # t1 = sqrt(|r|^2 tsl^2 |k|^2), with a zero gradient where it is 0 (as naive._sqrt)
            coef = torch.where(t1 > 0, g_t1 / t1, 0.0)
            tsl2 = tsl * tsl
            gr = torch.addcmul(gr, r, (coef * tsl2 * xsq[0])[..., None])
            g_tsl = coef * dsq[1] * tsl * xsq[0]
            add_xsq(0, 0.5 * coef * dsq[1] * tsl2)
            g_slope = g_slope + _amax_abs_backward(slope, tsl, g_tsl)
            g_eb = _amax_abs_backward(sv["eb"], sv["teb"], g_rt)
            ge = torch.addcmul(ge, g_eb, bend)
            sa, t = sv["sa"], a - s
            gz_ = g_eb * e * sa * (t * (3 + z * t) - 2 * z * sa)  # d silu''(z) / dz = silu'''(z)
        else:
            bend = s * a * (2 + z * (a - s))
        gr = torch.baddbmm(gr, ge, W2.mT)
        gW[1] = torch.baddbmm(gW[1], r.mT, ge)
        gh = torch.baddbmm(ngx[1].neg(), gr, W2)
        if g_xsq[1] is not None:
            gh = torch.addcmul(gh, h, g_xsq[1][..., None], value=2)
        gW[1] = torch.baddbmm(gW[1], gr.mT, h)
        gz_ = gz_ + torch.addcmul(g_slope * bend, gh, slope)
    else:
        gr = ngd[0].neg()
        gz_ = gr
    gW[0] = torch.baddbmm(gW[0], gz_.mT, c["k"])
    keep.update(gr=gr, g_k=torch.baddbmm(ngx[0].neg(), gz_, W[0]), g_xsq0=g_xsq[0])
    return gW, gS


def _dots(A, B):
    """sum_l <A_l, B_l> per memory: lists of (G, out_l, in_l) -> (G,)."""
    return sum(vecdot(a.flatten(1), b.flatten(1)) for a, b in zip(A, B))


def _amax_abs_backward(x, top, grad):
    """d/dx of max_j |x_j| (last dim) times ``grad``: autograd's rule (shared evenly among ties)."""
    hit = x.abs() == top[..., None]
    return x.sign() * hit * (grad / hit.sum(-1))[..., None]


def _finish(f, p, saved, kept, gy, n, last, stable, needs):
    """The chunk inputs' gradients, for all chunks at once, from what ``chunk_backward`` kept per chunk:
    a dict name -> (G, N, L, ...) for the ``FIELDS`` in ``needs``."""
    st = {key: torch.stack([kp[key] for kp in kept], 1) for key in kept[0] if kept[0][key] is not None}
    th2, cm = (torch.stack([s[key] for s in saved], 1) for key in ("th2", "cm"))

    def add_last(t, rows):  # t (G, N, L, ...) += rows (G, N, ...) at each chunk's last row
        t[:, :-1, -1] += rows[:, :-1]
        t[:, -1, last] += rows[:, -1]
        return t

    g = {}
    g_qb, g_qd, q = st["g_qb"], st["g_qd"], p["q"]
    g_beta = vecdot(g_qb, q)
    g_dbe = vecdot(g_qd, q)
    g["q"] = torch.addcmul(torch.addcmul(gy if n == 2 else torch.zeros_like(gy), g_qb, p["beta"]), g_qd, p["dbe"])
    if n == 2:
        hr = torch.stack([s["hr"] for s in saved], 1)
        g_beta = g_beta + vecdot(st["g_hrb"], hr)
        g_dbe = g_dbe + vecdot(st["g_hrd"], hr)
    g["beta"] = add_last(g_beta, st["g_bl"])
    g["dbe"] = add_last(g_dbe, st["g_dbel"])
    g["E"] = add_last(torch.zeros_like(g_beta), st["g_el"])
    g["qk"] = -st["nsc0"] * cm
    g["dd"] = add_last(-2 * st["ngcm"] * th2[:, :, None, :], -2 * st["ncl"] * th2)
    g["d_e"] = add_last(torch.zeros_like(f["d_e"]), -2 * st["nde"] * th2)
    theta = p["theta"]
    if stable:
        d1, d2, u, khalf = (torch.stack([s[key] for s in saved], 1) for key in ("d1", "d2", "u", "khalf"))
        g_u, den = st["g_u"], p["den"]
        g["theta"] = -st["ng_th1"] / (d1 * d2) + 2 * g_u * khalf / den
        g["eta"] = g_u * u / den * ((1 - f["eta"]) >= torch.finfo(theta.dtype).tiny)
        g["overlap"] = st["g_before"][..., None] * u[:, :, None, :]
        if "g_kh" in kept[-1]:
            g_kh = torch.zeros_like(f["kh"])
            g_kh[:, -1] = kept[-1]["g_kh"]
            g["kh"] = g_kh
    else:
        g["theta"] = -st["ng_th1"]
    g_k = st["g_k"]
    if "g_xsq0" in st:
        g_k = torch.addcmul(g_k, p["k"], st["g_xsq0"][..., None], value=2)
    g["k"] = g_k + st["gr"] if n == 2 else g_k
    g["v"] = -st["gr"]
    return {key: val for key, val in g.items() if needs[key]}


class ChunkLoop(torch.autograd.Function):
    """The loop over N whole chunks as one autograd node. forward(meta, *tensors): meta = (n layers,
    ``last`` of the final chunk, max_grad_norm, stable); tensors = the ``FIELDS`` (each (G, N, L, ...);
    overlap and kh None unless stable), then W (n), then S (n), each (G, out_l, in_l). Returns y
    (G, N, L, Dv), W and S after, the final chunk's anchor (the weights before it), and its Q (stable;
    else an empty tensor)."""

    @staticmethod
    def forward(ctx, meta, *tensors):
        n, last, max_grad_norm, stable = meta
        f = dict(zip(FIELDS, tensors[:len(FIELDS)]))
        W, S = list(tensors[len(FIELDS):len(FIELDS) + n]), list(tensors[len(FIELDS) + n:])
        p = prepare(f, last, n, stable)
        y, W, S, A, Q, saved = _loop(p, f["kh"], W, S, max_grad_norm, stable, keep=True)
        ctx.meta, ctx.f, ctx.p, ctx.saved = meta, f, p, saved
        return (y, *W, *S, *A, W[0].new_zeros(0) if Q is None else Q)

    @staticmethod
    def backward(ctx, gy, *grads):
        n, last, max_grad_norm, stable = ctx.meta
        f, p, saved = ctx.f, ctx.p, ctx.saved
        gW_out, gS_out, gA_out, gQ = grads[:n], grads[n:2 * n], grads[2 * n:3 * n], grads[3 * n]
        gW = [torch.zeros_like(w) if g is None else g for g, w in zip(gW_out, saved[-1]["W"])]
        gS = [torch.zeros_like(w) if g is None else g for g, w in zip(gS_out, saved[-1]["S"])]
        N = len(saved)
        if gy is None:
            gy = p["q"].new_zeros(*p["q"].shape[:3], saved[0]["W"][-1].shape[-2])
        views = {key: t.unbind(1) for key, t in p.items()}
        kept = [None] * N
        gys = gy.unbind(1)
        gQ = gQ if stable and gQ is not None and gQ.numel() else None
        for i in range(N - 1, -1, -1):
            final = i == N - 1
            c = {key: t[i] for key, t in views.items()}
            if final and stable:
                c["kh"] = f["kh"][:, i]
            kept[i] = {}
            gW, gS = chunk_backward(c, saved[i], gys[i], gW, gS, gQ if final else None, max_grad_norm, stable,
                                    kept[i])
            if final:
                gW = [gw if ga is None else gw + ga for gw, ga in zip(gW, gA_out)]
        needs = {key: f[key] is not None and ctx.needs_input_grad[1 + j] for j, key in enumerate(FIELDS)}
        g = _finish(f, p, saved, kept, gy, n, last, stable, needs)
        ctx.saved = None
        return (None, *(g.get(key) for key in FIELDS), *gW, *gS)


def _loop(p, kh, W, S, max_grad_norm, stable, keep):
    """The forward over the chunks of ``prepare``'s p. Returns y (G, N, L, Dv), W, S after the final chunk,
    its anchor, its Q (None unless stable) and the per-chunk intermediates (``keep``) or None."""
    N = p["q"].shape[1]
    views = {key: t.unbind(1) for key, t in p.items()}
    ys, saved = [], []
    Q, A = None, W
    for i in range(N):
        final = i == N - 1
        c = {key: t[i] for key, t in views.items()}
        if final and stable:
            c["kh"] = kh[:, i]
        A = W
        y, W, S, Q, sv = chunk_forward(c, W, S, max_grad_norm, stable, final and stable, keep)
        ys.append(y)
        saved.append(sv)
    return torch.stack(ys, 1), W, S, A, Q, (saved if keep else None)


def run_chunks(fields, W, S, *, last, max_grad_norm, stable):
    """The N chunks of ``fields`` (dict of ``FIELDS``, each (G, N, L, ...)) from the state W, S (lists of
    (G, out_l, in_l)). Returns y (G, N, L, Dv), W, S after row ``last`` of the final chunk, the final
    chunk's anchor, and its Q (None unless stable). Through ``ChunkLoop`` when a gradient is wanted."""
    n = len(W)
    tensors = [fields[key] for key in FIELDS]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, *W, *S)):
        out = ChunkLoop.apply((n, last, max_grad_norm, stable), *tensors, *W, *S)
        y, W, S, A = out[0], list(out[1:1 + n]), list(out[1 + n:1 + 2 * n]), list(out[1 + 2 * n:1 + 3 * n])
        return y, W, S, A, (out[-1] if stable else None)
    p = prepare(fields, last, n, stable)
    y, W, S, A, Q, _ = _loop(p, fields["kh"], W, S, max_grad_norm, stable, keep=False)
    return y, W, S, A, Q
