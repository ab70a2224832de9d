// CPU kernels of fused (shifted-)window attention (window_process, the partition copies, is in window_process_cpu.cpp).
//
// Semantics are those of mmfast.reference.window_attention (timm 1.0.31 Swin v1/v2): roll by -shift,
// pad bottom/right to multiples of the window (padded tokens carry pad_value, the qkv bias, and are
// keys like any other token), partition, attention with the relative position bias looked up by
// (dy, dx) and the shifted-window region mask built on the padded grid, merge, crop, un-roll.
// pad_then_roll selects the original Swin detection order (pad first, roll the padded map).
//
// window_attention_fwd / _bwd run one task per (head, batch, window). A task gathers its window's q,
// k, v rows straight from the strided [B, H, W, heads, head_dim] inputs by address arithmetic (the
// roll, the padding and the partition are index maps, never materialised), computes the logits with
// a small register-blocked GEMM into a per-thread N x N scratch, adds the bias and the region mask,
// and scatters the result rows back to the query's original spatial position. Padded query rows are
// never computed: their outputs are cropped away, so they have no output and no gradient. Every
// non-padded token belongs to exactly one window, so the scatters of out, dq, dk and dv never
// collide. The reductions across windows (bias table, logit_scale, pad_value) accumulate in float64
// into per-chunk partials over a fixed split of the task range (never over threads), summed in chunk
// order: the gradients are bitwise reproducible whatever the thread count.
//
// The backward recomputes P from lse and renormalises each row (see there); softmax terms below
// exp(-64) are flushed to zero, which keeps subnormals (from the -100 shift mask) out of the GEMMs.
//
// Compute type: float64 inputs compute in float64 (gradcheck), every other float type in float32.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../common/small_gemm.h"
#include "../common/softmax_row.h"
#include "window_checks.h"
#include "window_geometry.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace mmfast {

using at::IntArrayRef;
using at::Tensor;

namespace {

constexpr int64_t kMaxChunks = 64;  // fixed split of the backward's task range (determinism)
constexpr int64_t kFoldEvery = 8;   // windows summed in the compute type before a bias-table fold (float64)
constexpr double kNormEps = 1e-12;  // F.normalize's eps (Swin v2 cosine attention)

// ---------------------------------------------------------------------------------------------
// geometry: padded grid position -> source position, and shift-mask regions

// The window grid (window_geometry.h) of one call, with the batch and the per-row / per-column maps
// precomputed for the attention kernels' token gathers.
struct Geometry : WindowGrid {
  int64_t B = 0;
  bool masked = false;
  std::vector<int64_t> row_src, col_src;  // per padded-grid row / column: source row / column, -1 = padding
  std::vector<int64_t> row_reg, col_reg;  // per padded-grid row / column: shift region 0, 1 or 2
};

void axis_map(int64_t L, int64_t Lp, int64_t w, int64_t s, bool pad_then_roll, bool masked,
              std::vector<int64_t>& src, std::vector<int64_t>& reg) {
  src.resize(Lp);
  reg.resize(Lp);
  for (int64_t p = 0; p < Lp; ++p) {
    src[p] = grid_source(p, L, Lp, s, pad_then_roll);
    // timm's region slices [0, Lp-w), [Lp-w, Lp-s), [Lp-s, Lp); one region without a shift on this axis
    reg[p] = (masked && s > 0) ? int64_t(p >= Lp - w) + int64_t(p >= Lp - s) : 0;
  }
}

Geometry make_geometry(int64_t B, int64_t H, int64_t W, IntArrayRef window_size, IntArrayRef shift_size,
                       bool pad_then_roll, bool shift_mask) {
  Geometry g;
  static_cast<WindowGrid&>(g) =
      make_window_grid(H, W, window_size[0], window_size[1], shift_size[0], shift_size[1], pad_then_roll);
  g.B = B;
  g.masked = shift_mask && (g.sh > 0 || g.sw > 0);
  axis_map(H, g.Hp, g.wh, g.sh, pad_then_roll, g.masked, g.row_src, g.row_reg);
  axis_map(W, g.Wp, g.ww, g.sw, pad_then_roll, g.masked, g.col_src, g.col_reg);
  return g;
}

// Tokens of one window: source spatial index (y * W + x) or -1, the non-padded tokens (the query rows),
// and the region ids as numbers of the compute type (for the vectorised mask), ldN entries.
template <typename T>
struct WindowTokens {
  std::vector<int64_t> spatial, qtok;
  std::vector<T> region;
  bool mixed = false;

