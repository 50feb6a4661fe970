// The memory's forward without a tape (inference: no gradient wanted), for the depth-2 memory with the stable
// step, from the raw rows (q, k, v, the gates) and the state as the module keeps them: the same values as
// chunked.py's chunking and chunk_loop.py's ``prepare`` + ``chunk_forward``, chunk after chunk, each chunk's inputs
// made inside the loop, everything in buffers allocated once per call and reused by every chunk, the matmuls
// straight into BLAS on raw pointers.
//
// Why: a chunk of the tiny memory is a few dozen small matmul and elementwise steps on (G, 16, 128) numbers, and
// ``chunk_forward`` pays for each an ATen allocation, a view or a dispatch (~130 such events per chunk); the
// per-call preparation in Python (the padding, q k^T, the overlaps, the decay coefficients, ``prepare``, the state
// layout) was another ~0.5 ms per 128-token call. One call here (the tiny memory, 128 tokens, one thread) takes
// ~0.95 ms, where the preparation and the loop took ~1.4 ms; its matmuls run at ~75 GFLOP/s, so most of it is
// arithmetic. Streaming inference (MAC's memory writes one segment of 8 chunks per call) is where that shows.
// tests/test_memory_cpp.py checks this path against the Python loop and the C++ loop with a tape (fp64), and the
// module's inference against its forward with a gradient.

#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "blas.h"
#include "chunk_fused.h"

namespace titans_lnn_chunk_loop {

// How many calls took ``forward_infer`` (tests check that the path they compare ran).
inline int64_t& infer_calls() {
  static int64_t n = 0;
  return n;
}

// Whether ``forward_infer`` may run (the extension's ``use_infer`` sets it: tests compare both ways).
inline bool& infer_enabled() {
  static bool on = true;
  return on;
}

// Whether ``forward_infer`` may split the memories between torch's threads (the extension's ``use_parallel``).
inline bool& parallel_enabled() {
  static bool on = true;
  return on;
}

// Whether ``forward_infer`` takes these (the stable step is the caller's to check): depth 2, fp32/fp64 throughout,
// BLAS found and enabled, Dk = Dv, every tensor's size within BLAS's int.
inline bool infer_applies(const std::vector<Tensor>& inputs, const std::vector<Tensor>& W,
                          const std::vector<Tensor>& S) {
  if (!infer_enabled() || W.size() != 2 || S.size() != 2 || !blas_enabled() || !blas_found()) return false;
  const auto dtype = inputs[0].scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  for (const auto* group : {&inputs, &W, &S}) {
    for (const auto& t : *group) {
      if (!t.device().is_cpu() || t.scalar_type() != dtype || t.numel() > INT_MAX) return false;
    }
  }
  const int64_t Dk = inputs[0].size(2);  // q: (G, T, Dk); W_1 (G, hidden, Dk), W_2 (G, Dv, hidden)
  return W[0].size(2) == Dk && W[1].size(1) == Dk && inputs[2].size(2) == Dk;  // y = q + ...: Dk = Dv
}

// Buffers carved out of one allocation (one ATen allocation per call where each buffer was one): ``carve`` takes
// each buffer's pointer to set and its size in numbers; ``tensor`` is a view of a region that ATen ops work on
// (or that is returned).
template <typename T>
class Arena {
 public:
  void carve(std::initializer_list<std::pair<T**, int64_t>> parts, const at::TensorOptions& opts) {
    int64_t total = 0;
    for (const auto& part : parts) total += part.second;
    all_ = at::empty({total}, opts);
    T* p = all_.data_ptr<T>();
    for (const auto& [slot, n] : parts) {
      *slot = p;
      p += n;
    }
  }
  Tensor tensor(const T* p, at::IntArrayRef shape) const {
    return all_.narrow(0, p - all_.data_ptr<T>(), c10::multiply_integers(shape)).view(shape);
  }

