// CUDA kernels of window_process (roll + pad + partition) and window_process_reverse (merge + crop +
// un-roll) in one copy each. Argument checks and the CPU kernels are in window_process_cpu.cpp, the
// schemas in csrc/mmfast.cpp; the index maps are window_geometry.h's (the same functions on both devices).
//
// Both kernels are gathers that write their output contiguously: one thread moves VEC channels of one
// token (16-byte loads and stores when C, the strides and the pointers allow, else narrower), so no
// two threads write the same element and no atomics are needed.
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS / cuSPARSE headers that a minimal
// toolkit lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "window_checks.h"
#include "window_geometry.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace mmfast {

namespace {

using at::Tensor;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// windows [B*nW, N, C] (contiguous) <- x [B, H, W, C] with strides (sb, sy, sx, sc). VEC > 1 needs
// sc == 1 (the launcher picks VEC = 1 otherwise), so VEC = 1 also serves any channel stride.
template <typename scalar_t, int VEC>
__global__ void window_process_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pad,
                                      scalar_t* __restrict__ out, WindowGrid g, int64_t C, int64_t sb, int64_t sy,
                                      int64_t sx, int64_t sc, int64_t total) {
  using P = Pack<scalar_t, VEC>;
  const int64_t cv = C / VEC;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tok = e / cv, c = (e % cv) * VEC;
    const int64_t bw = tok / g.N, b = bw / g.nW;
    int64_t py, px;
    window_to_grid(g, bw % g.nW, tok % g.N, py, px);
    const int64_t ys = grid_source(py, g.H, g.Hp, g.sh, g.pad_then_roll);
    const int64_t xs = grid_source(px, g.W, g.Wp, g.sw, g.pad_then_roll);
    P val;
    if (ys >= 0 && xs >= 0) {
      const scalar_t* src = x + b * sb + ys * sy + xs * sx;
      if constexpr (VEC == 1) {
        val.v[0] = src[c * sc];
      } else {
        val = *reinterpret_cast<const P*>(src + c);
      }
    } else if (pad != nullptr) {
      val = *reinterpret_cast<const P*>(pad + c);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) val.v[i] = scalar_t(0);
    }
    *reinterpret_cast<P*>(out + tok * C + c) = val;
  }
}

// out [B, H, W, C] (contiguous) <- windows [B*nW, N, C] with strides (s0, s1, sc).
template <typename scalar_t, int VEC>
__global__ void window_reverse_kernel(const scalar_t* __restrict__ windows, scalar_t* __restrict__ out, WindowGrid g,
                                      int64_t C, int64_t s0, int64_t s1, int64_t sc, int64_t total) {
  using P = Pack<scalar_t, VEC>;
  const int64_t cv = C / VEC;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tok = e / cv, c = (e % cv) * VEC;
    const int64_t b = tok / (g.H * g.W), y = (tok / g.W) % g.H, x = tok % g.W;
    int64_t w, t;
    grid_to_window(g, grid_position(y, g.H, g.Hp, g.sh, g.pad_then_roll),
                   grid_position(x, g.W, g.Wp, g.sw, g.pad_then_roll), w, t);
    const scalar_t* src = windows + (b * g.nW + w) * s0 + t * s1;
    if (VEC == 1) {
      out[tok * C + c] = src[c * sc];
    } else {
      *reinterpret_cast<P*>(out + tok * C + c) = *reinterpret_cast<const P*>(src + c);
    }
  }
}

// Widest vector (elements) <= 16 bytes dividing C, every given stride and every pointer's alignment.
template <typename scalar_t>
int pick_vec(int64_t C, std::initializer_list<int64_t> strides, std::initializer_list<const void*> ptrs) {
  int vec = static_cast<int>(16 / sizeof(scalar_t));
  const auto ok = [&](int v) {
    if (C % v) return false;
    for (int64_t s : strides)
      if (s % v) return false;
    for (const void* p : ptrs)
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % (v * sizeof(scalar_t))) return false;
    return true;
  };
  while (vec > 1 && !ok(vec)) vec /= 2;
  return vec;
}

// fn(std::integral_constant<int, VEC>{}) for the run-time vector width vec (8, 4, 2 or 1).
template <typename Fn>
void with_vec(int vec, Fn&& fn) {
  switch (vec) {
    case 8:
      fn(std::integral_constant<int, 8>{});
      break;
    case 4:
      fn(std::integral_constant<int, 4>{});
      break;
    case 2:
      fn(std::integral_constant<int, 2>{});
      break;
    default:
      fn(std::integral_constant<int, 1>{});
      break;
  }
}

unsigned launch_blocks(int64_t total, int threads) {
  int device = 0, sm_count = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t sms = sm_count;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, sms * 32)));
}

Tensor window_process_cuda(const Tensor& x, at::IntArrayRef window_size, at::IntArrayRef shift_size, bool pad_then_roll,
                           const std::optional<Tensor>& pad_value) {
  window_process_check(x, window_size, shift_size, pad_value);
  TORCH_CHECK(x.is_cuda(), "mmfast window_process CUDA kernel: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(3);
  const WindowGrid g = make_window_grid(x.size(1), x.size(2), window_size[0], window_size[1], shift_size[0],
                                        shift_size[1], pad_then_roll);
  Tensor out = at::empty({B * g.nW, g.N, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor pad = pad_value.has_value() ? pad_value->to(x.scalar_type()).contiguous() : Tensor();
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_process_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* pp = pad.defined() ? pad.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t sb = x.stride(0), sy = x.stride(1), sx = x.stride(2), sc = x.stride(3);
    const int vec = (sc != 1 && C > 1) ? 1 : pick_vec<scalar_t>(C, {sb, sy, sx}, {xp, pp, op});
    const int64_t total = out.numel() / vec;
    const unsigned blocks = launch_blocks(total, kThreads);
    with_vec(vec, [&](auto v) {
      window_process_kernel<scalar_t, decltype(v)::value>
          <<<blocks, kThreads, 0, stream>>>(xp, pp, op, g, C, sb, sy, sx, sc, total);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor window_process_reverse_cuda(const Tensor& windows, at::IntArrayRef hw, at::IntArrayRef window_size,
                                   at::IntArrayRef shift_size, bool pad_then_roll) {
  window_process_reverse_check(windows, hw, window_size, shift_size);
  TORCH_CHECK(windows.is_cuda(), "mmfast window_process_reverse CUDA kernel: windows must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(windows.device());
  const int64_t C = windows.size(2);
  const WindowGrid g = make_window_grid(hw[0], hw[1], window_size[0], window_size[1], shift_size[0], shift_size[1],
                                        pad_then_roll);
  const int64_t B = windows.size(0) / g.nW;
  Tensor out = at::empty({B, g.H, g.W, C}, windows.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, windows.scalar_type(), "window_process_reverse_cuda", [&] {
    const scalar_t* wp = windows.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t s0 = windows.stride(0), s1 = windows.stride(1), sc = windows.stride(2);
    const int vec = (sc != 1 && C > 1) ? 1 : pick_vec<scalar_t>(C, {s0, s1}, {wp, op});
    const int64_t total = out.numel() / vec;
    const unsigned blocks = launch_blocks(total, kThreads);
    with_vec(vec, [&](auto v) {
      window_reverse_kernel<scalar_t, decltype(v)::value>
          <<<blocks, kThreads, 0, stream>>>(wp, op, g, C, s0, s1, sc, total);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("window_process", &window_process_cuda);
  m.impl("window_process_reverse", &window_process_reverse_cuda);
}

}  // namespace mmfast
