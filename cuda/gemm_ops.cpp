// ATen glue for the CUDA 4-bit GEMMs (TORCH_LIBRARY_IMPL CUDA).
//
// Dispatch (the forward), by M = rows of A:
// - M <= kSmallM: memory-bound. The streaming kernel (gemm_kernels.cu) reads each weight byte
//   once; tensor-core tiles would be mostly padding.
// - kSmallM < M <= kTcMaxM, 16-bit A: the fused tensor-core kernel (gemm_tc_kernel.cu). It
//   reads the 4-bit weight once per 128 rows of A and writes nothing else; the panel path would
//   write and re-read a 16-bit copy of W (4 bytes per weight), which at these M costs about as
//   much as the GEMM itself.
// - Larger M, or fp32 A: panels + cuBLAS. Compute-bound, cuBLAS's tuned kernels beat our simple
//   tile, and one extra pass over a panel of W is small next to M * N * K work.
// These bounds are estimates from the byte and FLOP counts, not yet timed on a GPU:
// scripts/gpu_check.sh times every path (set_gemm_path) so they can be set from measurements.
// The input gradient uses panels of K (columns of W), so every output element comes from one
// GEMM and is rounded once.
//
// Note [LoRA epilogue]: lora_4bit_forward's rank-r term scale * xa @ B^T goes into y inside
// the 4-bit GEMM on every path, never as a second elementwise pass over y: the small-M kernel's
// split-K epilogue dots xa and B in fp32; the tensor-core kernel runs xa * scale and B as a few
// more K steps into its fp32 accumulators (y rounded once); the panel path computes the
// rank-r product (with the bias) into each panel of y first and the base cuBLAS GEMM adds onto
// it through beta = 1. That path rounds twice, the rank-r term (and the bias, in A's dtype)
// when it is stored into y and then the sum: at most one more ulp of y's dtype than the fused
// paths, which the CUDA tests' tolerances allow (test_cuda_lora_term_in_every_gemm_epilogue).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_glue.h"
#include "gemm_checks.h"
#include "gemm_lora.h"
#include "gemm_path.h"
#include "quant_launchers.h"

namespace qlora_ext::cuda {
namespace {

constexpr int64_t kSmallM = 16;
constexpr int64_t kTcMaxM = 256;
constexpr int64_t kPanelBytes = int64_t(32) << 20;

// Multiprocessor count of the current device, read once per device (the attribute query is
// cheap, but this sits on the decode path).
int num_sms(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int v = 0;
    check_launch(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device),
                 "cudaDeviceGetAttribute");
    cache[device] = v > 0 ? v : 1;
  }
  return cache[device];
}

bool aligned16(const at::Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.const_data_ptr()) & 15) == 0;
}

// 16-byte vector loads need aligned bases; a view at an odd offset is copied once.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

// Panel extent along a dimension of `total`, a multiple of `unit`, about kPanelBytes of
// dequantized weight, and never the whole weight unless the weight is a single unit.
int64_t panel_extent(int64_t total, int64_t other, int64_t elem, int64_t unit) {
  int64_t e = kPanelBytes / (other * elem) / unit * unit;
  const int64_t half = (total / 2 + unit - 1) / unit * unit;
  e = std::min(e, half);
  return std::max(e, unit);
}

struct Weight {
  at::Tensor packed, absmax;
  std::optional<at::Tensor> na, nc, no;
  NestedAbsmax nested;
  int64_t N, K, blocksize;
  QuantType qt;
};

Weight make_weight(const at::Tensor& packed, const at::Tensor& absmax,
                   const std::optional<at::Tensor>& na, const std::optional<at::Tensor>& nc,
                   const std::optional<at::Tensor>& no, int64_t nested_blocksize, int64_t N,
                   int64_t K, int64_t blocksize, QuantType qt) {
  Weight w{aligned_contiguous(packed), absmax.contiguous(), {}, {}, {}, {}, N, K, blocksize, qt};
  if (na) w.na = na->contiguous();
  if (nc) w.nc = nc->contiguous();
  if (no) w.no = no->contiguous();
  w.nested = nested_view(w.absmax, w.na, w.nc, w.no, nested_blocksize);
  return w;
}

