// The memory's loop over whole chunks (kernels/titans_memory/chunk_loop.py) in C++ with ATen: the same
// per-chunk forward (``chunk_forward``) and hand-written backward (``chunk_backward``), op for op, with
// the whole loop over chunks in one call, so that no Python runs per chunk. The Python loop is the
// reference; tests/test_memory_cpp.py checks that both give the same values and gradients in fp64.
//
// Why: a chunk of the tiny memory is ~95 ops forward and ~190 backward on tensors of (G, 16, 128),
// each microseconds of overhead and almost no arithmetic; from Python each op also pays the
// interpreter and the autograd dispatch (issue 12's profile: 22.5% of a training step was Python
// between the ops). Here the ops run below autograd (nothing is recorded: the backward is explicit).
//
// Shapes: G = B*H memories, N chunks, L rows per chunk, n = 1 or 2 layers. The state X is per layer
// [W_l^T; S_l^T] (G, 2, in_l, out_l). The per-chunk inputs (``prepare``'s dict p) arrive as
// (G, N, L, ...) and are laid out once as (N, G, L, ...) so that each chunk is contiguous.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

using at::Tensor;
using TensorMap = std::map<std::string, Tensor>;

Tensor vecdot(const Tensor& a, const Tensor& b, int64_t dim = -1) { return at::mul(a, b).sum(dim); }

Tensor mT(const Tensor& t) { return t.transpose(-2, -1); }

// The per-chunk inputs: views of (N, G, L, ...) tensors at chunk i.
struct Chunk {
  Tensor q, k, theta, qk, bd, xsq0, r0, qbd, dd2, dl2, mix;
  Tensor den, tw, ov, knorm, kh;  // stable only (knorm: depth 2; kh: the final chunk, when Q is wanted)
};

// ``prepare``'s tensors as (N, G, ...) contiguous, so that chunk i is one contiguous slice.
struct Inputs {
  TensorMap t;
  int64_t N = 0;

  Inputs(const TensorMap& p) {
    for (const auto& kv : p) {  // (den is for chunk_loop.py's _finish only)
      if (kv.second.defined() && kv.first != "den") t[kv.first] = kv.second.transpose(0, 1).contiguous();
    }
    N = t.at("q").size(0);
  }

  Tensor at_chunk(const std::string& name, int64_t i) const {
    auto it = t.find(name);
    return it == t.end() ? Tensor() : it->second.select(0, i);
  }

  Chunk chunk(int64_t i) const {
    Chunk c;
    c.q = at_chunk("q", i);
    c.k = at_chunk("k", i);
    c.theta = at_chunk("theta", i);
    c.qk = at_chunk("qk", i);
    c.bd = at_chunk("bd", i);
    c.xsq0 = at_chunk("xsq0", i);
    c.r0 = at_chunk("r0", i);
    c.qbd = at_chunk("qbd", i);
    c.dd2 = at_chunk("dd2", i);
    c.dl2 = at_chunk("dl2", i);
    c.mix = at_chunk("mix", i);
    c.den = at_chunk("den", i);
    c.tw = at_chunk("tw", i);
    c.ov = at_chunk("ov", i);
    c.knorm = at_chunk("knorm", i);
    return c;
  }
};

// What ``chunk_backward`` needs from a chunk's forward (``chunk_forward``'s dict sv).
struct Saved {
  std::vector<Tensor> X, Ys, xs, ds, xsq, dsq;
  Tensor th1, th2, cm, sc0, r, cd;
  Tensor z, s, a, slope, e, sr, hr, hrbd, p1, sc1;                    // depth 2
  Tensor col, sl2, sa, bend, tsl, t1, eb, teb, rt, khalf, u, d1, d2;  // stable
  Tensor sqp, scale;                                                   // clip
};

// The loop's saved intermediates, held by the Python autograd node between forward and backward.
struct Tape {
  std::vector<Saved> chunks;
  std::vector<Chunk> views;  // each chunk's inputs (views of ``inputs``), as the forward used them
  std::shared_ptr<Inputs> inputs;
};

// Fused elementwise passes. Each replaces a chain of small ATen ops (one dispatch and one allocation each, on
// tensors of a few thousand elements) with one loop over contiguous data; the formulas are chunk_loop.py's.

template <typename T>
T* ptr(const Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "chunk_loop.cpp: expected a contiguous tensor, got strides ", t.strides());
  return t.data_ptr<T>();
}

// From z (G, L, hidden) and s = sigmoid(z): h = z s, a = 1 - s, slope = silu'(z) = s + h a.
void anchor_act(const Tensor& z, const Tensor& s, Tensor& h, Tensor& a, Tensor& slope) {
  h = at::empty_like(z);
  a = at::empty_like(z);
  slope = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "anchor_act", [&] {
    const scalar_t *zp = ptr<scalar_t>(z), *sp = ptr<scalar_t>(s);
    scalar_t *hp = ptr<scalar_t>(h), *ap = ptr<scalar_t>(a), *lp = ptr<scalar_t>(slope);
    for (int64_t i = 0, m = z.numel(); i < m; ++i) {
      const scalar_t hv = zp[i] * sp[i], av = 1 - sp[i];
      hp[i] = hv;
      ap[i] = av;
      lp[i] = sp[i] + hv * av;
    }
  });
}

// Depth 2, per row of (G, L, hidden): d_1 = e silu'(z), ||h||^2, ||d_1||^2 and (stable) the curvature's terms:
// silu'^2, silu''(z) = s a (2 + z (a - s)), e silu'', reach = silu'^2 . col(W_2), max|silu'|, max|e silu''|.
struct AnchorRows {
  Tensor d1, xsq1, dsq0, sl2, sa, bend, eb, reach, tsl, teb;
};