 private:
  Tensor all_;
};

// One chunk's inputs for G memories and L rows, as ``prepare`` makes them (chunk_loop.py), row-major; kh: the
// unit keys (G, L, Dk), for Q.
template <typename T>
struct ChunkRows {
  const T *q, *k, *theta, *qk, *bd, *xsq0, *r0, *qbd, *dd2, *dl2, *mix, *tw, *ov, *knorm, *kh;
};

// What chunked.py computes for all chunks before the loop (``chunks``, ``_chunk_inputs``,
// ``_chunk_coefficients``) and chunk_loop.py's ``prepare``, here for one chunk at a time, into buffers reused by
// every chunk: from the raw rows q, k, v (G, T, D), theta, eta, alpha (G, T), chunk i's L rows, the rows past T
// zero (as chunked.py pads them). ``last``: the row whose state the chunk leaves (L - 1 but in the final chunk).
template <typename T>
class RawChunks {
 public:
  RawChunks(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta,
            const Tensor& alpha, int64_t L)
      : G_(q.size(0)), T_(q.size(1)), D_(q.size(2)), L_(L), q_(q.data_ptr<T>()), k_(k.data_ptr<T>()),
        v_(v.data_ptr<T>()), theta_(theta.data_ptr<T>()), eta_(eta.data_ptr<T>()), alpha_(alpha.data_ptr<T>()) {
    const int64_t G = G_, D = D_, GL = G * L, GLL = GL * L;
    arena_.carve({{&qc_, GL * D}, {&kc_, GL * D}, {&kh_, GL * D}, {&r0_, GL * D},
                  {&lb_, 2 * GL + 2 * GLL},  // lb, le, D_beta, D_E side by side: one exp for the four
                  {&th_, GL}, {&xsq0_, GL}, {&kn_, GL}, {&tw_, GL}, {&qk_, GLL}, {&ov_, GLL}, {&dd2_, GLL},
                  {&bd_, 2 * GL}, {&qbd_, 2 * GL * D}, {&dl2_, 2 * GL}, {&mix_, 4 * G}},
                 q.options());
    le_ = lb_ + GL;
    db_ = le_ + GL;
    de_ = db_ + GLL;
    logs_ = arena_.tensor(lb_, {2 * GL + 2 * GLL});
  }

