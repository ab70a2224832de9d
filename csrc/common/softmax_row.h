// The vectorised softmax of one row, in place, shared by the CPU attention kernels (window attention,
// ToMe proportional attention). Header-only.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace mmfast {
namespace cpu {

// row[0:ld] <- softmax(row[0:ld]); returns the row's log-sum-exp. ld is a multiple of the vector width
// (padding columns hold -inf: exp gives 0). Terms exp(x - max) with x - max <= exp_floor are exactly 0
// (a floor of -inf flushes nothing): a kernel whose masked logits sit far below the row maximum keeps
// subnormal products out of its GEMMs that way.
template <typename T>
inline T softmax_row(T* row, int64_t ld, T exp_floor = -std::numeric_limits<T>::infinity()) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kW = Vec::size();
  Vec vmax(-std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < ld; j += kW) vmax = at::vec::maximum(vmax, Vec::loadu(row + j));
  const T mx = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  const Vec vm(mx), floor(exp_floor);
  Vec vsum(T(0));
  for (int64_t j = 0; j < ld; j += kW) {
    const Vec x = Vec::loadu(row + j) - vm;
    const Vec e = x.exp() & (x > floor);
    e.store(row + j);
    vsum = vsum + e;
  }
  const T sum = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, vsum);
  const Vec inv(T(1) / sum);
  for (int64_t j = 0; j < ld; j += kW) (Vec::loadu(row + j) * inv).store(row + j);
  return mx + std::log(sum);
}

}  // namespace cpu
}  // namespace mmfast
