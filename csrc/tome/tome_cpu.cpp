// CPU kernels of ToMe token merging (bipartite soft matching and the size-weighted merge).
//
// The oracle is mmfast/reference/tome.py; its rules (tie-breaks, protected tokens, the order of the
// unmerged tokens, the clamping of r and the r == 0 identity) are the contract restated below.
//
// tome_match: the [B, N_A, N_B] score tensor is never materialised; at most kTileElems scores exist
// at a time, in a reused L2-sized tile. The row norms and the normalised metric come from the same
// ATen calls the reference makes (linalg_vector_norm, div), so the normalised rows are
// bit-identical to the reference's. The scores are produced tile by tile by ATen's bmm, i.e. the
// same BLAS GEMM, in the same dtype and with the same per-matrix shape as the reference's
// `a @ b^T` (a tile holds whole batch items whenever one item's N_A x N_B scores fit), so every
// score is bit-identical to the reference's, whatever order the BLAS sums in (MKL on AVX-512 sums
// K <= 384 sequentially with FMA and splits larger K in halves; tested up to C = 768, fp32, fp16,
// bf16, fp64). Hence identical indices, near-ties included. Only when one item's scores exceed the
// tile (N above ~1000) are A rows split, which keeps the bits for BLAS libraries whose per-element
// order depends on K only (MKL: tested with N = 1201). A fused pass turns each tile row into
// (node_max, node_idx) with the reference's tie-break; the selection is a per-item stable sort.
//
// tome_merge_wavg and its backward: one task per OUTPUT token reads its own input token and the src
// tokens merged into it (a per-item CSR built here from dst_idx with a stable counting sort), so
// every output row and every input-gradient row is written by exactly one task: no atomics, and
// the same bits on every run and for every thread count. Accumulation is fp32 (fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

namespace mmfast {
namespace {

using at::Tensor;

// Scores per GEMM tile (1 MiB in fp32): large enough that ViT-sized problems run as a few batched
// GEMMs, small enough to stay in L2 while the fused argmax pass reads it back.
constexpr int64_t kTileElems = int64_t(1) << 18;

int64_t floor_div2(int64_t v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); }

// reference.tome.effective_r: min(r, (N - protected) // 2), 0 when B has no legal destination.
int64_t effective_r(int64_t n, int64_t r, bool class_token, bool distill_token) {
  const int64_t prot = int64_t(class_token) + int64_t(distill_token);
  r = std::min(r, floor_div2(n - prot));
  if (n / 2 - int64_t(distill_token) <= 0) r = 0;
  return std::max<int64_t>(r, 0);
}

// Scalar conversions to and from the accumulation type. c10::Half's own conversions use F16C
// intrinsics when CPU_CAPABILITY_AVX2 is defined, which this build defines without -mf16c, so
// Half goes through c10's portable round-to-nearest-even routines instead.
template <typename T>
inline at::opmath_type<T> to_acc(T v) {
  return static_cast<at::opmath_type<T>>(v);
}
inline float to_acc(c10::Half v) { return c10::detail::fp16_ieee_to_fp32_value(v.x); }

template <typename T>
inline T from_acc(at::opmath_type<T> v) {
  return static_cast<T>(v);
}
template <>
inline c10::Half from_acc<c10::Half>(float v) {
  return c10::Half(c10::detail::fp16_ieee_from_fp32_value(v), c10::Half::from_bits());
}

// Grain of a parallel loop whose items each touch about `work` elements: ~32K elements per task,
// so small problems stay on the calling thread (an OpenMP region costs more than they do).
int64_t items_grain(int64_t work) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work, 1)); }

// fp32 accumulation for every floating type but float64 (kept for gradcheck).
at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ------------------------------------------------------------------------------------------------
// Matching
// ------------------------------------------------------------------------------------------------

// Fused epilogue of one score tile: per A row, the argmax over B (strict >, so the lowest index
// wins an exact tie) and its value. NaN (a zero-norm token) counts as +inf: torch.argmax returns the
// first NaN and torch.sort puts NaN first in descending order, which +inf reproduces exactly.
template <typename scalar_t, typename key_t>
void row_argmax(const scalar_t* row, int64_t n_b, int64_t j0, bool masked_row, key_t* out_max, int64_t* out_idx) {
  key_t best = -std::numeric_limits<key_t>::infinity();
  int64_t best_j = 0;
  if (!masked_row) {
    for (int64_t j = j0; j < n_b; ++j) {
      key_t v = to_acc(row[j]);
      if (std::isnan(v)) v = std::numeric_limits<key_t>::infinity();
      if (v > best) {
        best = v;
        best_j = j;
      }
    }
  }
  *out_max = best;
  *out_idx = best_j;
}

