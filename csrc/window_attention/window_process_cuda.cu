// CUDA kernels of window_process (roll + pad + partition) and window_process_reverse (merge + crop +
// un-roll) in one copy each. Schemas, argument checks and the CPU kernels are in window_attention_cpu.cpp.
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

#include <algorithm>
#include <cstdint>
#include <optional>

namespace mmfast {

// Defined in window_attention_cpu.cpp.
void window_process_check(const at::Tensor& x, at::IntArrayRef window_size, at::IntArrayRef shift_size,
                          const std::optional<at::Tensor>& pad_value);
void window_process_reverse_check(const at::Tensor& windows, at::IntArrayRef hw, at::IntArrayRef window_size,
                                  at::IntArrayRef shift_size);

namespace {

using at::Tensor;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct Geo {
  int64_t H, W, Hp, Wp, wh, ww, sh, sw, nww, nW, N, C;
  bool pad_then_roll;
};

// Source row of padded-grid row p along an axis of length L (padded Lp), or -1 for padding.
__device__ __forceinline__ int64_t source_index(int64_t p, int64_t L, int64_t Lp, int64_t s, bool pad_then_roll) {
  if (pad_then_roll) {
    const int64_t r = (p + s) % Lp;
    return r < L ? r : -1;
  }
  return p < L ? (p + s) % L : -1;
}

template <typename scalar_t, int VEC>
__global__ void window_process_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pad,
                                      scalar_t* __restrict__ out, Geo g, int64_t sb, int64_t sy, int64_t sx,
                                      int64_t total) {
  using P = Pack<scalar_t, VEC>;
  const int64_t cv = g.C / VEC;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tok = e / cv, c = (e % cv) * VEC;
    const int64_t bw = tok / g.N, t = tok % g.N, b = bw / g.nW, w = bw % g.nW;
    const int64_t py = (w / g.nww) * g.wh + t / g.ww, px = (w % g.nww) * g.ww + t % g.ww;
    const int64_t ys = source_index(py, g.H, g.Hp, g.sh, g.pad_then_roll);
    const int64_t xs = source_index(px, g.W, g.Wp, g.sw, g.pad_then_roll);
    P val;
    if (ys >= 0 && xs >= 0) {
      val = *reinterpret_cast<const P*>(x + b * sb + ys * sy + xs * sx + c);
    } else if (pad != nullptr) {
      val = *reinterpret_cast<const P*>(pad + c);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) val.v[i] = scalar_t(0);
    }
    *reinterpret_cast<P*>(out + tok * g.C + c) = val;
  }
}

// Generic strided fallback (channel stride != 1): one element per thread.
template <typename scalar_t>
__global__ void window_process_strided_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pad,
                                              scalar_t* __restrict__ out, Geo g, int64_t sb, int64_t sy, int64_t sx,
                                              int64_t sc, int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tok = e / g.C, c = e % g.C;
    const int64_t bw = tok / g.N, t = tok % g.N, b = bw / g.nW, w = bw % g.nW;
    const int64_t py = (w / g.nww) * g.wh + t / g.ww, px = (w % g.nww) * g.ww + t % g.ww;
    const int64_t ys = source_index(py, g.H, g.Hp, g.sh, g.pad_then_roll);
    const int64_t xs = source_index(px, g.W, g.Wp, g.sw, g.pad_then_roll);
    scalar_t val;
    if (ys >= 0 && xs >= 0) {
      val = x[b * sb + ys * sy + xs * sx + c * sc];
    } else {
      val = pad != nullptr ? pad[c] : scalar_t(0);
    }
    out[e] = val;
  }
}

// out [B, H, W, C] (contiguous) <- windows [B*nW, N, C] with strides (s0, s1, sc).
template <typename scalar_t, int VEC>
__global__ void window_reverse_kernel(const scalar_t* __restrict__ windows, scalar_t* __restrict__ out, Geo g,
                                      int64_t s0, int64_t s1, int64_t sc, int64_t total) {
  using P = Pack<scalar_t, VEC>;
  const int64_t cv = g.C / VEC;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tok = e / cv, c = (e % cv) * VEC;
    const int64_t b = tok / (g.H * g.W), y = (tok / g.W) % g.H, x = tok % g.W;
    const int64_t py = g.pad_then_roll ? (y - g.sh + g.Hp) % g.Hp : (y - g.sh + g.H) % g.H;
    const int64_t px = g.pad_then_roll ? (x - g.sw + g.Wp) % g.Wp : (x - g.sw + g.W) % g.W;
    const int64_t w = (py / g.wh) * g.nww + px / g.ww, t = (py % g.wh) * g.ww + px % g.ww;
    const scalar_t* src = windows + (b * g.nW + w) * s0 + t * s1;
    if (VEC == 1) {
      out[tok * g.C + c] = src[c * sc];
    } else {
      *reinterpret_cast<P*>(out + tok * g.C + c) = *reinterpret_cast<const P*>(src + c);
    }
  }
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

Geo make_geo(int64_t H, int64_t W, int64_t C, at::IntArrayRef window_size, at::IntArrayRef shift_size,
             bool pad_then_roll) {
  Geo g;
  g.H = H;
  g.W = W;
  g.C = C;
  g.wh = window_size[0];
  g.ww = window_size[1];
  g.sh = shift_size[0];
  g.sw = shift_size[1];
  g.Hp = round_up(H, g.wh);
  g.Wp = round_up(W, g.ww);
  g.nww = g.Wp / g.ww;
  g.nW = (g.Hp / g.wh) * g.nww;
  g.N = g.wh * g.ww;
  g.pad_then_roll = pad_then_roll;
  return g;
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
  const Geo g = make_geo(x.size(1), x.size(2), C, window_size, shift_size, pad_then_roll);
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
    if (sc != 1 && C > 1) {
      const int64_t total = out.numel();
      window_process_strided_kernel<scalar_t>
          <<<launch_blocks(total, kThreads), kThreads, 0, stream>>>(xp, pp, op, g, sb, sy, sx, sc, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int vec = pick_vec<scalar_t>(C, {sb, sy, sx}, {xp, pp, op});
    const int64_t total = out.numel() / vec;
    const unsigned blocks = launch_blocks(total, kThreads);
    switch (vec) {
      case 8:
        window_process_kernel<scalar_t, 8><<<blocks, kThreads, 0, stream>>>(xp, pp, op, g, sb, sy, sx, total);
        break;
      case 4:
        window_process_kernel<scalar_t, 4><<<blocks, kThreads, 0, stream>>>(xp, pp, op, g, sb, sy, sx, total);
        break;
      case 2:
        window_process_kernel<scalar_t, 2><<<blocks, kThreads, 0, stream>>>(xp, pp, op, g, sb, sy, sx, total);
        break;
      default:
        window_process_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(xp, pp, op, g, sb, sy, sx, total);
        break;
    }
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
  const Geo g = make_geo(hw[0], hw[1], C, window_size, shift_size, pad_then_roll);
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
    switch (vec) {
      case 8:
        window_reverse_kernel<scalar_t, 8><<<blocks, kThreads, 0, stream>>>(wp, op, g, s0, s1, sc, total);
        break;
      case 4:
        window_reverse_kernel<scalar_t, 4><<<blocks, kThreads, 0, stream>>>(wp, op, g, s0, s1, sc, total);
        break;
      case 2:
        window_reverse_kernel<scalar_t, 2><<<blocks, kThreads, 0, stream>>>(wp, op, g, s0, s1, sc, total);
        break;
      default:
        window_reverse_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(wp, op, g, s0, s1, sc, total);
        break;
    }
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