  ChunkRows<T> rows(int64_t i, int64_t last) {
    const int64_t G = G_, L = L_, D = D_, t0 = i * L, n = std::min(L, T_ - t0);  // n real rows, then padding
    T *qc = qc_, *kc = kc_, *kh = kh_, *r0 = r0_, *th = th_, *lb = lb_, *le = le_, *xsq0 = xsq0_, *kn = kn_,
      *tw = tw_, *qk = qk_, *ov = ov_, *db = db_, *de = de_, *dd2 = dd2_, *bd = bd_, *qbd = qbd_, *dl2 = dl2_,
      *mix = mix_;
    const T tiny = std::numeric_limits<T>::min(), amax = static_cast<T>(1 - 1e-7), one = 1, zero = 0,
            inf = std::numeric_limits<T>::infinity();
    for (int64_t g = 0; g < G; ++g) {
      const int64_t src = g * T_ + t0, dst = g * L;
      for (auto [from, to] : {std::pair<const T*, T*>{q_, qc}, {k_, kc}}) {
        std::memcpy(to + dst * D, from + src * D, sizeof(T) * n * D);
        std::memset(to + (dst + n) * D, 0, sizeof(T) * (L - n) * D);
      }
      T cb = 0, ce = 0;  // the cumulative log-decays (``_chunk_coefficients``)
      for (int64_t l = 0; l < L; ++l) {
        const bool real = l < n;
        const T a = real ? alpha_[src + l] : zero, e = real ? eta_[src + l] : zero;
        th[dst + l] = real ? theta_[src + l] : zero;
        lb[dst + l] = cb += std::log1p(-std::min(a, amax));
        le[dst + l] = ce += std::log(std::max(e, tiny));
        const T* kr = kc + (dst + l) * D;
        const T* vr = v_ + (src + l) * D;
        T* rr = r0 + (dst + l) * D;
        T* hr = kh + (dst + l) * D;
        T sq = 0;
        for (int64_t j = 0; j < D; ++j) {
          sq += kr[j] * kr[j];
          rr[j] = kr[j] - (real ? vr[j] : zero);
        }
        xsq0[dst + l] = sq;
        kn[dst + l] = std::sqrt(sq);
        const T norm = std::max(kn[dst + l], static_cast<T>(1e-12));  // ``unit_rows``
        for (int64_t j = 0; j < D; ++j) hr[j] = kr[j] / norm;
        tw[dst + l] = 2 * th[dst + l] / std::max(1 - e, tiny);
      }
      // log D_beta[t, s] = log beta_t - log beta_s, log D_E alike (s <= t; else -inf: 0 after the exp)
      T *dbg = db + g * L * L, *deg = de + g * L * L;
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t u = 0; u < L; ++u) {
          dbg[t * L + u] = u <= t ? lb[dst + t] - lb[dst + u] : -inf;
          deg[t * L + u] = u <= t ? le[dst + t] - le[dst + u] : -inf;
        }
      }
    }
    // one vectorised exp (torch's, as chunked.py's) for beta, E, D_beta and D_E
    logs_.exp_();
    // The rows of ``prepare``: bd = (beta, DbE = D_beta E), qbd = [beta q, DbE q], the state's decay at row ``last``.
    for (int64_t g = 0; g < G; ++g) {
      const int64_t dst = g * L;
      const T* dbg = db + g * L * L;
      for (int64_t t = 0; t < L; ++t) {
        T acc = 0;
        for (int64_t u = 0; u <= t; ++u) acc += dbg[t * L + u] * le[dst + u];
        bd[(dst + t) * 2] = lb[dst + t];
        bd[(dst + t) * 2 + 1] = acc;
        const T* qr = qc + (dst + t) * D;
        T* o = qbd + (dst + t) * 2 * D;
        for (int64_t j = 0; j < D; ++j) {
          o[j] = qr[j] * lb[dst + t];
          o[D + j] = qr[j] * acc;
        }
      }
      T* m = mix + g * 4;
      m[0] = bd[(dst + last) * 2];
      m[1] = bd[(dst + last) * 2 + 1];
      m[2] = 0;
      m[3] = le[dst + last];
    }
    // q k^T, the unit keys' overlaps tril(cos^2, -1), D = D_beta D_E (times 2, as ``prepare``'s dd2).
    rgemm<T>(G, L, L, D, {qc, L * D, D, false}, {kc, L * D, D, true}, qk, L * L, L, zero, one);
    rgemm<T>(G, L, L, D, {kh, L * D, D, false}, {kh, L * D, D, true}, ov, L * L, L, zero, one);
    rgemm<T>(G, L, L, L, {db, L * L, L, false}, {de, L * L, L, false}, dd2, L * L, L, zero, static_cast<T>(2));
    for (int64_t g = 0; g < G; ++g) {
      T* o = ov + g * L * L;
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t u = 0; u < L; ++u) o[t * L + u] = u < t ? o[t * L + u] * o[t * L + u] : zero;
      }
      for (int64_t u = 0; u < L; ++u) {  // the rows ``last`` of D and D_E, times 2
        dl2[g * 2 * L + u] = dd2[g * L * L + last * L + u];
        dl2[g * 2 * L + L + u] = 2 * de[g * L * L + last * L + u];
      }
    }
    return {qc, kc, th, qk, bd, xsq0, r0, qbd, dd2, dl2, mix, tw, ov, kn, kh};
  }

 private:
  int64_t G_, T_, D_, L_;
  const T *q_, *k_, *v_, *theta_, *eta_, *alpha_;
  T *qc_, *kc_, *kh_, *r0_, *th_, *lb_, *le_, *db_, *de_, *xsq0_, *kn_, *tw_, *qk_, *ov_, *dd2_, *bd_, *qbd_, *dl2_,
      *mix_;
  Arena<T> arena_;
  Tensor logs_;
};

