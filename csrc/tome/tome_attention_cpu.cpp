// CPU kernel of ToMe's proportional attention, inference only.
//
// tome_attention(qkv, log_size, num_heads, scale) computes, for every batch item b and head h,
//   out[b, :, h] = softmax((q * scale) @ k^T + log_size[b][None, :]) @ v
// where q, k, v are the three [N, head_dim] slices of timm's fused qkv projection output
// ([B, N, 3 * C], C = num_heads * head_dim, laid out as [3, heads, head_dim] along the last dim),
// and writes out as [B, N, C] (heads-major within C): the layout timm's attention output projection
// reads. So the per-layer permute/contiguous copies of q, k, v, the scale multiply, the bias add,
// the softmax pass and the output transpose copy of the explicit path are all gone; q, k, v are
// read once from the projection output by address arithmetic.
//
// One task per (b, h): q * scale, k^T (zero-padded to a vector multiple of columns) and v are packed
// into a per-thread scratch, the N x N logits are formed by the register-blocked small GEMM
// (csrc/common/small_gemm.h) in an L2-resident buffer, the bias row is added (its padding columns are
// -inf, so they vanish in the softmax), each row is softmaxed with at::vec (Sleef exp), and P @ v is
// written straight into out. Compute type: float32 (float64 for float64 inputs). No atomics, no
// reduction across tasks: the result does not depend on the thread count.
//
// There is no backward: the Python layer (mmfast.ops.tome) only dispatches here when no gradient is
// needed and runs the differentiable path otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common/small_gemm.h"
#include "../common/softmax_row.h"

namespace mmfast {
namespace {

using at::Tensor;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename S, typename T>
void tome_attention_kernel(const Tensor& qkv, const Tensor& log_size, int64_t H, double scale, Tensor& out) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kW = Vec::size();
  const int64_t B = qkv.size(0), N = qkv.size(1), C = qkv.size(2) / 3, D = C / H;
  const int64_t sb = qkv.stride(0), sn = qkv.stride(1);
  const S* base = qkv.const_data_ptr<S>();
  const bool has_bias = log_size.defined();
  const T* bias = has_bias ? log_size.const_data_ptr<T>() : nullptr;  // [B, N] contiguous, compute type
  S* obase = out.mutable_data_ptr<S>();
  const int64_t ldN = round_up(N, kW), ldD = round_up(D, kW);
  const T tscale = static_cast<T>(scale);
  const T ninf = -std::numeric_limits<T>::infinity();

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // q [N, D] (scaled), kt [D, ldN], v [N, ldD], logits [N, ldN], o [N, ldD], bias row [ldN]
    std::vector<T> buf(N * D + D * ldN + N * ldD + N * ldN + N * ldD + ldN);
    T* qs = buf.data();
    T* kt = qs + N * D;
    T* vp = kt + D * ldN;
    T* lg = vp + N * ldD;
    T* ob = lg + N * ldN;
    T* brow = ob + N * ldD;
    std::fill(kt, kt + D * ldN, T(0));
    std::fill(vp, vp + N * ldD, T(0));
    int64_t bias_b = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      if (b != bias_b) {
        for (int64_t j = 0; j < N; ++j) brow[j] = has_bias ? bias[b * N + j] : T(0);
        for (int64_t j = N; j < ldN; ++j) brow[j] = ninf;
        bias_b = b;
      }
      const S* item = base + b * sb;
      for (int64_t i = 0; i < N; ++i) {
        const S* row = item + i * sn;
        const S* q = row + h * D;
        const S* k = row + C + h * D;
        const S* v = row + 2 * C + h * D;
        // q * scale rounded in the input type, as (q * scale) in the explicit path
        for (int64_t d = 0; d < D; ++d) qs[i * D + d] = cpu::to_compute<T>(cpu::from_compute<S>(cpu::to_compute<T>(q[d]) * tscale));
        for (int64_t d = 0; d < D; ++d) kt[d * ldN + i] = cpu::to_compute<T>(k[d]);
        for (int64_t d = 0; d < D; ++d) vp[i * ldD + d] = cpu::to_compute<T>(v[d]);
      }
      cpu::small_gemm<T>(N, N, D, qs, D, 1, kt, ldN, lg, ldN);
      for (int64_t i = 0; i < N; ++i) {
        T* row = lg + i * ldN;
        for (int64_t j = 0; j < ldN; j += kW) (Vec::loadu(row + j) + Vec::loadu(brow + j)).store(row + j);
        cpu::softmax_row<T>(row, ldN);
      }
      cpu::small_gemm<T>(N, D, N, lg, ldN, 1, vp, ldD, ob, ldD);
      S* o = obase + b * N * C + h * D;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t d = 0; d < D; ++d) o[i * C + d] = cpu::from_compute<S>(ob[i * ldD + d]);
    }
  });
}

Tensor tome_attention_cpu(const Tensor& qkv, const std::optional<Tensor>& log_size, int64_t num_heads, double scale) {
  TORCH_CHECK(qkv.device().is_cpu(), "tome_attention: qkv must be a CPU tensor, got ", qkv.device());
  TORCH_CHECK(qkv.dim() == 3, "tome_attention: qkv must be [B, N, 3 * C] (the fused qkv projection output), got ",
              qkv.sizes());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble || qkv.scalar_type() == at::kHalf ||
                  qkv.scalar_type() == at::kBFloat16,
              "tome_attention: qkv must be float32, float64, float16 or bfloat16, got ", qkv.scalar_type());
  TORCH_CHECK(num_heads > 0, "tome_attention: num_heads must be positive, got ", num_heads);
  TORCH_CHECK(qkv.size(2) % (3 * num_heads) == 0, "tome_attention: qkv's last dim (", qkv.size(2),
              ") must be 3 * num_heads * head_dim with num_heads=", num_heads);
  TORCH_CHECK(qkv.size(1) > 0, "tome_attention: qkv has no tokens");
  const auto compute = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor qkv_c = qkv.stride(2) == 1 ? qkv : qkv.contiguous();
  Tensor ls;
  if (log_size.has_value() && log_size->defined()) {
    const Tensor& l = *log_size;
    TORCH_CHECK(l.device().is_cpu(), "tome_attention: log_size must be a CPU tensor, got ", l.device());
    TORCH_CHECK(l.dim() == 2 && l.size(0) == qkv.size(0) && l.size(1) == qkv.size(1),
                "tome_attention: log_size must be [B, N] = [", qkv.size(0), ", ", qkv.size(1), "], got ", l.sizes());
    TORCH_CHECK(at::isFloatingType(l.scalar_type()), "tome_attention: log_size must be floating, got ",
                l.scalar_type());
    ls = l.to(compute).contiguous();
  }
  Tensor out = at::empty({qkv.size(0), qkv.size(1), qkv.size(2) / 3}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "tome_attention", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      tome_attention_kernel<double, double>(qkv_c, ls, num_heads, scale, out);
    } else {
      tome_attention_kernel<scalar_t, float>(qkv_c, ls, num_heads, scale, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) { m.impl("tome_attention", &tome_attention_cpu); }

}  // namespace mmfast