// node_max / node_idx [B, N_A] of the normalised metric m, tile by tile.
template <typename scalar_t>
void scores_argmax(const Tensor& m, bool class_token, bool distill_token, Tensor& node_max, Tensor& node_idx) {
  using key_t = at::opmath_type<scalar_t>;  // exact for every score value of scalar_t
  const int64_t bsz = m.size(0), n = m.size(1), n_a = (n + 1) / 2, n_b = n / 2;
  // The reference's operands: a = m[:, ::2], b = m[:, 1::2], scores = a @ b^T (strided views).
  const Tensor a_all = m.slice(1, 0, n, 2);
  const Tensor bt_all = m.slice(1, 1, n, 2).transpose(1, 2);
  const int64_t per_item = n_a * n_b;
  const int64_t items = std::max<int64_t>(1, std::min<int64_t>(bsz, kTileElems / per_item));
  const int64_t rows = per_item <= kTileElems ? n_a : std::max<int64_t>(1, kTileElems / n_b);
  Tensor tile = at::empty({items * rows * n_b}, m.options());
  const int64_t j0 = distill_token ? 1 : 0;  // B's token 0 is the distillation token: a -inf column
  key_t* pmax = node_max.data_ptr<key_t>();
  int64_t* pidx = node_idx.data_ptr<int64_t>();

  for (int64_t b0 = 0; b0 < bsz; b0 += items) {
    const int64_t nb = std::min(items, bsz - b0);
    for (int64_t i0 = 0; i0 < n_a; i0 += rows) {
      const int64_t ni = std::min(rows, n_a - i0);
      Tensor t = tile.narrow(0, 0, nb * ni * n_b).view({nb, ni, n_b});
      at::bmm_out(t, a_all.narrow(0, b0, nb).narrow(1, i0, ni), bt_all.narrow(0, b0, nb));
      const scalar_t* base = t.const_data_ptr<scalar_t>();
      at::parallel_for(0, nb * ni, items_grain(n_b), [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t bi = k / ni, gi = i0 + k % ni, out = (b0 + bi) * n_a + gi;
          row_argmax(base + k * n_b, n_b, j0, class_token && gi == 0, pmax + out, pidx + out);
        }
      });
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> tome_match_cpu(const Tensor& metric, int64_t r, bool class_token,
                                                  bool distill_token) {
  TORCH_CHECK_VALUE(metric.dim() == 3, "mmfast tome_match: metric must be 3-D [B, N, C], got shape ",
                    metric.sizes());
  TORCH_CHECK_VALUE(metric.is_floating_point(), "mmfast tome_match: metric must be a floating-point tensor, got ",
                    metric.scalar_type());
  TORCH_CHECK_VALUE(metric.device().is_cpu(), "mmfast tome_match CPU kernel: metric must be on CPU, got ",
                    metric.device());
  TORCH_CHECK_VALUE(r >= 0, "mmfast tome_match: r must be a non-negative int, got ", r);
  const int64_t bsz = metric.size(0), n = metric.size(1), n_a = (n + 1) / 2;
  r = effective_r(n, r, class_token, distill_token);
  const auto lopts = metric.options().dtype(at::kLong);
  if (r == 0 || bsz == 0) {
    // The reference's r == 0 answer, computed without scores (and the shapes of an empty batch).
    return {at::arange(n_a - r, lopts).expand({bsz, n_a - r}).contiguous(), at::empty({bsz, r}, lopts),
            at::empty({bsz, r}, lopts)};
  }
  // Exactly the reference's normalisation, metric / metric.norm(dim=-1, keepdim=True), in the
  // metric's dtype (a zero-norm token gives NaN, handled as the reference's argmax/sort do).
  const Tensor norm = at::linalg_vector_norm(metric, 2, at::IntArrayRef{-1}, /*keepdim=*/true, std::nullopt);
  const Tensor m = metric.div(norm);
  Tensor node_max = at::empty({bsz, n_a}, metric.options().dtype(acc_type_of(metric.scalar_type())));
  Tensor node_idx = at::empty({bsz, n_a}, lopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "tome_match", [&] {
    scores_argmax<scalar_t>(m, class_token, distill_token, node_max, node_idx);
  });
  const int64_t* pidx = node_idx.const_data_ptr<int64_t>();

  // Selection: stable sort by node_max descending (exact ties: lower A index first), first r merge.
  Tensor unm_idx = at::empty({bsz, n_a - r}, lopts);
  Tensor src_idx = at::empty({bsz, r}, lopts);
  Tensor dst_idx = at::empty({bsz, r}, lopts);
  int64_t* pu = unm_idx.data_ptr<int64_t>();
  int64_t* ps = src_idx.data_ptr<int64_t>();
  int64_t* pd = dst_idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(node_max.scalar_type(), "tome_match_select", [&] {
    const scalar_t* key_all = node_max.data_ptr<scalar_t>();
    at::parallel_for(0, bsz, items_grain(n), [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> order(n_a);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* key = key_all + b * n_a;
        std::iota(order.begin(), order.end(), int64_t(0));
        std::stable_sort(order.begin(), order.end(), [key](int64_t i, int64_t j) { return key[i] > key[j]; });
        for (int64_t k = 0; k < r; ++k) {
          ps[b * r + k] = order[k];
          pd[b * r + k] = pidx[b * n_a + order[k]];
        }
        // With a class token the survivors go back to ascending A index (class token first).
        if (class_token) std::sort(order.begin() + r, order.end());
        std::copy(order.begin() + r, order.end(), pu + b * (n_a - r));
      }
    });
  });
  return {unm_idx, src_idx, dst_idx};
}

// ------------------------------------------------------------------------------------------------
// Merge
// ------------------------------------------------------------------------------------------------

// Output token t of batch item b reads input token own[b, t] and then the src tokens
// src_tok[b, off[b, t] .. off[b, t + 1]) in merge order (the order scatter_reduce adds them).
struct Groups {
  int64_t n_out = 0, r = 0;
  std::vector<int64_t> own;      // [B, n_out]
  std::vector<int64_t> off;      // [B, n_out + 1]
  std::vector<int64_t> src_tok;  // [B, r]
};

void check_index(const Tensor& t, const char* op, const char* name, int64_t bsz) {
  TORCH_CHECK_VALUE(t.dim() == 2, "mmfast ", op, ": ", name, " must be 2-D [B, k], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, "mmfast ", op, ": ", name, " must be int64, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "mmfast ", op, " CPU kernel: ", name, " must be on CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.size(0) == bsz, "mmfast ", op, ": ", name, " has batch ", t.size(0), " but x has batch ", bsz);
}

// Validates the indices against x's token count and builds the per-item CSR of merge groups.
Groups build_groups(const char* op, int64_t bsz, int64_t n, const Tensor& unm_in, const Tensor& src_in,
                    const Tensor& dst_in) {
  check_index(unm_in, op, "unm_idx", bsz);
  check_index(src_in, op, "src_idx", bsz);
  check_index(dst_in, op, "dst_idx", bsz);
  const int64_t n_a = (n + 1) / 2, n_b = n / 2, r = src_in.size(1);
  TORCH_CHECK_VALUE(dst_in.size(1) == r, "mmfast ", op, ": src_idx and dst_idx must have the same shape, got ",
                    src_in.sizes(), " and ", dst_in.sizes());
  TORCH_CHECK_VALUE(unm_in.size(1) + r == n_a, "mmfast ", op, ": x has ", n, " tokens (", n_a,
                    " in set A) but the indices describe ", unm_in.size(1) + r, " A tokens (unm_idx ",
                    unm_in.sizes(), ", src_idx ", src_in.sizes(), ")");
  Groups g;
  g.r = r;
  if (r == 0) {
    // r == 0 is the identity in the original token order, as in the reference.
    g.n_out = n;
    g.own.resize(bsz * n);
    g.off.assign(bsz * (n + 1), 0);
    for (int64_t b = 0; b < bsz; ++b) std::iota(g.own.begin() + b * n, g.own.begin() + (b + 1) * n, int64_t(0));
    return g;
  }
  const int64_t n_unm = n_a - r, n_out = n - r;
  g.n_out = n_out;
  g.own.resize(bsz * n_out);
  g.off.resize(bsz * (n_out + 1));
  g.src_tok.resize(bsz * r);
  const Tensor unm = unm_in.contiguous(), src = src_in.contiguous(), dst = dst_in.contiguous();
  const int64_t* pu = unm.data_ptr<int64_t>();
  const int64_t* ps = src.data_ptr<int64_t>();
  const int64_t* pd = dst.data_ptr<int64_t>();
  std::vector<int64_t> bad(bsz, -1);  // first offending batch item, reported after the parallel loop
  at::parallel_for(0, bsz, items_grain(n), [&](int64_t b0, int64_t b1) {
    std::vector<char> seen(n_a);
    std::vector<int64_t> count(n_b + 1);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(seen.begin(), seen.end(), 0);
      bool ok = true;
      for (int64_t k = 0; k < n_unm && ok; ++k) {
        const int64_t i = pu[b * n_unm + k];
        ok = i >= 0 && i < n_a && !seen[i];
        if (ok) seen[i] = 1;
      }
      for (int64_t k = 0; k < r && ok; ++k) {
        const int64_t i = ps[b * r + k], j = pd[b * r + k];
        ok = i >= 0 && i < n_a && !seen[i] && j >= 0 && j < n_b;
        if (ok) seen[i] = 1;
      }
      if (!ok) {
        bad[b] = b;
        continue;
      }
      int64_t* own = g.own.data() + b * n_out;
      int64_t* off = g.off.data() + b * (n_out + 1);
      for (int64_t k = 0; k < n_unm; ++k) own[k] = 2 * pu[b * n_unm + k];
      for (int64_t j = 0; j < n_b; ++j) own[n_unm + j] = 2 * j + 1;
      // Stable counting sort of the srcs by destination.
      std::fill(count.begin(), count.end(), 0);
      for (int64_t k = 0; k < r; ++k) ++count[pd[b * r + k] + 1];
      for (int64_t j = 0; j < n_b; ++j) count[j + 1] += count[j];
      for (int64_t t = 0; t <= n_unm; ++t) off[t] = 0;
      for (int64_t j = 0; j < n_b; ++j) off[n_unm + j + 1] = count[j + 1];
      int64_t* srt = g.src_tok.data() + b * r;
      for (int64_t k = 0; k < r; ++k) srt[count[pd[b * r + k]]++] = 2 * ps[b * r + k];
    }
  });
  for (int64_t b = 0; b < bsz; ++b) {
    TORCH_CHECK_VALUE(bad[b] < 0, "mmfast ", op, ": batch item ", b, ": unm_idx and src_idx must together hold ",
                      "every A index in [0, ", n_a, ") exactly once, and dst_idx values must be in [0, ", n_b,
                      ")");
  }
  return g;
}

void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 3, "mmfast ", op, ": x must be 3-D [B, N, C], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.is_floating_point(), "mmfast ", op, ": x must be a floating-point tensor, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "mmfast ", op, " CPU kernel: x must be on CPU, got ", x.device());
}

