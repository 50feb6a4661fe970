"""The loop over whole chunks of ``memory_update_chunked`` with a hand-written backward (depth 1 and 2).

Why: the chunks follow each other, so the loop stays, and each chunk is ~70 small ops on (B*H, C, 128)
tensors. Under autograd every one of them is recorded, and the backward ran ~450 ops per chunk through
the autograd engine (~10 us each, 84% of the tiny memory's forward + backward at 16K: issue 12's
profile). Here the forward runs without recording (keeping what the backward needs) and the backward
is the chain rule written out once per chunk, in reverse: about a quarter of the ops, none through the
engine. The math is ``chunked._chunk``'s (the closed form of ``naive.memory_update_ref``), the same
forward; the backward is the same gradient, including the step bound's (kappa, the chunk's overlaps,
the clip): ``tests/test_memory_speed.py`` checks it against autograd through ``chunked._chunk``, and
``tests/test_memory.py`` both against the per-token oracle.

Per chunk, with G = B*H batched memories, L rows, layer inputs x_l and per-token gradient factors
delta_l (the gradient of W_l at the anchor is delta_l x_l^T), for depth 2 (M(x) = x + W_2 silu(W_1 x)):
    z = k W_1^T, h = silu(z), r = k + h W_2^T - v, e = r W_2,  delta_2 = 2 r, delta_1 = 2 e silu'(z)
    kappa = 2 (|h|^2 + |k|^2 silu'(z)^2 . col(W_2)) + 2 (|r| max|silu'(z)| |k| + max|e silu''(z)| |k|^2)
    theta' = theta / ((1 + P)(1 + P + u)), u = theta kappa / (1 - eta), P = overlap u     (stable)
    theta'' = theta' min(1, max_grad_norm / |g|), |g|^2 = sum_l |delta_l|^2 |x_l|^2
    Cm = D theta''; y = the read at the per-token weights; (W, S) after the chunk's row ``last``.
Depth 1 (M(x) = W_1 x): r = k W_1^T - v, delta_1 = 2 r, kappa = 2 |k|^2.
"""

from __future__ import annotations

import torch

from titans_lnn.kernels.titans_memory.naive import clip_scale

# The chunk inputs, each (N, G, L, ...): N chunks, contiguous per chunk. overlap and kh are None unless stable.
FIELDS = ("q", "k", "v", "theta", "eta", "qk", "overlap", "kh", "beta", "E", "dbe", "dd", "d_e")


def _sqrt(x):
    """sqrt with 0 (and a zero gradient) at x <= 0, as ``naive._sqrt``."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _amax_abs_backward(x, top, grad):
    """d/dx of max_j |x_j| (last dim) times ``grad`` (..., ): autograd's rule (shared evenly by ties)."""
    hit = x.abs() == top[..., None]
    return x.sign() * hit * (grad / hit.sum(-1))[..., None]