void dequantize_slice(const Weight& w, const Slice& s, at::Tensor& dst, cudaStream_t stream) {
  check_launch(launch_dequantize_4bit(w.packed.const_data_ptr<uint8_t>(),
                                      w.nested.codes ? nullptr : w.absmax.const_data_ptr<float>(),
                                      w.nested, s, w.blocksize, w.qt, dst.data_ptr(),
                                      to_dtype(dst.scalar_type()), stream),
               "dequantize_4bit (panel)");
}

// The LoRA term to add in the GEMM (lora_4bit_forward): xa [M, r] fp32, B [N, r], scale.
struct LoraArgs {
  const at::Tensor& xa;
  const at::Tensor& B;
  double scale;
};

// gemm_4bit, optionally with the rank-r LoRA term added inside the GEMM (Note [LoRA epilogue]).
at::Tensor gemm_4bit_impl(const at::Tensor& A, const at::Tensor& packed, const at::Tensor& absmax,
                          int64_t N, int64_t K, int64_t blocksize, c10::string_view quant_type,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize,
                          const LoraArgs* lora) {
  const QuantType qt = parse_quant_type(std::string(quant_type));
  check_gemm_4bit_args(A, "x", K, packed, absmax, N, K, blocksize, nested_absmax, nested_code,
                       nested_offset, nested_blocksize);
  check_bias(bias, A, N);
  const c10::cuda::CUDAGuard guard(A.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Weight w = make_weight(packed, absmax, nested_absmax, nested_code, nested_offset,
                               nested_blocksize, N, K, blocksize, qt);
  const at::Tensor A2 = aligned_contiguous(A.reshape({-1, K}));
  const int64_t M = A2.size(0);
  at::Tensor out = at::empty({M, N}, A.options());
  if (M == 0) return out.view(gemm_out_shape(A, N));
  const GemmPath path = gemm_path();
  const bool half_a = A.scalar_type() != at::kFloat;
  const bool small = M <= kSmallM && path != GemmPath::Panel && path != GemmPath::TensorCore;
  const bool tc =
      !small && half_a && path != GemmPath::Panel && (M <= kTcMaxM || path == GemmPath::TensorCore);
  LoraTerm term;  // filled for the path that runs; the tensors below keep its buffers alive
  at::Tensor xa32, b32, x_ext, w_ext, xa_t, b_t;
  if (small) {
    if (lora) {
      xa32 = lora->xa.to(at::kFloat).contiguous();
      b32 = lora->B.to(at::kFloat).contiguous();
      term.xa = xa32.const_data_ptr<float>();
      term.B = b32.const_data_ptr<float>();
      term.r = int(b32.size(1));
      term.scale = float(lora->scale);
    }
    const int splits = gemv_4bit_splits(N, K, num_sms(A.get_device()));
    at::Tensor ws = at::empty({splits * M * N}, A.options().dtype(at::kFloat));
    std::optional<at::Tensor> b;
    if (bias) b = bias->contiguous();
    check_launch(launch_gemv_4bit(A2.const_data_ptr(), to_dtype(A.scalar_type()), M, N, K,
                                  w.packed.const_data_ptr<uint8_t>(),
                                  w.nested.codes ? nullptr : w.absmax.const_data_ptr<float>(),
                                  w.nested, blocksize, qt, b ? b->const_data_ptr() : nullptr,
                                  b ? to_dtype(b->scalar_type()) : DType::F32, splits,
                                  ws.data_ptr<float>(), out.data_ptr(), stream, term),
                 "gemm_4bit (small M)");
  } else if (tc) {
    if (lora) {
      const int64_t r = lora->B.size(1), r_pad = (r + 31) / 32 * 32;
      x_ext = at::zeros({M, r_pad}, A.options());
      w_ext = at::zeros({N, r_pad}, A.options());
      x_ext.narrow(1, 0, r).copy_(lora->xa.reshape({M, r}) * lora->scale);
      w_ext.narrow(1, 0, r).copy_(lora->B);
      term.x_ext = x_ext.const_data_ptr();
      term.w_ext = w_ext.const_data_ptr();
      term.r_pad = int(r_pad);
    }
    std::optional<at::Tensor> b;
    if (bias) b = bias->contiguous();
    check_launch(launch_gemm_4bit_tc(A2.const_data_ptr(), to_dtype(A.scalar_type()), M, N, K,
                                     w.packed.const_data_ptr<uint8_t>(),
                                     w.nested.codes ? nullptr : w.absmax.const_data_ptr<float>(),
                                     w.nested, blocksize, qt, b ? b->const_data_ptr() : nullptr,
                                     b ? to_dtype(b->scalar_type()) : DType::F32, out.data_ptr(),
                                     stream, term),
                 "gemm_4bit (tensor cores)");
  } else {
    const int64_t rows = panel_extent(N, K, A.element_size(), 16);
    at::Tensor panel = at::empty({rows * K}, A.options());
    const std::optional<at::Tensor> b = bias ? std::optional(bias->to(A.scalar_type())) : bias;
    if (lora) {
      xa_t = (lora->xa.reshape({M, -1}) * lora->scale).to(A.scalar_type());
      b_t = lora->B.to(A.scalar_type());
    }
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t r = std::min(rows, N - n0);
      at::Tensor p = panel.narrow(0, 0, r * K).view({r, K});
      dequantize_slice(w, Slice{n0, r, K, 0, K}, p, stream);
      at::Tensor o = out.narrow(1, n0, r);
      if (lora) {
        // The rank-r product (plus bias) first; the base GEMM then accumulates onto it in
        // cuBLAS's beta = 1 epilogue, so y is written by GEMMs only.
        if (b) {
          at::addmm_out(o, b->narrow(0, n0, r), xa_t, b_t.narrow(0, n0, r).t());
        } else {
          at::mm_out(o, xa_t, b_t.narrow(0, n0, r).t());
        }
        o.addmm_(A2, p.t());
      } else if (b) {
        at::addmm_out(o, b->narrow(0, n0, r), A2, p.t());
      } else {
        at::mm_out(o, A2, p.t());
      }
    }
  }
  return out.view(gemm_out_shape(A, N));
}