  void setup(const Geometry& g, int64_t w, int64_t ldN) {
    spatial.resize(g.N);
    region.assign(ldN, T(0));
    qtok.clear();
    const int64_t wy = w / g.nww, wx = w % g.nww;
    mixed = false;
    for (int64_t t = 0; t < g.N; ++t) {
      const int64_t py = wy * g.wh + t / g.ww, px = wx * g.ww + t % g.ww;
      const int64_t sy = g.row_src[py], sx = g.col_src[px];
      const bool valid = sy >= 0 && sx >= 0;
      spatial[t] = valid ? sy * g.W + sx : -1;
      if (valid) qtok.push_back(t);
      region[t] = static_cast<T>(3 * g.row_reg[py] + g.col_reg[px]);
      mixed = mixed || region[t] != region[0];
    }
  }
};

using cpu::small_gemm;

// ---------------------------------------------------------------------------------------------
// attention kernels

// A strided [B, H, W, heads, head_dim] operand.
template <typename S>
struct Strided5 {
  const S* p;
  int64_t sb, sy, sx, sh, sd;
  Strided5(const Tensor& t)
      : p(t.const_data_ptr<S>()), sb(t.stride(0)), sy(t.stride(1)), sx(t.stride(2)), sh(t.stride(3)), sd(t.stride(4)) {}
  const S* row(int64_t b, int64_t spatial, int64_t W, int64_t h) const {
    return p + b * sb + (spatial / W) * sy + (spatial % W) * sx + h * sh;
  }
};

using cpu::from_compute;
using cpu::to_compute;

template <typename S, typename T>
inline void load_row(const S* src, int64_t stride, int64_t n, T* dst) {
  if (stride == 1) {
    for (int64_t d = 0; d < n; ++d) dst[d] = to_compute<T>(src[d]);
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = to_compute<T>(src[d * stride]);
  }
}

template <typename S, typename T>
inline void store_row(const T* src, int64_t n, S* dst) {
  for (int64_t d = 0; d < n; ++d) dst[d] = from_compute<S>(src[d]);
}

// F.normalize in place (x / max(|x|, eps)); returns |x|.
template <typename T>
inline T normalize_row(T* x, int64_t n) {
  T ss = 0;
  for (int64_t d = 0; d < n; ++d) ss += x[d] * x[d];
  const T norm = std::sqrt(ss);
  const T denom = std::max(norm, static_cast<T>(kNormEps));
  for (int64_t d = 0; d < n; ++d) x[d] = x[d] / denom;
  return norm;
}

// Gradient through y = x / max(|x|, eps), given y and |x|, in place over g.
template <typename T>
inline void normalize_backward(T* g, const T* y, T norm, int64_t n) {
  if (norm >= static_cast<T>(kNormEps)) {
    T dot = 0;
    for (int64_t d = 0; d < n; ++d) dot += y[d] * g[d];
    for (int64_t d = 0; d < n; ++d) g[d] = (g[d] - y[d] * dot) / norm;
  } else {
    for (int64_t d = 0; d < n; ++d) g[d] = g[d] / static_cast<T>(kNormEps);
  }
}

struct AttnParams {
  Geometry g;
  int64_t heads = 0, hd = 0, R = 0;
  bool has_bias = false, cosine = false, has_pad = false;
  double scale = 1.0, mask_value = -100.0;
};

// bm[i, j] = table[(yi - yj + wh - 1) * (2ww - 1) + (xi - xj + ww - 1)] for one head; padding columns 0.
template <typename T>
void build_bias_matrix(const Geometry& g, const T* table, T* bm, int64_t ldN) {
  const int64_t tw = 2 * g.ww - 1;
  for (int64_t i = 0; i < g.N; ++i) {
    const int64_t base = (i / g.ww + g.wh - 1) * tw + (i % g.ww + g.ww - 1);
    T* row = bm + i * ldN;
    for (int64_t j = 0; j < g.N; ++j) row[j] = table[base - (j / g.ww) * tw - (j % g.ww)];
    for (int64_t j = g.N; j < ldN; ++j) row[j] = T(0);
  }
}

// table[idx(i, j)] += dbm[i, j] (the adjoint of build_bias_matrix), in a fixed order.
template <typename T>
void fold_bias_matrix(const Geometry& g, const T* dbm, double* table, int64_t ldN) {
  const int64_t tw = 2 * g.ww - 1;
  for (int64_t i = 0; i < g.N; ++i) {
    const int64_t base = (i / g.ww + g.wh - 1) * tw + (i % g.ww + g.ww - 1);
    const T* row = dbm + i * ldN;
    for (int64_t j = 0; j < g.N; ++j) table[base - (j / g.ww) * tw - (j % g.ww)] += static_cast<double>(row[j]);
  }
}

// exp(x) for the softmax, exactly 0 where x < kExpFloor. Shift-masked logits sit ~100 below the row
// maximum, and exp(-100) is subnormal in float32: every product with it would take the CPU's slow
// subnormal path (2-3x the run time of a shifted block). Terms under exp(-64) (float32; exp(-600) for
// float64) are below 1e-27 of the row's largest term, so dropping them changes nothing representable.
template <typename T>
struct ExpFloor {
  static constexpr T value = T(-64);
};
template <>
struct ExpFloor<double> {
  static constexpr double value = -600.0;
};

template <typename T>
inline at::vec::Vectorized<T> softmax_exp(const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  return x.exp() & (x > Vec(ExpFloor<T>::value));
}

// Logits of one query row, in place over the row of q.k products: + bias row + region mask, and -inf in
// the padding columns [N, ldN).
template <typename T>
inline void finish_logits(T* s, const T* bias_row, const WindowTokens<T>& win, int64_t tok, T mask_value, int64_t N,
                          int64_t ldN) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kW = Vec::size();
  if (bias_row != nullptr)
    for (int64_t j = 0; j < ldN; j += kW) (Vec::loadu(s + j) + Vec::loadu(bias_row + j)).store(s + j);
  if (win.mixed) {
    const Vec mine(win.region[tok]), mv(mask_value);
    for (int64_t j = 0; j < ldN; j += kW) {
      const Vec differs = Vec::loadu(win.region.data() + j) != mine;
      (Vec::loadu(s + j) + (differs & mv)).store(s + j);
    }
  }
  for (int64_t j = N; j < ldN; ++j) s[j] = -std::numeric_limits<T>::infinity();
}