def chunk_forward(c, W, S, last, max_grad_norm, stable, want_q, keep):
    """One chunk. c: dict of ``FIELDS`` for this chunk, (G, L, ...); W, S: lists of (G, out_l, in_l);
    ``last`` the row after which the state is read. Returns (y (G, L, Dv), W', S', Q (G, Dk, Dk) or None,
    saved: what ``chunk_backward`` needs, or None unless ``keep``)."""
    n = len(W)
    k, v, q, theta = c["k"], c["v"], c["q"], c["theta"]
    W1 = W[0]
    z = torch.bmm(k, W1.mT)  # (G, L, out_1)
    sv = {}
    if n == 2:
        W2 = W[1]
        s = torch.sigmoid(z)
        h = z * s
        slope = s * (1 + z * (1 - s))  # silu'(z)
        r = torch.baddbmm(k - v, h, W2.mT)  # M(k) - v: (G, L, Dv)
        e = torch.bmm(r, W2)  # W_2^T r: (G, L, out_1)
        deltas = [2 * e * slope, 2 * r]
        xs = [k, h]
        sv.update(s=s, h=h, slope=slope, e=e)
    else:
        r = z - v
        deltas, xs = [2 * r], [k]
    x_sq = [x.square().sum(-1) for x in xs]  # (G, L)
    sv.update(z=z, r=r, x_sq=x_sq)
    th1, u = theta, None
    if stable:
        if n == 2:
            col = W2.square().sum(-2)  # ||W_2[:, j]||^2: (G, out_1)
            reach = torch.bmm(slope.square(), col[..., None])[..., 0]
            bend = s * (1 - s) * (2 + z * (1 - 2 * s))  # silu''(z)
            top_slope = slope.abs().amax(-1)
            r_sq = r.square().sum(-1)
            t1 = _sqrt(r_sq * top_slope.square() * x_sq[0])
            eb = e * bend
            top_eb = eb.abs().amax(-1)
            kappa = 2 * (x_sq[1] + x_sq[0] * reach) + 2 * (t1 + top_eb * x_sq[0])
            sv.update(col=col, reach=reach, bend=bend, top_slope=top_slope, r_sq=r_sq, t1=t1, eb=eb, top_eb=top_eb)
        else:
            kappa = 2 * x_sq[0]
        den = (1 - c["eta"]).clamp_min(torch.finfo(theta.dtype).tiny)
        u = theta * kappa / den
        d1 = 1 + torch.bmm(c["overlap"], u[..., None])[..., 0]
        d2 = d1 + u
        th1 = theta / (d1 * d2)
        sv.update(kappa=kappa, den=den, u=u, d1=d1, d2=d2, th1=th1)
    th2 = th1
    if max_grad_norm is not None:
        sq = sum(d.square().sum(-1) * xq for d, xq in zip(deltas, x_sq))
        scale = clip_scale(sq, max_grad_norm)
        th2 = th1 * scale
        sv.update(sq=sq, scale=scale)
    cm = c["dd"] * th2[:, None, :]  # (G, L, L)
    beta, dbe = c["beta"][..., None], c["dbe"][..., None]
    # Read y_t = M_{W_t}(q_t): base (beta_t W_0 + dbe_t S_0) x minus the chunk's writes up to t.
    o_w, o_s = torch.bmm(q, W1.mT), torch.bmm(q, S[0].mT)
    sc = cm * c["qk"]
    zr = torch.baddbmm(o_w * beta + o_s * dbe, sc, deltas[0], alpha=-1)
    reads = [dict(x=q, o_w=o_w, o_s=o_s, sc=sc)]
    if n == 2:
        sr = torch.sigmoid(zr)
        hr = zr * sr
        o_w2, o_s2 = torch.bmm(hr, W2.mT), torch.bmm(hr, S[1].mT)
        p1 = torch.bmm(hr, h.mT)  # (G, L, L)
        sc1 = cm * p1
        y = q + torch.baddbmm(o_w2 * beta + o_s2 * dbe, sc1, deltas[1], alpha=-1)
        reads.append(dict(x=hr, o_w=o_w2, o_s=o_s2, sc=sc1, p=p1))
        sv.update(zr=zr, sr=sr)
    else:
        y = zr
    # State after row ``last``.
    cl = cm[:, last]  # (G, L)
    de = c["d_e"][:, last] * th2
    b_l, dbe_l, e_l = (c[name][:, last, None, None] for name in ("beta", "dbe", "E"))
    W_new = [torch.baddbmm(b_l * w + dbe_l * s_, d.mT, cl[..., None] * x, alpha=-1)
             for w, s_, d, x in zip(W, S, deltas, xs)]
    S_new = [torch.baddbmm(e_l * s_, d.mT, de[..., None] * x, alpha=-1) for s_, d, x in zip(S, deltas, xs)]
    Q = torch.bmm(c["kh"].mT, u[..., None] * c["kh"]) if want_q else None
    if not keep:
        return y, W_new, S_new, Q, None
    sv.update(W=W, S=S, deltas=deltas, xs=xs, th2=th2, cm=cm, cl=cl, de=de, reads=reads, last=last)
    return y, W_new, S_new, Q, sv


