// CPU kernels of the tiled contrastive loss.
//
// The logit matrix l = scale * a @ b^T + bias ([M, N]) is never materialised: it is produced one
// kTileM x kTileN tile at a time by ATen's GEMM (MKL/oneDNN, multithreaded) into a reused buffer,
// and a fused, vectorised pass turns each tile into the statistics or gradient weights that the
// loss needs. Extra memory is O(kTileM * kTileN + (M + N) * D), linear in the batch.
//
// Compute type: float64 inputs stay float64 (for gradcheck); every other float type is computed
// in float32, so fp16/bf16 features accumulate in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

namespace mmfast {
namespace {

constexpr int64_t kTileM = 1024;  // 1024 x 1024 tiles: MKL reaches big-GEMM speed (256 x 1024 ran 4x slower)
constexpr int64_t kTileN = 1024;
constexpr int64_t kColChunk = 64;  // columns per task of the column pass (1024 rows x 64 floats = 256 KiB)

using at::Tensor;

at::ScalarType compute_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_features(const Tensor& a, const Tensor& b) {
  TORCH_CHECK(a.dim() == 2, "mmfast contrastive: a must be 2-D [M, D], got ", a.dim(), "-D");
  TORCH_CHECK(b.dim() == 2, "mmfast contrastive: b must be 2-D [N, D], got ", b.dim(), "-D");
  TORCH_CHECK(a.size(1) == b.size(1), "mmfast contrastive: embedding sizes differ: a has D=",
              a.size(1), ", b has D=", b.size(1));
  TORCH_CHECK(a.is_floating_point() && b.is_floating_point(),
              "mmfast contrastive: features must be floating point");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "mmfast contrastive: a and b dtypes differ (",
              a.scalar_type(), " vs ", b.scalar_type(), ")");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "mmfast contrastive CPU kernel: tensors must be on CPU");
}

double scalar_value(const Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, "mmfast contrastive: ", name, " must have one element, got shape ", t.sizes());
  return t.item<double>();
}

double bias_value(const std::optional<Tensor>& bias) {
  return bias.has_value() ? scalar_value(*bias, "bias") : 0.0;
}

// The features every entry point starts from: checked, in the compute type ct, contiguous.
struct Features {
  at::ScalarType ct;
  Tensor a, b;
};

Features checked_features(const Tensor& a_in, const Tensor& b_in) {
  check_features(a_in, b_in);
  const auto ct = compute_type(a_in);
  return {ct, a_in.to(ct).contiguous(), b_in.to(ct).contiguous()};
}

// Every entry point's dtype dispatch: fn(alpha, beta) with the logits' scale and bias as values of
// the compute type ct (float64 or float32, the only two compute_type gives).
template <typename Fn>
auto with_scale_bias(at::ScalarType ct, const Tensor& scale, const std::optional<Tensor>& bias, Fn&& fn) {
  const double alpha = scalar_value(scale, "scale"), beta = bias_value(bias);
  if (ct == at::kDouble) return fn(alpha, beta);
  return fn(static_cast<float>(alpha), static_cast<float>(beta));
}

// Running (max, sum of exp(l - max), sum of exp(l - max) * l) for an online softmax.
template <typename T>
inline void merge_stats(T& m, T& s, T& e, T m2, T s2, T e2) {
  if (s2 == T(0)) return;
  if (m2 > m) {
    const T f = std::exp(m - m2);
    s = s * f + s2;
    e = e * f + e2;
    m = m2;
  } else {
    const T f = std::exp(m2 - m);
    s += s2 * f;
    e += e2 * f;
  }
}

// Sum of the lanes of a vector accumulator.
template <typename T>
inline T reduce_sum(const at::vec::Vectorized<T>& v) {
  using Vec = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, v);
}

// The reused buffer of the dot-product tiles of a @ b^T: one kTileM x kTileN tile (smaller when
// a or b has fewer rows). Tiles are written at its start, with its row stride.
Tensor tile_buffer(const Tensor& a, const Tensor& b) {
  return at::empty({std::min(a.size(0), kTileM), std::min(b.size(0), kTileN)}, a.options());
}

// One tile of the dot products a @ b^T: rows [i0, i0 + tm) of a against rows [j0, j0 + tn) of b.
struct DotTile {
  int64_t i0, tm, j0, tn;
  Tensor a_blk, b_blk;  // those rows of a and b
  Tensor dots;          // a_blk @ b_blk^T, a [tm, tn] view at the start of the tile buffer
};