void check_size(const std::optional<Tensor>& size, const Tensor& x, const char* op) {
  if (!size.has_value()) return;
  const Tensor& s = *size;
  TORCH_CHECK_VALUE(s.dim() == 3 && s.size(0) == x.size(0) && s.size(1) == x.size(1) && s.size(2) == 1, "mmfast ",
                    op, ": size must be [B, N, 1] = [", x.size(0), ", ", x.size(1), ", 1] to match x, got shape ",
                    s.sizes());
  TORCH_CHECK_VALUE(s.is_floating_point(), "mmfast ", op, ": size must be a floating-point tensor, got ",
                    s.scalar_type());
  TORCH_CHECK_VALUE(s.device().is_cpu(), "mmfast ", op, " CPU kernel: size must be on CPU, got ", s.device());
}

// The src tokens merged into output token k = b * n_out + t: src_tok[first .. last) of item b.
struct GroupSpan {
  int64_t b, first, last;
};

GroupSpan group_span(const Groups& g, int64_t k) {
  const int64_t b = k / g.n_out, t = k % g.n_out;
  const int64_t* off = g.off.data() + b * (g.n_out + 1) + t;
  return {b, b * g.r + off[0], b * g.r + off[1]};
}

// Output token k's size-weighted sum over its group, own token first and then the src tokens in
// merge order (the forward's summation order, which the backward repeats to recompute out_t):
// acc[i] = sum_j s_j * x_j[i]. Returns S_t = sum_j s_j. x is [B, N, C] and size [B, N], contiguous.
template <typename scalar_t>
at::opmath_type<scalar_t> group_weighted_sum(const Groups& g, int64_t k, const scalar_t* px,
                                             const at::opmath_type<scalar_t>* ps, int64_t n, int64_t c,
                                             at::opmath_type<scalar_t>* acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const GroupSpan span = group_span(g, k);
  const int64_t own = g.own[k];
  acc_t s_sum = ps[span.b * n + own];
  const scalar_t* xr = px + (span.b * n + own) * c;
  for (int64_t i = 0; i < c; ++i) acc[i] = to_acc(xr[i]) * s_sum;
  for (int64_t q = span.first; q < span.last; ++q) {
    const int64_t tok = g.src_tok[q];
    const acc_t s = ps[span.b * n + tok];
    s_sum += s;
    xr = px + (span.b * n + tok) * c;
    for (int64_t i = 0; i < c; ++i) acc[i] += to_acc(xr[i]) * s;
  }
  return s_sum;
}

