// Batched matmuls of the memory's chunk loop (chunk_loop.cpp) straight into BLAS: one ?gemm_ call per
// memory, on the tensors' own memory, written into a preallocated output or accumulated in place.
//
// Why: the loop's matmuls are tiny ((2, 16, 128) x (2, 128, 128) in the tiny memory: ~0.5 MFLOP), and each
// at::bmm / baddbmm_ paid the dispatcher, its shape checks and an output allocation before reaching the same
// BLAS call, ~3x the arithmetic's time. The gemm routines are found at run time in the BLAS that torch
// itself loaded (libtorch_cpu: MKL on x86 wheels); where they are not found, where a dtype is not fp32/fp64
// or a matrix has no unit stride in its last two dims, the ATen op runs instead (the same result).
//
// Row-major C (M x N) = A (M x K) B (K x N) is column-major C^T = B^T A^T: a row-major matrix with leading
// dimension ld is, read column-major, its transpose with that ld ("N"); a column-major one ("T").

#pragma once

#include <dlfcn.h>
#include <torch/extension.h>

#include <climits>

namespace titans_lnn_chunk_loop {

using at::Tensor;

using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                         const int*, const double*, const int*, const double*, double*, const int*);

// A symbol of the torch CPU library already loaded (no new library is opened), or nullptr.
inline void* torch_cpu_symbol(const char* name) {
  for (const char* lib : {"libtorch_cpu.so", "libtorch_cpu.dylib"}) {
    void* handle = dlopen(lib, RTLD_LAZY | RTLD_NOLOAD);
    if (handle == nullptr) continue;
    if (void* sym = dlsym(handle, name)) return sym;
  }
  return nullptr;
}

struct Blas {
  sgemm_t sgemm = nullptr;
  dgemm_t dgemm = nullptr;

  Blas() {
    sgemm = reinterpret_cast<sgemm_t>(torch_cpu_symbol("sgemm_"));
    dgemm = reinterpret_cast<dgemm_t>(torch_cpu_symbol("dgemm_"));
    if (sgemm == nullptr || dgemm == nullptr) {  // both or neither
      sgemm = nullptr;
      dgemm = nullptr;
    }
  }
};

inline const Blas& blas() {
  static const Blas b;
  return b;
}

inline bool blas_found() { return blas().sgemm != nullptr; }

// MKL's threads for the calling thread only, while it lives (MKL_Set_Num_Threads_Local, found at run time in the
// MKL that torch carries; absent, nothing is set): the loop's matmuls are far too small to share between threads
// (with 2 torch threads MKL split them, and its hand-offs made the memory's loop ~20% slower than on one).
class MklSingleThread {
 public:
  MklSingleThread() : old_(set(1)) {}
  ~MklSingleThread() {
    if (old_ >= 0) set(old_);
  }

 private:
  static int set(int n) {
    using fn_t = int (*)(int);
    static const fn_t fn = reinterpret_cast<fn_t>(torch_cpu_symbol("MKL_Set_Num_Threads_Local"));
    return fn == nullptr ? -1 : fn(n);
  }
  int old_;
};

// Whether the loop calls BLAS directly (when found) or the ATen ops: the extension's ``use_blas`` sets it
// (tests run the loop both ways and compare).
inline bool& blas_enabled() {
  static bool on = true;
  return on;
}

// A matrix view (the last two dims of a 3-D tensor) as BLAS sees it: transposed flag and leading dimension,
// or false when neither of its last two strides is 1 (or a size does not fit an int).
inline bool as_blas(const Tensor& t, char& trans, int& ld) {
  const int64_t rows = t.size(1), cols = t.size(2), s_r = t.stride(1), s_c = t.stride(2);
  if (rows > INT_MAX || cols > INT_MAX) return false;
  if (s_c == 1 && (rows == 1 || s_r >= std::max<int64_t>(cols, 1)) && s_r <= INT_MAX) {
    trans = 'N';  // row-major: column-major its transpose
    ld = static_cast<int>(rows == 1 ? std::max<int64_t>(cols, 1) : s_r);
    return true;
  }
  if (s_r == 1 && (cols == 1 || s_c >= std::max<int64_t>(rows, 1)) && s_c <= INT_MAX) {
    trans = 'T';
    ld = static_cast<int>(cols == 1 ? std::max<int64_t>(rows, 1) : s_c);
    return true;
  }
  return false;
}