// Per-thread scratch of one task; row-major with padded leading dimensions ldD (head_dim) and ldN (tokens).
// Zero-initialised: the padding columns of every GEMM B operand stay zero.
template <typename T>
struct Scratch {
  std::vector<T> Qs, Qn, K, Kt, V, Vt, Sm, O, dO, dP, dQ, dK, dV, bm, dbm, qnorm, knorm;
};

// Gathers the task's q (non-padded rows, scaled: scale * q, or logit_scale * normalize(q)), k (all N rows,
// normalised in cosine mode) and v. In cosine mode Qn gets normalize(q) and qnorm/knorm the norms.
template <typename S, typename T>
void gather_qkv(const AttnParams& p, const WindowTokens<T>& win, int64_t b, int64_t h, const Strided5<S>& q,
                const Strided5<S>& k, const Strided5<S>& v, const T* pad, const T* ls, int64_t ldD, Scratch<T>& s,
                bool keep_qn) {
  const int64_t hd = p.hd, W = p.g.W;
  const T alpha = p.cosine ? ls[h] : static_cast<T>(p.scale);
  for (size_t i = 0; i < win.qtok.size(); ++i) {
    T* row = s.Qs.data() + i * ldD;
    load_row(q.row(b, win.spatial[win.qtok[i]], W, h), q.sd, hd, row);
    if (p.cosine) {
      const T norm = normalize_row(row, hd);
      if (keep_qn) {
        std::memcpy(s.Qn.data() + i * ldD, row, hd * sizeof(T));
        s.qnorm[i] = norm;
      }
    }
    for (int64_t d = 0; d < hd; ++d) row[d] = alpha * row[d];
  }
  for (int64_t j = 0; j < p.g.N; ++j) {
    T* krow = s.K.data() + j * ldD;
    T* vrow = s.V.data() + j * ldD;
    const int64_t sp = win.spatial[j];
    if (sp >= 0) {
      load_row(k.row(b, sp, W, h), k.sd, hd, krow);
      load_row(v.row(b, sp, W, h), v.sd, hd, vrow);
    } else if (pad != nullptr) {
      std::memcpy(krow, pad + (1 * p.heads + h) * hd, hd * sizeof(T));
      std::memcpy(vrow, pad + (2 * p.heads + h) * hd, hd * sizeof(T));
    } else {
      std::fill(krow, krow + hd, T(0));
      std::fill(vrow, vrow + hd, T(0));
    }
    if (p.cosine) s.knorm[j] = normalize_row(krow, hd);
  }
}