// Every kernel's outer loop: the tiles in row-major order, each computed by ATen's GEMM into
// `buffer` (see tile_buffer) and handed to tile_fn(const DotTile&) before the next overwrites it.
template <typename F>
void for_each_dot_tile(const Tensor& a, const Tensor& b, Tensor& buffer, F&& tile_fn) {
  const int64_t M = a.size(0), N = b.size(0);
  for (int64_t i0 = 0; i0 < M; i0 += kTileM) {
    const int64_t tm = std::min(kTileM, M - i0);
    const Tensor a_blk = a.narrow(0, i0, tm);
    for (int64_t j0 = 0; j0 < N; j0 += kTileN) {
      const int64_t tn = std::min(kTileN, N - j0);
      const Tensor b_blk = b.narrow(0, j0, tn);
      Tensor dots = buffer.narrow(0, 0, tm).narrow(1, 0, tn);
      at::mm_out(dots, a_blk, b_blk.t());
      tile_fn(DotTile{i0, tm, j0, tn, a_blk, b_blk, dots});
    }
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> softmax_fwd_impl(const Tensor& a, const Tensor& b, T alpha, T beta) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t M = a.size(0), N = b.size(0);
  const auto opts = a.options();
  Tensor row_m = at::full({M}, -std::numeric_limits<T>::infinity(), opts);
  Tensor row_s = at::zeros({M}, opts), row_e = at::zeros({M}, opts);
  Tensor col_m = at::full({N}, -std::numeric_limits<T>::infinity(), opts);
  Tensor col_s = at::zeros({N}, opts), col_e = at::zeros({N}, opts);
  Tensor tile = tile_buffer(a, b);
  T* rm = row_m.data_ptr<T>();
  T* rs = row_s.data_ptr<T>();
  T* re = row_e.data_ptr<T>();
  T* cm = col_m.data_ptr<T>();
  T* cs = col_s.data_ptr<T>();
  T* ce = col_e.data_ptr<T>();
  const T* base = tile.data_ptr<T>();
  const int64_t ld = tile.size(1);

  for_each_dot_tile(a, b, tile, [&](const DotTile& d) {
    const int64_t i0 = d.i0, tm = d.tm, j0 = d.j0, tn = d.tn;
    // One parallel region per tile (barriers are expensive on busy machines): tasks
    // [0, row_tasks) are row slabs, the rest are column chunks. Both read the raw dot products
    // and apply l = alpha * g + beta on the fly, so they are independent.
    constexpr int64_t kRowsPerTask = 64;
    const int64_t row_tasks = (tm + kRowsPerTask - 1) / kRowsPerTask;
    const int64_t col_tasks = (tn + kColChunk - 1) / kColChunk;
    at::parallel_for(0, row_tasks + col_tasks, 1, [&](int64_t t0, int64_t t1) {
      const Vec va(alpha), vb(beta);
      for (int64_t task = t0; task < t1; ++task) {
        if (task < row_tasks) {
          const int64_t r_end = std::min(tm, (task + 1) * kRowsPerTask);
          for (int64_t r = task * kRowsPerTask; r < r_end; ++r) {
            const T* g = base + r * ld;
            Vec vmax(-std::numeric_limits<T>::infinity());
            int64_t j = 0;
            for (; j + Vec::size() <= tn; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(g + j) * va + vb);
            T mx = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vmax);
            for (; j < tn; ++j) mx = std::max(mx, g[j] * alpha + beta);
            Vec vs(0), ve(0);
            const Vec vm(mx);
            j = 0;
            for (; j + Vec::size() <= tn; j += Vec::size()) {
              const Vec x = Vec::loadu(g + j) * va + vb;
              const Vec p = (x - vm).exp();
              vs = vs + p;
              ve = ve + p * x;
            }
            T s = reduce_sum(vs);
            T e = reduce_sum(ve);
            for (; j < tn; ++j) {
              const T x = g[j] * alpha + beta;
              const T p = std::exp(x - mx);
              s += p;
              e += p * x;
            }
            merge_stats(rm[i0 + r], rs[i0 + r], re[i0 + r], mx, s, e);
          }
        } else {
          T mx[kColChunk], s[kColChunk], e[kColChunk];
          const int64_t jb = (task - row_tasks) * kColChunk, w = std::min(kColChunk, tn - jb);
          for (int64_t k = 0; k < w; ++k) {
            mx[k] = -std::numeric_limits<T>::infinity();
            s[k] = 0;
            e[k] = 0;
          }
          for (int64_t r = 0; r < tm; ++r) {
            const T* g = base + r * ld + jb;
            int64_t k = 0;
            for (; k + Vec::size() <= w; k += Vec::size())
              at::vec::maximum(Vec::loadu(mx + k), Vec::loadu(g + k) * va + vb).store(mx + k);
            for (; k < w; ++k) mx[k] = std::max(mx[k], g[k] * alpha + beta);
          }
          for (int64_t r = 0; r < tm; ++r) {
            const T* g = base + r * ld + jb;
            int64_t k = 0;
            for (; k + Vec::size() <= w; k += Vec::size()) {
              const Vec x = Vec::loadu(g + k) * va + vb;
              const Vec p = (x - Vec::loadu(mx + k)).exp();
              (Vec::loadu(s + k) + p).store(s + k);
              (Vec::loadu(e + k) + p * x).store(e + k);
            }
            for (; k < w; ++k) {
              const T x = g[k] * alpha + beta;
              const T p = std::exp(x - mx[k]);
              s[k] += p;
              e[k] += p * x;
            }
          }
          for (int64_t k = 0; k < w; ++k)
            merge_stats(cm[j0 + jb + k], cs[j0 + jb + k], ce[j0 + jb + k], mx[k], s[k], e[k]);
        }
      }
    });
  });
  // lse = m + log(s); mean logit = e / s. With M or N == 0 the sums are empty: lse = -inf.
  Tensor row_lse = row_m + row_s.log();
  Tensor col_lse = col_m + col_s.log();
  return {row_lse, row_e / row_s, col_lse, col_e / col_s};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> softmax_fwd_cpu(const Tensor& a_in, const Tensor& b_in, const Tensor& scale,
                                                           const std::optional<Tensor>& bias) {
  const Features f = checked_features(a_in, b_in);
  return with_scale_bias(f.ct, scale, bias,
                         [&](auto alpha, auto beta) { return softmax_fwd_impl(f.a, f.b, alpha, beta); });
}

// Gradient weights for one tile, written in place over the raw dot products in `ga`; when
// `gb` is given, the second set of weights goes there.
template <typename T>
std::tuple<Tensor, Tensor> softmax_bwd_impl(const Tensor& a, const Tensor& b, T alpha, T beta, const Tensor& row_lse,
                                            const Tensor& col_lse, const Tensor& arw, const Tensor& acw,
                                            const Tensor* brw, const Tensor* bcw) {
  using Vec = at::vec::Vectorized<T>;
  Tensor da = at::zeros_like(a), db = at::zeros_like(b);
  const bool two = brw != nullptr;
  Tensor ta = tile_buffer(a, b);
  Tensor tb = two ? at::empty_like(ta) : ta;
  const T* rl = row_lse.data_ptr<T>();
  const T* cl = col_lse.data_ptr<T>();
  const T* w_ar = arw.data_ptr<T>();
  const T* w_ac = acw.data_ptr<T>();
  const T* w_br = two ? brw->data_ptr<T>() : nullptr;
  const T* w_bc = two ? bcw->data_ptr<T>() : nullptr;
  const int64_t ld = ta.size(1);
  T* pa = ta.data_ptr<T>();
  T* pb = tb.data_ptr<T>();

  for_each_dot_tile(a, b, ta, [&](const DotTile& d) {
    const int64_t i0 = d.i0, tm = d.tm, j0 = d.j0, tn = d.tn;
    at::parallel_for(0, tm, 16, [&](int64_t r0, int64_t r1) {
      const Vec va(alpha), vb(beta);
      for (int64_t r = r0; r < r1; ++r) {
        T* la = pa + r * ld;
        T* lb = pb + r * ld;
        const T lse_r = rl[i0 + r];
        const Vec vlse(lse_r), var(w_ar[i0 + r]), vbr(two ? w_br[i0 + r] : T(0));
        int64_t j = 0;
        for (; j + Vec::size() <= tn; j += Vec::size()) {
          Vec l = Vec::loadu(la + j) * va + vb;
          Vec pr = (l - vlse).exp();
          Vec pc = (l - Vec::loadu(cl + j0 + j)).exp();
          (var * pr + Vec::loadu(w_ac + j0 + j) * pc).store(la + j);
          if (two) (vbr * pr + Vec::loadu(w_bc + j0 + j) * pc).store(lb + j);
        }
        for (; j < tn; ++j) {
          const T l = la[j] * alpha + beta;
          const T pr = std::exp(l - lse_r), pc = std::exp(l - cl[j0 + j]);
          la[j] = w_ar[i0 + r] * pr + w_ac[j0 + j] * pc;
          if (two) lb[j] = w_br[i0 + r] * pr + w_bc[j0 + j] * pc;
        }
      }
    });
    Tensor gb = tb.narrow(0, 0, tm).narrow(1, 0, tn);
    da.narrow(0, i0, tm).addmm_(d.dots, d.b_blk, 1, alpha);
    db.narrow(0, j0, tn).addmm_(gb.t(), d.a_blk, 1, alpha);
  });
  return {da, db};
}

Tensor weights_as(const Tensor& w, int64_t n, at::ScalarType ct, const char* name) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == n, "mmfast contrastive: ", name, " must have shape [", n, "], got ",
              w.sizes());
  return w.to(ct).contiguous();
}

