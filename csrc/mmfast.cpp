// mmfast._C: importing this module registers every C++/CUDA op with the PyTorch dispatcher
// (torch.ops.mmfast.*) and exposes the facts of this build for `python -m mmfast.info`.
//
// Schemas live here, in the one TORCH_LIBRARY block of the namespace; each op's kernels are
// registered next to their code with TORCH_LIBRARY_IMPL(mmfast, CPU|CUDA, m).
#include <torch/extension.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef MMFAST_WITH_CUDA
namespace mmfast {
// Defined in csrc/cuda_info.cu, compiled by nvcc, which knows what it compiled for.
std::string cuda_build_version();
std::string cuda_archs_compiled();
}  // namespace mmfast
#endif

namespace {

std::string compiler_version() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["compiler"] = compiler_version();
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_max_threads"] = 1;
#endif
#if defined(__AVX512F__)
  d["cpu_vector_isa"] = "avx512";
#elif defined(__AVX2__)
  d["cpu_vector_isa"] = "avx2";
#else
  d["cpu_vector_isa"] = "generic";
#endif
#ifdef MMFAST_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = mmfast::cuda_build_version();
  d["cuda_archs"] = mmfast::cuda_archs_compiled();
#else
  d["cuda"] = false;
  d["cuda_version"] = std::string("");
  d["cuda_archs"] = std::string("");
#endif
  d["torch_version_built"] = std::string(TORCH_VERSION);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmfast compiled ops (registered as torch.ops.mmfast.*) and build facts";
  m.def("build_info", &build_info, "Facts about this build of mmfast._C");
}

TORCH_LIBRARY(mmfast, m) {
  // ---- contrastive loss tiles (see csrc/contrastive/) -------------------------------------
  // logits l_ij = scale * <a_i, b_j> + bias. Row statistics are over all columns of b; column
  // statistics are over the rows of a only (partials when rows are split across ranks).
  // Returns (row_lse[M], row_mean_logit[M], col_lse[N], col_mean_logit[N]) where
  // mean_logit is the softmax-weighted mean of the logits (it gives d loss / d scale).
  m.def(
      "contrastive_softmax_fwd(Tensor a, Tensor b, Tensor scale, Tensor? bias) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradient of sum_ij G_ij * l_ij wrt a and b for
  //   G^a_ij = a_row_w_i * exp(l_ij - row_lse_i) + a_col_w_j * exp(l_ij - col_lse_j)
  // (G^b likewise with b_row_w, b_col_w; None means the same as a's). Returns (da, db).
  m.def(
      "contrastive_softmax_bwd(Tensor a, Tensor b, Tensor scale, Tensor? bias, Tensor row_lse, "
      "Tensor col_lse, Tensor a_row_w, Tensor a_col_w, Tensor? b_row_w, Tensor? b_col_w) "
      "-> (Tensor, Tensor)");
  // Row sums of softplus(l_ij): the SigLIP loss with every pair treated as a negative.
  m.def("contrastive_sigmoid_fwd(Tensor a, Tensor b, Tensor scale, Tensor? bias) -> Tensor");
  // Gradient of sum_ij row_w_i * softplus(l_ij): (da, db, dscale, dbias).
  m.def(
      "contrastive_sigmoid_bwd(Tensor a, Tensor b, Tensor scale, Tensor? bias, Tensor row_w) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Both in one pass: (row sums of softplus(l_ij), da, db, dscale, dbias) for row weights row_w.
  m.def(
      "contrastive_sigmoid_fwd_bwd(Tensor a, Tensor b, Tensor scale, Tensor? bias, Tensor row_w) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- (shifted-)window attention (see csrc/window_attention/) ------------------------------
  // q, k, v: [B, H, W, heads, head_dim], any strides (views of a fused qkv are fine). Semantics of
  // mmfast.reference.window_attention.window_attention; pad_then_roll = order "pad_roll". scale is
  // ignored when logit_scale (Swin v2 cosine attention, already exponentiated) is given. Returns out
  // [B, H, W, heads, head_dim] in q's dtype and lse [B, H, W, heads] in the compute type (float32, or
  // float64 for float64 inputs).
  m.def(
      "window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? rel_pos_bias, Tensor? logit_scale, "
      "Tensor? pad_value, int[] window_size, int[] shift_size, float scale, bool shift_mask, float mask_value, "
      "bool pad_then_roll) -> (Tensor out, Tensor lse)");
  // Gradients; empty tensors for absent optional inputs. d_pad_value[0] is zero (padded queries are
  // cropped away).
  m.def(
      "window_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? rel_pos_bias, Tensor? logit_scale, Tensor? pad_value, int[] window_size, int[] shift_size, "
      "float scale, bool shift_mask, float mask_value, bool pad_then_roll) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor d_rel_pos_bias, Tensor d_logit_scale, Tensor d_pad_value)");
  // Roll + pad + partition in one copy: x [B, H, W, C] -> windows [B*nW, Wh*Ww, C]; padded tokens get
  // pad_value [C] (or zeros).
  m.def(
      "window_process(Tensor x, int[] window_size, int[] shift_size, bool pad_then_roll, Tensor? pad_value) "
      "-> Tensor");
  // Merge + crop + un-roll: windows [B*nW, Wh*Ww, C] -> [B, H, W, C] with (H, W) = hw. The adjoint of
  // window_process for x; padded tokens are dropped.
  m.def(
      "window_process_reverse(Tensor windows, int[] hw, int[] window_size, int[] shift_size, bool pad_then_roll) "
      "-> Tensor");
  // ---- ToMe token merging (see csrc/tome/) ----------------------------------------------------
  // Bipartite soft matching of metric [B, N, C]: (unm_idx [B, N_A - r], src_idx [B, r],
  // dst_idx [B, r]) int64, identical to mmfast.reference.tome.matching_indices (r is clamped the
  // same way; effective r == 0 gives unm_idx = arange(N_A) and empty src/dst).
  m.def(
      "tome_match(Tensor metric, int r, bool class_token=False, bool distill_token=False) "
      "-> (Tensor, Tensor, Tensor)");
  // Size-weighted merge (reference.tome.merge_wavg): (x_out [B, N - r, C], size_out [B, N - r, 1]).
  // size None means ones. Empty src_idx (r == 0) is the identity in the original token order.
  m.def(
      "tome_merge_wavg(Tensor x, Tensor? size, Tensor unm_idx, Tensor src_idx, Tensor dst_idx) "
      "-> (Tensor, Tensor)");
  // Its gradient: (grad_x [B, N, C], grad_size [B, N, 1]); grad_size is the gradient w.r.t. the
  // implicit ones when size is None.
  m.def(
      "tome_merge_wavg_bwd(Tensor grad_x_out, Tensor? grad_size_out, Tensor x, Tensor? size, Tensor unm_idx, "
      "Tensor src_idx, Tensor dst_idx) -> (Tensor, Tensor)");
  // out[b, :, h] = softmax((q * scale) @ k^T + log_size[b]) @ v from timm's fused qkv output; inference only.
  m.def("tome_attention(Tensor qkv, Tensor? log_size, int num_heads, float scale) -> Tensor");
}