template <typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

template <typename S, typename T>
void attention_fwd_kernel(const AttnParams& p, const Tensor& q_, const Tensor& k_, const Tensor& v_, const T* table,
                          const T* ls, const T* pad, S* out, T* lse) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kW = Vec::size();
  const Geometry& g = p.g;
  const int64_t N = g.N, hd = p.hd, heads = p.heads;
  const int64_t ldN = round_up(N, kW), ldD = round_up(hd, kW);
  const Strided5<S> q(q_), k(k_), v(v_);
  const int64_t per_head = g.B * g.nW, ntasks = heads * per_head;
  const T mask_value = static_cast<T>(p.mask_value);

  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    Scratch<T> s;
    s.Qs.assign(N * ldD, T(0));
    s.K.assign(N * ldD, T(0));
    s.Kt.assign(hd * ldN, T(0));
    s.V.assign(N * ldD, T(0));
    s.Sm.assign(N * ldN, T(0));
    s.O.assign(N * ldD, T(0));
    if (p.cosine) s.knorm.assign(N, T(0));
    if (p.has_bias) s.bm.assign(N * ldN, T(0));
    int64_t bm_head = -1;
    WindowTokens<T> win;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t h = task / per_head, bw = task % per_head, b = bw / g.nW, w = bw % g.nW;
      win.setup(g, w, ldN);
      const int64_t nq = static_cast<int64_t>(win.qtok.size());
      if (nq == 0) continue;
      if (p.has_bias && bm_head != h) {
        build_bias_matrix(g, table + h * p.R, s.bm.data(), ldN);
        bm_head = h;
      }
      gather_qkv(p, win, b, h, q, k, v, pad, ls, ldD, s, false);
      transpose_into(s.K.data(), N, hd, ldD, s.Kt.data(), ldN);
      small_gemm(nq, N, hd, s.Qs.data(), ldD, 1, s.Kt.data(), ldN, s.Sm.data(), ldN);
      for (int64_t i = 0; i < nq; ++i) {
        T* row = s.Sm.data() + i * ldN;
        const int64_t tok = win.qtok[i];
        finish_logits(row, p.has_bias ? s.bm.data() + tok * ldN : nullptr, win, tok, mask_value, N, ldN);
        const T row_lse = cpu::softmax_row(row, ldN, ExpFloor<T>::value);
        lse[(b * g.H * g.W + win.spatial[tok]) * heads + h] = row_lse;
      }
      small_gemm(nq, hd, N, s.Sm.data(), ldN, 1, s.V.data(), ldD, s.O.data(), ldD);
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t sp = win.spatial[win.qtok[i]];
        store_row(s.O.data() + i * ldD, hd, out + ((b * g.H * g.W + sp) * heads + h) * hd);
      }
    }
  });
}