std::tuple<Tensor, Tensor> softmax_bwd_cpu(const Tensor& a_in, const Tensor& b_in, const Tensor& scale,
                                           const std::optional<Tensor>& bias, const Tensor& row_lse,
                                           const Tensor& col_lse, const Tensor& a_row_w, const Tensor& a_col_w,
                                           const std::optional<Tensor>& b_row_w,
                                           const std::optional<Tensor>& b_col_w) {
  const Features f = checked_features(a_in, b_in);
  TORCH_CHECK(b_row_w.has_value() == b_col_w.has_value(),
              "mmfast contrastive: b_row_w and b_col_w must both be given or both be None");
  const auto ct = f.ct;
  const int64_t M = a_in.size(0), N = b_in.size(0);
  Tensor rl = weights_as(row_lse, M, ct, "row_lse"), cl = weights_as(col_lse, N, ct, "col_lse");
  Tensor arw = weights_as(a_row_w, M, ct, "a_row_w"), acw = weights_as(a_col_w, N, ct, "a_col_w");
  Tensor brw, bcw;
  if (b_row_w.has_value()) {
    brw = weights_as(*b_row_w, M, ct, "b_row_w");
    bcw = weights_as(*b_col_w, N, ct, "b_col_w");
  }
  return with_scale_bias(ct, scale, bias, [&](auto alpha, auto beta) {
    return softmax_bwd_impl(f.a, f.b, alpha, beta, rl, cl, arw, acw, b_row_w.has_value() ? &brw : nullptr,
                            b_row_w.has_value() ? &bcw : nullptr);
  });
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), stable for every x.
template <typename T>
inline T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

