// lora_4bit_forward / lora_4bit_backward in ATen terms, shared by the CPU and CUDA kernels.
//
// The base product goes through the qlora_ext::gemm_4bit / gemm_4bit_grad_input ops (via the
// dispatcher), so W4 is never dequantized whole; the rank-r products are small at::mm calls.
// What differs per backend is in LoraBackend: the dtype the base product runs in, and the
// dropout kernel (Note [Dropout by seed], lora_dropout.h).
//
// Note [LoRA accumulation]: every adapter product (dropout(x) @ A^T, grad_out @ B,
// grad_out^T @ xa, g^T @ dropout(x), g @ A) runs in fp32 (fp64 for fp64 inputs) whatever the
// dtypes of x, A and B, so fp32 adapters with bf16 activations lose nothing to bf16 rounding
// in their own gradients; grad_A and grad_B are rounded once, to A's and B's dtypes. On the
// CPU the base product also comes back in fp32 (its kernels accumulate in fp32 anyway), the
// rank-r term is added to that fp32 y (addmm, beta = 1) and y is rounded to x's dtype once. On
// CUDA the base product runs in x's dtype and the rank-r term is added inside the 4-bit GEMM
// (Note [LoRA epilogue], cuda/gemm_ops.cpp): in fp32 in the small-M kernel's epilogue, with
// xa * scale and B rounded to x's dtype as extra tensor-core K steps, or by cuBLAS's beta = 1.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <tuple>

#include "gemm_checks.h"
#include "lora_dropout.h"

namespace qlora_ext {

// The 4-bit weight arguments of the gemm ops, passed through unchanged.
struct Weight4Ref {
  const at::Tensor& packed;
  const at::Tensor& absmax;
  int64_t N, K, blocksize;
  c10::string_view quant_type;
  const std::optional<at::Tensor>& na;
  const std::optional<at::Tensor>& nc;
  const std::optional<at::Tensor>& no;
  int64_t nested_blocksize;
};

struct LoraBackend {
  // true: the base product is computed and accumulated in fp32 (CPU); false: in x's dtype.
  bool base_in_acc;
  // Applies Note [Dropout by seed] in place to a contiguous fp32 (or, on the CPU, fp64) tensor.
  void (*dropout)(at::Tensor& t, uint64_t seed, uint32_t threshold, double inv_keep);
  // When set (CUDA): y = x2d @ dequant(W)^T (+ bias) + scale * xa @ B^T with the rank-r term
  // added inside the 4-bit GEMM; otherwise the base product and an addmm.
  at::Tensor (*base_plus_lora)(const at::Tensor& x2d, const Weight4Ref& w,
                               const std::optional<at::Tensor>& bias, const at::Tensor& xa,
                               const at::Tensor& B, double scale) = nullptr;
  // When set (CPU), Note [Fused dropout passes]: dst = dropout(src) and dst += dropout(src) in
  // one pass each, over contiguous tensors of the accumulation dtype.
  void (*dropout_into)(const at::Tensor& src, at::Tensor& dst, uint64_t seed, uint32_t threshold,
                       double inv_keep) = nullptr;
  void (*dropout_add)(const at::Tensor& src, at::Tensor& dst, uint64_t seed, uint32_t threshold,
                      double inv_keep) = nullptr;
};

inline bool is_lora_float(const at::Tensor& t) {
  const auto dt = t.scalar_type();
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
         (dt == at::kDouble && t.device().is_cpu());
}

inline void check_lora_args(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                            int64_t N, int64_t K, double scale, double dropout_p,
                            const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(A.dim() == 2 && A.size(1) == K && A.size(0) > 0, "lora_A must have shape [r, K=", K,
              "] with r > 0, got ", A.sizes());
  const int64_t r = A.size(0);
  TORCH_CHECK(B.dim() == 2 && B.size(0) == N && B.size(1) == r, "lora_B must have shape [N=", N,
              ", r=", r, "], got ", B.sizes());
  TORCH_CHECK(is_lora_float(A), "lora_A must be float32, float16 or bfloat16, got ",
              A.scalar_type());
  TORCH_CHECK(is_lora_float(B), "lora_B must be float32, float16 or bfloat16, got ",
              B.scalar_type());
  TORCH_CHECK(A.device() == x.device() && B.device() == x.device(), "lora_A (", A.device(),
              ") and lora_B (", B.device(), ") must be on x's device ", x.device());
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(dropout_p == 0.0 || (seed && seed->numel() == 1 && seed->scalar_type() == at::kLong),
              "seed must be a one-element int64 tensor when dropout_p > 0");
}

inline at::ScalarType lora_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Note [Fused dropout passes]: a LoRA layer's dropout touches an M x K tensor three times per
// step: dropout(x) for xa in the forward, again for grad_A in the backward (Note [Dropout by
// seed]: no mask is kept), and once more on the rank-r part of grad_x before it joins the base
// part. As a copy followed by an in-place pass, and an in-place pass followed by add_, that is
// three extra read-write sweeps of M x K per layer and step (fp32 1024 x 576: 2.4 MB each),
// which the CPU backend folds into the copy and into the add. The arithmetic is unchanged
// (one rounded multiply by 1 / (1 - p), then one rounded add; no contraction), so the bits are
// those of the separate passes.

// dropout(X) in the accumulation dtype; X itself (no copy) when dropout is off.
inline at::Tensor lora_dropped(const LoraBackend& be, const at::Tensor& X_acc, double dropout_p,
                               const std::optional<at::Tensor>& seed) {
  if (dropout_p == 0.0) return X_acc;
  const auto s = static_cast<uint64_t>(seed->item<int64_t>());
  if (be.dropout_into) {
    const at::Tensor src = X_acc.contiguous();
    at::Tensor t = at::empty_like(src, at::MemoryFormat::Contiguous);
    be.dropout_into(src, t, s, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p));
    return t;
  }
  at::Tensor t = X_acc.clone(at::MemoryFormat::Contiguous);
  be.dropout(t, s, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p));
  return t;
}

