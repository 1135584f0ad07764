// CPU kernels of the fused affine/additive coupling: one pass over memory in
// each direction, vectorized with at::vec, parallel over (row, chunk) blocks.
// The per-sample log-det is reduced per block into a partial buffer and summed
// in a fixed order afterwards, so results do not depend on the thread count.
#include "../flowops.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <stdexcept>

namespace flowops {

ScaleMap parse_scale(const std::string& name) {
  if (name == "exp") return ScaleMap::EXP;
  if (name == "softclamp") return ScaleMap::SOFTCLAMP;
  if (name == "sigmoid") return ScaleMap::SIGMOID;
  if (name == "additive") return ScaleMap::ADDITIVE;
  TORCH_CHECK_VALUE(false, "flowops: scale must be one of 'exp', 'softclamp', 'sigmoid', 'additive', got '", name, "'");
}

namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 16384;      // elements of one row handled by one work item
constexpr int64_t kGrainElems = 32768;  // minimum elements per thread

// exp with the polynomial (2-ulp) implementation for float; full precision for double.
template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& v) {
  return v.exp_u20();
}

// tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) in (0, 1]: one exp and one division,
// no overflow for any input, absolute error a few 1e-8 in float (ATen's tanh costs several
// times more and dominated the soft-clamp kernels).
template <typename T>
inline Vectorized<T> vtanh(const Vectorized<T>& u) {
  using Vec = Vectorized<T>;
  Vec e = vexp(u.abs() * Vec(T(-2)));
  Vec t = (Vec(T(1)) - e) / (Vec(T(1)) + e);
  return Vec::blendv(t.neg(), t, u >= Vec(T(0)));
}

// log s and d(log s)/d(raw) for the vectorized scale maps.
template <typename T, ScaleMap M>
inline void scale_map(const Vectorized<T>& r, T clamp, Vectorized<T>& logs, Vectorized<T>& g) {
  using Vec = Vectorized<T>;
  if constexpr (M == ScaleMap::EXP) {
    logs = r;
    g = Vec(T(1));
  } else if constexpr (M == ScaleMap::SOFTCLAMP) {
    Vec th = vtanh(r * Vec(T(1) / clamp));
    logs = th * Vec(clamp);
    g = Vec(T(1)) - th * th;
  } else if constexpr (M == ScaleMap::SIGMOID) {
    // log sigmoid(u) = min(u, 0) - log(1 + exp(-|u|)), u = r + 2
    Vec u = r + Vec(T(2));
    Vec e = vexp(u.abs().neg());
    logs = at::vec::minimum(u, Vec(T(0))) - (Vec(T(1)) + e).log();
    g = Vec(T(1)) - vexp(logs);  // 1 - sigmoid(u)
  } else {
    logs = Vec(T(0));
    g = Vec(T(0));
  }
}

struct RowLayout {
  at::Tensor t;
  int64_t row_stride;
};

// Views a tensor as [B, N] rows whose inner part is contiguous; copies only
// when the inner dimensions are not already laid out contiguously.
RowLayout rows_of(const at::Tensor& t) {
  int64_t expected = 1;
  bool ok = true;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) { ok = false; break; }
    expected *= t.size(d);
  }
  at::Tensor c = ok ? t : t.contiguous();
  return {c, c.size(0) > 1 ? c.stride(0) : expected};
}

struct Blocks {
  int64_t B, N, chunk, nch, grain;
};

Blocks make_blocks(int64_t B, int64_t N) {
  Blocks k;
  k.B = B;
  k.N = N;
  k.chunk = std::max<int64_t>(1, std::min(N, kChunk));
  k.nch = N == 0 ? 1 : (N + k.chunk - 1) / k.chunk;
  k.grain = std::max<int64_t>(1, kGrainElems / k.chunk);
  return k;
}

