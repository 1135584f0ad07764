// GEMMs for the flowops C++ kernels: float through oneDNN's brgemm micro-kernel where this torch has it.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#if __has_include(<ATen/native/CPUBlas.h>) && __has_include(<oneapi/dnnl/dnnl_ukernel.hpp>)
#include <ATen/native/CPUBlas.h>  // oneDNN's brgemm micro-kernel (float), where this torch has it
#endif

#include <algorithm>
#include <vector>

namespace flowops {
namespace blas {

// at::native::cpublas::brgemm computes C (+)= A B for row-major A [M, K], B [K, N], single-threaded (JIT
// kernels cached per shape and thread). The products below are tiled over it, one tile per task of
// at::parallel_for (inside a parallel region the tasks run in the calling thread); a transposed operand is
// transposed 64 x 64 panel by panel into a per-thread buffer. At the CNF op's shapes that is about 1.1-1.25x
// MKL's sgemm (paired timings in bench/RESULTS.md), with no operator dispatch per call. Other dtypes, a torch
// without the float brgemm, or strided operands take at::mm_out / addmm_.
inline constexpr int64_t kTile = 64;

inline bool brgemm_ok(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B) {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  return C.scalar_type() == at::kFloat && A.is_contiguous() && B.is_contiguous() && C.is_contiguous() &&
         C.numel() > 0;
#else
  return false;
#endif
}

#if defined(CPUBLAS_BRGEMM_F32F32F32)
inline float* panel_buffer() {
  thread_local std::vector<float> buf(static_cast<size_t>(kTile * kTile));
  return buf.data();
}

inline void brgemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const float* a,
            const float* b, float* c) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c, false);
}

// How many of `extent` rows (or columns) one task takes when the other dimension has only `tiles` tiles: all
// of them, unless that leaves fewer than `per_thread` tasks per thread (outside a parallel region), then a
// split into multiples of 16. (A split re-transposes the shared panels once per block: 64 x K values, cheap.)
inline int64_t split_rows(int64_t extent, int64_t tiles, int64_t per_thread = 2) {
  const int64_t want = per_thread * (at::in_parallel_region() ? 1 : at::get_num_threads());
  if (tiles >= want || extent <= 16) return std::max<int64_t>(extent, 1);
  const int64_t blocks = std::min((want + tiles - 1) / tiles, (extent + 15) / 16);
  return ((extent + blocks - 1) / blocks + 15) / 16 * 16;
}

// body(i, mi, j, nj, panel) for every block [i, i + mi) x [j, j + nj) of an M x N result in blocks of
// rows x cols, one block per task of at::parallel_for, with the running thread's panel buffer.
template <typename F>
inline void for_blocks(int64_t M, int64_t rows, int64_t N, int64_t cols, const F& body) {
  const int64_t rb = (M + rows - 1) / rows, cb = (N + cols - 1) / cols;
  at::parallel_for(0, rb * cb, 1, [&](int64_t q0, int64_t q1) {
    float* panel = panel_buffer();
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t i = q / cb * rows, j = q % cb * cols;
      body(i, std::min(rows, M - i), j, std::min(cols, N - j), panel);
    }
  });
}
#endif

// C = A B: A [M, K], B [K, N]; blocks of `rows` (default 64) rows x 256 columns of C; rows = 0: blocks of 64
// columns and as many rows as leave four blocks per thread (see split_rows).
inline void gemm_nn(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, int64_t rows = kTile) {
  if (!brgemm_ok(C, A, B) || A.size(1) == 0) {
    at::mm_out(C, A, B);
    return;
  }
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  const int64_t M = A.size(0), K = A.size(1), N = B.size(1);
  const float* a = A.const_data_ptr<float>();
  const float* b = B.const_data_ptr<float>();
  float* c = C.mutable_data_ptr<float>();
  const int64_t cols = rows <= 0 ? kTile : 256;
  if (rows <= 0) rows = split_rows(M, (N + cols - 1) / cols, 4);  // a partial column tile: balance with more rows
  for_blocks(M, rows, N, cols, [&](int64_t i, int64_t mi, int64_t j, int64_t nj, float*) {
    brgemm(mi, nj, K, K, N, N, false, a + i * K, b + j, c + i * N + j);
  });
#endif
}