inline at::Tensor call_gemm_4bit(const at::Tensor& A, const Weight4Ref& w,
                                 const std::optional<at::Tensor>& bias) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlora_ext::gemm_4bit", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            int64_t, int64_t, c10::string_view, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, int64_t)>();
  return op.call(A, w.packed, w.absmax, w.N, w.K, w.blocksize, w.quant_type, bias, w.na, w.nc, w.no,
                 w.nested_blocksize);
}

inline at::Tensor call_gemm_4bit_grad_input(const at::Tensor& G, const Weight4Ref& w) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlora_ext::gemm_4bit_grad_input", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            int64_t, int64_t, c10::string_view, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            int64_t)>();
  return op.call(G, w.packed, w.absmax, w.N, w.K, w.blocksize, w.quant_type, w.na, w.nc, w.no,
                 w.nested_blocksize);
}

// (y, xa): y = x @ W^T + scale * xa @ B^T (+ bias), xa = dropout(x) @ A^T in fp32/fp64.
inline std::tuple<at::Tensor, at::Tensor> lora_forward(const LoraBackend& be, const at::Tensor& x,
                                                       const Weight4Ref& w, const at::Tensor& A,
                                                       const at::Tensor& B, double scale,
                                                       double dropout_p,
                                                       const std::optional<at::Tensor>& seed,
                                                       const std::optional<at::Tensor>& bias) {
  check_gemm_4bit_args(x, "x", w.K, w.packed, w.absmax, w.N, w.K, w.blocksize, w.na, w.nc, w.no,
                       w.nested_blocksize);
  check_bias(bias, x, w.N);
  check_lora_args(x, A, B, w.N, w.K, scale, dropout_p, seed);
  const at::ScalarType acc = lora_acc_dtype(x);
  const at::Tensor X_acc = x.reshape({-1, w.K}).to(acc);
  at::Tensor xa = at::mm(lora_dropped(be, X_acc, dropout_p, seed), A.to(acc).t());
  at::Tensor y;
  if (be.base_in_acc) {
    y = call_gemm_4bit(X_acc, w, bias);
    y.addmm_(xa, B.to(acc).t(), 1.0, scale);
    y = y.to(x.scalar_type());
  } else if (be.base_plus_lora) {
    y = be.base_plus_lora(x.reshape({-1, w.K}), w, bias, xa, B, scale);
  } else {
    y = call_gemm_4bit(x.reshape({-1, w.K}), w, bias);
    y.addmm_(xa.to(x.scalar_type()), B.to(x.scalar_type()).t(), 1.0, scale);
  }
  return {y.view(gemm_out_shape(x, w.N)), xa.view(gemm_out_shape(x, A.size(0)))};
}