template <typename T>
Tensor sigmoid_fwd_impl(const Tensor& a, const Tensor& b, T alpha, T beta) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t M = a.size(0);
  Tensor out = at::zeros({M}, a.options());
  Tensor tile = tile_buffer(a, b);
  T* po = out.data_ptr<T>();
  const T* base = tile.data_ptr<T>();
  const int64_t ld = tile.size(1);
  for_each_dot_tile(a, b, tile, [&](const DotTile& d) {
    const int64_t i0 = d.i0, tm = d.tm, tn = d.tn;
    at::parallel_for(0, tm, 16, [&](int64_t r0, int64_t r1) {
      const Vec va(alpha), vb(beta), zero(0), one(1);
      for (int64_t r = r0; r < r1; ++r) {
        const T* g = base + r * ld;
        Vec acc(0);
        int64_t j = 0;
        for (; j + Vec::size() <= tn; j += Vec::size()) {
          Vec x = Vec::loadu(g + j) * va + vb;
          acc = acc + at::vec::maximum(x, zero) + (zero - x.abs()).exp().log1p();
        }
        T s = reduce_sum(acc);
        for (; j < tn; ++j) s += softplus(g[j] * alpha + beta);
        po[i0 + r] += s;
      }
    });
  });
  return out;
}

Tensor sigmoid_fwd_cpu(const Tensor& a_in, const Tensor& b_in, const Tensor& scale, const std::optional<Tensor>& bias) {
  const Features f = checked_features(a_in, b_in);
  return with_scale_bias(f.ct, scale, bias,
                         [&](auto alpha, auto beta) { return sigmoid_fwd_impl(f.a, f.b, alpha, beta); });
}