at::Tensor gemm_4bit_cuda(const at::Tensor& A, const at::Tensor& packed, const at::Tensor& absmax,
                          int64_t N, int64_t K, int64_t blocksize, c10::string_view quant_type,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& nested_offset,
                          int64_t nested_blocksize) {
  return gemm_4bit_impl(A, packed, absmax, N, K, blocksize, quant_type, bias, nested_absmax,
                        nested_code, nested_offset, nested_blocksize, nullptr);
}

at::Tensor gemm_4bit_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& packed,
                                     const at::Tensor& absmax, int64_t N, int64_t K,
                                     int64_t blocksize, c10::string_view quant_type,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& nested_offset,
                                     int64_t nested_blocksize) {
  const QuantType qt = parse_quant_type(std::string(quant_type));
  check_gemm_4bit_args(grad_out, "grad_out", N, packed, absmax, N, K, blocksize, nested_absmax,
                       nested_code, nested_offset, nested_blocksize);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Weight w = make_weight(packed, absmax, nested_absmax, nested_code, nested_offset,
                               nested_blocksize, N, K, blocksize, qt);
  const at::Tensor G = grad_out.reshape({-1, N}).contiguous();
  const int64_t M = G.size(0);
  at::Tensor grad_A = at::empty({M, K}, grad_out.options());
  if (M > 0) {
    const int64_t cols = panel_extent(K, N, grad_out.element_size(), blocksize);
    at::Tensor panel = at::empty({N * cols}, grad_out.options());
    for (int64_t k0 = 0; k0 < K; k0 += cols) {
      const int64_t c = std::min(cols, K - k0);
      at::Tensor p = panel.narrow(0, 0, N * c).view({N, c});
      dequantize_slice(w, Slice{0, N, K, k0, c}, p, stream);
      at::Tensor o = grad_A.narrow(1, k0, c);
      at::mm_out(o, G, p);
    }
  }
  return grad_A.view(gemm_out_shape(grad_out, K));
}

}  // namespace

at::Tensor gemm_4bit_lora_cuda(const at::Tensor& x2d, const Weight4Ref& w,
                               const std::optional<at::Tensor>& bias, const at::Tensor& xa,
                               const at::Tensor& B, double scale) {
  const LoraArgs lora{xa, B, scale};
  return gemm_4bit_impl(x2d, w.packed, w.absmax, w.N, w.K, w.blocksize, w.quant_type, bias, w.na,
                        w.nc, w.no, w.nested_blocksize, &lora);
}

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("gemm_4bit", &gemm_4bit_cuda);
  m.impl("gemm_4bit_grad_input", &gemm_4bit_grad_input_cuda);
}

}  // namespace qlora_ext::cuda