AnchorRows anchor_rows(const Tensor& z, const Tensor& s, const Tensor& a, const Tensor& h, const Tensor& slope,
                       const Tensor& e, const Tensor& col, bool stable) {
  const int64_t G = z.size(0), L = z.size(1), K = z.size(2);
  AnchorRows o;
  o.d1 = at::empty_like(z);
  o.xsq1 = at::empty({G, L}, z.options());
  o.dsq0 = at::empty({G, L}, z.options());
  if (stable) {
    o.sl2 = at::empty_like(z);
    o.sa = at::empty_like(z);
    o.bend = at::empty_like(z);
    o.eb = at::empty_like(z);
    o.reach = at::empty({G, L}, z.options());
    o.tsl = at::empty({G, L}, z.options());
    o.teb = at::empty({G, L}, z.options());
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "anchor_rows", [&] {
    const scalar_t *zp = ptr<scalar_t>(z), *sp = ptr<scalar_t>(s), *ap = ptr<scalar_t>(a), *hp = ptr<scalar_t>(h),
                   *lp = ptr<scalar_t>(slope), *ep = ptr<scalar_t>(e);
    scalar_t *dp = ptr<scalar_t>(o.d1), *xq = ptr<scalar_t>(o.xsq1), *dq = ptr<scalar_t>(o.dsq0);
    const scalar_t* cp = stable ? ptr<scalar_t>(col) : nullptr;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t l = 0; l < L; ++l) {
        const int64_t row = g * L + l, base = row * K;
        scalar_t sx = 0, sd = 0;
        _Pragma("omp simd reduction(+ : sx, sd)")
        for (int64_t j = 0; j < K; ++j) {
          const scalar_t d = ep[base + j] * lp[base + j];
          dp[base + j] = d;
          sx += hp[base + j] * hp[base + j];
          sd += d * d;
        }
        xq[row] = sx;
        dq[row] = sd;
        if (!stable) continue;
        scalar_t *sl2 = ptr<scalar_t>(o.sl2) + base, *sa = ptr<scalar_t>(o.sa) + base,
                 *bend = ptr<scalar_t>(o.bend) + base, *eb = ptr<scalar_t>(o.eb) + base;
        const scalar_t* c = cp + g * K;
        scalar_t reach = 0, tsl = 0, teb = 0;
        _Pragma("omp simd reduction(+ : reach) reduction(max : tsl, teb)")
        for (int64_t j = 0; j < K; ++j) {
          const scalar_t sl = lp[base + j], sv = sp[base + j], av = ap[base + j], zv = zp[base + j];
          const scalar_t q = sl * sl, sav = sv * av;
          const scalar_t bv = sav * (zv * (av - sv) + 2);
          const scalar_t ebv = ep[base + j] * bv;
          sl2[j] = q;
          sa[j] = sav;
          bend[j] = bv;
          eb[j] = ebv;
          reach += q * c[j];
          tsl = std::abs(sl) > tsl ? std::abs(sl) : tsl;
          teb = std::abs(ebv) > teb ? std::abs(ebv) : teb;
        }
        ptr<scalar_t>(o.reach)[row] = reach;
        ptr<scalar_t>(o.tsl)[row] = tsl;
        ptr<scalar_t>(o.teb)[row] = teb;
      }
    }
  });
  return o;
}

// The steps of a chunk, per (G, L): kappa / 2, u, d1 = 1 + overlap u, d2, theta' (stable), the clip's sqp and scale,
// theta''; then Cm = dd2 theta'' (G, L, L), sc0 = Cm qk, cd = dl2 theta'' (G, 2, L).
struct Steps {
  Tensor t1, rt, khalf, u, d1, d2, th1, sqp, scale, th2, cm, sc0, cd;
};

Steps chunk_steps(const Chunk& c, const std::vector<Tensor>& xsq, const std::vector<Tensor>& dsq, const AnchorRows* ar,
                  c10::optional<double> max_grad_norm, bool stable) {
  const int64_t n = static_cast<int64_t>(xsq.size());
  const int64_t G = c.theta.size(0), L = c.theta.size(1);
  auto opts = c.theta.options();
  Steps o;
  const bool clip = max_grad_norm.has_value();
  if (stable) {
    if (n == 2) {
      o.t1 = at::empty({G, L}, opts);
      o.rt = at::empty({G, L}, opts);
    }
    o.khalf = n == 2 ? at::empty({G, L}, opts) : xsq[0];
    o.u = at::empty({G, L}, opts);
    o.d1 = at::empty({G, L}, opts);
    o.d2 = at::empty({G, L}, opts);
    o.th1 = at::empty({G, L}, opts);
  } else {
    o.th1 = c.theta;
  }
  if (clip) {
    o.sqp = at::empty({G, L}, opts);
    o.scale = at::empty({G, L}, opts);
    o.th2 = at::empty({G, L}, opts);
  } else {
    o.th2 = o.th1;
  }
  o.cm = at::empty({G, L, L}, opts);
  o.sc0 = at::empty({G, L, L}, opts);
  o.cd = at::empty({G, 2, L}, opts);
  AT_DISPATCH_FLOATING_TYPES(c.theta.scalar_type(), "chunk_steps", [&] {
    const scalar_t* theta = ptr<scalar_t>(c.theta);
    const scalar_t *x0 = ptr<scalar_t>(xsq[0]), *q0 = ptr<scalar_t>(dsq[0]);
    const scalar_t *x1 = n == 2 ? ptr<scalar_t>(xsq[1]) : nullptr, *q1 = n == 2 ? ptr<scalar_t>(dsq[1]) : nullptr;
    const scalar_t half_max = clip ? static_cast<scalar_t>(0.5 * *max_grad_norm) : 0;
    for (int64_t g = 0; g < G; ++g) {
      scalar_t* th1 = ptr<scalar_t>(o.th1) + g * L;
      if (stable) {
        scalar_t* u = ptr<scalar_t>(o.u) + g * L;
        const scalar_t* tw = ptr<scalar_t>(c.tw) + g * L;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t row = g * L + l;
          scalar_t kh = x0[row];
          if (n == 2) {
            const scalar_t t1 = std::sqrt(q1[row]) * ptr<scalar_t>(ar->tsl)[row] * ptr<scalar_t>(c.knorm)[row];
            const scalar_t rt = ptr<scalar_t>(ar->reach)[row] + ptr<scalar_t>(ar->teb)[row];
            kh = (x1[row] + t1) + x0[row] * rt;
            ptr<scalar_t>(o.t1)[row] = t1;
            ptr<scalar_t>(o.rt)[row] = rt;
            ptr<scalar_t>(o.khalf)[row] = kh;
          }
          u[l] = tw[l] * kh;
        }
        const scalar_t* ov = ptr<scalar_t>(c.ov) + g * L * L;
        for (int64_t l = 0; l < L; ++l) {
          scalar_t acc = 0;
          for (int64_t j = 0; j < L; ++j) acc += ov[l * L + j] * u[j];
          const scalar_t d1 = acc + 1, d2 = d1 + u[l];
          ptr<scalar_t>(o.d1)[g * L + l] = d1;
          ptr<scalar_t>(o.d2)[g * L + l] = d2;
          th1[l] = theta[g * L + l] / (d1 * d2);
        }
      }
      scalar_t* th2 = ptr<scalar_t>(o.th2) + g * L;
      if (clip) {
        for (int64_t l = 0; l < L; ++l) {
          const int64_t row = g * L + l;
          scalar_t sqp = q0[row] * x0[row];  // ||g||^2 / 4
          if (n == 2) sqp += q1[row] * x1[row];
          const scalar_t scale = std::min<scalar_t>(half_max / std::sqrt(sqp), 1);  // (at sqp = 0: inf -> 1)
          ptr<scalar_t>(o.sqp)[row] = sqp;
          ptr<scalar_t>(o.scale)[row] = scale;
          th2[l] = th1[l] * scale;
        }
      }
      const scalar_t *dd2 = ptr<scalar_t>(c.dd2) + g * L * L, *qk = ptr<scalar_t>(c.qk) + g * L * L,
                     *dl2 = ptr<scalar_t>(c.dl2) + g * 2 * L;
      scalar_t *cm = ptr<scalar_t>(o.cm) + g * L * L, *sc0 = ptr<scalar_t>(o.sc0) + g * L * L,
               *cd = ptr<scalar_t>(o.cd) + g * 2 * L;
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t j = 0; j < L; ++j) {
          const scalar_t v = dd2[i * L + j] * th2[j];
          cm[i * L + j] = v;
          sc0[i * L + j] = v * qk[i * L + j];
        }
      }
      for (int64_t i = 0; i < 2 * L; ++i) cd[i] = dl2[i] * th2[i % L];
    }
  });
  return o;
}