template <typename T, ScaleMap M, bool INV, bool MASKED>
void fwd_kernel(const T* x, int64_t sx, const T* p, int64_t sp, const T* mask, T clamp,
                T* y, T* partial, const Blocks& k) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t shift_off = (M == ScaleMap::ADDITIVE) ? 0 : k.N;
  at::parallel_for(0, k.B * k.nch, k.grain, [&](int64_t begin, int64_t end) {
    const Vec lane = Vec::arange(T(0), T(1));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / k.nch, c = item % k.nch;
      const int64_t lo = c * k.chunk, hi = std::min(k.N, lo + k.chunk);
      const T* xr = x + b * sx;
      const T* rr = p + b * sp;
      const T* tr = rr + shift_off;
      T* yr = y + b * k.N;
      Vec acc(T(0));
      for (int64_t i = lo; i < hi; i += V) {
        const int64_t n = std::min<int64_t>(V, hi - i);
        const bool full = n == V;
        Vec xv = full ? Vec::loadu(xr + i) : Vec::loadu(xr + i, n);
        Vec tv = full ? Vec::loadu(tr + i) : Vec::loadu(tr + i, n);
        Vec out;
        if constexpr (M == ScaleMap::ADDITIVE) {
          out = INV ? xv - tv : xv + tv;
        } else {
          Vec rv = full ? Vec::loadu(rr + i) : Vec::loadu(rr + i, n);
          Vec logs, g;
          scale_map<T, M>(rv, clamp, logs, g);
          out = INV ? (xv - tv) * vexp(logs.neg()) : xv * vexp(logs) + tv;
          if constexpr (MASKED) {
            Vec mv = full ? Vec::loadu(mask + i) : Vec::loadu(mask + i, n);
            logs = Vec::blendv(logs, Vec(T(0)), mv != Vec(T(0)));
          }
          if (!full) logs = Vec::blendv(Vec(T(0)), logs, lane < Vec(T(n)));
          acc = acc + logs;
        }
        if constexpr (MASKED) {
          Vec mv = full ? Vec::loadu(mask + i) : Vec::loadu(mask + i, n);
          out = Vec::blendv(out, xv, mv != Vec(T(0)));
        }
        if (full) out.store(yr + i); else out.store(yr + i, n);
      }
      T s = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
      partial[item] = INV ? -s : s;
    }
  });
}

template <typename T, ScaleMap M, bool INV, bool MASKED>
void bwd_kernel(const T* gy, const T* gld, const T* x, int64_t sx, const T* p, int64_t sp,
                const T* mask, T clamp, T* gx, T* gp, const Blocks& k) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t shift_off = (M == ScaleMap::ADDITIVE) ? 0 : k.N;
  const int64_t gp_row = (M == ScaleMap::ADDITIVE) ? k.N : 2 * k.N;
  at::parallel_for(0, k.B * k.nch, k.grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / k.nch, c = item % k.nch;
      const int64_t lo = c * k.chunk, hi = std::min(k.N, lo + k.chunk);
      const T* gyr = gy + b * k.N;
      const T* xr = x + b * sx;
      const T* rr = p + b * sp;
      const T* tr = rr + shift_off;
      T* gxr = gx + b * k.N;
      T* grr = gp + b * gp_row;
      T* gtr = grr + shift_off;
      const Vec gl(gld[b]);
      for (int64_t i = lo; i < hi; i += V) {
        const int64_t n = std::min<int64_t>(V, hi - i);
        const bool full = n == V;
        Vec go = full ? Vec::loadu(gyr + i) : Vec::loadu(gyr + i, n);
        Vec gxv, gtv, grv;
        if constexpr (M == ScaleMap::ADDITIVE) {
          gxv = go;
          gtv = INV ? go.neg() : go;
        } else {
          Vec xv = full ? Vec::loadu(xr + i) : Vec::loadu(xr + i, n);
          Vec rv = full ? Vec::loadu(rr + i) : Vec::loadu(rr + i, n);
          Vec logs, g;
          scale_map<T, M>(rv, clamp, logs, g);
          if constexpr (INV) {
            Vec tv = full ? Vec::loadu(tr + i) : Vec::loadu(tr + i, n);
            Vec inv_s = vexp(logs.neg());
            Vec xo = (xv - tv) * inv_s;
            gxv = go * inv_s;
            gtv = gxv.neg();
            grv = (go * xo + gl).neg() * g;
          } else {
            Vec s = vexp(logs);
            gxv = go * s;
            gtv = go;
            grv = (gxv * xv + gl) * g;
          }
        }
        if constexpr (MASKED) {
          Vec pt = (full ? Vec::loadu(mask + i) : Vec::loadu(mask + i, n)) != Vec(T(0));
          gxv = Vec::blendv(gxv, go, pt);
          gtv = Vec::blendv(gtv, Vec(T(0)), pt);
          if constexpr (M != ScaleMap::ADDITIVE) grv = Vec::blendv(grv, Vec(T(0)), pt);
        }
        if (full) {
          gxv.store(gxr + i);
          gtv.store(gtr + i);
          if constexpr (M != ScaleMap::ADDITIVE) grv.store(grr + i);
        } else {
          gxv.store(gxr + i, n);
          gtv.store(gtr + i, n);
          if constexpr (M != ScaleMap::ADDITIVE) grv.store(grr + i, n);
        }
      }
    }
  });
}

