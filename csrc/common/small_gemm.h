// Register-blocked small GEMM on at::vec and element conversions, shared by the CPU attention kernels (window attention,
// ToMe proportional attention). Header-only; every function is inline.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace mmfast {
namespace cpu {

// small GEMM: C[m, :n] (+)= sum_k A(m, k) * B[k, :n], A(m, k) = A[m * sam + k * sak], B and C row-major with
// leading dimensions that are multiples of the vector width (the padding columns of B must be finite;
// C's padding columns receive the products with them). Register-blocked MR rows x NV vectors.

template <typename T, int MR, int NV>
inline void gemm_block(int64_t K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb, T* C, int64_t ldc,
                       bool accumulate) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kW = Vec::size();
  Vec c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? Vec::loadu(C + r * ldc + v * kW) : Vec(T(0));
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + v * kW);
    const T* a = A + k * sak;
    for (int r = 0; r < MR; ++r) {
      const Vec ar(a[r * sam]);
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(ar, bv[v], c[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * kW);
}

template <typename T, int MR>
inline void gemm_rows(int64_t nvec, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate) {
  constexpr int64_t kW = at::vec::Vectorized<T>::size();
  int64_t v = 0;
  for (; v + 2 <= nvec; v += 2) gemm_block<T, MR, 2>(K, A, sam, sak, B + v * kW, ldb, C + v * kW, ldc, accumulate);
  if (v < nvec) gemm_block<T, MR, 1>(K, A, sam, sak, B + v * kW, ldb, C + v * kW, ldc, accumulate);
}

// The last rows (fewer than 6): one register block of exactly `rows` rows.
template <typename T, int MR>
inline void gemm_tail(int64_t rows, int64_t nvec, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                      int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      gemm_rows<T, MR>(nvec, K, A, sam, sak, B, ldb, C, ldc, accumulate);
    } else {
      gemm_tail<T, MR - 1>(rows, nvec, K, A, sam, sak, B, ldb, C, ldc, accumulate);
    }
  }
}

template <typename T>
inline void small_gemm(int64_t M, int64_t ncols, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                       int64_t ldb, T* C, int64_t ldc, bool accumulate = false) {
  constexpr int64_t kW = at::vec::Vectorized<T>::size();
  const int64_t nvec = (ncols + kW - 1) / kW;
  int64_t m = 0;
  // 6 rows x 2 vectors: 12 accumulators + 2 B vectors + 1 broadcast fit the 16 AVX2 registers.
  for (; m + 6 <= M; m += 6) gemm_rows<T, 6>(nvec, K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, accumulate);
  gemm_tail<T, 5>(M - m, nvec, K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, accumulate);
}

// Element conversions to and from the compute type. at::Half's own float conversions use F16C
// intrinsics, which the build's -mavx2 -mfma flags do not enable; c10's portable bit conversions are
// used instead.
template <typename T, typename S>
inline T to_compute(S v) {
  return static_cast<T>(v);
}
template <>
inline float to_compute<float, at::Half>(at::Half v) {
  return c10::detail::fp16_ieee_to_fp32_value(v.x);
}
template <typename S, typename T>
inline S from_compute(T v) {
  return static_cast<S>(v);
}
template <>
inline at::Half from_compute<at::Half, float>(float v) {
  return at::Half(c10::detail::fp16_ieee_from_fp32_value(v), at::Half::from_bits());
}

}  // namespace cpu
}  // namespace mmfast