inline void gemm_call(const Blas& lib, const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                      const float* beta, float* c, const int* ldc) {
  lib.sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void gemm_call(const Blas& lib, const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                      const double* beta, double* c, const int* ldc) {
  lib.dgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// A row-major matrix operand of a batched product: memory g's matrix starts at p + g * batch; element (i, j)
// of the logical matrix is at i * ld + j, or at j * ld + i when ``t`` (stored transposed).
template <typename T>
struct Mat {
  const T* p;
  int64_t batch, ld;
  bool t;
};

// C[g] = beta C[g] + alpha A[g] B[g] for g < G: A (M x K), B (K x N), C (M x N) row-major with leading dim ldc
// and batch stride sc. Row-major C = A B is column-major C^T = B^T A^T (see the top of this file).
template <typename T>
void rgemm(int64_t G, int64_t M, int64_t N, int64_t K, Mat<T> A, Mat<T> B, T* C, int64_t sc, int64_t ldc, T beta,
           T alpha) {
  const Blas& lib = blas();
  const char ta = A.t ? 'T' : 'N', tb = B.t ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int lda = static_cast<int>(A.ld), ldb = static_cast<int>(B.ld), lc = static_cast<int>(ldc);
  for (int64_t g = 0; g < G; ++g) {
    gemm_call(lib, &tb, &ta, &m, &n, &k, &alpha, B.p + g * B.batch, &ldb, A.p + g * A.batch, &lda, &beta,
              C + g * sc, &lc);
  }
}

// out = beta out + alpha a @ b per memory, in place; a (G, M, K), b (G, K, N), out (G, M, N) with unit stride
// in its last dim. beta == 0: out is only written (its old values, even NaN, are not read).
inline Tensor& gemm_into(Tensor& out, const Tensor& a, const Tensor& b, double beta, double alpha) {
  const auto dtype = out.scalar_type();
  const Blas& lib = blas();
  char ta, tb;
  int lda, ldb;
  const int64_t G = out.size(0), M = out.size(1), N = out.size(2), K = a.size(2);
  const bool ok = blas_enabled() && lib.sgemm != nullptr && out.device().is_cpu() && a.scalar_type() == dtype &&
                  b.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kDouble) && a.dim() == 3 &&
                  b.dim() == 3 && out.dim() == 3 && a.size(0) == G && b.size(0) == G && a.size(1) == M &&
                  b.size(1) == K && b.size(2) == N && M > 0 && N > 0 && K > 0 && out.stride(2) == 1 &&
                  (M == 1 || out.stride(1) >= N) && out.stride(1) <= INT_MAX && as_blas(a, ta, lda) &&
                  as_blas(b, tb, ldb);
  if (!ok) return out.baddbmm_(a, b, beta, alpha);  // (beta 0: ATen ignores out's old values too)
  const int64_t ldc = M == 1 ? N : out.stride(1);
  AT_DISPATCH_FLOATING_TYPES(dtype, "gemm_into", [&] {
    rgemm<scalar_t>(G, M, N, K, {a.data_ptr<scalar_t>(), a.stride(0), lda, ta == 'T'},
                    {b.data_ptr<scalar_t>(), b.stride(0), ldb, tb == 'T'}, out.data_ptr<scalar_t>(), out.stride(0),
                    ldc, static_cast<scalar_t>(beta), static_cast<scalar_t>(alpha));
  });
  return out;
}

// a @ b per memory: a new (G, M, N) tensor.
inline Tensor blas_bmm(const Tensor& a, const Tensor& b) {
  Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  return gemm_into(out, a, b, 0, 1);
}

// beta c + alpha a @ b per memory: a new (G, M, N) tensor (c of that shape).
inline Tensor blas_baddbmm(const Tensor& c, const Tensor& a, const Tensor& b, double beta = 1, double alpha = 1) {
  Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  out.copy_(c);
  return gemm_into(out, a, b, beta, alpha);
}

// out = beta out + alpha a @ b in place (``out.baddbmm_(a, b, beta, alpha)``); returns out. out may be a view
// (e.g. one of the state's halves): the result lands in the viewed memory.
inline Tensor blas_acc(Tensor out, const Tensor& a, const Tensor& b, double beta = 1, double alpha = 1) {
  gemm_into(out, a, b, beta, alpha);
  return out;
}

}  // namespace titans_lnn_chunk_loop
