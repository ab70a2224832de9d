// The geometry of one (shifted-)window layout, shared by the CPU kernels (window_attention_cpu.cpp,
// window_process_cpu.cpp) and the CUDA kernels (window_process_cuda.cu): the map padded bottom/right
// to whole windows, the windows on that padded grid, and the index maps between the grid and the
// map, rolled by -shift either before the padding (timm's order) or after it (pad_then_roll, the
// original Swin detection order). Host and device code alike; nothing here allocates or checks.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MMFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMFAST_HOST_DEVICE inline
#endif

namespace mmfast {

MMFAST_HOST_DEVICE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct WindowGrid {
  int64_t H = 0, W = 0;                                  // the map
  int64_t wh = 1, ww = 1, sh = 0, sw = 0;                // window and shift (0 <= shift < window)
  int64_t Hp = 0, Wp = 0;                                // padded grid
  int64_t nwh = 0, nww = 0, nW = 0, N = 0;               // windows per column, per row, in all; tokens per window
  bool pad_then_roll = false;
};

inline WindowGrid make_window_grid(int64_t H, int64_t W, int64_t wh, int64_t ww, int64_t sh, int64_t sw,
                                   bool pad_then_roll) {
  WindowGrid g;
  g.H = H;
  g.W = W;
  g.wh = wh;
  g.ww = ww;
  g.sh = sh;
  g.sw = sw;
  g.Hp = round_up(H, wh);
  g.Wp = round_up(W, ww);
  g.nwh = g.Hp / wh;
  g.nww = g.Wp / ww;
  g.nW = g.nwh * g.nww;
  g.N = wh * ww;
  g.pad_then_roll = pad_then_roll;
  return g;
}

// The map row (column) at padded-grid row (column) p of an axis of length L, padded to Lp and
// shifted by s; -1 for padding.
MMFAST_HOST_DEVICE int64_t grid_source(int64_t p, int64_t L, int64_t Lp, int64_t s, bool pad_then_roll) {
  if (pad_then_roll) {
    const int64_t r = (p + s) % Lp;  // roll of the padded map
    return r < L ? r : -1;
  }
  return p < L ? (p + s) % L : -1;  // roll of the unpadded map, then pad
}

// The inverse: the padded-grid row (column) that map row (column) y lands on.
MMFAST_HOST_DEVICE int64_t grid_position(int64_t y, int64_t L, int64_t Lp, int64_t s, bool pad_then_roll) {
  return pad_then_roll ? (y - s + Lp) % Lp : (y - s + L) % L;
}

// Padded-grid position of token t of window w, and the window and token of a grid position.
MMFAST_HOST_DEVICE void window_to_grid(const WindowGrid& g, int64_t w, int64_t t, int64_t& py, int64_t& px) {
  py = (w / g.nww) * g.wh + t / g.ww;
  px = (w % g.nww) * g.ww + t % g.ww;
}

MMFAST_HOST_DEVICE void grid_to_window(const WindowGrid& g, int64_t py, int64_t px, int64_t& w, int64_t& t) {
  w = (py / g.wh) * g.nww + px / g.ww;
  t = (py % g.wh) * g.ww + px % g.ww;
}

}  // namespace mmfast