template <typename scalar_t>
void wavg_fwd_impl(const Groups& g, const Tensor& x, const Tensor& size, Tensor& out, Tensor& size_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bsz = x.size(0), n = x.size(1), c = x.size(2);
  const scalar_t* px = x.data_ptr<scalar_t>();
  const acc_t* ps = size.data_ptr<acc_t>();
  scalar_t* po = out.data_ptr<scalar_t>();
  acc_t* pso = size_out.data_ptr<acc_t>();
  at::parallel_for(0, bsz * g.n_out, items_grain(c), [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> acc(c);
    for (int64_t k = k0; k < k1; ++k) {
      const acc_t s_sum = group_weighted_sum(g, k, px, ps, n, c, acc.data());
      scalar_t* orow = po + k * c;
      for (int64_t i = 0; i < c; ++i) orow[i] = from_acc<scalar_t>(acc[i] / s_sum);
      pso[k] = s_sum;
    }
  });
}

std::tuple<Tensor, Tensor> tome_merge_wavg_cpu(const Tensor& x_in, const std::optional<Tensor>& size,
                                               const Tensor& unm_idx, const Tensor& src_idx, const Tensor& dst_idx) {
  const char* op = "tome_merge_wavg";
  check_x(x_in, op);
  check_size(size, x_in, op);
  const int64_t bsz = x_in.size(0), n = x_in.size(1), c = x_in.size(2);
  const Groups g = build_groups(op, bsz, n, unm_idx, src_idx, dst_idx);
  // Output dtypes follow the reference: x * size promotes, merge(size) keeps size's dtype.
  const auto size_dtype = size.has_value() ? size->scalar_type() : x_in.scalar_type();
  const auto out_dtype = at::promote_types(x_in.scalar_type(), size_dtype);
  const auto acc = acc_type_of(out_dtype);
  const Tensor x = x_in.to(out_dtype).contiguous();
  const Tensor s = size.has_value() ? size->to(acc).contiguous() : at::ones({bsz, n, 1}, x.options().dtype(acc));
  Tensor out = at::empty({bsz, g.n_out, c}, x.options());
  Tensor size_out = at::empty({bsz, g.n_out, 1}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "tome_merge_wavg",
                                  [&] { wavg_fwd_impl<scalar_t>(g, x, s, out, size_out); });
  return {out, size_out.to(size_dtype)};
}