// The read's hidden layer: hr = silu(zr) (sr = sigmoid(zr)) and hrbd = [beta hr, dbe hr] (G, L, 2 hidden).
void read_act(const Tensor& zr, const Tensor& sr, const Tensor& bd, Tensor& hr, Tensor& hrbd) {
  const int64_t G = zr.size(0), L = zr.size(1), K = zr.size(2);
  hr = at::empty_like(zr);
  hrbd = at::empty({G, L, 2 * K}, zr.options());
  AT_DISPATCH_FLOATING_TYPES(zr.scalar_type(), "read_act", [&] {
    const scalar_t *zp = ptr<scalar_t>(zr), *sp = ptr<scalar_t>(sr), *bp = ptr<scalar_t>(bd);
    scalar_t *hp = ptr<scalar_t>(hr), *op = ptr<scalar_t>(hrbd);
    for (int64_t row = 0; row < G * L; ++row) {
      const scalar_t b0 = bp[2 * row], b1 = bp[2 * row + 1];
      for (int64_t j = 0; j < K; ++j) {
        const scalar_t v = zp[row * K + j] * sp[row * K + j];
        hp[row * K + j] = v;
        op[row * 2 * K + j] = v * b0;
        op[row * 2 * K + K + j] = v * b1;
      }
    }
  });
}

// The state's decay [W; S] <- mix [W; S] (mix (G, 2, 2), X (G, 2, in, out)): a 2x2 mix of two long rows, which a
// batched matmul with an inner size of 2 does slowly (~25 us here for 2 x 16K numbers).
Tensor mix_state(const Tensor& mix, const Tensor& X) {
  const int64_t G = X.size(0), M = X[0][0].numel();
  Tensor out = at::empty_like(X);
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "mix_state", [&] {
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t* m = ptr<scalar_t>(mix) + g * 4;
      const scalar_t *x0 = ptr<scalar_t>(X) + g * 2 * M, *x1 = x0 + M;
      scalar_t *o0 = ptr<scalar_t>(out) + g * 2 * M, *o1 = o0 + M;
      for (int64_t j = 0; j < M; ++j) {
        o0[j] = m[0] * x0[j] + m[1] * x1[j];
        o1[j] = m[2] * x0[j] + m[3] * x1[j];
      }
    }
  });
  return out;
}

// Its backward: from GX = dL/d(mix X), returns dL/dX = mix^T GX and adds dL/dmix = GX X^T (G, 2, 2) to g_mix.
Tensor mix_state_backward(const Tensor& mix, const Tensor& X, const Tensor& GX, Tensor& g_mix) {
  const int64_t G = X.size(0), M = X[0][0].numel();
  Tensor gc = GX.contiguous();
  Tensor gX = at::empty_like(X);
  if (!g_mix.defined()) g_mix = at::zeros({G, 2, 2}, X.options());
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "mix_state_backward", [&] {
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t* m = ptr<scalar_t>(mix) + g * 4;
      const scalar_t *x0 = ptr<scalar_t>(X) + g * 2 * M, *x1 = x0 + M;
      const scalar_t *g0 = ptr<scalar_t>(gc) + g * 2 * M, *g1 = g0 + M;
      scalar_t *o0 = ptr<scalar_t>(gX) + g * 2 * M, *o1 = o0 + M;
      scalar_t s00 = 0, s01 = 0, s10 = 0, s11 = 0;
      _Pragma("omp simd reduction(+ : s00, s01, s10, s11)")
      for (int64_t j = 0; j < M; ++j) {
        o0[j] = m[0] * g0[j] + m[2] * g1[j];
        o1[j] = m[1] * g0[j] + m[3] * g1[j];
        s00 += g0[j] * x0[j];
        s01 += g0[j] * x1[j];
        s10 += g1[j] * x0[j];
        s11 += g1[j] * x1[j];
      }
      scalar_t* gm = ptr<scalar_t>(g_mix) + g * 4;
      gm[0] += s00;
      gm[1] += s01;
      gm[2] += s10;
      gm[3] += s11;
    }
  });
  return gX;
}