template <typename S, typename T>
void attention_bwd_kernel(const AttnParams& p, const Tensor& dout_, const Tensor& q_, const Tensor& k_,
                          const Tensor& v_, const T* lse, const T* table, const T* ls, const T* pad, S* dq, S* dk,
                          S* dv, double* part_table, double* part_ls, double* part_pad, int64_t nchunks) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kW = Vec::size();
  const Geometry& g = p.g;
  const int64_t N = g.N, hd = p.hd, heads = p.heads;
  const int64_t ldN = round_up(N, kW), ldD = round_up(hd, kW);
  const Strided5<S> q(q_), k(k_), v(v_), dout(dout_);
  const int64_t per_head = g.B * g.nW, ntasks = heads * per_head;
  const T mask_value = static_cast<T>(p.mask_value);
  const T scale = static_cast<T>(p.scale);

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    Scratch<T> s;
    for (auto* buf : {&s.Qs, &s.K, &s.V, &s.dO, &s.dQ, &s.dK, &s.dV}) buf->assign(N * ldD, T(0));
    s.Kt.assign(hd * ldN, T(0));
    s.Vt.assign(hd * ldN, T(0));
    s.Sm.assign(N * ldN, T(0));
    s.dP.assign(N * ldN, T(0));
    if (p.cosine) {
      s.Qn.assign(N * ldD, T(0));
      s.qnorm.assign(N, T(0));
      s.knorm.assign(N, T(0));
    }
    if (p.has_bias) {
      s.bm.assign(N * ldN, T(0));
      s.dbm.assign(N * ldN, T(0));
    }
    int64_t bm_head = -1;
    WindowTokens<T> win;
    for (int64_t c = c0; c < c1; ++c) {
      double* my_table = p.has_bias ? part_table + c * heads * p.R : nullptr;
      double* my_ls = p.cosine ? part_ls + c * heads : nullptr;
      double* my_pad = p.has_pad ? part_pad + c * 2 * heads * hd : nullptr;
      int64_t dbm_head = -1, dbm_count = 0;
      for (int64_t task = c * ntasks / nchunks; task < (c + 1) * ntasks / nchunks; ++task) {
        const int64_t h = task / per_head, bw = task % per_head, b = bw / g.nW, w = bw % g.nW;
        win.setup(g, w, ldN);
        const int64_t nq = static_cast<int64_t>(win.qtok.size());
        if (p.has_bias) {
          if (bm_head != h) {
            build_bias_matrix(g, table + h * p.R, s.bm.data(), ldN);
            bm_head = h;
          }
          if (dbm_head != h || dbm_count == kFoldEvery) {
            if (dbm_head >= 0) fold_bias_matrix(g, s.dbm.data(), my_table + dbm_head * p.R, ldN);
            std::fill(s.dbm.begin(), s.dbm.end(), T(0));
            dbm_head = h;
            dbm_count = 0;
          }
          ++dbm_count;
        }
        gather_qkv(p, win, b, h, q, k, v, pad, ls, ldD, s, true);
        transpose_into(s.K.data(), N, hd, ldD, s.Kt.data(), ldN);
        transpose_into(s.V.data(), N, hd, ldD, s.Vt.data(), ldN);
        for (int64_t i = 0; i < nq; ++i)
          load_row(dout.row(b, win.spatial[win.qtok[i]], g.W, h), dout.sd, hd, s.dO.data() + i * ldD);
        // P = exp(S - lse), dP = dO V^T, dS = P * (dP - rowsum(P * dP)); rowsum(P * dP) = rowsum(dO * O).
        small_gemm(nq, N, hd, s.Qs.data(), ldD, 1, s.Kt.data(), ldN, s.Sm.data(), ldN);
        small_gemm(nq, N, hd, s.dO.data(), ldD, 1, s.Vt.data(), ldN, s.dP.data(), ldN);
        for (int64_t i = 0; i < nq; ++i) {
          T* prow = s.Sm.data() + i * ldN;
          T* dprow = s.dP.data() + i * ldN;
          const int64_t tok = win.qtok[i];
          finish_logits(prow, p.has_bias ? s.bm.data() + tok * ldN : nullptr, win, tok, mask_value, N, ldN);
          // exp(S - lse) sums to 1 only up to the rounding of lse (|lse| * eps, large with Swin v2's logits);
          // renormalising the row restores sum_j P = 1 and with it sum_j dS = 0, which d_logit_scale and
          // the bias gradient (sums of dS over many rows) are sensitive to.
          const Vec vlse(lse[(b * g.H * g.W + win.spatial[tok]) * heads + h]);
          Vec vsum(T(0)), vd(T(0));
          for (int64_t j = 0; j < ldN; j += kW) {
            const Vec e = softmax_exp(Vec::loadu(prow + j) - vlse);
            e.store(prow + j);
            vsum = vsum + e;
            vd = at::vec::fmadd(e, Vec::loadu(dprow + j), vd);
          }
          const T sum = at::vec::vec_reduce_all<T>([](Vec& a, Vec& c) { return a + c; }, vsum);
          const Vec inv(T(1) / sum);
          for (int64_t j = 0; j < ldN; j += kW) (Vec::loadu(prow + j) * inv).store(prow + j);
          const Vec dsum(at::vec::vec_reduce_all<T>([](Vec& a, Vec& c) { return a + c; }, vd) / sum);
          for (int64_t j = 0; j < ldN; j += kW)
            (Vec::loadu(prow + j) * (Vec::loadu(dprow + j) - dsum)).store(dprow + j);
          if (p.has_bias) {
            T* drow = s.dbm.data() + tok * ldN;
            for (int64_t j = 0; j < ldN; j += kW) (Vec::loadu(drow + j) + Vec::loadu(dprow + j)).store(drow + j);
          }
        }
        // dV = P^T dO, dQs = dS K, dK = dS^T Qs (keys: all N rows; queries: the nq non-padded rows)
        small_gemm(N, hd, nq, s.Sm.data(), 1, ldN, s.dO.data(), ldD, s.dV.data(), ldD);
        small_gemm(nq, hd, N, s.dP.data(), ldN, 1, s.K.data(), ldD, s.dQ.data(), ldD);
        small_gemm(N, hd, nq, s.dP.data(), 1, ldN, s.Qs.data(), ldD, s.dK.data(), ldD);
        if (p.cosine) {
          const T lsh = ls[h];
          double dls = 0;
          for (int64_t i = 0; i < nq; ++i) {
            T* gq = s.dQ.data() + i * ldD;
            const T* qn = s.Qn.data() + i * ldD;
            for (int64_t d = 0; d < hd; ++d) {
              dls += static_cast<double>(qn[d] * gq[d]);
              gq[d] = lsh * gq[d];
            }
            normalize_backward(gq, qn, s.qnorm[i], hd);
          }
          my_ls[h] += dls;
          for (int64_t j = 0; j < N; ++j)
            normalize_backward(s.dK.data() + j * ldD, s.K.data() + j * ldD, s.knorm[j], hd);
        } else {
          for (int64_t i = 0; i < nq; ++i) {
            T* gq = s.dQ.data() + i * ldD;
            for (int64_t d = 0; d < hd; ++d) gq[d] = scale * gq[d];
          }
        }
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t sp = win.spatial[win.qtok[i]];
          store_row(s.dQ.data() + i * ldD, hd, dq + ((b * g.H * g.W + sp) * heads + h) * hd);
        }
        for (int64_t j = 0; j < N; ++j) {
          const int64_t sp = win.spatial[j];
          if (sp >= 0) {
            const int64_t off = ((b * g.H * g.W + sp) * heads + h) * hd;
            store_row(s.dK.data() + j * ldD, hd, dk + off);
            store_row(s.dV.data() + j * ldD, hd, dv + off);
          } else if (my_pad != nullptr) {
            double* pk = my_pad + h * hd;
            double* pv = my_pad + (heads + h) * hd;
            const T* gk = s.dK.data() + j * ldD;
            const T* gv = s.dV.data() + j * ldD;
            for (int64_t d = 0; d < hd; ++d) {
              pk[d] += gk[d];
              pv[d] += gv[d];
            }
          }
        }
      }
      if (p.has_bias && dbm_head >= 0) fold_bias_matrix(g, s.dbm.data(), my_table + dbm_head * p.R, ldN);
    }
  });
}