// d out_t / d x_i = s_i / S_t and d out_t / d s_i = (x_i - out_t) / S_t for every member i of
// output token t's group, so with q = g_t / S_t:
//   grad_x_i = s_i * q,   grad_s_i = <q, x_i - out_t> + grad_size_out_t.
// out_t is recomputed from the group (its rows are re-read right away, from cache).
template <typename scalar_t>
void wavg_bwd_impl(const Groups& g, const Tensor& gout, const Tensor& gsize, bool has_gsize, const Tensor& x,
                   const Tensor& size, Tensor& gx, Tensor& gs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bsz = x.size(0), n = x.size(1), c = x.size(2);
  const scalar_t* px = x.data_ptr<scalar_t>();
  const scalar_t* pg = gout.data_ptr<scalar_t>();
  const acc_t* pgs = has_gsize ? gsize.data_ptr<acc_t>() : nullptr;
  const acc_t* ps = size.data_ptr<acc_t>();
  scalar_t* pgx = gx.data_ptr<scalar_t>();
  acc_t* pgsz = gs.data_ptr<acc_t>();
  at::parallel_for(0, bsz * g.n_out, items_grain(c), [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> acc(c), q(c);
    for (int64_t k = k0; k < k1; ++k) {
      const GroupSpan span = group_span(g, k);
      const int64_t b = span.b;
      const acc_t s_sum = group_weighted_sum(g, k, px, ps, n, c, acc.data());
      const scalar_t* grow = pg + k * c;
      for (int64_t i = 0; i < c; ++i) {
        acc[i] /= s_sum;  // out_t
        q[i] = to_acc(grow[i]) / s_sum;
      }
      const acc_t gsz = has_gsize ? pgs[k] : acc_t(0);
      auto member = [&](int64_t tok) {
        const acc_t s = ps[b * n + tok];
        const scalar_t* xm = px + (b * n + tok) * c;
        scalar_t* gxm = pgx + (b * n + tok) * c;
        acc_t dot = 0;
        for (int64_t i = 0; i < c; ++i) {
          gxm[i] = from_acc<scalar_t>(q[i] * s);
          dot += q[i] * (to_acc(xm[i]) - acc[i]);
        }
        pgsz[b * n + tok] = dot + gsz;
      };
      member(g.own[k]);
      for (int64_t p = span.first; p < span.last; ++p) member(g.src_tok[p]);
    }
  });
}