// One chunk forward: returns y (G, L, Dv); X becomes the state after the chunk; Q (G, Dk, Dk) when kh is
// given. The intermediates go to sv when it is not null.
Tensor chunk_forward(const Chunk& c, std::vector<Tensor>& X, c10::optional<double> max_grad_norm, bool stable,
                     Tensor* Q, Saved* sv) {
  const int64_t n = static_cast<int64_t>(X.size());
  const int64_t G = c.k.size(0), L = c.k.size(1);
  const Tensor& k = c.k;
  Tensor Wt1 = X[0].select(1, 0);  // W_1^T: (G, Dk, out_1)
  Tensor z, s, a, slope, e, h, r, Wt2, col;
  std::vector<Tensor> ds, xs, xsq{c.xsq0}, dsq;
  AnchorRows ar;
  if (n == 2) {
    Wt2 = X[1].select(1, 0);  // W_2^T: (G, hidden, Dv)
    z = at::bmm(k, Wt1);      // (G, L, hidden)
    s = at::sigmoid(z);
    anchor_act(z, s, h, a, slope);
    r = at::baddbmm(c.r0, h, Wt2);  // M(k) - v: (G, L, Dv)
    e = at::bmm(r, mT(Wt2));        // W_2^T r
    if (stable) col = vecdot(Wt2, Wt2).contiguous();  // ||W_2[:, j]||^2: (G, hidden)
    ar = anchor_rows(z, s, a, h, slope, e, col, stable);
    ds = {ar.d1, r};
    xs = {k, h};
    xsq.push_back(ar.xsq1);
    dsq = {ar.dsq0, vecdot(r, r)};
  } else {
    r = at::baddbmm(c.r0, k, Wt1);
    ds = {r};
    xs = {k};
    dsq = {vecdot(r, r)};
  }
  Steps st = chunk_steps(c, xsq, dsq, n == 2 ? &ar : nullptr, max_grad_norm, stable);
  // Read y_t = M_{W_t}(q_t): the base (beta_t W + dbe_t S) q_t minus the chunk's writes up to t.
  const int64_t o0 = X[0].size(-1);
  Tensor zr = at::bmm(c.qbd, X[0].view({G, -1, o0})).baddbmm_(st.sc0, ds[0], 1, -1);
  Tensor y, sr, hr, hrbd, p1, sc1;
  if (n == 2) {
    sr = at::sigmoid(zr);
    read_act(zr, sr, c.bd, hr, hrbd);  // [beta hr, dbe hr]: (G, L, 2 hidden)
    p1 = at::bmm(hr, mT(h));            // (G, L, L)
    sc1 = at::mul(st.cm, p1);
    y = at::baddbmm(c.q, hrbd, X[1].view({G, -1, X[1].size(-1)})).baddbmm_(sc1, r, 1, -1);
  } else {
    y = zr;
  }
  // State after row ``last``: [W; S]^T <- mix [W; S]^T - Y d, Y = [Cm[last] x; De[last] x]^T (G, 2, in_l, L).
  std::vector<Tensor> Ys, X_new;
  for (int64_t l = 0; l < n; ++l) {
    const Tensor& x = xs[l];
    Tensor Y = at::empty({G, 2, x.size(-1), L}, x.options());
    at::mul_out(Y, mT(x).unsqueeze(1), st.cd.unsqueeze(2));
    const int64_t i_l = X[l].size(2), o_l = X[l].size(3);
    Tensor Xn = mix_state(c.mix, X[l]).view({G, 2 * i_l, o_l});
    X_new.push_back(Xn.baddbmm_(Y.view({G, 2 * i_l, L}), ds[l], 1, -1).view({G, 2, i_l, o_l}));
    Ys.push_back(Y);
  }
  if (Q != nullptr) *Q = at::bmm(mT(c.kh), at::mul(st.u.unsqueeze(-1), c.kh));
  if (sv != nullptr) {
    sv->X = X;
    sv->Ys = Ys;
    sv->xs = xs;
    sv->ds = ds;
    sv->xsq = xsq;
    sv->dsq = dsq;
    sv->th1 = st.th1;
    sv->th2 = st.th2;
    sv->cm = st.cm;
    sv->sc0 = st.sc0;
    sv->r = r;
    sv->cd = st.cd;
    sv->z = z;
    sv->s = s;
    sv->a = a;
    sv->slope = slope;
    sv->e = e;
    sv->sr = sr;
    sv->hr = hr;
    sv->hrbd = hrbd;
    sv->p1 = p1;
    sv->sc1 = sc1;
    sv->col = col;
    sv->sl2 = ar.sl2;
    sv->sa = ar.sa;
    sv->bend = ar.bend;
    sv->tsl = ar.tsl;
    sv->t1 = st.t1;
    sv->eb = ar.eb;
    sv->teb = ar.teb;
    sv->rt = st.rt;
    sv->khalf = st.khalf;
    sv->u = st.u;
    sv->d1 = st.d1;
    sv->d2 = st.d2;
    sv->sqp = st.sqp;
    sv->scale = st.scale;
  }
  X = std::move(X_new);
  return y;
}

// The per-chunk values that ``_finish`` needs (chunk_loop.py's dict ``keep``).
using Kept = TensorMap;

// The state update's gradient, per layer: from nGY = -dL/dY (G, 2, in_l, L), Y = [cd_c x^T]:
// ngxT = sum_c nGY_c cd_c (G, in_l, L) and ngcd = sum_i nGY[:, :, i] x[:, i] (G, 2, L), added to ``ngcd``.
Tensor state_grads(const Tensor& nGY, const Tensor& cd, const Tensor& x, Tensor& ngcd) {
  const int64_t G = nGY.size(0), I = nGY.size(2), L = nGY.size(3);
  Tensor ngxT = at::empty({G, I, L}, nGY.options());
  if (!ngcd.defined()) ngcd = at::zeros({G, 2, L}, nGY.options());
  Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(nGY.scalar_type(), "state_grads", [&] {
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t *n0 = ptr<scalar_t>(nGY) + g * 2 * I * L, *n1 = n0 + I * L;
      const scalar_t *c0 = ptr<scalar_t>(cd) + g * 2 * L, *c1 = c0 + L, *xp = ptr<scalar_t>(xc) + g * L * I;
      scalar_t *o = ptr<scalar_t>(ngxT) + g * I * L, *t0 = ptr<scalar_t>(ngcd) + g * 2 * L, *t1 = t0 + L;
      for (int64_t i = 0; i < I; ++i) {
        for (int64_t l = 0; l < L; ++l) {
          const scalar_t a = n0[i * L + l], b = n1[i * L + l], xv = xp[l * I + i];
          o[i * L + l] = a * c0[l] + b * c1[l];
          t0[l] += a * xv;
          t1[l] += b * xv;
        }
      }
    }
  });
  return ngxT;
}

// The steps' gradient, per (G, L), from -dL/dcd (ngcd) and -dL/dCm (ngcm): -dL/dtheta'' through the clip to
// -dL/dtheta' (ng_th1), the clip's gradients of ||x_l||^2 and ||d_l||^2 (g_xsq; cf_l = gsq ||x_l||^2, with which
// -dL/dd_l gets -2 cf_l d_l), and (stable) through theta' = theta / (d1 d2) to g_before and g_u (without Q's term).
struct StepGrads {
  Tensor ng_th1, g_before, g_u;
  std::vector<Tensor> g_xsq, cf;
};