// Sums partials [nchunks, n] over the chunks, in chunk order.
void sum_chunks(const double* part, int64_t nchunks, int64_t n, double* out) {
  for (int64_t e = 0; e < n; ++e) out[e] = 0;
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t e = 0; e < n; ++e) out[e] += part[c * n + e];
}

// ---------------------------------------------------------------------------------------------
// op entry points

at::ScalarType compute_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

AttnParams check_attention(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                           const std::optional<Tensor>& rel_pos_bias, const std::optional<Tensor>& logit_scale,
                           const std::optional<Tensor>& pad_value, IntArrayRef window_size, IntArrayRef shift_size,
                           double scale, bool shift_mask, double mask_value, bool pad_then_roll) {
  TORCH_CHECK(q.dim() == 5, "mmfast ", op, ": q must be 5-D [B, H, W, heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "mmfast ", op, ": k shape ", k.sizes(), " must equal q shape ", q.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "mmfast ", op, ": v shape ", v.sizes(), " must equal q shape ", q.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "mmfast ", op, ": q must be floating point, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "mmfast ", op,
              ": k and v must have q's dtype ", q.scalar_type(), ", got k ", k.scalar_type(), " and v ",
              v.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "mmfast ", op,
              " CPU kernel: q, k and v must be on the CPU");
  TORCH_CHECK(q.size(1) >= 1 && q.size(2) >= 1 && q.size(3) >= 1 && q.size(4) >= 1, "mmfast ", op,
              ": q must have non-empty H, W, heads and head_dim, got shape ", q.sizes());
  check_window_shift(window_size, shift_size, op);
  AttnParams p;
  p.heads = q.size(3);
  p.hd = q.size(4);
  p.g = make_geometry(q.size(0), q.size(1), q.size(2), window_size, shift_size, pad_then_roll, shift_mask);
  p.R = (2 * p.g.wh - 1) * (2 * p.g.ww - 1);
  p.scale = scale;
  p.mask_value = mask_value;
  if (rel_pos_bias.has_value()) {
    const Tensor& t = *rel_pos_bias;
    TORCH_CHECK(t.dim() == 2 && t.size(0) == p.R && t.size(1) == p.heads, "mmfast ", op,
                ": rel_pos_bias must be [(2*Wh-1)*(2*Ww-1), heads] = [", p.R, ", ", p.heads, "] for window_size ",
                window_size, ", got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.device().is_cpu(), "mmfast ", op,
                ": rel_pos_bias must be a floating point CPU tensor");
    p.has_bias = true;
  }
  if (logit_scale.has_value()) {
    const Tensor& t = *logit_scale;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == p.heads, "mmfast ", op, ": logit_scale must be [heads] = [", p.heads,
                "], got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.device().is_cpu(), "mmfast ", op,
                ": logit_scale must be a floating point CPU tensor");
    p.cosine = true;
  }
  if (pad_value.has_value()) {
    const Tensor& t = *pad_value;
    TORCH_CHECK(t.dim() == 3 && t.size(0) == 3 && t.size(1) == p.heads && t.size(2) == p.hd, "mmfast ", op,
                ": pad_value must be [3, heads, head_dim] = [3, ", p.heads, ", ", p.hd, "], got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.device().is_cpu(), "mmfast ", op,
                ": pad_value must be a floating point CPU tensor");
    p.has_pad = true;
  }
  return p;
}

