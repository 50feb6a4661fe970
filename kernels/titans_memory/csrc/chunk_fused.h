// Fused elementwise passes of the memory's chunk loop (chunk_loop.cpp): the forward's (and the state decay's
// backward), and the structs they share with it; the backward's are in chunk_fused_backward.h.
// Each pass replaces a chain of small ATen ops (one dispatch and one allocation each, on tensors of a few
// thousand elements) with one loop over contiguous data; the formulas are kernels/titans_memory/chunk_loop.py's
// (``chunk_forward`` and ``chunk_backward``), and tests/test_memory_cpp.py checks the C++ loop against it.
// Shapes: G = B*H memories, L rows per chunk, n = 1 or 2 layers; the state X is per layer [W_l^T; S_l^T]
// (G, 2, in_l, out_l).

#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

namespace titans_lnn_chunk_loop {

using at::Tensor;
using TensorMap = std::map<std::string, Tensor>;

inline Tensor vecdot(const Tensor& a, const Tensor& b, int64_t dim = -1) { return at::mul(a, b).sum(dim); }

inline Tensor mT(const Tensor& t) { return t.transpose(-2, -1); }


// The per-chunk inputs: views of (N, G, L, ...) tensors at chunk i.
struct Chunk {
  Tensor q, k, theta, qk, bd, xsq0, r0, qbd, dd2, dl2, mix;
  Tensor tw, ov, knorm, kh;  // stable only (knorm: depth 2; kh: the final chunk, when Q is wanted)
};

// What ``chunk_backward`` needs from a chunk's forward (``chunk_forward``'s dict sv).
struct Saved {
  std::vector<Tensor> X, Ys, xs, ds, xsq, dsq;
  Tensor th1, th2, cm, sc0, r, cd;
  Tensor z, s, a, slope, e, sr, hr, hrbd, p1, sc1;                    // depth 2
  Tensor col, sl2, sa, bend, tsl, t1, eb, teb, rt, khalf, u, d1, d2;  // stable
  Tensor sqp, scale;                                                   // clip
};

template <typename T>
inline T* ptr(const Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "chunk_loop.cpp: expected a contiguous tensor, got strides ", t.strides());
  return t.data_ptr<T>();
}

// From z (G, L, hidden) and s = sigmoid(z): h = z s, a = 1 - s, slope = silu'(z) = s + h a.
inline void anchor_act(const Tensor& z, const Tensor& s, Tensor& h, Tensor& a, Tensor& slope) {
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

inline AnchorRows anchor_rows(const Tensor& z, const Tensor& s, const Tensor& a, const Tensor& h,
                              const Tensor& slope, const Tensor& e, const Tensor& col, bool stable) {
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

// One memory's Cm = dd2 theta'' (L, L), sc0 = Cm qk and cd = dl2 theta'' (2, L) from its steps theta'' (L).
template <typename T>
inline void cm_rows(const T* dd2, const T* qk, const T* dl2, const T* th2, int64_t L, T* cm, T* sc0, T* cd) {
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t j = 0; j < L; ++j) {
      const T v = dd2[i * L + j] * th2[j];
      cm[i * L + j] = v;
      sc0[i * L + j] = v * qk[i * L + j];
    }
  }
  for (int64_t i = 0; i < 2 * L; ++i) cd[i] = dl2[i] * th2[i % L];
}

// One memory's state decay [W; S] <- mix [W; S]: x0, x1 the two halves (M numbers each), mix (2, 2) row-major.
template <typename T>
inline void mix_rows(const T* m, const T* x0, const T* x1, int64_t M, T* o0, T* o1) {
  for (int64_t j = 0; j < M; ++j) {
    o0[j] = m[0] * x0[j] + m[1] * x1[j];
    o1[j] = m[2] * x0[j] + m[3] * x1[j];
  }
}

inline Steps chunk_steps(const Chunk& c, const std::vector<Tensor>& xsq, const std::vector<Tensor>& dsq,
                         const AnchorRows* ar, c10::optional<double> max_grad_norm, bool stable) {
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
      cm_rows(ptr<scalar_t>(c.dd2) + g * L * L, ptr<scalar_t>(c.qk) + g * L * L, ptr<scalar_t>(c.dl2) + g * 2 * L,
              th2, L, ptr<scalar_t>(o.cm) + g * L * L, ptr<scalar_t>(o.sc0) + g * L * L,
              ptr<scalar_t>(o.cd) + g * 2 * L);
    }
  });
  return o;
}

// ``read_act`` on raw rows: zr, sr (rows, K), bd (rows, 2) -> hr (rows, K), hrbd (rows, 2 K).
template <typename T>
inline void read_rows(const T* zp, const T* sp, const T* bp, int64_t rows, int64_t K, T* hp, T* op) {
  for (int64_t row = 0; row < rows; ++row) {
    const T b0 = bp[2 * row], b1 = bp[2 * row + 1];
    for (int64_t j = 0; j < K; ++j) {
      const T v = zp[row * K + j] * sp[row * K + j];
      hp[row * K + j] = v;
      op[row * 2 * K + j] = v * b0;
      op[row * 2 * K + K + j] = v * b1;
    }
  }
}

// The read's hidden layer: hr = silu(zr) (sr = sigmoid(zr)) and hrbd = [beta hr, dbe hr] (G, L, 2 hidden).
inline void read_act(const Tensor& zr, const Tensor& sr, const Tensor& bd, Tensor& hr, Tensor& hrbd) {
  const int64_t G = zr.size(0), L = zr.size(1), K = zr.size(2);
  hr = at::empty_like(zr);
  hrbd = at::empty({G, L, 2 * K}, zr.options());
  AT_DISPATCH_FLOATING_TYPES(zr.scalar_type(), "read_act", [&] {
    read_rows(ptr<scalar_t>(zr), ptr<scalar_t>(sr), ptr<scalar_t>(bd), G * L, K, ptr<scalar_t>(hr),
              ptr<scalar_t>(hrbd));
  });
}

// The state's decay [W; S] <- mix [W; S] (mix (G, 2, 2), X (G, 2, in, out)): a 2x2 mix of two long rows, which a
// batched matmul with an inner size of 2 does slowly (~25 us here for 2 x 16K numbers).
inline Tensor mix_state(const Tensor& mix, const Tensor& X) {
  const int64_t G = X.size(0), M = X[0][0].numel();
  Tensor out = at::empty_like(X);
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "mix_state", [&] {
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t* x0 = ptr<scalar_t>(X) + g * 2 * M;
      scalar_t* o0 = ptr<scalar_t>(out) + g * 2 * M;
      mix_rows(ptr<scalar_t>(mix) + g * 4, x0, x0 + M, M, o0, o0 + M);
    }
  });
  return out;
}

// Its backward: from GX = dL/d(mix X), returns dL/dX = mix^T GX and adds dL/dmix = GX X^T (G, 2, 2) to g_mix.
inline Tensor mix_state_backward(const Tensor& mix, const Tensor& X, const Tensor& GX, Tensor& g_mix) {
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

}  // namespace titans_lnn_chunk_loop