StepGrads step_grads(const Chunk& c, const Saved& sv, const Tensor& ngcd, const Tensor& ngcm,
                     c10::optional<double> max_grad_norm, bool stable) {
  const int64_t n = static_cast<int64_t>(sv.X.size());
  const int64_t G = c.theta.size(0), L = c.theta.size(1);
  auto opts = c.theta.options();
  const bool clip = max_grad_norm.has_value();
  StepGrads o;
  o.ng_th1 = at::empty({G, L}, opts);
  if (clip || stable) {
    for (int64_t i = 0; i < n; ++i) o.g_xsq.push_back(at::zeros({G, L}, opts));
  }
  if (clip) {
    for (int64_t i = 0; i < n; ++i) o.cf.push_back(at::empty({G, L}, opts));
  }
  if (stable) {
    o.g_before = at::empty({G, L}, opts);
    o.g_u = at::empty({G, L}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(c.theta.scalar_type(), "step_grads", [&] {
    std::vector<scalar_t> ng2(L);
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t *a0 = ptr<scalar_t>(ngcd) + g * 2 * L, *b0 = ptr<scalar_t>(c.dl2) + g * 2 * L;
      const scalar_t *cm = ptr<scalar_t>(ngcm) + g * L * L, *dd2 = ptr<scalar_t>(c.dd2) + g * L * L;
      for (int64_t l = 0; l < L; ++l) ng2[l] = a0[l] * b0[l] + a0[L + l] * b0[L + l];
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t l = 0; l < L; ++l) ng2[l] += cm[i * L + l] * dd2[i * L + l];
      }
      scalar_t* ng1 = ptr<scalar_t>(o.ng_th1) + g * L;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t row = g * L + l;
        ng1[l] = ng2[l];
        if (!clip) continue;
        const scalar_t scale = ptr<scalar_t>(sv.scale)[row], sqp = ptr<scalar_t>(sv.sqp)[row];
        ng1[l] = ng2[l] * scale;
        // d scale / d sqp = -scale / (2 sqp)
        const scalar_t gsq = scale < 1 ? ng2[l] * ptr<scalar_t>(sv.th2)[row] / sqp * static_cast<scalar_t>(0.5) : 0;
        for (int64_t i = 0; i < n; ++i) {
          ptr<scalar_t>(o.cf[i])[row] = gsq * ptr<scalar_t>(sv.xsq[i])[row];
          ptr<scalar_t>(o.g_xsq[i])[row] = gsq * ptr<scalar_t>(sv.dsq[i])[row];
        }
      }
      if (!stable) continue;
      // theta' = theta / (d1 d2), d1 = 1 + overlap u, d2 = d1 + u
      scalar_t *gb = ptr<scalar_t>(o.g_before) + g * L, *gu = ptr<scalar_t>(o.g_u) + g * L;
      const scalar_t *th1 = ptr<scalar_t>(sv.th1) + g * L, *d1 = ptr<scalar_t>(sv.d1) + g * L,
                     *d2 = ptr<scalar_t>(sv.d2) + g * L, *ov = ptr<scalar_t>(c.ov) + g * L * L;
      for (int64_t l = 0; l < L; ++l) {
        const scalar_t t = ng1[l] * th1[l], g_d2 = t / d2[l];
        gu[l] = g_d2;
        gb[l] = g_d2 + t / d1[l];
      }
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t j = 0; j < L; ++j) gu[j] += ov[i * L + j] * gb[i];
      }
    }
  });
  return o;
}

// Through u = tw kappa / 2 to kappa's terms (stable): adds to g_xsq; for depth 2 returns g_rt (d/d(reach + max|e
// silu''|)), g_tsl (d/d max|silu'|) and grc (dL/dr gets grc r, from |r| in t1).
struct KappaGrads {
  Tensor g_rt, g_tsl, grc;
};

KappaGrads kappa_grads(const Chunk& c, const Saved& sv, const Tensor& g_u, std::vector<Tensor>& g_xsq) {
  const int64_t n = static_cast<int64_t>(sv.X.size());
  const int64_t G = c.theta.size(0), L = c.theta.size(1);
  KappaGrads o;
  if (n == 2) {
    o.g_rt = at::empty({G, L}, c.theta.options());
    o.g_tsl = at::empty({G, L}, c.theta.options());
    o.grc = at::empty({G, L}, c.theta.options());
  }
  AT_DISPATCH_FLOATING_TYPES(c.theta.scalar_type(), "kappa_grads", [&] {
    const scalar_t *gu = ptr<scalar_t>(g_u), *tw = ptr<scalar_t>(c.tw), *x0 = ptr<scalar_t>(sv.xsq[0]);
    scalar_t* gx0 = ptr<scalar_t>(g_xsq[0]);
    for (int64_t row = 0; row < G * L; ++row) {
      const scalar_t gk = gu[row] * tw[row];  // d/d(kappa / 2)
      if (n == 1) {
        gx0[row] += gk;
        continue;
      }
      ptr<scalar_t>(g_xsq[1])[row] += gk;
      gx0[row] += gk * ptr<scalar_t>(sv.rt)[row];
      ptr<scalar_t>(o.g_rt)[row] = gk * x0[row];
      // t1 = sqrt(|r|^2 tsl^2 |k|^2), with a zero gradient where it is 0 (as naive._sqrt)
      const scalar_t t1 = ptr<scalar_t>(sv.t1)[row], tsl = ptr<scalar_t>(sv.tsl)[row];
      const scalar_t dsq1 = ptr<scalar_t>(sv.dsq[1])[row];
      const scalar_t coef = t1 > 0 ? gk / t1 : 0, tsl2 = tsl * tsl;
      ptr<scalar_t>(o.grc)[row] = coef * tsl2 * x0[row];
      ptr<scalar_t>(o.g_tsl)[row] = coef * dsq1 * tsl * x0[row];
      gx0[row] += coef * dsq1 * tsl2 * static_cast<scalar_t>(0.5);
    }
  });
  return o;
}

template <typename T>
T sign(T x) {
  return x > 0 ? T(1) : (x < 0 ? T(-1) : T(0));
}