def chunk_backward(c, sv, gy, gW_new, gS_new, gQ, max_grad_norm, stable):
    """The chain rule through ``chunk_forward``: from the gradients of y (G, L, Dv), of the state after
    the chunk (lists of (G, out_l, in_l)) and of Q (or None), the gradients of the state before it (the
    anchor's included) and a dict of the chunk inputs' gradients (the keys of ``FIELDS`` that have one)."""
    W, S, xs, deltas, reads = sv["W"], sv["S"], sv["xs"], sv["deltas"], sv["reads"]
    n, last, th2, cm, cl, de = len(W), sv["last"], sv["th2"], sv["cm"], sv["cl"], sv["de"]
    beta, dbe = c["beta"][..., None], c["dbe"][..., None]
    g = {}
    # State: W' = b_l W + dbe_l S - delta^T (cl x), S' = e_l S - delta^T (de x).
    b_l, dbe_l, e_l = (c[name][:, last, None, None] for name in ("beta", "dbe", "E"))
    gW = [b_l * gw for gw in gW_new]
    gS = [dbe_l * gw + e_l * gs for gw, gs in zip(gW_new, gS_new)]
    g_bl = sum((gw * w).sum((-2, -1)) for gw, w in zip(gW_new, W))  # (G,)
    g_dbel = sum((gw * s_).sum((-2, -1)) for gw, s_ in zip(gW_new, S))
    g_el = sum((gs * s_).sum((-2, -1)) for gs, s_ in zip(gS_new, S))
    g_cl = g_de = 0
    gx, gd = [], []
    for gw, gs, d, x in zip(gW_new, gS_new, deltas, xs):
        pw, ps = torch.bmm(d, gw), torch.bmm(d, gs)  # (G, L, in)
        gx.append(-(cl[..., None] * pw + de[..., None] * ps))
        g_cl = g_cl - (pw * x).sum(-1)
        g_de = g_de - (ps * x).sum(-1)
        gd.append(-(cl[..., None] * torch.bmm(x, gw.mT) + de[..., None] * torch.bmm(x, gs.mT)))
    g_th2 = g_cl * c["dd"][:, last] + g_de * c["d_e"][:, last]
    g_dd = torch.zeros_like(c["dd"])
    g_de_mat = torch.zeros_like(c["d_e"])
    g_de_mat[:, last] = g_de * th2
    g_beta, g_dbe = torch.zeros_like(c["beta"]), torch.zeros_like(c["dbe"])
    g_E = torch.zeros_like(c["E"])
    g_E[:, last] = g_el
    # Read, from the last layer back: z_l = base_l - (Cm * P_l) delta_l, base_l = beta x W^T + dbe x S^T.
    gz = gy
    g_cm = 0
    gq = gy if n == 2 else 0
    for i in range(n - 1, -1, -1):
        rd = reads[i]
        gsc = -torch.bmm(gz, deltas[i].mT)  # (G, L, L)
        gd[i] = gd[i] - torch.bmm(rd["sc"].mT, gz)
        gzb, gzs = gz * beta, gz * dbe
        g_beta = g_beta + (gz * rd["o_w"]).sum(-1)
        g_dbe = g_dbe + (gz * rd["o_s"]).sum(-1)
        gW[i] = gW[i] + torch.bmm(gzb.mT, rd["x"])
        gS[i] = gS[i] + torch.bmm(gzs.mT, rd["x"])
        gin = torch.baddbmm(torch.bmm(gzb, W[i]), gzs, S[i])  # d/d(the layer's input)
        if i == 0:
            g_cm = g_cm + gsc * c["qk"]
            g["qk"] = gsc * cm
            gq = gq + gin
        else:
            g_cm = g_cm + gsc * rd["p"]
            gp = gsc * cm
            gin = gin + torch.bmm(gp, xs[1])
            gx[1] = gx[1] + torch.bmm(gp.mT, rd["x"])
            sr, zr = sv["sr"], sv["zr"]
            gz = gin * (sr * (1 + zr * (1 - sr)))  # silu'(z_r)
    g["q"] = gq
    g_dd = g_dd + g_cm * th2[:, None, :]
    g_dd[:, last] += g_cl * th2
    g_th2 = g_th2 + (g_cm * c["dd"]).sum(-2)
    g_beta[:, last] += g_bl
    g_dbe[:, last] += g_dbel
    g.update(dd=g_dd, d_e=g_de_mat, beta=g_beta, dbe=g_dbe, E=g_E)
    # Theta: the clip, then the stable step.
    x_sq = sv["x_sq"]
    g_xsq = [torch.zeros_like(t) for t in x_sq]
    g_th1 = g_th2
    if max_grad_norm is not None:
        sq, scale = sv["sq"], sv["scale"]
        g_th1 = g_th2 * scale
        clipped = sq > max_grad_norm**2
        th1 = sv["th1"] if stable else c["theta"]
        safe = torch.where(clipped, sq, torch.ones_like(sq))
        g_sq = torch.where(clipped, -0.5 * g_th2 * th1 * scale / safe, torch.zeros_like(sq))  # d min(1, m/|g|)
        for i in range(n):
            gd[i] = gd[i] + 2 * deltas[i] * (g_sq * x_sq[i])[..., None]
            g_xsq[i] = g_xsq[i] + g_sq * deltas[i].square().sum(-1)
    z, r = sv["z"], sv["r"]
    g_top_slope = g_top_eb = g_reach = g_t1 = None
    if stable:
        u, d1, d2, th1, den, kappa = sv["u"], sv["d1"], sv["d2"], sv["th1"], sv["den"], sv["kappa"]
        g_theta = g_th1 / (d1 * d2)
        g_d1 = -g_th1 * th1 / d1
        g_d2 = -g_th1 * th1 / d2
        g_before = g_d1 + g_d2
        g_u = g_d2 + torch.bmm(c["overlap"].mT, g_before[..., None])[..., 0]
        g["overlap"] = g_before[..., None] * u[:, None, :]
        if gQ is not None:
            kh = c["kh"]
            g_u = g_u + (torch.bmm(kh, gQ) * kh).sum(-1)
            g["kh"] = u[..., None] * torch.bmm(kh, gQ + gQ.mT)
        g["theta"] = g_theta + g_u * kappa / den
        g["eta"] = g_u * u / den * ((1 - c["eta"]) >= torch.finfo(u.dtype).tiny)
        g_kappa = g_u * c["theta"] / den
        if n == 2:
            g_xsq[1] = g_xsq[1] + 2 * g_kappa
            g_xsq[0] = g_xsq[0] + 2 * g_kappa * (sv["reach"] + sv["top_eb"])
            g_reach = 2 * g_kappa * x_sq[0]
            g_t1 = 2 * g_kappa
            g_top_eb = 2 * g_kappa * x_sq[0]
        else:
            g_xsq[0] = g_xsq[0] + 2 * g_kappa
    else:
        g["theta"] = g_th1
    # The anchor's forward and its gradient factors, back to k, v and the anchor weights.
    W1 = W[0]
    if n == 2:
        W2, s, h, slope, e = W[1], sv["s"], sv["h"], sv["slope"], sv["e"]
        ge = 2 * gd[0] * slope
        g_slope = 2 * gd[0] * e
        gr = 2 * gd[1]
        gz_ = 0
        if stable:
            g_slope = g_slope + 2 * slope * (g_reach[..., None] * sv["col"][:, None, :])
            g_col = torch.bmm(slope.square().mT, g_reach[..., None])[..., 0]  # (G, out_1)
            gW[1] = gW[1] + 2 * W2 * g_col[:, None, :]
            t1, r_sq, top_slope = sv["t1"], sv["r_sq"], sv["top_slope"]
            g_p = torch.where(t1 > 0, g_t1 / (2 * torch.where(t1 > 0, t1, torch.ones_like(t1))), torch.zeros_like(t1))
            gr = gr + 2 * r * (g_p * top_slope.square() * x_sq[0])[..., None]
            g_top_slope = g_p * r_sq * 2 * top_slope * x_sq[0]
            g_xsq[0] = g_xsq[0] + g_p * r_sq * top_slope.square()
            g_slope = g_slope + _amax_abs_backward(slope, top_slope, g_top_slope)
            geb = _amax_abs_backward(sv["eb"], sv["top_eb"], g_top_eb)
            bend = sv["bend"]
            ge = ge + geb * bend
            g_bend = geb * e
            t = 1 - 2 * s
            gz_ = g_bend * (s * (1 - s) * (t * (3 + z * t) - 2 * z * s * (1 - s)))  # silu'''(z)
        else:
            bend = s * (1 - s) * (2 + z * (1 - 2 * s))
        gr = torch.baddbmm(gr, ge, W2.mT)
        gW[1] = gW[1] + torch.bmm(r.mT, ge)
        gh = torch.baddbmm(gx[1] + 2 * h * g_xsq[1][..., None], gr, W2)
        gW[1] = gW[1] + torch.bmm(gr.mT, h)
        gz_ = gz_ + g_slope * bend + gh * slope
        gk = gr + gx[0] + 2 * c["k"] * g_xsq[0][..., None]
    else:
        gr = 2 * gd[0]
        gz_ = gr
        gk = gx[0] + 2 * c["k"] * g_xsq[0][..., None]
    g["v"] = -gr
    g["k"] = torch.baddbmm(gk, gz_, W1)
    gW[0] = gW[0] + torch.bmm(gz_.mT, c["k"])
    return gW, gS, g


