// The memory's loop over whole chunks (kernels/titans_memory/chunk_loop.py) in C++: the same per-chunk
// forward (``chunk_forward``) and hand-written backward (``chunk_backward``), with the whole loop over chunks
// in one call, so that no Python runs per chunk. The matmuls go straight to BLAS (blas.h); the elementwise
// chains between them are fused into loops (chunk_fused.h, chunk_fused_backward.h). The Python loop is the reference;
// tests/test_memory_cpp.py checks that both give the same values and gradients in fp64.
//
// Why: a chunk of the tiny memory was ~95 ops forward and ~190 backward on tensors of (G, 16, 128),
// each microseconds of overhead and almost no arithmetic; from Python each op also paid the
// interpreter and the autograd dispatch (issue 12's profile: 22.5% of a training step was Python
// between the ops). Here ~20 compute calls (matmuls mostly, straight to BLAS) run per chunk forward and ~30
// backward, besides the fused loops and their outputs' allocations, below autograd (nothing is recorded: the
// backward is explicit). Python's loop issued 67 and 126 (views not counted; the tiny memory's shapes).
//
// Shapes: G = B*H memories, N chunks, L rows per chunk, n = 1 or 2 layers. The state X is per layer
// [W_l^T; S_l^T] (G, 2, in_l, out_l). The per-chunk inputs (``prepare``'s dict p) arrive as
// (G, N, L, ...) and are laid out once as (N, G, L, ...) so that each chunk is contiguous.

#include <torch/extension.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "blas.h"
#include "chunk_fused.h"
#include "chunk_fused_backward.h"
#include "chunk_infer.h"

namespace {

using namespace titans_lnn_chunk_loop;

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
    c.tw = at_chunk("tw", i);
    c.ov = at_chunk("ov", i);
    c.knorm = at_chunk("knorm", i);
    return c;
  }
};