std::tuple<Tensor, Tensor> tome_merge_wavg_bwd_cpu(const Tensor& grad_x_out, const std::optional<Tensor>& grad_size_out,
                                                   const Tensor& x_in, const std::optional<Tensor>& size,
                                                   const Tensor& unm_idx, const Tensor& src_idx,
                                                   const Tensor& dst_idx) {
  const char* op = "tome_merge_wavg_bwd";
  check_x(x_in, op);
  check_size(size, x_in, op);
  const int64_t bsz = x_in.size(0), n = x_in.size(1), c = x_in.size(2);
  const Groups g = build_groups(op, bsz, n, unm_idx, src_idx, dst_idx);
  TORCH_CHECK_VALUE(grad_x_out.dim() == 3 && grad_x_out.size(0) == bsz && grad_x_out.size(1) == g.n_out &&
                        grad_x_out.size(2) == c,
                    "mmfast ", op, ": grad_x_out must have shape [", bsz, ", ", g.n_out, ", ", c, "], got ",
                    grad_x_out.sizes());
  TORCH_CHECK_VALUE(grad_x_out.device().is_cpu(), "mmfast ", op, " CPU kernel: grad_x_out must be on CPU");
  if (grad_size_out.has_value()) {
    const Tensor& gso = *grad_size_out;
    TORCH_CHECK_VALUE(gso.dim() == 3 && gso.size(0) == bsz && gso.size(1) == g.n_out && gso.size(2) == 1, "mmfast ",
                      op, ": grad_size_out must have shape [", bsz, ", ", g.n_out, ", 1], got ", gso.sizes());
    TORCH_CHECK_VALUE(gso.device().is_cpu(), "mmfast ", op, " CPU kernel: grad_size_out must be on CPU");
  }
  const auto size_dtype = size.has_value() ? size->scalar_type() : x_in.scalar_type();
  const auto work_dtype = at::promote_types(x_in.scalar_type(), size_dtype);
  const auto acc = acc_type_of(work_dtype);
  const Tensor x = x_in.to(work_dtype).contiguous();
  const Tensor s = size.has_value() ? size->to(acc).contiguous() : at::ones({bsz, n, 1}, x.options().dtype(acc));
  const Tensor gout = grad_x_out.to(work_dtype).contiguous();
  const Tensor gsz = grad_size_out.has_value() ? grad_size_out->to(acc).contiguous() : Tensor();
  Tensor gx = at::empty({bsz, n, c}, x.options());
  Tensor gs = at::empty({bsz, n, 1}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work_dtype, "tome_merge_wavg_bwd", [&] {
    wavg_bwd_impl<scalar_t>(g, gout, gsz, grad_size_out.has_value(), x, s, gx, gs);
  });
  return {gx.to(x_in.scalar_type()), gs.to(size_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("tome_match", &tome_match_cpu);
  m.impl("tome_merge_wavg", &tome_merge_wavg_cpu);
  m.impl("tome_merge_wavg_bwd", &tome_merge_wavg_bwd_cpu);
}

}  // namespace mmfast