class ChunkLoop(torch.autograd.Function):
    """The loop over N whole chunks as one autograd node. forward(meta, *tensors): meta = (n layers,
    ``last`` of the final chunk, max_grad_norm, stable); tensors = the ``FIELDS`` (each (N, G, L, ...);
    overlap and kh None unless stable), then W (n), then S (n). Returns y (N, G, L, Dv), W after, S after,
    the final chunk's anchor (the weights before it), and its Q (stable; else an empty tensor)."""

    @staticmethod
    def forward(ctx, meta, *tensors):
        n, last, max_grad_norm, stable = meta
        fields = dict(zip(FIELDS, tensors[:len(FIELDS)]))
        W, S = list(tensors[len(FIELDS):len(FIELDS) + n]), list(tensors[len(FIELDS) + n:])
        N = fields["q"].shape[0]
        ys, saved = [], []
        for i in range(N):
            c = {key: (None if t is None else t[i]) for key, t in fields.items()}
            final = i == N - 1
            A = W
            y, W, S, Q, sv = chunk_forward(c, W, S, last if final else c["q"].shape[1] - 1, max_grad_norm, stable,
                                           stable and final, keep=True)
            ys.append(y)
            saved.append(sv)
        ctx.meta, ctx.fields, ctx.saved = meta, fields, saved
        Q = Q if Q is not None else W[0].new_zeros(0)
        return (torch.stack(ys), *W, *S, *A, Q)

    @staticmethod
    def backward(ctx, gy, *grads):
        n, last, max_grad_norm, stable = ctx.meta
        fields, saved = ctx.fields, ctx.saved
        gW_out, gS_out, gA_out, gQ = grads[:n], grads[n:2 * n], grads[2 * n:3 * n], grads[3 * n]
        like = saved[-1]
        gW = [torch.zeros_like(w) if g is None else g for g, w in zip(gW_out, like["W"])]
        gS = [torch.zeros_like(w) if g is None else g for g, w in zip(gS_out, like["S"])]
        gy = torch.zeros(len(saved), *like["cm"].shape[:2], like["W"][-1].shape[-2], dtype=like["cm"].dtype,
                         device=like["cm"].device) if gy is None else gy
        N = len(saved)
        per = {key: [None] * N for key in FIELDS}
        for i in range(N - 1, -1, -1):
            c = {key: (None if t is None else t[i]) for key, t in fields.items()}
            final = i == N - 1
            gW, gS, g = chunk_backward(c, saved[i], gy[i], gW, gS, gQ if final and stable else None,
                                       max_grad_norm, stable)
            if final:
                gW = [gw if ga is None else gw + ga for gw, ga in zip(gW, gA_out)]
            for key, val in g.items():
                per[key][i] = val
            saved[i] = None  # free as we go
        out = []
        for key in FIELDS:
            t = fields[key]
            if t is None or not ctx.needs_input_grad[1 + FIELDS.index(key)]:
                out.append(None)
                continue
            vals = per[key]
            if all(val is None for val in vals):
                out.append(None)
                continue
            out.append(torch.stack([torch.zeros_like(t[i]) if val is None else val for i, val in enumerate(vals)]))
        return (None, *out, *gW, *gS)