// C (+)= A^T B (trans_a: A [K, M], B [K, N]; row-stacked samples, K the rows) or C = A B^T (A [M, K], B [N, K],
// a weight as stored): one task per 64 rows (A^T B) or 64 columns (A B^T) of C, and per block of the other
// dimension (see split_rows); the task transposes its 64 x 64 panels of the transposed operand, K panel by
// K panel, into its thread's buffer and accumulates them through brgemm.
inline void gemm_t(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, bool trans_a, bool accumulate) {
  const int64_t K = A.size(trans_a ? 0 : 1);
  if (!brgemm_ok(C, A, B) || K == 0) {
    const at::Tensor a = trans_a ? A.t() : A, b = trans_a ? B : B.t();
    if (accumulate) {
      C.addmm_(a, b);
    } else {
      at::mm_out(C, a, b);
    }
    return;
  }
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  const int64_t M = C.size(0), N = C.size(1);
  const float* a = A.const_data_ptr<float>();
  const float* b = B.const_data_ptr<float>();
  float* c = C.mutable_data_ptr<float>();
  const int64_t rows = trans_a ? kTile : split_rows(M, (N + kTile - 1) / kTile);
  const int64_t cols = trans_a ? split_rows(N, (M + kTile - 1) / kTile) : kTile;
  for_blocks(M, rows, N, cols, [&](int64_t i, int64_t mi, int64_t j, int64_t nj, float* panel) {
    for (int64_t k0 = 0; k0 < K; k0 += kTile) {
      const int64_t kb = std::min(kTile, K - k0);
      const bool add = accumulate || k0 > 0;
      if (trans_a) {  // panel = A[k0:, i:]^T, [mi, kb]
        at::vec::transpose_mxn<float>(a + k0 * M + i, M, panel, kb, static_cast<int>(kb), static_cast<int>(mi));
        brgemm(mi, nj, kb, kb, N, N, add, panel, b + k0 * N + j, c + i * N + j);
      } else {  // panel = B[j:, k0:]^T, [kb, nj]
        at::vec::transpose_mxn<float>(b + j * K + k0, K, panel, nj, static_cast<int>(nj), static_cast<int>(kb));
        brgemm(mi, nj, kb, K, nj, N, add, a + i * K + k0, panel, c + i * N + j);
      }
    }
  });
#endif
}

inline void gemm_nt(at::Tensor& C, const at::Tensor& A, const at::Tensor& B) { gemm_t(C, A, B, false, false); }

inline void gemm_tn(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, bool accumulate) {
  gemm_t(C, A, B, true, accumulate);
}

// C = A^T B for A [K, M], B [K, N] with a long K (pixels) and a small result (a weight gradient): K is split
// between the threads, each accumulating a whole [M, N] partial over its rows through brgemm (its 64-row
// slices of A transposed into a per-thread buffer, each once), and the partials are summed into C.
inline void gemm_tn_split_k(at::Tensor& C, const at::Tensor& A, const at::Tensor& B) {
  const int64_t K = A.size(0), M = A.size(1), N = B.size(1);
  if (!brgemm_ok(C, A, B) || K == 0) {
    at::mm_out(C, A.t(), B);
    return;
  }
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t parts_wanted = std::max<int64_t>(1, std::min<int64_t>(threads, K / 128));
  const int64_t chunk = ((K + parts_wanted - 1) / parts_wanted + kTile - 1) / kTile * kTile;
  const int64_t parts = (K + chunk - 1) / chunk;
  at::Tensor partial = parts > 1 ? at::empty({parts - 1, M, N}, C.options()) : at::Tensor();
  const float* a = A.const_data_ptr<float>();
  const float* b = B.const_data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(M * kTile));
    for (int64_t q = q0; q < q1; ++q) {
      float* c = q == 0 ? C.mutable_data_ptr<float>() : partial.mutable_data_ptr<float>() + (q - 1) * M * N;
      const int64_t k_begin = q * chunk, k_end = std::min(K, k_begin + chunk);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kTile) {
        const int64_t kb = std::min(kTile, k_end - k0);
        at::vec::transpose_mxn<float>(a + k0 * M, M, buf.data(), kb, static_cast<int>(kb), static_cast<int>(M));
        brgemm(M, N, kb, kb, N, N, k0 > k_begin, buf.data(), b + k0 * N, c);
      }
    }
  });
  if (parts > 1) C.add_(partial.sum(0));
#endif
}

}  // namespace blas
}  // namespace flowops
