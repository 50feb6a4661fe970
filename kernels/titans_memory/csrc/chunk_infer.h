// The forward over the chunks without a tape (inference: no gradient wanted), for the depth-2 memory with the
// stable step: the same values as chunk_loop.cpp's ``chunk_forward`` chunk after chunk, computed in buffers
// allocated once per call and reused by every chunk, the matmuls straight into BLAS on raw pointers.
//
// Why: a chunk of the tiny memory is a few dozen small matmul and elementwise steps on (G, 16, 128) numbers, and
// ``chunk_forward`` pays for each an ATen allocation, a view or a dispatch (~130 such events per chunk). Here the
// loop over one 128-token call of the tiny memory takes 0.86 ms instead of 1.15 (one thread); streaming inference
// (MAC's memory writes one segment of 8 chunks per call) is where that shows. tests/test_memory_cpp.py checks this
// path against the Python loop and against the C++ loop with a tape.

#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "blas.h"
#include "chunk_fused.h"

namespace titans_lnn_chunk_loop {

// How many calls took ``forward_infer`` (tests check that the path they compare ran).
inline int64_t& infer_calls() {
  static int64_t n = 0;
  return n;
}

// Whether ``forward`` may take ``forward_infer`` (the extension's ``use_infer`` sets it: tests compare both).
inline bool& infer_enabled() {
  static bool on = true;
  return on;
}

// Whether ``forward_infer`` takes these: depth 2, the stable step, fp32/fp64, BLAS found and enabled, Dk = Dv,
// contiguous states, every matmul size within BLAS's int.
inline bool infer_applies(const std::vector<Tensor>& X, int64_t d_q, bool stable) {
  if (!infer_enabled() || X.size() != 2 || !stable || !blas_enabled() || !blas_found()) return false;
  if (d_q != X[1].size(3)) return false;  // y = q + ...: the residual needs Dk = Dv
  const auto dtype = X[0].scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  for (const auto& x : X) {
    if (!x.is_contiguous() || x.scalar_type() != dtype || x.size(2) * 2 > INT_MAX || x.size(3) > INT_MAX) return false;
  }
  return true;
}

// The forward over the N chunks of ``t`` (``Inputs::t``: (N, G, L, ...) contiguous), from the state X (per layer
// (G, 2, in_l, out_l), contiguous). Returns y (G, N, L, Dv), X after the final chunk, X before it, and Q of the
// final chunk when ``kh`` (G, L, Dk) is defined.
template <typename T>
void forward_infer_typed(const TensorMap& t, int64_t N, const Tensor& kh, const std::vector<Tensor>& X_in,
                         c10::optional<double> max_grad_norm, Tensor& y_out, std::vector<Tensor>& X_out,
                         std::vector<Tensor>& X_before, Tensor& Q_out) {
  const Tensor& kt = t.at("k");
  const int64_t G = kt.size(1), L = kt.size(2), Dk = kt.size(3);
  const int64_t H = X_in[0].size(3), Dv = X_in[1].size(3);
  auto opts = X_in[0].options();
  const bool clip = max_grad_norm.has_value();
  const T half_max = clip ? static_cast<T>(0.5 * *max_grad_norm) : T(0);
  // per-chunk inputs: base pointers and the size of one chunk's block (G memories)
  auto in = [&](const char* name) { return t.at(name).template data_ptr<T>(); };
  const T *q_all = in("q"), *k_all = in("k"), *theta_all = in("theta"), *qk_all = in("qk"), *bd_all = in("bd"),
          *xsq0_all = in("xsq0"), *r0_all = in("r0"), *qbd_all = in("qbd"), *dd2_all = in("dd2"),
          *dl2_all = in("dl2"), *mix_all = in("mix"), *tw_all = in("tw"), *ov_all = in("ov"),
          *knorm_all = in("knorm");
  // the buffers, reused by every chunk
  auto buf = [&](std::initializer_list<int64_t> shape) { return at::empty(shape, opts); };
  Tensor z = buf({G, L, H}), s = buf({G, L, H}), h = buf({G, L, H}), slope = buf({G, L, H}), e = buf({G, L, H}),
         d1 = buf({G, L, H}), r = buf({G, L, Dv}), zr = buf({G, L, H}), sr = buf({G, L, H}), hr = buf({G, L, H}),
         hrbd = buf({G, L, 2 * H}), col = buf({G, H}), rows = buf({9, G, L}), cm = buf({G, L, L}),
         sc0 = buf({G, L, L}), sc1 = buf({G, L, L}), cd = buf({G, 2, L}), Y0 = buf({G, 2, Dk, L}),
         Y1 = buf({G, 2, H, L});
  T *zp = z.data_ptr<T>(), *sp = s.data_ptr<T>(), *hp = h.data_ptr<T>(), *lp = slope.data_ptr<T>(),
    *ep = e.data_ptr<T>(), *d1p = d1.data_ptr<T>(), *rp = r.data_ptr<T>(), *zrp = zr.data_ptr<T>(),
    *srp = sr.data_ptr<T>(), *hrp = hr.data_ptr<T>(), *hbp = hrbd.data_ptr<T>(), *colp = col.data_ptr<T>(),
    *cmp = cm.data_ptr<T>(), *sc0p = sc0.data_ptr<T>(), *sc1p = sc1.data_ptr<T>(), *cdp = cd.data_ptr<T>(),
    *Y0p = Y0.data_ptr<T>(), *Y1p = Y1.data_ptr<T>();
  T* rw = rows.data_ptr<T>();  // per (G, L) row: xsq1, dsq0, dsq1, reach, tsl, teb, u, th1, th2
  T *xsq1 = rw, *dsq0 = rw + G * L, *dsq1 = rw + 2 * G * L, *reach = rw + 3 * G * L, *tsl = rw + 4 * G * L,
    *teb = rw + 5 * G * L, *u = rw + 6 * G * L, *th1 = rw + 7 * G * L, *th2 = rw + 8 * G * L;
  Tensor y = at::empty({G, N, L, Dv}, opts);
  T* yp = y.data_ptr<T>();
  // the state: double-buffered per layer; chunk i reads cur and writes nxt
  const int64_t S0 = 2 * Dk * H, S1 = 2 * H * Dv;  // one memory's [W; S] per layer
  Tensor bufs[2][2] = {{buf({G, 2, Dk, H}), buf({G, 2, H, Dv})}, {buf({G, 2, Dk, H}), buf({G, 2, H, Dv})}};
  const T* cur0 = X_in[0].data_ptr<T>();
  const T* cur1 = X_in[1].data_ptr<T>();
  Tensor cur_t0 = X_in[0], cur_t1 = X_in[1];
  const T one = 1, zero = 0, minus = -1;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t o = i * G;  // chunk i's first memory in the (N, G, ...) inputs
    const T *q = q_all + o * L * Dk, *k = k_all + o * L * Dk, *theta = theta_all + o * L, *qk = qk_all + o * L * L,
            *bd = bd_all + o * L * 2, *xsq0 = xsq0_all + o * L, *r0 = r0_all + o * L * Dv,
            *qbd = qbd_all + o * L * 2 * Dk, *dd2 = dd2_all + o * L * L, *dl2 = dl2_all + o * 2 * L,
            *mix = mix_all + o * 4, *tw = tw_all + o * L, *ov = ov_all + o * L * L, *knorm = knorm_all + o * L;
    Tensor& nxt_t0 = bufs[i % 2][0];
    Tensor& nxt_t1 = bufs[i % 2][1];
    T *nxt0 = nxt_t0.data_ptr<T>(), *nxt1 = nxt_t1.data_ptr<T>();
    // The anchor: z = k W_1^T, h = silu(z), r = (k - v) + h W_2^T, e = r W_2 (W_l^T = X_l[:, 0]).
    rgemm<T>(G, L, H, Dk, {k, L * Dk, Dk, false}, {cur0, S0, H, false}, zp, L * H, H, zero, one);
    at::sigmoid_out(s, z);
    for (int64_t j = 0, m = G * L * H; j < m; ++j) {
      const T hv = zp[j] * sp[j];
      hp[j] = hv;
      lp[j] = sp[j] + hv * (1 - sp[j]);
    }
    std::memcpy(rp, r0, sizeof(T) * G * L * Dv);
    rgemm<T>(G, L, Dv, H, {hp, L * H, H, false}, {cur1, S1, Dv, false}, rp, L * Dv, Dv, one, one);
    rgemm<T>(G, L, H, Dv, {rp, L * Dv, Dv, false}, {cur1, S1, Dv, true}, ep, L * H, H, zero, one);
    for (int64_t g = 0; g < G; ++g) {  // ||W_2[:, j]||^2 (W_2^T = X_1[g, 0]: hidden x Dv)
      for (int64_t j = 0; j < H; ++j) {
        const T* w = cur1 + g * S1 + j * Dv;
        T acc = 0;
        _Pragma("omp simd reduction(+ : acc)")
        for (int64_t c = 0; c < Dv; ++c) acc += w[c] * w[c];
        colp[g * H + j] = acc;
      }
    }
    // Per row (``anchor_rows``): d_1 = e silu'(z), ||h||^2, ||d_1||^2, ||r||^2 and the curvature's terms.
    for (int64_t g = 0; g < G; ++g) {
      const T* c = colp + g * H;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t row = g * L + l, base = row * H;
        T sx = 0, sd = 0, rc = 0, mt = 0, me = 0;
        _Pragma("omp simd reduction(+ : sx, sd, rc) reduction(max : mt, me)")
        for (int64_t j = 0; j < H; ++j) {
          const T sl = lp[base + j], sv = sp[base + j], av = 1 - sv, zv = zp[base + j], ev = ep[base + j];
          const T d = ev * sl;
          d1p[base + j] = d;
          sx += hp[base + j] * hp[base + j];
          sd += d * d;
          const T sav = sv * av;
          const T ebv = ev * (sav * (zv * (av - sv) + 2));
          rc += sl * sl * c[j];
          mt = std::abs(sl) > mt ? std::abs(sl) : mt;
          me = std::abs(ebv) > me ? std::abs(ebv) : me;
        }
        xsq1[row] = sx;
        dsq0[row] = sd;
        reach[row] = rc;
        tsl[row] = mt;
        teb[row] = me;
        T sr2 = 0;
        const T* rr = rp + row * Dv;
        _Pragma("omp simd reduction(+ : sr2)")
        for (int64_t j = 0; j < Dv; ++j) sr2 += rr[j] * rr[j];
        dsq1[row] = sr2;
      }
    }
    // The steps (``chunk_steps``): kappa / 2, u, theta' = theta / (d1 d2), the clip, then Cm, sc0 = Cm qk, cd.
    for (int64_t g = 0; g < G; ++g) {
      T *ug = u + g * L, *t1g = th1 + g * L, *t2g = th2 + g * L;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t row = g * L + l;
        const T t1 = std::sqrt(dsq1[row]) * tsl[row] * knorm[row];
        const T rt = reach[row] + teb[row];
        const T kh2 = (xsq1[row] + t1) + xsq0[row] * rt;
        ug[l] = tw[row] * kh2;
      }
      const T* ovg = ov + g * L * L;
      for (int64_t l = 0; l < L; ++l) {
        T acc = 0;
        for (int64_t j = 0; j < L; ++j) acc += ovg[l * L + j] * ug[j];
        const T e1 = acc + 1, e2 = e1 + ug[l];
        t1g[l] = theta[g * L + l] / (e1 * e2);
      }
      for (int64_t l = 0; l < L; ++l) {
        const int64_t row = g * L + l;
        if (clip) {
          const T sqp = dsq0[row] * xsq0[row] + dsq1[row] * xsq1[row];
          t2g[l] = t1g[l] * std::min<T>(half_max / std::sqrt(sqp), 1);
        } else {
          t2g[l] = t1g[l];
        }
      }
      cm_rows(dd2 + g * L * L, qk + g * L * L, dl2 + g * 2 * L, t2g, L, cmp + g * L * L, sc0p + g * L * L,
              cdp + g * 2 * L);
    }
    // The read: zr = [beta q, dbe q] [W_1; S_1]^T - sc0 d_1, hr = silu(zr), y = q + [beta hr, dbe hr] [W_2; S_2]^T
    // - (Cm (hr h^T)) r.
    rgemm<T>(G, L, H, 2 * Dk, {qbd, L * 2 * Dk, 2 * Dk, false}, {cur0, S0, H, false}, zrp, L * H, H, zero, one);
    rgemm<T>(G, L, H, L, {sc0p, L * L, L, false}, {d1p, L * H, H, false}, zrp, L * H, H, one, minus);
    at::sigmoid_out(sr, zr);
    read_rows(zrp, srp, bd, G * L, H, hrp, hbp);
    rgemm<T>(G, L, L, H, {hrp, L * H, H, false}, {hp, L * H, H, true}, sc1p, L * L, L, zero, one);  // p1
    for (int64_t j = 0, m = G * L * L; j < m; ++j) sc1p[j] *= cmp[j];
    T* yi = yp + i * L * Dv;  // memory g's rows of chunk i: yi + g * N * L * Dv
    for (int64_t g = 0; g < G; ++g) std::memcpy(yi + g * N * L * Dv, q + g * L * Dk, sizeof(T) * L * Dv);
    rgemm<T>(G, L, Dv, 2 * H, {hbp, L * 2 * H, 2 * H, false}, {cur1, S1, Dv, false}, yi, N * L * Dv, Dv, one, one);
    rgemm<T>(G, L, Dv, L, {sc1p, L * L, L, false}, {rp, L * Dv, Dv, false}, yi, N * L * Dv, Dv, one, minus);
    // The state after row ``last``: [W; S]^T <- mix [W; S]^T - Y d, Y = [cd x]^T per layer (x: k, h; d: d_1, r).
    const T* xs[2] = {k, hp};
    const int64_t ins[2] = {Dk, H}, outs[2] = {H, Dv}, sizes[2] = {S0, S1};
    T* Ys[2] = {Y0p, Y1p};
    const T* curs[2] = {cur0, cur1};
    T* nxts[2] = {nxt0, nxt1};
    const T* ds[2] = {d1p, rp};
    for (int64_t layer = 0; layer < 2; ++layer) {
      const int64_t in_l = ins[layer], out_l = outs[layer], M = sizes[layer] / 2;
      for (int64_t g = 0; g < G; ++g) {
        const T* x = xs[layer] + g * L * in_l;
        const T* cdg = cdp + g * 2 * L;
        T* Y = Ys[layer] + g * 2 * in_l * L;
        for (int64_t half = 0; half < 2; ++half) {
          for (int64_t a = 0; a < in_l; ++a) {
            for (int64_t l = 0; l < L; ++l) Y[(half * in_l + a) * L + l] = x[l * in_l + a] * cdg[half * L + l];
          }
        }
        const T* x0 = curs[layer] + g * 2 * M;
        T* o0 = nxts[layer] + g * 2 * M;
        mix_rows(mix + g * 4, x0, x0 + M, M, o0, o0 + M);
      }
      rgemm<T>(G, 2 * in_l, out_l, L, {Ys[layer], 2 * in_l * L, L, false}, {ds[layer], L * out_l, out_l, false},
               nxts[layer], 2 * M, out_l, one, minus);
    }
    if (i == N - 1) {
      X_before = {cur_t0, cur_t1};
      if (kh.defined()) {  // Q = kh^T (u kh): the steps taken along each key in the final chunk
        Tensor ukh = at::mul(kh, at::from_blob(u, {G, L, 1}, opts));
        Q_out = blas_bmm(mT(kh), ukh);
      }
    }
    cur_t0 = nxt_t0;
    cur_t1 = nxt_t1;
    cur0 = nxt0;
    cur1 = nxt1;
  }
  X_out = {cur_t0, cur_t1};
  y_out = y;
}

inline void forward_infer(const TensorMap& t, int64_t N, const Tensor& kh, const std::vector<Tensor>& X,
                          c10::optional<double> max_grad_norm, Tensor& y, std::vector<Tensor>& X_out,
                          std::vector<Tensor>& X_before, Tensor& Q) {
  ++infer_calls();
  AT_DISPATCH_FLOATING_TYPES(X[0].scalar_type(), "forward_infer", [&] {
    forward_infer_typed<scalar_t>(t, N, kh, X, max_grad_norm, y, X_out, X_before, Q);
  });
}

}  // namespace titans_lnn_chunk_loop