def run_chunks(fields, W, S, *, last, max_grad_norm, stable):
    """The N chunks of ``fields`` (dict of ``FIELDS``, each (N, G, L, ...)) from the state W, S (lists of
    (G, out_l, in_l)). Returns y (N, G, L, Dv), W, S after row ``last`` of the final chunk, the final
    chunk's anchor, and its Q (None unless stable). Through ``ChunkLoop`` when a gradient is wanted."""
    n = len(W)
    tensors = [fields[key] for key in FIELDS]
    wants = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, *W, *S))
    if wants:
        out = ChunkLoop.apply((n, last, max_grad_norm, stable), *tensors, *W, *S)
        y, W, S, A, Q = out[0], list(out[1:1 + n]), list(out[1 + n:1 + 2 * n]), list(out[1 + 2 * n:1 + 3 * n]), out[-1]
        return y, W, S, A, (Q if stable else None)
    N = fields["q"].shape[0]
    ys = []
    for i in range(N):
        c = {key: (None if t is None else t[i]) for key, t in fields.items()}
        final = i == N - 1
        A = W
        y, W, S, Q, _ = chunk_forward(c, W, S, last if final else c["q"].shape[1] - 1, max_grad_norm, stable,
                                      stable and final, keep=False)
        ys.append(y)
    return torch.stack(ys), W, S, A, Q
