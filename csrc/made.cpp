// MADE autoregressive inversion on CPU in one masked pass's arithmetic (flowops::made_solve).
//
// Solves y = u * s(raw(u)) + t(u), (raw, t) = MADE(u), for u (MAF sampling, IAF density).
// Everything is in MADE's sorted layout: column k of y has degree k + 1, hidden units are sorted
// by degree, output rows 2k / 2k + 1 hold the raw scale / shift of degree k + 1. ends[l][k] is
// the number of units of hidden layer l with degree <= k.
//
// Degree by degree: once u_k is known, only the units of degree k + 1 are computed in each layer
// (a contiguous slice of rows, fed by a contiguous prefix of the layer below), then the two
// outputs of the next dimension. Each staircase weight is used once per sample.
//
// The batch is cut into tiles of TW = 4 SIMD vectors of samples; a tile's activations are kept
// feature-major ([units, TW]) in a thread-local buffer that stays in cache for the whole degree
// loop, so every slice is a small register-blocked GEMM (up to 4 weight rows x 4 vectors of
// samples per step) instead of a skinny BLAS call that re-reads the prefix from memory. Tiles
// run in parallel (at::parallel_for); results do not depend on the thread count.
//
// No autograd: flowops routes calls that need gradients to the differentiable sliced path.
#include "flowops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace flowops {
namespace {

using at::vec::Vectorized;
constexpr int NV = 4;  // SIMD vectors of samples per tile

enum class Act { RELU, TANH };

// out[r, :] = bias[r] + sum_k W[r, k] * H[k, :] for R rows (tile width NV vectors).
template <typename T, int R>
inline void gemm_rows(const T* W, int64_t ldw, const T* bias, const T* H, int64_t K, T* out, int64_t tw) {
  using Vec = Vectorized<T>;
  constexpr int V = Vec::size();
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec(bias[r]);
  for (int64_t k = 0; k < K; ++k) {
    const T* h = H + k * tw;
    Vec hv[NV];
    for (int v = 0; v < NV; ++v) hv[v] = Vec::loadu(h + v * V);
    for (int r = 0; r < R; ++r) {
      Vec w(W[r * ldw + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(w, hv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v].store(out + r * tw + v * V);
}

template <typename T>
inline void gemm_slice(const T* W, int64_t ldw, const T* bias, const T* H, int64_t K, T* out, int64_t rows,
                       int64_t tw) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) gemm_rows<T, 4>(W + r * ldw, ldw, bias + r, H, K, out + r * tw, tw);
  switch (rows - r) {
    case 3: gemm_rows<T, 3>(W + r * ldw, ldw, bias + r, H, K, out + r * tw, tw); break;
    case 2: gemm_rows<T, 2>(W + r * ldw, ldw, bias + r, H, K, out + r * tw, tw); break;
    case 1: gemm_rows<T, 1>(W + r * ldw, ldw, bias + r, H, K, out + r * tw, tw); break;
    default: break;
  }
}

template <typename T>
inline void activate(T* h, int64_t n, Act act) {
  using Vec = Vectorized<T>;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    Vec v = Vec::loadu(h + i);
    v = act == Act::RELU ? at::vec::maximum(v, Vec(T(0))) : v.tanh();
    v.store(h + i);
  }
}

template <typename T>
void solve_cpu(const at::Tensor& y, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
               const std::vector<std::vector<int64_t>>& ends, Act act, ScaleMap scale, T clamp, at::Tensor& u,
               at::Tensor& logdet) {
  using Vec = Vectorized<T>;
  constexpr int64_t TW = NV * Vec::size();
  const int64_t B = y.size(0), D = y.size(1);
  const int64_t L = static_cast<int64_t>(weights.size()) - 1;  // hidden layers
  std::vector<const T*> W(L + 1), Bs(L + 1);
  std::vector<int64_t> ldw(L + 1), units(L);
  for (int64_t l = 0; l <= L; ++l) {
    W[l] = weights[l].data_ptr<T>();
    Bs[l] = biases[l].data_ptr<T>();
    ldw[l] = weights[l].size(1);
    if (l < L) units[l] = weights[l].size(0);
  }
  const T* yp = y.data_ptr<T>();
  T* up = u.data_ptr<T>();
  T* lp = logdet.data_ptr<T>();
  const int64_t tiles = (B + TW - 1) / TW;

  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    int64_t total = D + 2;
    for (int64_t l = 0; l < L; ++l) total += units[l];
    std::vector<T> buf(static_cast<size_t>((total + D) * TW));
    T* uT = buf.data();           // [D, TW]
    T* yT = uT + D * TW;          // [D, TW]
    T* pT = yT + D * TW;          // [2, TW]
    std::vector<T*> hT(L);
    T* next = pT + 2 * TW;
    for (int64_t l = 0; l < L; ++l) {
      hT[l] = next;
      next += units[l] * TW;
    }
    T ld[TW];
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t b0 = tile * TW;
      const int64_t nb = std::min<int64_t>(TW, B - b0);
      for (int64_t k = 0; k < D; ++k)
        for (int64_t j = 0; j < TW; ++j) yT[k * TW + j] = j < nb ? yp[(b0 + j) * D + k] : T(0);
      std::fill(ld, ld + TW, T(0));
      for (int64_t k = 0; k < D; ++k) {
        // outputs of dimension k from the last layer's units of degree <= k
        const T* src = L ? hT[L - 1] : uT;
        const int64_t pe = L ? ends[L - 1][k] : k;
        gemm_slice<T>(W[L] + 2 * k * ldw[L], ldw[L], Bs[L] + 2 * k, src, pe, pT, 2, TW);
        for (int64_t j = 0; j < TW; j += Vec::size()) {
          Vec raw = Vec::loadu(pT + j), sh = Vec::loadu(pT + TW + j), logs;
          if (scale == ScaleMap::EXP) {
            logs = raw;
          } else if (scale == ScaleMap::SOFTCLAMP) {
            logs = (raw * Vec(T(1) / clamp)).tanh() * Vec(clamp);
          } else {
            Vec uu = raw + Vec(T(2));
            logs = at::vec::minimum(uu, Vec(T(0))) - uu.abs().neg().exp().log1p();
          }
          Vec yk = Vec::loadu(yT + k * TW + j);
          ((yk - sh) * logs.neg().exp()).store(uT + k * TW + j);
          (Vec::loadu(ld + j) + logs).store(ld + j);
        }
        // hidden units of degree k + 1
        for (int64_t l = 0; l < L; ++l) {
          const int64_t a = ends[l][k], e = ends[l][k + 1];
          if (e <= a) continue;
          const T* below = l ? hT[l - 1] : uT;
          const int64_t K = l ? ends[l - 1][k + 1] : k + 1;
          gemm_slice<T>(W[l] + a * ldw[l], ldw[l], Bs[l] + a, below, K, hT[l] + a * TW, e - a, TW);
          activate<T>(hT[l] + a * TW, (e - a) * TW, act);
        }
      }
      for (int64_t j = 0; j < nb; ++j) {
        for (int64_t k = 0; k < D; ++k) up[(b0 + j) * D + k] = uT[k * TW + j];
        lp[b0 + j] = -ld[j];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> made_solve(const at::Tensor& y, at::TensorList weights, at::TensorList biases,
                                              at::TensorList ends, c10::string_view activation,
                                              c10::string_view scale, double clamp) {
  TORCH_CHECK_VALUE(y.dim() == 2, "made_solve: y must be [batch, features], got ", y.sizes());
  TORCH_CHECK_VALUE(y.device().is_cpu(), "made_solve: CPU tensors only");
  const int64_t L = static_cast<int64_t>(weights.size()) - 1;
  TORCH_CHECK_VALUE(L >= 0 && static_cast<int64_t>(biases.size()) == L + 1 && static_cast<int64_t>(ends.size()) == L,
                    "made_solve: expected L + 1 weights and biases and L degree-end tensors");
  const int64_t D = y.size(1);
  std::string act_s(activation), scale_s(scale);
  TORCH_CHECK_VALUE(act_s == "relu" || act_s == "tanh", "made_solve: activation must be 'relu' or 'tanh', got '",
                    act_s, "'");
  ScaleMap sm = parse_scale(scale_s);
  TORCH_CHECK_VALUE(sm != ScaleMap::ADDITIVE, "made_solve: scale must be 'exp', 'softclamp' or 'sigmoid'");
  std::vector<at::Tensor> ws, bs;
  std::vector<std::vector<int64_t>> ev;
  int64_t prev = D;
  for (int64_t l = 0; l <= L; ++l) {
    at::Tensor w = weights[l].contiguous(), b = biases[l].contiguous();
    TORCH_CHECK_VALUE(w.scalar_type() == y.scalar_type() && b.scalar_type() == y.scalar_type(),
                      "made_solve: weights and biases must have y's dtype");
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == prev && b.dim() == 1 && b.size(0) == w.size(0),
                      "made_solve: layer ", l, " has weight ", w.sizes(), " and bias ", b.sizes(),
                      ", expected [*, ", prev, "] and [*]");
    if (l == L) TORCH_CHECK_VALUE(w.size(0) == 2 * D, "made_solve: the output layer must have 2D rows");
    prev = w.size(0);
    ws.push_back(w);
    bs.push_back(b);
    if (l < L) {
      at::Tensor e = ends[l].to(at::kLong).contiguous();
      TORCH_CHECK_VALUE(e.numel() == D + 1, "made_solve: ends[", l, "] must have D + 1 entries");
      const int64_t* ep = e.data_ptr<int64_t>();
      std::vector<int64_t> v(ep, ep + D + 1);
      TORCH_CHECK_VALUE(v[D] <= w.size(0), "made_solve: ends exceed the layer width");
      ev.push_back(std::move(v));
    }
  }
  at::Tensor yc = y.contiguous();
  at::Tensor u = at::empty_like(yc);
  at::Tensor logdet = at::empty({y.size(0)}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "made_solve", [&] {
    solve_cpu<scalar_t>(yc, ws, bs, ev, act_s == "relu" ? Act::RELU : Act::TANH, sm, static_cast<scalar_t>(clamp),
                        u, logdet);
  });
  return {u, logdet};
}

}  // namespace
}  // namespace flowops

TORCH_LIBRARY_FRAGMENT(flowops, m) {
  m.def("made_solve(Tensor y, Tensor[] weights, Tensor[] biases, Tensor[] ends, str activation, str scale, "
        "float clamp) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flowops, CPU, m) {
  m.impl("made_solve", &flowops::made_solve);
}