// Small parameter tensors in the compute type: the bias table transposed to [heads, R], logit_scale
// [heads], pad_value [3, heads, head_dim].
struct SmallInputs {
  Tensor table, ls, pad;
};

SmallInputs small_inputs(const AttnParams& p, at::ScalarType ct, const std::optional<Tensor>& rel_pos_bias,
                         const std::optional<Tensor>& logit_scale, const std::optional<Tensor>& pad_value) {
  SmallInputs s;
  if (p.has_bias) s.table = rel_pos_bias->to(ct).t().contiguous();
  if (p.cosine) s.ls = logit_scale->to(ct).contiguous();
  if (p.has_pad) s.pad = pad_value->to(ct).contiguous();
  return s;
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

std::tuple<Tensor, Tensor> window_attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const std::optional<Tensor>& rel_pos_bias,
                                                    const std::optional<Tensor>& logit_scale,
                                                    const std::optional<Tensor>& pad_value, IntArrayRef window_size,
                                                    IntArrayRef shift_size, double scale, bool shift_mask,
                                                    double mask_value, bool pad_then_roll) {
  const AttnParams p = check_attention("window_attention_fwd", q, k, v, rel_pos_bias, logit_scale, pad_value,
                                       window_size, shift_size, scale, shift_mask, mask_value, pad_then_roll);
  const auto ct = compute_type(q);
  const SmallInputs in = small_inputs(p, ct, rel_pos_bias, logit_scale, pad_value);
  Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(ct));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    attention_fwd_kernel<scalar_t, T>(p, q, k, v, ptr_or_null<T>(in.table), ptr_or_null<T>(in.ls),
                                      ptr_or_null<T>(in.pad), out.mutable_data_ptr<scalar_t>(),
                                      lse.mutable_data_ptr<T>());
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> window_attention_bwd_cpu(
    const Tensor& dout_in, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse_in,
    const std::optional<Tensor>& rel_pos_bias, const std::optional<Tensor>& logit_scale,
    const std::optional<Tensor>& pad_value, IntArrayRef window_size, IntArrayRef shift_size, double scale,
    bool shift_mask, double mask_value, bool pad_then_roll) {
  const char* op = "window_attention_bwd";
  const AttnParams p = check_attention(op, q, k, v, rel_pos_bias, logit_scale, pad_value, window_size, shift_size,
                                       scale, shift_mask, mask_value, pad_then_roll);
  TORCH_CHECK(dout_in.sizes() == q.sizes(), "mmfast ", op, ": dout shape ", dout_in.sizes(), " must equal q shape ",
              q.sizes());
  TORCH_CHECK(dout_in.device().is_cpu() && at::isFloatingType(dout_in.scalar_type()), "mmfast ", op,
              ": dout must be a floating point CPU tensor");
  // out is part of the contract (rowsum(dO * O)); the kernel uses the equal rowsum(P * dP) of its own
  // compute-type P and dP instead, which does not round O to a low-precision dtype.
  TORCH_CHECK(out.sizes() == q.sizes(), "mmfast ", op, ": out shape ", out.sizes(), " must equal q shape ", q.sizes());
  TORCH_CHECK(lse_in.dim() == 4 && lse_in.size(0) == q.size(0) && lse_in.size(1) == q.size(1) &&
                  lse_in.size(2) == q.size(2) && lse_in.size(3) == q.size(3),
              "mmfast ", op, ": lse must be [B, H, W, heads] = ", q.sizes().slice(0, 4), ", got ", lse_in.sizes());
  const auto ct = compute_type(q);
  const SmallInputs in = small_inputs(p, ct, rel_pos_bias, logit_scale, pad_value);
  Tensor lse = lse_in.to(ct).contiguous();
  Tensor dout = dout_in.scalar_type() == q.scalar_type() ? dout_in : dout_in.to(q.scalar_type());
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  // Every non-padded token belongs to exactly one window: each element of dq, dk, dv is written once.
  Tensor dq = at::empty(q.sizes(), opts), dk = at::empty(q.sizes(), opts), dv = at::empty(q.sizes(), opts);
  const int64_t ntasks = p.heads * p.g.B * p.g.nW;
  const int64_t nchunks = std::max<int64_t>(1, std::min(ntasks, kMaxChunks));
  // Reductions across windows accumulate in float64 whatever the compute type.
  const auto copts = q.options().dtype(at::kDouble);
  Tensor part_table = p.has_bias ? at::zeros({nchunks, p.heads, p.R}, copts) : Tensor();
  Tensor part_ls = p.cosine ? at::zeros({nchunks, p.heads}, copts) : Tensor();
  Tensor part_pad = p.has_pad ? at::zeros({nchunks, 2, p.heads, p.hd}, copts) : Tensor();
  Tensor d_table = p.has_bias ? at::empty({p.heads, p.R}, copts) : Tensor();
  Tensor d_ls = p.cosine ? at::empty({p.heads}, copts) : Tensor();
  Tensor d_pad = p.has_pad ? at::zeros({3, p.heads, p.hd}, copts) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    if (ntasks > 0) {
      attention_bwd_kernel<scalar_t, T>(p, dout, q, k, v, lse.const_data_ptr<T>(), ptr_or_null<T>(in.table),
                                        ptr_or_null<T>(in.ls), ptr_or_null<T>(in.pad), dq.mutable_data_ptr<scalar_t>(),
                                        dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
                                        p.has_bias ? part_table.mutable_data_ptr<double>() : nullptr,
                                        p.cosine ? part_ls.mutable_data_ptr<double>() : nullptr,
                                        p.has_pad ? part_pad.mutable_data_ptr<double>() : nullptr, nchunks);
    }
  });
  if (p.has_bias)
    sum_chunks(part_table.const_data_ptr<double>(), nchunks, p.heads * p.R, d_table.mutable_data_ptr<double>());
  if (p.cosine) sum_chunks(part_ls.const_data_ptr<double>(), nchunks, p.heads, d_ls.mutable_data_ptr<double>());
  // d pad_value[0] stays zero: padded query rows are cropped away and get no gradient.
  if (p.has_pad)
    sum_chunks(part_pad.const_data_ptr<double>(), nchunks, 2 * p.heads * p.hd,
               d_pad.mutable_data_ptr<double>() + p.heads * p.hd);
  const auto empty = [&] { return at::empty({0}, q.options()); };
  Tensor d_bias_out = p.has_bias ? d_table.t().contiguous().to(rel_pos_bias->scalar_type()) : empty();
  Tensor d_ls_out = p.cosine ? d_ls.to(logit_scale->scalar_type()) : empty();
  Tensor d_pad_out = p.has_pad ? d_pad.to(pad_value->scalar_type()) : empty();
  return {dq, dk, dv, d_bias_out, d_ls_out, d_pad_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("window_attention_fwd", &window_attention_fwd_cpu);
  m.impl("window_attention_bwd", &window_attention_bwd_cpu);
}

}  // namespace mmfast
