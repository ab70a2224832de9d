// CPU kernels of window_process (roll + pad + partition in one copy) and window_process_reverse (merge
// + crop + un-roll), and their argument checks (the CUDA kernels, window_process_cuda.cu, check with
// the same functions; the schemas are in csrc/mmfast.cpp). The index maps are window_geometry.h's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "window_checks.h"
#include "window_geometry.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace mmfast {

using at::IntArrayRef;
using at::Tensor;

namespace {


template <typename S>
inline void copy_channels(const S* src, int64_t stride, int64_t C, S* dst) {
  if (stride == 1) {
    std::memcpy(dst, src, C * sizeof(S));
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] = src[c * stride];
  }
}

}  // namespace

// Declared in window_checks.h: the CUDA entry points (window_process_cuda.cu) check with these too.
void window_process_check(const Tensor& x, IntArrayRef window_size, IntArrayRef shift_size,
                          const std::optional<Tensor>& pad_value) {
  const char* op = "window_process";
  TORCH_CHECK(x.dim() == 4, "mmfast ", op, ": x must be 4-D [B, H, W, C], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "mmfast ", op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1, "mmfast ", op, ": x must have H, W >= 1, got shape ", x.sizes());
  check_window_shift(window_size, shift_size, op);
  if (pad_value.has_value()) {
    const Tensor& t = *pad_value;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(3), "mmfast ", op, ": pad_value must be [C] = [", x.size(3),
                "] (x's channels), got ", t.sizes());
    TORCH_CHECK(t.device() == x.device(), "mmfast ", op, ": pad_value must be on x's device ", x.device(), ", got ",
                t.device());
  }
}

void window_process_reverse_check(const Tensor& windows, IntArrayRef hw, IntArrayRef window_size,
                                  IntArrayRef shift_size) {
  const char* op = "window_process_reverse";
  TORCH_CHECK(windows.dim() == 3, "mmfast ", op, ": windows must be 3-D [B*nW, Wh*Ww, C], got shape ", windows.sizes());
  TORCH_CHECK(at::isFloatingType(windows.scalar_type()), "mmfast ", op, ": windows must be floating point, got ",
              windows.scalar_type());
  auto [H, W] = check_pair(hw, op, "hw");
  TORCH_CHECK(H >= 1 && W >= 1, "mmfast ", op, ": hw must be >= 1 on both axes, got ", hw);
  check_window_shift(window_size, shift_size, op);
  const int64_t wh = window_size[0], ww = window_size[1];
  const int64_t nW = make_window_grid(H, W, wh, ww, 0, 0, false).nW;
  TORCH_CHECK(windows.size(1) == wh * ww, "mmfast ", op, ": windows must have Wh*Ww = ", wh * ww,
              " tokens per window (dim 1) for window_size ", window_size, ", got shape ", windows.sizes());
  TORCH_CHECK(windows.size(0) % nW == 0, "mmfast ", op, ": windows dim 0 (", windows.size(0),
              ") must be a multiple of the ", nW, " windows of an hw ", hw, " map with window_size ", window_size);
}

namespace {

Tensor window_process_cpu(const Tensor& x, IntArrayRef window_size, IntArrayRef shift_size, bool pad_then_roll,
                          const std::optional<Tensor>& pad_value) {
  window_process_check(x, window_size, shift_size, pad_value);
  TORCH_CHECK(x.device().is_cpu(), "mmfast window_process CPU kernel: x must be on the CPU");
  const WindowGrid g = make_window_grid(x.size(1), x.size(2), window_size[0], window_size[1], shift_size[0],
                                        shift_size[1], pad_then_roll);
  const int64_t B = x.size(0), C = x.size(3);
  Tensor out = at::empty({B * g.nW, g.N, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor pad = pad_value.has_value() ? pad_value->to(x.scalar_type()).contiguous() : Tensor();
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_process", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* pp = pad.defined() ? pad.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t sb = x.stride(0), sy = x.stride(1), sx = x.stride(2), sc = x.stride(3);
    const int64_t ntok = B * g.nW * g.N;
    at::parallel_for(0, ntok, std::max<int64_t>(1, 32768 / C), [&](int64_t t0, int64_t t1) {
      for (int64_t tok = t0; tok < t1; ++tok) {
        const int64_t bw = tok / g.N, b = bw / g.nW;
        int64_t py, px;
        window_to_grid(g, bw % g.nW, tok % g.N, py, px);
        const int64_t ys = grid_source(py, g.H, g.Hp, g.sh, g.pad_then_roll);
        const int64_t xs = grid_source(px, g.W, g.Wp, g.sw, g.pad_then_roll);
        scalar_t* dst = op + tok * C;
        if (ys >= 0 && xs >= 0) {
          copy_channels(xp + b * sb + ys * sy + xs * sx, sc, C, dst);
        } else if (pp != nullptr) {
          std::memcpy(dst, pp, C * sizeof(scalar_t));
        } else {
          std::memset(dst, 0, C * sizeof(scalar_t));  // +0.0 in every float format
        }
      }
    });
  });
  return out;
}

Tensor window_process_reverse_cpu(const Tensor& windows, IntArrayRef hw, IntArrayRef window_size,
                                  IntArrayRef shift_size, bool pad_then_roll) {
  window_process_reverse_check(windows, hw, window_size, shift_size);
  TORCH_CHECK(windows.device().is_cpu(), "mmfast window_process_reverse CPU kernel: windows must be on the CPU");
  const WindowGrid g = make_window_grid(hw[0], hw[1], window_size[0], window_size[1], shift_size[0], shift_size[1],
                                        pad_then_roll);
  const int64_t H = g.H, W = g.W, C = windows.size(2), B = windows.size(0) / g.nW;
  Tensor out = at::empty({B, H, W, C}, windows.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  // The padded-grid row / column of every output row / column (the inverse of the roll).
  std::vector<int64_t> grid_y(H), grid_x(W);
  for (int64_t y = 0; y < H; ++y) grid_y[y] = grid_position(y, H, g.Hp, g.sh, pad_then_roll);
  for (int64_t x = 0; x < W; ++x) grid_x[x] = grid_position(x, W, g.Wp, g.sw, pad_then_roll);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, windows.scalar_type(), "window_process_reverse", [&] {
    const scalar_t* wp = windows.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t s0 = windows.stride(0), s1 = windows.stride(1), s2 = windows.stride(2);
    at::parallel_for(0, B * H * W, std::max<int64_t>(1, 32768 / C), [&](int64_t t0, int64_t t1) {
      for (int64_t tok = t0; tok < t1; ++tok) {
        const int64_t b = tok / (H * W), y = (tok / W) % H, x = tok % W;
        int64_t w, t;
        grid_to_window(g, grid_y[y], grid_x[x], w, t);
        copy_channels(wp + (b * g.nW + w) * s0 + t * s1, s2, C, op + tok * C);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("window_process", &window_process_cpu);
  m.impl("window_process_reverse", &window_process_reverse_cpu);
}

}  // namespace mmfast