// Rows shorter than one vector (2-D toy flows have N = 1): vectorize across a
// tile of V rows instead, gathering one column at a time into lane buffers, so
// the per-row cost is a few scalar copies rather than a masked vector pass.
template <typename T, ScaleMap M, bool INV, bool MASKED>
void fwd_tiles(const T* x, int64_t sx, const T* p, int64_t sp, const T* mask, T clamp, T* y, T* logdet,
               int64_t B, int64_t N) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t shift_off = (M == ScaleMap::ADDITIVE) ? 0 : N;
  const int64_t ntiles = (B + V - 1) / V;
  at::parallel_for(0, ntiles, std::max<int64_t>(1, kGrainElems / (V * N)), [&](int64_t begin, int64_t end) {
    alignas(64) T bx[V], br[V], bt[V], by[V], bl[V];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b0 = tile * V, nb = std::min<int64_t>(V, B - b0);
      Vec acc(T(0));
      for (int64_t j = 0; j < N; ++j) {
        for (int64_t l = 0; l < nb; ++l) {
          const int64_t b = b0 + l;
          bx[l] = x[b * sx + j];
          bt[l] = p[b * sp + shift_off + j];
          if constexpr (M != ScaleMap::ADDITIVE) br[l] = p[b * sp + j];
        }
        Vec xv = Vec::loadu(bx, nb), tv = Vec::loadu(bt, nb), out;
        const bool pass = MASKED && mask[j] != T(0);
        if (pass) {
          out = xv;
        } else if constexpr (M == ScaleMap::ADDITIVE) {
          out = INV ? xv - tv : xv + tv;
        } else {
          Vec logs, g;
          scale_map<T, M>(Vec::loadu(br, nb), clamp, logs, g);
          out = INV ? (xv - tv) * vexp(logs.neg()) : xv * vexp(logs) + tv;
          acc = INV ? acc - logs : acc + logs;
        }
        out.store(by, nb);
        for (int64_t l = 0; l < nb; ++l) y[(b0 + l) * N + j] = by[l];
      }
      acc.store(bl, nb);
      for (int64_t l = 0; l < nb; ++l) logdet[b0 + l] = bl[l];
    }
  });
}

template <typename T, ScaleMap M, bool INV, bool MASKED>
void bwd_tiles(const T* gy, const T* gld, const T* x, int64_t sx, const T* p, int64_t sp, const T* mask, T clamp,
               T* gx, T* gp, int64_t B, int64_t N) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t shift_off = (M == ScaleMap::ADDITIVE) ? 0 : N;
  const int64_t gp_row = (M == ScaleMap::ADDITIVE) ? N : 2 * N;
  const int64_t ntiles = (B + V - 1) / V;
  at::parallel_for(0, ntiles, std::max<int64_t>(1, kGrainElems / (V * N)), [&](int64_t begin, int64_t end) {
    alignas(64) T bgo[V], bx[V], br[V], bt[V], bgx[V], bgr[V], bgt[V];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b0 = tile * V, nb = std::min<int64_t>(V, B - b0);
      Vec gl = Vec::loadu(gld + b0, nb);
      for (int64_t j = 0; j < N; ++j) {
        for (int64_t l = 0; l < nb; ++l) {
          const int64_t b = b0 + l;
          bgo[l] = gy[b * N + j];
          if constexpr (M != ScaleMap::ADDITIVE) {
            bx[l] = x[b * sx + j];
            br[l] = p[b * sp + j];
            if constexpr (INV) bt[l] = p[b * sp + shift_off + j];
          }
        }
        Vec go = Vec::loadu(bgo, nb), gxv, gtv, grv(T(0));
        const bool pass = MASKED && mask[j] != T(0);
        if (pass) {
          gxv = go;
          gtv = Vec(T(0));
        } else if constexpr (M == ScaleMap::ADDITIVE) {
          gxv = go;
          gtv = INV ? go.neg() : go;
        } else {
          Vec xv = Vec::loadu(bx, nb), logs, g;
          scale_map<T, M>(Vec::loadu(br, nb), clamp, logs, g);
          if constexpr (INV) {
            Vec inv_s = vexp(logs.neg());
            Vec xo = (xv - Vec::loadu(bt, nb)) * inv_s;
            gxv = go * inv_s;
            gtv = gxv.neg();
            grv = (go * xo + gl).neg() * g;
          } else {
            gxv = go * vexp(logs);
            gtv = go;
            grv = (gxv * xv + gl) * g;
          }
        }
        gxv.store(bgx, nb);
        gtv.store(bgt, nb);
        grv.store(bgr, nb);
        for (int64_t l = 0; l < nb; ++l) {
          const int64_t b = b0 + l;
          gx[b * N + j] = bgx[l];
          gp[b * gp_row + shift_off + j] = bgt[l];
          if constexpr (M != ScaleMap::ADDITIVE) gp[b * gp_row + j] = bgr[l];
        }
      }
    }
  });
}