// Depth 2, the anchor's hidden layer, per row of (G, L, hidden): from -dL/dd_1 (ngd0), dL/de (ge) and dL/dsilu'
// (g_slope); stable: with the curvature's terms (max|.| shares its gradient evenly among ties, as autograd's
// amax) and gzc, the part of dL/dz through silu''(z) (its derivative silu'''); else bend = silu''(z).
struct AnchorGrads {
  Tensor ge, g_slope, gzc, bend;
};

AnchorGrads anchor_grads(const Saved& sv, const Tensor& ngd0, const KappaGrads* kg, bool stable) {
  const Tensor &z = sv.z, &s = sv.s, &a = sv.a, &slope = sv.slope, &e = sv.e;
  const int64_t G = z.size(0), L = z.size(1), K = z.size(2);
  AnchorGrads o;
  o.ge = at::empty_like(z);
  o.g_slope = at::empty_like(z);
  if (stable) {
    o.gzc = at::empty_like(z);
    o.bend = sv.bend;
  } else {
    o.bend = at::empty_like(z);
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "anchor_grads", [&] {
    const scalar_t *zp = ptr<scalar_t>(z), *sp = ptr<scalar_t>(s), *ap = ptr<scalar_t>(a), *lp = ptr<scalar_t>(slope),
                   *ep = ptr<scalar_t>(e), *np = ptr<scalar_t>(ngd0);
    scalar_t *gep = ptr<scalar_t>(o.ge), *gsp = ptr<scalar_t>(o.g_slope);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t l = 0; l < L; ++l) {
        const int64_t row = g * L + l, base = row * K;
        if (!stable) {
          scalar_t* bend = ptr<scalar_t>(o.bend) + base;
          for (int64_t j = 0; j < K; ++j) {
            const scalar_t gd = -np[base + j], sj = sp[base + j], aj = ap[base + j];
            gep[base + j] = gd * lp[base + j];
            gsp[base + j] = gd * ep[base + j];
            bend[j] = sj * aj * (zp[base + j] * (aj - sj) + 2);
          }
          continue;
        }
        const scalar_t *col = ptr<scalar_t>(sv.col) + g * K, *bend = ptr<scalar_t>(sv.bend) + base,
                       *eb = ptr<scalar_t>(sv.eb) + base, *sa = ptr<scalar_t>(sv.sa) + base;
        const scalar_t tsl = ptr<scalar_t>(sv.tsl)[row], teb = ptr<scalar_t>(sv.teb)[row];
        const scalar_t g_rt = ptr<scalar_t>(kg->g_rt)[row], g_tsl = ptr<scalar_t>(kg->g_tsl)[row];
        int64_t n_sl = 0, n_eb = 0;
        _Pragma("omp simd reduction(+ : n_sl, n_eb)")
        for (int64_t j = 0; j < K; ++j) {
          n_sl += std::abs(lp[base + j]) == tsl;
          n_eb += std::abs(eb[j]) == teb;
        }
        const scalar_t share_sl = g_tsl / static_cast<scalar_t>(n_sl), share_eb = g_rt / static_cast<scalar_t>(n_eb);
        scalar_t* gzc = ptr<scalar_t>(o.gzc) + base;
        for (int64_t j = 0; j < K; ++j) {
          const scalar_t gd = -np[base + j], sl = lp[base + j], ev = ep[base + j], ebv = eb[j];
          scalar_t gs = gd * ev + 2 * sl * (g_rt * col[j]);
          if (std::abs(sl) == tsl) gs += sign(sl) * share_sl;
          const scalar_t g_eb = std::abs(ebv) == teb ? sign(ebv) * share_eb : 0;
          gep[base + j] = gd * sl + g_eb * bend[j];
          gsp[base + j] = gs;
          const scalar_t zv = zp[base + j], t = ap[base + j] - sp[base + j];
          gzc[j] = g_eb * ev * sa[j] * (t * (zv * t + 3) - 2 * zv * sa[j]);
        }
      }
    }
  });
  return o;
}

// dL/dz of the anchor (depth 2): g_slope silu''(z) + (gh + 2 h g_xsq1) silu'(z) (+ gzc).
Tensor anchor_gz(const AnchorGrads& ag, const Tensor& gh, const Tensor& h, const Tensor& slope, const Tensor& g_xsq1) {
  const int64_t G = h.size(0), L = h.size(1), K = h.size(2);
  Tensor gz = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "anchor_gz", [&] {
    const scalar_t *gs = ptr<scalar_t>(ag.g_slope), *bend = ptr<scalar_t>(ag.bend), *ghp = ptr<scalar_t>(gh),
                   *hp = ptr<scalar_t>(h), *lp = ptr<scalar_t>(slope);
    const scalar_t* gzc = ag.gzc.defined() ? ptr<scalar_t>(ag.gzc) : nullptr;
    const scalar_t* gx = g_xsq1.defined() ? ptr<scalar_t>(g_xsq1) : nullptr;
    scalar_t* o = ptr<scalar_t>(gz);
    for (int64_t row = 0; row < G * L; ++row) {
      const scalar_t w = gx != nullptr ? 2 * gx[row] : 0;
      for (int64_t j = row * K; j < (row + 1) * K; ++j) {
        scalar_t v = gs[j] * bend[j] + (ghp[j] + w * hp[j]) * lp[j];
        if (gzc != nullptr) v += gzc[j];
        o[j] = v;
      }
    }
  });
  return gz;
}

// The read's hidden layer backward (depth 2): from g_hrbd (G, L, 2 hidden) = dL/d[beta hr, dbe hr]: the part of
// dL/dhr through hrbd (G, L, hidden) and dL/d(beta, dbe) through it (g_bd1, (G, L, 2)).
Tensor read_grads(const Tensor& g_hrbd, const Tensor& bd, const Tensor& hr, Tensor& g_bd1) {
  const int64_t G = hr.size(0), L = hr.size(1), K = hr.size(2);
  Tensor ghr = at::empty_like(hr);
  g_bd1 = at::empty({G, L, 2}, hr.options());
  AT_DISPATCH_FLOATING_TYPES(hr.scalar_type(), "read_grads", [&] {
    const scalar_t *gp = ptr<scalar_t>(g_hrbd), *bp = ptr<scalar_t>(bd), *hp = ptr<scalar_t>(hr);
    scalar_t *o = ptr<scalar_t>(ghr), *gb = ptr<scalar_t>(g_bd1);
    for (int64_t row = 0; row < G * L; ++row) {
      const scalar_t b0 = bp[2 * row], b1 = bp[2 * row + 1];
      const scalar_t *g0 = gp + row * 2 * K, *g1 = g0 + K, *h = hp + row * K;
      scalar_t s0 = 0, s1 = 0;
      _Pragma("omp simd reduction(+ : s0, s1)")
      for (int64_t j = 0; j < K; ++j) {
        o[row * K + j] = g0[j] * b0 + g1[j] * b1;
        s0 += g0[j] * h[j];
        s1 += g1[j] * h[j];
      }
      gb[2 * row] = s0;
      gb[2 * row + 1] = s1;
    }
  });
  return ghr;
}