// The forward over the chunks of L rows of q, k, v (G, T, D), theta, eta, alpha (G, T), all contiguous, from the
// state X (per layer (G, 2, in_l, out_l), contiguous). Returns y (G, T, Dv), X after row T - 1, X before the
// final chunk (its anchor), and the final chunk's Q when ``want_q``.
template <typename T>
void forward_infer_typed(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& theta_in,
                         const Tensor& eta_in, const Tensor& alpha_in, int64_t L, const std::vector<Tensor>& X_in,
                         c10::optional<double> max_grad_norm, bool want_q, Tensor& y_out,
                         std::vector<Tensor>& X_out, std::vector<Tensor>& X_before, Tensor& Q_out) {
  const int64_t G = q_in.size(0), Tn = q_in.size(1), Dk = q_in.size(2), N = (Tn + L - 1) / L;
  const int64_t H = X_in[0].size(3), Dv = X_in[1].size(3);
  auto opts = X_in[0].options();
  const bool clip = max_grad_norm.has_value();
  const T half_max = clip ? static_cast<T>(0.5 * *max_grad_norm) : T(0);
  RawChunks<T> chunks(q_in, k_in, v_in, theta_in, eta_in, alpha_in, L);
  // the buffers, reused by every chunk
  const int64_t GLH = G * L * H, S0 = 2 * Dk * H, S1 = 2 * H * Dv;  // S0, S1: one memory's [W; S] per layer
  T *zp, *sp, *hp, *lp, *ep, *d1p, *zrp, *srp, *hrp, *rp, *hbp, *colp, *cmp, *sc0p, *sc1p, *cdp, *Y0p, *Y1p, *rw,
      *st[2][2];
  Arena<T> arena;
  arena.carve({{&zp, GLH}, {&sp, GLH}, {&hp, GLH}, {&lp, GLH}, {&ep, GLH}, {&d1p, GLH}, {&zrp, GLH}, {&srp, GLH},
               {&hrp, GLH}, {&rp, G * L * Dv}, {&hbp, 2 * GLH}, {&colp, G * H}, {&cmp, G * L * L},
               {&sc0p, G * L * L}, {&sc1p, G * L * L}, {&cdp, 2 * G * L}, {&Y0p, G * 2 * Dk * L}, {&Y1p, 2 * GLH},
               {&rw, 9 * G * L},  // per (G, L) row: xsq1, dsq0, dsq1, reach, tsl, teb, u, th1, th2
               {&st[0][0], G * S0}, {&st[0][1], G * S1}, {&st[1][0], G * S0}, {&st[1][1], G * S1}},
              opts);
  Tensor z = arena.tensor(zp, {GLH}), s = arena.tensor(sp, {GLH}), zr = arena.tensor(zrp, {GLH}),
         sr = arena.tensor(srp, {GLH});
  T *xsq1 = rw, *dsq0 = rw + G * L, *dsq1 = rw + 2 * G * L, *reach = rw + 3 * G * L, *tsl = rw + 4 * G * L,
    *teb = rw + 5 * G * L, *u = rw + 6 * G * L, *th1 = rw + 7 * G * L, *th2 = rw + 8 * G * L;
  // y apart from the arena, which it would keep alive (the final chunk's padding rows cut off at the end)
  Tensor y = at::empty({G, N * L, Dv}, opts);
  T* yp = y.data_ptr<T>();
  // the state: double-buffered per layer; chunk i reads cur and writes nxt
  Tensor bufs[2][2];
  for (int b = 0; b < 2; ++b) {
    bufs[b][0] = arena.tensor(st[b][0], {G, 2, Dk, H});
    bufs[b][1] = arena.tensor(st[b][1], {G, 2, H, Dv});
  }
  const T* cur0 = X_in[0].data_ptr<T>();
  const T* cur1 = X_in[1].data_ptr<T>();
  Tensor cur_t0 = X_in[0], cur_t1 = X_in[1];
  const T one = 1, zero = 0, minus = -1;
  for (int64_t i = 0; i < N; ++i) {
    const ChunkRows<T> c = chunks.rows(i, i == N - 1 ? (Tn - 1) % L : L - 1);
    const T *q = c.q, *k = c.k, *theta = c.theta, *qk = c.qk, *bd = c.bd, *xsq0 = c.xsq0, *r0 = c.r0,
            *qbd = c.qbd, *dd2 = c.dd2, *dl2 = c.dl2, *mix = c.mix, *tw = c.tw, *ov = c.ov, *knorm = c.knorm;
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
      if (want_q) {  // Q = kh^T (u kh): the steps taken along each key in the final chunk
        Tensor kh = at::from_blob(const_cast<T*>(c.kh), {G, L, Dk}, opts);
        Q_out = blas_bmm(mT(kh), at::mul(kh, at::from_blob(u, {G, L, 1}, opts)));
      }
    }
    cur_t0 = nxt_t0;
    cur_t1 = nxt_t1;
    cur0 = nxt0;
    cur1 = nxt1;
  }
  X_out = {cur_t0, cur_t1};
  y_out = y.narrow(1, 0, Tn);
}