// (grad_x, grad_A, grad_B); the derivation is in python/qlora_ext/lora.py.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const LoraBackend& be, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& xa,
    const Weight4Ref& w, const at::Tensor& A, const at::Tensor& B, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  check_gemm_4bit_args(grad_out, "grad_out", w.N, w.packed, w.absmax, w.N, w.K, w.blocksize, w.na,
                       w.nc, w.no, w.nested_blocksize);
  check_gemm_4bit_args(x, "x", w.K, w.packed, w.absmax, w.N, w.K, w.blocksize, w.na, w.nc, w.no,
                       w.nested_blocksize);
  check_lora_args(x, A, B, w.N, w.K, scale, dropout_p, seed);
  const int64_t r = A.size(0);
  const at::ScalarType acc = lora_acc_dtype(x);
  const at::Tensor G = grad_out.reshape({-1, w.N});
  const at::Tensor X = x.reshape({-1, w.K});
  TORCH_CHECK(G.size(0) == X.size(0), "grad_out has ", G.size(0), " rows but x has ", X.size(0));
  TORCH_CHECK(xa.numel() == X.size(0) * r && xa.size(-1) == r, "xa must have shape [..., r=", r,
              "] with x's leading dimensions, got ", xa.sizes());
  const at::Tensor XA = xa.reshape({-1, r}).to(acc);
  const at::Tensor G_acc = G.to(acc);
  const at::Tensor grad_B = at::mm(G_acc.t(), XA).mul_(scale);
  const at::Tensor g = at::mm(G_acc, B.to(acc)).mul_(scale);  // dL/d(xa), [M, r]
  const at::Tensor grad_A = at::mm(g.t(), lora_dropped(be, X.to(acc), dropout_p, seed));
  at::Tensor gx_lora = at::mm(g, A.to(acc));
  at::Tensor grad_x = call_gemm_4bit_grad_input(be.base_in_acc ? G_acc : G, w);
  if (dropout_p == 0.0) {
    grad_x.add_(gx_lora);
  } else {
    // The dropout mask is diagonal, so its transpose is itself: same seed, same mask.
    const auto s = static_cast<uint64_t>(seed->item<int64_t>());
    const uint32_t threshold = dropout_threshold(dropout_p);
    const double inv_keep = 1.0 / (1.0 - dropout_p);
    if (be.dropout_add && grad_x.is_contiguous() && grad_x.scalar_type() == gx_lora.scalar_type()) {
      be.dropout_add(gx_lora, grad_x, s, threshold, inv_keep);
    } else {
      be.dropout(gx_lora, s, threshold, inv_keep);
      grad_x.add_(gx_lora);
    }
  }
  if (be.base_in_acc) grad_x = grad_x.to(x.scalar_type());
  return {grad_x.view(x.sizes()), grad_A.to(A.scalar_type()), grad_B.to(B.scalar_type())};
}

}  // namespace qlora_ext