// In place: ghr becomes dL/dz_read = ghr silu'(z_read) = ghr (sr + hr (1 - sr)).
void read_gz(Tensor& ghr, const Tensor& sr, const Tensor& hr) {
  AT_DISPATCH_FLOATING_TYPES(ghr.scalar_type(), "read_gz", [&] {
    const scalar_t *sp = ptr<scalar_t>(sr), *hp = ptr<scalar_t>(hr);
    scalar_t* o = ptr<scalar_t>(ghr);
    for (int64_t j = 0, m = ghr.numel(); j < m; ++j) o[j] *= sp[j] + hp[j] * (1 - sp[j]);
  });
}

// The chain rule through one chunk_forward: from the gradients of y (G, L, Dv), of the state after the chunk
// (GX) and of Q (undefined unless wanted), the gradient of the state before it. Names with a leading n hold
// minus a gradient (as in chunk_loop.py).
std::vector<Tensor> chunk_backward(const Chunk& c, const Saved& sv, const Tensor& gy, const std::vector<Tensor>& GX,
                                   const Tensor& gQ, c10::optional<double> max_grad_norm, bool stable, Kept& keep) {
  const auto& X = sv.X;
  const auto& Ys = sv.Ys;
  const auto& xs = sv.xs;
  const auto& ds = sv.ds;
  const int64_t n = static_cast<int64_t>(X.size());
  const Tensor& cm = sv.cm;
  const int64_t G = gy.size(0), L = gy.size(1);
  // The state update X' = mix X - Y d.
  std::vector<Tensor> gX, ngxT, ngd;
  Tensor g_mix, ngcd;
  for (int64_t l = 0; l < n; ++l) {
    const int64_t i_l = X[l].size(2), o_l = X[l].size(3);
    gX.push_back(mix_state_backward(c.mix, X[l], GX[l], g_mix));
    Tensor g2 = GX[l].reshape({G, 2 * i_l, o_l});
    Tensor nGY = at::bmm(g2, mT(ds[l])).view({G, 2, i_l, L});
    ngd.push_back(at::bmm(mT(Ys[l].view({G, 2 * i_l, L})), g2));
    ngxT.push_back(state_grads(nGY, sv.cd, xs[l], ngcd));  // (G, in_l, L); ngcd (G, 2, L)
  }
  keep["ngcd"] = ngcd;
  keep["g_mix"] = g_mix;
  // The read, from the last layer back.
  Tensor ngcm, gz = gy;
  if (n == 2) {
    const Tensor &hr = sv.hr, &h = xs[1];
    const int64_t o1 = X[1].size(-1);
    Tensor nsc1 = at::bmm(gy, mT(sv.r));
    ngd[1].baddbmm_(mT(sv.sc1), gy);
    ngcm = at::mul(nsc1, sv.p1);
    Tensor ngp = at::mul(nsc1, cm);
    gX[1].view({G, -1, o1}).baddbmm_(mT(sv.hrbd), gy);
    Tensor g_hrbd = at::bmm(gy, mT(X[1].view({G, -1, o1})));  // (G, L, 2 hidden)
    Tensor g_bd1;
    gz = read_grads(g_hrbd, c.bd, hr, g_bd1).baddbmm_(ngp, h, 1, -1);
    ngxT[1].baddbmm_(mT(hr), ngp);
    read_gz(gz, sv.sr, hr);  // silu'(z_read)
    keep["g_bd1"] = g_bd1;   // d/d(beta, dbe) via hrbd: (G, L, 2)
  }
  Tensor nsc0 = at::bmm(gz, mT(ds[0]));
  ngd[0].baddbmm_(mT(sv.sc0), gz);
  ngcm = ngcm.defined() ? ngcm.addcmul_(nsc0, c.qk) : at::mul(nsc0, c.qk);
  const int64_t o0 = X[0].size(-1);
  gX[0].view({G, -1, o0}).baddbmm_(mT(c.qbd), gz);
  keep["nsc0"] = nsc0;
  keep["ngcm"] = ngcm;
  keep["g_qbd"] = at::bmm(gz, mT(X[0].view({G, -1, o0})));
  // The clip (theta'' = theta' scale(sqp)) and the stable step (theta' = theta / (d1 d2)).
  StepGrads sg = step_grads(c, sv, ngcd, ngcm, max_grad_norm, stable);
  for (size_t i = 0; i < sg.cf.size(); ++i) ngd[i].addcmul_(ds[i], sg.cf[i].unsqueeze(-1), -2);
  keep["ng_th1"] = sg.ng_th1;
  KappaGrads kg;
  if (stable) {
    Tensor g_u = sg.g_u;
    if (gQ.defined()) {
      const Tensor& kh = c.kh;
      g_u = at::add(g_u, vecdot(at::bmm(kh, gQ), kh));
      keep["g_kh"] = at::mul(sv.u.unsqueeze(-1), at::bmm(kh, at::add(gQ, mT(gQ))));
    }
    keep["g_before"] = sg.g_before;
    keep["g_u"] = g_u;
    kg = kappa_grads(c, sv, g_u, sg.g_xsq);
  }
  // The anchor's forward and its gradient factors; the weights' gradients go to gX[l][:, 0] (W_l^T).
  const Tensor& k = c.k;
  Tensor Wt1 = X[0].select(1, 0);
  Tensor gr, gz_;
  if (n == 2) {
    Tensor Wt2 = X[1].select(1, 0), gWt2 = gX[1].select(1, 0);
    const Tensor &h = xs[1], &r = sv.r;
    AnchorGrads ag = anchor_grads(sv, ngd[0], stable ? &kg : nullptr, stable);
    gr = ngd[1].neg_();
    if (stable) {
      Tensor g_col = at::bmm(mT(sv.sl2), kg.g_rt.unsqueeze(-1));  // (G, hidden, 1)
      gWt2.addcmul_(Wt2, g_col, 2);
      gr.addcmul_(r, kg.grc.unsqueeze(-1));
    }
    gr.baddbmm_(ag.ge, Wt2);
    gWt2.baddbmm_(mT(ag.ge), r);
    Tensor gh = at::baddbmm(mT(ngxT[1]).neg(), gr, mT(Wt2));
    gWt2.baddbmm_(mT(h), gr);
    gz_ = anchor_gz(ag, gh, h, sv.slope, sg.g_xsq.empty() ? Tensor() : sg.g_xsq[1]);
  } else {
    gr = ngd[0].neg_();
    gz_ = gr;
  }
  gX[0].select(1, 0).baddbmm_(mT(k), gz_);
  keep["gr"] = gr;
  keep["g_k"] = at::baddbmm(mT(ngxT[0]).neg(), gz_, mT(Wt1));
  if (!sg.g_xsq.empty()) keep["g_xsq0"] = sg.g_xsq[0];
  return gX;
}

