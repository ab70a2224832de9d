// Argument checks of the window ops, shared by the CPU and CUDA entry points (host code only). The
// window_process checks are defined in window_process_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace mmfast {

inline std::pair<int64_t, int64_t> check_pair(at::IntArrayRef v, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 2, "mmfast ", op, ": ", name, " must have 2 entries (h, w), got ", v);
  return {v[0], v[1]};
}

inline void check_window_shift(at::IntArrayRef window_size, at::IntArrayRef shift_size, const char* op) {
  auto [wh, ww] = check_pair(window_size, op, "window_size");
  auto [sh, sw] = check_pair(shift_size, op, "shift_size");
  TORCH_CHECK(wh >= 1 && ww >= 1, "mmfast ", op, ": window_size must be >= 1 on both axes, got ", window_size);
  TORCH_CHECK(sh >= 0 && sh < wh && sw >= 0 && sw < ww, "mmfast ", op,
              ": shift_size must satisfy 0 <= shift < window_size on both axes, got shift_size ", shift_size,
              " for window_size ", window_size);
}

void window_process_check(const at::Tensor& x, at::IntArrayRef window_size, at::IntArrayRef shift_size,
                          const std::optional<at::Tensor>& pad_value);
void window_process_reverse_check(const at::Tensor& windows, at::IntArrayRef hw, at::IntArrayRef window_size,
                                  at::IntArrayRef shift_size);

}  // namespace mmfast