// The backward's tile pass; with kWithLoss it also sums softplus(alpha * a.b + beta) per row, i.e. the
// forward's row sums (one GEMM and one pass over the logits fewer than forward + backward).
template <typename T, bool kWithLoss>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sigmoid_grad_pass(const Tensor& a, const Tensor& b, T alpha, T beta,
                                                                     const Tensor& row_w) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t M = a.size(0);
  Tensor da = at::zeros_like(a), db = at::zeros_like(b);
  Tensor tile = tile_buffer(a, b);
  // Per-row partial sums of G * <a, b> and of G, combined in a fixed order (deterministic).
  Tensor dot_acc = at::zeros({M}, a.options()), g_acc = at::zeros({M}, a.options());
  Tensor sp_acc = kWithLoss ? at::zeros({M}, a.options()) : Tensor();
  T* pd = dot_acc.data_ptr<T>();
  T* pg = g_acc.data_ptr<T>();
  T* ps = kWithLoss ? sp_acc.data_ptr<T>() : nullptr;
  const T* w = row_w.data_ptr<T>();
  T* base = tile.data_ptr<T>();
  const int64_t ld = tile.size(1);
  for_each_dot_tile(a, b, tile, [&](const DotTile& d) {
    const int64_t i0 = d.i0, tm = d.tm, j0 = d.j0, tn = d.tn;
    at::parallel_for(0, tm, 16, [&](int64_t r0, int64_t r1) {
      const Vec va(alpha), vb(beta), one(1), zero(0);
      for (int64_t r = r0; r < r1; ++r) {
        T* g = base + r * ld;
        const T wr = w[i0 + r];
        const Vec vw(wr);
        Vec vd(0), vg(0), vs(0);
        int64_t j = 0;
        for (; j + Vec::size() <= tn; j += Vec::size()) {
          Vec dot = Vec::loadu(g + j);
          Vec x = dot * va + vb;
          if constexpr (kWithLoss) vs = vs + at::vec::maximum(x, zero) + (zero - x.abs()).exp().log1p();
          Vec sig = one / (one + x.neg().exp());
          Vec gw = vw * sig;
          vd = vd + gw * dot;
          vg = vg + gw;
          gw.store(g + j);
        }
        T sd = reduce_sum(vd);
        T sg = reduce_sum(vg);
        T ss = kWithLoss ? reduce_sum(vs) : T(0);
        for (; j < tn; ++j) {
          const T dot = g[j];
          if constexpr (kWithLoss) ss += softplus(dot * alpha + beta);
          const T gw = wr / (T(1) + std::exp(-(dot * alpha + beta)));
          sd += gw * dot;
          sg += gw;
          g[j] = gw;
        }
        pd[i0 + r] += sd;
        pg[i0 + r] += sg;
        if constexpr (kWithLoss) ps[i0 + r] += ss;
      }
    });
    da.narrow(0, i0, tm).addmm_(d.dots, d.b_blk, 1, alpha);
    db.narrow(0, j0, tn).addmm_(d.dots.t(), d.a_blk, 1, alpha);
  });
  return {da, db, dot_acc.sum(), g_acc.sum(), sp_acc};
}

// Argument preparation and dtype dispatch of sigmoid_grad_pass: (da, db, sum G * a.b, sum G, softplus row
// sums when kWithLoss).
template <bool kWithLoss>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sigmoid_grad_cpu(const Tensor& a_in, const Tensor& b_in,
                                                                    const Tensor& scale,
                                                                    const std::optional<Tensor>& bias,
                                                                    const Tensor& row_w) {
  const Features f = checked_features(a_in, b_in);
  Tensor w = weights_as(row_w, f.a.size(0), f.ct, "row_w");
  return with_scale_bias(f.ct, scale, bias, [&](auto alpha, auto beta) {
    return sigmoid_grad_pass<decltype(alpha), kWithLoss>(f.a, f.b, alpha, beta, w);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sigmoid_bwd_cpu(const Tensor& a_in, const Tensor& b_in, const Tensor& scale,
                                                           const std::optional<Tensor>& bias, const Tensor& row_w) {
  auto [da, db, dscale, dbias, unused] =
      sigmoid_grad_cpu<false>(a_in, b_in, scale, bias, row_w);
  return {da, db, dscale, dbias};
}

// Forward and gradient in one tile pass: (softplus row sums, da, db, sum G * a.b, sum G) with row weights
// row_w, i.e. sigmoid_fwd's output and sigmoid_bwd's outputs together.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sigmoid_fwd_bwd_cpu(const Tensor& a_in, const Tensor& b_in,
                                                                       const Tensor& scale,
                                                                       const std::optional<Tensor>& bias,
                                                                       const Tensor& row_w) {
  auto [da, db, dscale, dbias, rows] =
      sigmoid_grad_cpu<true>(a_in, b_in, scale, bias, row_w);
  return {rows, da, db, dscale, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("contrastive_softmax_fwd", &softmax_fwd_cpu);
  m.impl("contrastive_softmax_bwd", &softmax_bwd_cpu);
  m.impl("contrastive_sigmoid_fwd", &sigmoid_fwd_cpu);
  m.impl("contrastive_sigmoid_bwd", &sigmoid_bwd_cpu);
  m.impl("contrastive_sigmoid_fwd_bwd", &sigmoid_fwd_bwd_cpu);
}

}  // namespace mmfast