template <typename F>
void dispatch_mode(ScaleMap m, bool inverse, bool masked, F&& f) {
  // Expands (scale map, direction, mask) into compile-time template arguments.
  auto with_mask = [&](auto mc, auto ic) {
    if (masked) f(mc, ic, std::true_type{}); else f(mc, ic, std::false_type{});
  };
  auto with_inv = [&](auto mc) {
    if (inverse) with_mask(mc, std::true_type{}); else with_mask(mc, std::false_type{});
  };
  switch (m) {
    case ScaleMap::EXP: with_inv(std::integral_constant<ScaleMap, ScaleMap::EXP>{}); break;
    case ScaleMap::SOFTCLAMP: with_inv(std::integral_constant<ScaleMap, ScaleMap::SOFTCLAMP>{}); break;
    case ScaleMap::SIGMOID: with_inv(std::integral_constant<ScaleMap, ScaleMap::SIGMOID>{}); break;
    case ScaleMap::ADDITIVE: with_inv(std::integral_constant<ScaleMap, ScaleMap::ADDITIVE>{}); break;
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& params, const std::optional<at::Tensor>& mask,
                  ScaleMap m) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "flowops.affine_coupling: x must have a batch and a feature/channel dimension, got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "flowops.affine_coupling (cpu kernel): x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_TYPE(params.scalar_type() == x.scalar_type(), "flowops.affine_coupling: params dtype ", params.scalar_type(),
                   " does not match x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(params.dim() == x.dim() && params.size(0) == x.size(0), "flowops.affine_coupling: params shape ",
                    params.sizes(), " does not fit x shape ", x.sizes());
  const int64_t factor = m == ScaleMap::ADDITIVE ? 1 : 2;
  TORCH_CHECK_VALUE(params.size(1) == factor * x.size(1), "flowops.affine_coupling: params must have ", factor,
                    "x the channels of x along dim 1, got params shape ", params.sizes(), " for x shape ", x.sizes());
  for (int64_t d = 2; d < x.dim(); ++d)
    TORCH_CHECK_VALUE(params.size(d) == x.size(d), "flowops.affine_coupling: params shape ", params.sizes(),
                      " does not fit x shape ", x.sizes());
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->numel() * x.size(0) == x.numel() || x.size(0) == 0,
                      "flowops.affine_coupling: mask must hold one value per position of a sample (",
                      x.size(0) ? x.numel() / x.size(0) : 0, "), got ", mask->numel());
    TORCH_CHECK_TYPE(mask->scalar_type() == x.scalar_type(), "flowops.affine_coupling: mask dtype must match x");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> affine_coupling_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& params_in, const std::optional<at::Tensor>& mask_in,
    const std::string& scale, double clamp, bool inverse) {
  const ScaleMap m = parse_scale(scale);
  check_inputs(x_in, params_in, mask_in, m);
  const int64_t B = x_in.size(0);
  const int64_t N = B ? x_in.numel() / B : 0;
  auto y = at::empty(x_in.sizes(), x_in.options());
  if (B == 0 || N == 0 || m == ScaleMap::ADDITIVE) {
    auto logdet = at::zeros({B}, x_in.options());
    if (B == 0 || N == 0) return {y, logdet};
    if (m == ScaleMap::ADDITIVE && !mask_in.has_value()) {  // one pass: y = x +- t
      if (inverse) at::sub_out(y, x_in, params_in); else at::add_out(y, x_in, params_in);
      return {y, logdet};
    }
  }
  at::Tensor logdet = at::empty({B}, x_in.options());
  RowLayout xl = rows_of(x_in), pl = rows_of(params_in);
  at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "affine_coupling_fwd_tiles", [&] {
    if (N >= static_cast<int64_t>(Vectorized<scalar_t>::size())) return;
    dispatch_mode(m, inverse, mask.defined(), [&](auto mc, auto ic, auto kc) {
      fwd_tiles<scalar_t, decltype(mc)::value, decltype(ic)::value, decltype(kc)::value>(
          xl.t.const_data_ptr<scalar_t>(), xl.row_stride, pl.t.const_data_ptr<scalar_t>(), pl.row_stride,
          mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(clamp),
          y.mutable_data_ptr<scalar_t>(), logdet.mutable_data_ptr<scalar_t>(), B, N);
    });
    done = true;
  });
  if (done) return {y, logdet};
  Blocks k = make_blocks(B, N);
  auto partial = at::empty({B, k.nch}, x_in.options());
  AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "affine_coupling_fwd_cpu", [&] {
    dispatch_mode(m, inverse, mask.defined(), [&](auto mc, auto ic, auto kc) {
      fwd_kernel<scalar_t, decltype(mc)::value, decltype(ic)::value, decltype(kc)::value>(
          xl.t.const_data_ptr<scalar_t>(), xl.row_stride, pl.t.const_data_ptr<scalar_t>(), pl.row_stride,
          mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(clamp),
          y.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<scalar_t>(), k);
    });
  });
  if (m == ScaleMap::ADDITIVE) logdet.zero_();
  else logdet = k.nch == 1 ? partial.view({B}) : partial.sum(1);
  return {y, logdet};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_bwd_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& grad_logdet_in, const at::Tensor& x_in,
    const at::Tensor& params_in, const std::optional<at::Tensor>& mask_in, const std::string& scale,
    double clamp, bool inverse) {
  const ScaleMap m = parse_scale(scale);
  check_inputs(x_in, params_in, mask_in, m);
  const int64_t B = x_in.size(0);
  const int64_t N = B ? x_in.numel() / B : 0;
  auto gx = at::empty(x_in.sizes(), x_in.options());
  auto gp = at::empty(params_in.sizes(), params_in.options());
  if (B == 0 || N == 0) return {gx, gp};
  at::Tensor gy = grad_y_in.contiguous().to(x_in.scalar_type());
  at::Tensor gld = grad_logdet_in.contiguous().to(x_in.scalar_type());
  RowLayout xl = rows_of(x_in), pl = rows_of(params_in);
  at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  {
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "affine_coupling_bwd_tiles", [&] {
      if (N >= static_cast<int64_t>(Vectorized<scalar_t>::size())) return;
      dispatch_mode(m, inverse, mask.defined(), [&](auto mc, auto ic, auto kc) {
        bwd_tiles<scalar_t, decltype(mc)::value, decltype(ic)::value, decltype(kc)::value>(
            gy.const_data_ptr<scalar_t>(), gld.const_data_ptr<scalar_t>(), xl.t.const_data_ptr<scalar_t>(),
            xl.row_stride, pl.t.const_data_ptr<scalar_t>(), pl.row_stride,
            mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(clamp),
            gx.mutable_data_ptr<scalar_t>(), gp.mutable_data_ptr<scalar_t>(), B, N);
      });
      done = true;
    });
    if (done) return {gx, gp};
  }
  Blocks k = make_blocks(B, N);
  AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "affine_coupling_bwd_cpu", [&] {
    dispatch_mode(m, inverse, mask.defined(), [&](auto mc, auto ic, auto kc) {
      bwd_kernel<scalar_t, decltype(mc)::value, decltype(ic)::value, decltype(kc)::value>(
          gy.const_data_ptr<scalar_t>(), gld.const_data_ptr<scalar_t>(), xl.t.const_data_ptr<scalar_t>(),
          xl.row_stride, pl.t.const_data_ptr<scalar_t>(), pl.row_stride,
          mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(clamp),
          gx.mutable_data_ptr<scalar_t>(), gp.mutable_data_ptr<scalar_t>(), k);
    });
  });
  return {gx, gp};
}

}  // namespace flowops