// The loop's saved intermediates, held by the Python autograd node between forward and backward.
struct Tape {
  std::vector<Saved> chunks;
  std::vector<Chunk> views;  // each chunk's inputs (views of ``inputs``), as the forward used them
  std::shared_ptr<Inputs> inputs;
};

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
    z = blas_bmm(k, Wt1);     // (G, L, hidden)
    s = at::sigmoid(z);
    anchor_act(z, s, h, a, slope);
    r = blas_baddbmm(c.r0, h, Wt2);  // M(k) - v: (G, L, Dv)
    e = blas_bmm(r, mT(Wt2));        // W_2^T r
    if (stable) col = vecdot(Wt2, Wt2).contiguous();  // ||W_2[:, j]||^2: (G, hidden)
    ar = anchor_rows(z, s, a, h, slope, e, col, stable);
    ds = {ar.d1, r};
    xs = {k, h};
    xsq.push_back(ar.xsq1);
    dsq = {ar.dsq0, vecdot(r, r)};
  } else {
    r = blas_baddbmm(c.r0, k, Wt1);
    ds = {r};
    xs = {k};
    dsq = {vecdot(r, r)};
  }
  Steps st = chunk_steps(c, xsq, dsq, n == 2 ? &ar : nullptr, max_grad_norm, stable);
  // Read y_t = M_{W_t}(q_t): the base (beta_t W + dbe_t S) q_t minus the chunk's writes up to t.
  const int64_t o0 = X[0].size(-1);
  Tensor zr = blas_acc(blas_bmm(c.qbd, X[0].view({G, -1, o0})), st.sc0, ds[0], 1, -1);
  Tensor y, sr, hr, hrbd, p1, sc1;
  if (n == 2) {
    sr = at::sigmoid(zr);
    read_act(zr, sr, c.bd, hr, hrbd);  // [beta hr, dbe hr]: (G, L, 2 hidden)
    p1 = blas_bmm(hr, mT(h));           // (G, L, L)
    sc1 = at::mul(st.cm, p1);
    y = blas_acc(blas_baddbmm(c.q, hrbd, X[1].view({G, -1, X[1].size(-1)})), sc1, r, 1, -1);
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
    X_new.push_back(blas_acc(Xn, Y.view({G, 2 * i_l, L}), ds[l], 1, -1).view({G, 2, i_l, o_l}));
    Ys.push_back(Y);
  }
  if (Q != nullptr) *Q = blas_bmm(mT(c.kh), at::mul(st.u.unsqueeze(-1), c.kh));
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
    Tensor nGY = blas_bmm(g2, mT(ds[l])).view({G, 2, i_l, L});
    ngd.push_back(blas_bmm(mT(Ys[l].view({G, 2 * i_l, L})), g2));
    ngxT.push_back(state_grads(nGY, sv.cd, xs[l], ngcd));  // (G, in_l, L); ngcd (G, 2, L)
  }
  keep["ngcd"] = ngcd;
  keep["g_mix"] = g_mix;
  // The read, from the last layer back.
  Tensor ngcm, gz = gy;
  if (n == 2) {
    const Tensor &hr = sv.hr, &h = xs[1];
    const int64_t o1 = X[1].size(-1);
    Tensor nsc1 = blas_bmm(gy, mT(sv.r));
    blas_acc(ngd[1], mT(sv.sc1), gy);
    ngcm = at::mul(nsc1, sv.p1);
    Tensor ngp = at::mul(nsc1, cm);
    blas_acc(gX[1].view({G, -1, o1}), mT(sv.hrbd), gy);
    Tensor g_hrbd = blas_bmm(gy, mT(X[1].view({G, -1, o1})));  // (G, L, 2 hidden)
    Tensor g_bd1;
    gz = blas_acc(read_grads(g_hrbd, c.bd, hr, g_bd1), ngp, h, 1, -1);
    blas_acc(ngxT[1], mT(hr), ngp);
    read_gz(gz, sv.sr, hr);  // silu'(z_read)
    keep["g_bd1"] = g_bd1;   // d/d(beta, dbe) via hrbd: (G, L, 2)
  }
  Tensor nsc0 = blas_bmm(gz, mT(ds[0]));
  blas_acc(ngd[0], mT(sv.sc0), gz);
  ngcm = ngcm.defined() ? ngcm.addcmul_(nsc0, c.qk) : at::mul(nsc0, c.qk);
  const int64_t o0 = X[0].size(-1);
  blas_acc(gX[0].view({G, -1, o0}), mT(c.qbd), gz);
  keep["nsc0"] = nsc0;
  keep["ngcm"] = ngcm;
  keep["g_qbd"] = blas_bmm(gz, mT(X[0].view({G, -1, o0})));
  // The clip (theta'' = theta' scale(sqp)) and the stable step (theta' = theta / (d1 d2)).
  StepGrads sg = step_grads(c, sv, ngcd, ngcm, max_grad_norm, stable);
  for (size_t i = 0; i < sg.cf.size(); ++i) ngd[i].addcmul_(ds[i], sg.cf[i].unsqueeze(-1), -2);
  keep["ng_th1"] = sg.ng_th1;
  KappaGrads kg;
  if (stable) {
    Tensor g_u = sg.g_u;
    if (gQ.defined()) {
      const Tensor& kh = c.kh;
      g_u = at::add(g_u, vecdot(blas_bmm(kh, gQ), kh));
      keep["g_kh"] = at::mul(sv.u.unsqueeze(-1), blas_bmm(kh, at::add(gQ, mT(gQ))));
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
      Tensor g_col = blas_bmm(mT(sv.sl2), kg.g_rt.unsqueeze(-1));  // (G, hidden, 1)
      gWt2.addcmul_(Wt2, g_col, 2);
      gr.addcmul_(r, kg.grc.unsqueeze(-1));
    }
    blas_acc(gr, ag.ge, Wt2);
    blas_acc(gWt2, mT(ag.ge), r);
    Tensor gh = blas_baddbmm(mT(ngxT[1]), gr, mT(Wt2), -1, 1);
    blas_acc(gWt2, mT(h), gr);
    gz_ = anchor_gz(ag, gh, h, sv.slope, sg.g_xsq.empty() ? Tensor() : sg.g_xsq[1]);
  } else {
    gr = ngd[0].neg_();
    gz_ = gr;
  }
  blas_acc(gX[0].select(1, 0), mT(k), gz_);
  keep["gr"] = gr;
  keep["g_k"] = blas_baddbmm(mT(ngxT[0]), gz_, mT(Wt1), -1, 1);
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
  MklSingleThread mkl_one_thread;  // (blas.h)
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
  MklSingleThread mkl_one_thread;  // (blas.h)
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
  // An on/off switch of the extension (tests run both ways and compare): use_<name>(on) -> the previous setting.
  auto def_switch = [&m](const char* name, bool& (*flag)(), const char* doc) {
    m.def(
        name,
        [flag](bool on) {
          const bool was = flag();
          flag() = on;
          return was;
        },
        doc, py::arg("on"));
  };
  def_switch("use_blas", &blas_enabled,
             "call BLAS directly for the loop's matmuls (when found; else ATen); returns the previous setting");
  m.def("blas_found", &blas_found, "whether the gemm routines were found in torch's BLAS");
  def_switch("use_infer", &infer_enabled,
             "let forward_infer run (chunk_infer.h; off: it returns None and chunked.py takes the loop); returns "
             "the previous setting");
  def_switch("use_parallel", &parallel_enabled,
             "let forward_infer split the memories between torch's threads; returns the previous setting");
  m.def("infer_calls", [] { return infer_calls(); }, "how many forwards ran through chunk_infer.h");
  m.def("forward_infer", &forward_infer, "the forward without a tape from the raw inputs (chunk_infer.h), or None",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("theta"), py::arg("eta"), py::arg("alpha"),
        py::arg("chunk"), py::arg("W"), py::arg("S"), py::arg("max_grad_norm"), py::arg("want_q"));
  py::class_<Tape, std::shared_ptr<Tape>>(m, "Tape");
  m.def("forward", &forward, "the forward over all chunks", py::arg("p"), py::arg("kh"), py::arg("X"),
        py::arg("max_grad_norm"), py::arg("stable"), py::arg("keep"));
  m.def("backward", &backward, "the backward over all chunks, in reverse", py::arg("tape"), py::arg("gy"),
        py::arg("gX"), py::arg("gA"), py::arg("gQ"), py::arg("max_grad_norm"), py::arg("stable"));
}