// ``forward_infer_typed`` from the raw inputs as chunked.py has them (q, k, v (G, T, D); theta, eta, alpha (G, T))
// and the state as the module keeps it (W_l, S_l (G, out_l, in_l)), with the stable step. Returns (y (G, T, Dv),
// W, S after row T - 1, the final chunk's anchor W, its Q), or None where it does not apply (``infer_applies``).
inline py::object forward_infer(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, int64_t chunk,
                               const std::vector<Tensor>& W, const std::vector<Tensor>& S,
                               c10::optional<double> max_grad_norm, bool want_q) {
  if (!infer_applies({q, k, v, theta, eta, alpha}, W, S)) return py::none();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  ++infer_calls();
  std::vector<Tensor> X;  // per layer [W_l^T; S_l^T] (G, 2, in_l, out_l)
  for (size_t l = 0; l < W.size(); ++l) X.push_back(at::stack({mT(W[l]), mT(S[l])}, 1));
  // The G memories are independent: split between torch's threads (one part each; the same values as in one
  // part, each memory's arithmetic being the same calls on the same numbers).
  const int64_t G = q.size(0), parts = parallel_enabled() ? std::min<int64_t>(G, at::get_num_threads()) : 1;
  std::vector<Tensor> ys(parts), Qs(parts);
  std::vector<std::vector<Tensor>> Xo(parts), Xb(parts);
  std::vector<Tensor> raw = {q.contiguous(), k.contiguous(), v.contiguous(), theta.contiguous(), eta.contiguous(),
                             alpha.contiguous()};
  auto run = [&](int64_t p) {
    MklSingleThread mkl_one_thread;  // (in each thread that runs a part)
    const int64_t g0 = G * p / parts, n = G * (p + 1) / parts - g0;
    auto part = [&](const Tensor& t) { return t.narrow(0, g0, n); };
    std::vector<Tensor> Xp;
    for (const auto& x : X) Xp.push_back(part(x));
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "forward_infer", [&] {
      forward_infer_typed<scalar_t>(part(raw[0]), part(raw[1]), part(raw[2]), part(raw[3]), part(raw[4]),
                                    part(raw[5]), chunk, Xp, max_grad_norm, want_q, ys[p], Xo[p], Xb[p], Qs[p]);
    });
  };
  if (parts == 1) {
    run(0);
  } else {
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) run(p);
    });
  }
  auto join = [&](const std::vector<Tensor>& pieces) { return parts == 1 ? pieces[0] : at::cat(pieces, 0); };
  Tensor y = join(ys), Q = want_q ? join(Qs) : Tensor();
  std::vector<Tensor> X_out, X_before;
  for (size_t l = 0; l < X.size(); ++l) {
    std::vector<Tensor> o, b;
    for (int64_t p = 0; p < parts; ++p) {
      o.push_back(Xo[p][l]);
      b.push_back(Xb[p][l]);
    }
    X_out.push_back(join(o));
    X_before.push_back(join(b));
  }
  std::vector<Tensor> W_out, S_out, A_out;
  for (size_t l = 0; l < X.size(); ++l) {
    W_out.push_back(mT(X_out[l].select(1, 0)).contiguous());
    S_out.push_back(mT(X_out[l].select(1, 1)).contiguous());
    A_out.push_back(mT(X_before[l].select(1, 0)).contiguous());
  }
  return py::make_tuple(y, W_out, S_out, A_out, Q);
}

}  // namespace titans_lnn_chunk_loop