// The forward over all chunks. p: ``prepare``'s dict (each (G, N, L, ...)); kh: (G, L, Dk) of the final chunk
// or None; X: the state (``_to_state``). Returns (y (G, N, L, Dv), X after the final chunk, X before it, Q of the
// final chunk or None, the tape for ``backward`` or None, the stacked per-chunk values ``_finish`` reads
// (th2, cm and, when stable, d1, d2, u, khalf: each (G, N, ...)) or an empty dict).
py::tuple forward(const TensorMap& p, const c10::optional<Tensor>& kh, std::vector<Tensor> X,
                  c10::optional<double> max_grad_norm, bool stable, bool keep) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto inputs = std::make_shared<Inputs>(p);
  const int64_t N = inputs->N;
  const bool want_q = stable && kh.has_value() && kh->defined();
  std::shared_ptr<Tape> tape;
  if (keep) {
    tape = std::make_shared<Tape>();
    tape->chunks.resize(N);
    tape->views.reserve(N);
    tape->inputs = inputs;
  }
  std::vector<Tensor> ys, X_a = X;
  ys.reserve(N);
  Tensor Q;
  for (int64_t i = 0; i < N; ++i) {
    const bool final = i == N - 1;
    Chunk c = inputs->chunk(i);
    if (final && want_q) c.kh = *kh;
    if (keep) tape->views.push_back(c);
    X_a = X;
    ys.push_back(chunk_forward(c, X, max_grad_norm, stable, final && want_q ? &Q : nullptr,
                               keep ? &tape->chunks[i] : nullptr));
  }
  TensorMap stacked;
  if (keep) {
    auto stack = [&](Tensor Saved::*field) {
      std::vector<Tensor> all;
      all.reserve(N);
      for (const auto& sv : tape->chunks) all.push_back(sv.*field);
      return at::stack(all, 1);
    };
    stacked["th2"] = stack(&Saved::th2);
    stacked["cm"] = stack(&Saved::cm);
    if (stable) {
      stacked["d1"] = stack(&Saved::d1);
      stacked["d2"] = stack(&Saved::d2);
      stacked["u"] = stack(&Saved::u);
      stacked["khalf"] = stack(&Saved::khalf);
    }
  }
  py::object q_out = Q.defined() ? py::cast(Q) : py::none();
  py::object tape_out = keep ? py::cast(tape) : py::none();
  return py::make_tuple(at::stack(ys, 1), X, X_a, q_out, tape_out, stacked);
}

// The backward over all chunks, in reverse. gy: (G, N, L, Dv); gX: the gradient of the state after the final
// chunk (as X); gA: the gradients of the final chunk's anchor W_l^T (G, in_l, out_l), each possibly None; gQ: of
// its Q, or None. Returns (the gradient of the state before the first chunk, the per-chunk values ``_finish``
// reads, stacked: each (G, N, ...), the final chunk's g_kh or None).
py::tuple backward(const std::shared_ptr<Tape>& tape, const Tensor& gy, std::vector<Tensor> gX,
                   const std::vector<c10::optional<Tensor>>& gA, const c10::optional<Tensor>& gQ,
                   c10::optional<double> max_grad_norm, bool stable) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Inputs& inputs = *tape->inputs;
  const int64_t N = inputs.N;
  Tensor gyt = gy.transpose(0, 1).contiguous();  // (N, G, L, Dv)
  std::vector<Kept> kept(N);
  Tensor g_q = stable && gQ.has_value() && gQ->defined() && gQ->numel() ? *gQ : Tensor();
  for (int64_t i = N - 1; i >= 0; --i) {
    const bool final = i == N - 1;
    const Chunk& c = tape->views[i];
    gX = chunk_backward(c, tape->chunks[i], gyt.select(0, i), gX, final && c.kh.defined() ? g_q : Tensor(),
                        max_grad_norm, stable, kept[i]);
    if (final) {
      for (size_t l = 0; l < gX.size(); ++l) {
        if (l < gA.size() && gA[l].has_value() && gA[l]->defined()) gX[l].select(1, 0).add_(*gA[l]);
      }
    }
    tape->chunks[i] = Saved();  // free the chunk's intermediates as soon as they are used
    tape->views[i] = Chunk();
  }
  TensorMap stacked;
  py::object g_kh = py::none();
  for (const auto& kv : kept[0]) {
    std::vector<Tensor> all;
    all.reserve(N);
    for (auto& kp : kept) {
      auto it = kp.find(kv.first);
      if (it != kp.end()) all.push_back(it->second);
    }
    if (kv.first == "g_kh") continue;
    if (static_cast<int64_t>(all.size()) == N) stacked[kv.first] = at::stack(all, 1);
  }
  auto it = kept[N - 1].find("g_kh");
  if (it != kept[N - 1].end()) g_kh = py::cast(it->second);
  return py::make_tuple(gX, stacked, g_kh);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "titans-lnn: the memory's chunk loop (chunk_loop.py) in C++";
  py::class_<Tape, std::shared_ptr<Tape>>(m, "Tape");
  m.def("forward", &forward, "the forward over all chunks", py::arg("p"), py::arg("kh"), py::arg("X"),
        py::arg("max_grad_norm"), py::arg("stable"), py::arg("keep"));
  m.def("backward", &backward, "the backward over all chunks, in reverse", py::arg("tape"), py::arg("gy"),
        py::arg("gX"), py::arg("gA"), py::arg("gQ"), py::arg("max_grad_norm"), py::arg("stable"));
}
