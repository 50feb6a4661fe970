// Fused elementwise passes of the memory's chunk loop (chunk_loop.cpp): the backward's (``chunk_backward`` in
// kernels/titans_memory/chunk_loop.py, written out per chunk). Names with a leading n hold minus a gradient.

#pragma once

#include <vector>

#include "chunk_fused.h"

namespace titans_lnn_chunk_loop {

// The state update's gradient, per layer: from nGY = -dL/dY (G, 2, in_l, L), Y = [cd_c x^T]:
// ngxT = sum_c nGY_c cd_c (G, in_l, L) and ngcd = sum_i nGY[:, :, i] x[:, i] (G, 2, L), added to ``ngcd``.
inline Tensor state_grads(const Tensor& nGY, const Tensor& cd, const Tensor& x, Tensor& ngcd) {
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

inline StepGrads step_grads(const Chunk& c, const Saved& sv, const Tensor& ngcd, const Tensor& ngcm,
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

inline KappaGrads kappa_grads(const Chunk& c, const Saved& sv, const Tensor& g_u, std::vector<Tensor>& g_xsq) {
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
inline T sign(T x) {
  return x > 0 ? T(1) : (x < 0 ? T(-1) : T(0));
}

// Depth 2, the anchor's hidden layer, per row of (G, L, hidden): from -dL/dd_1 (ngd0), dL/de (ge) and dL/dsilu'
// (g_slope); stable: with the curvature's terms (max|.| shares its gradient evenly among ties, as autograd's
// amax) and gzc, the part of dL/dz through silu''(z) (its derivative silu'''); else bend = silu''(z).
struct AnchorGrads {
  Tensor ge, g_slope, gzc, bend;
};

inline AnchorGrads anchor_grads(const Saved& sv, const Tensor& ngd0, const KappaGrads* kg, bool stable) {
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
inline Tensor anchor_gz(const AnchorGrads& ag, const Tensor& gh, const Tensor& h, const Tensor& slope,
                        const Tensor& g_xsq1) {
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
inline Tensor read_grads(const Tensor& g_hrbd, const Tensor& bd, const Tensor& hr, Tensor& g_bd1) {
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
inline void read_gz(Tensor& ghr, const Tensor& sr, const Tensor& hr) {
  AT_DISPATCH_FLOATING_TYPES(ghr.scalar_type(), "read_gz", [&] {
    const scalar_t *sp = ptr<scalar_t>(sr), *hp = ptr<scalar_t>(hr);
    scalar_t* o = ptr<scalar_t>(ghr);
    for (int64_t j = 0, m = ghr.numel(); j < m; ++j) o[j] *= sp[j] + hp[j] * (1 - sp[j]);
  });
}

}  // namespace titans_lnn_chunk_loop
