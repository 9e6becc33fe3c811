// Every qlora_ext op schema, declared once. Kernels live in cpp/cpu/ (CPU) and cuda/ (CUDA);
// fake kernels and autograd formulas in python/qlora_ext/_ops.py; pure-PyTorch references in
// tests/reference.py.
#include <torch/library.h>

TORCH_LIBRARY(qlora_ext, m) {
  // Blockwise 4-bit quantization of a flattened float tensor: (packed uint8 [ceil(n/2)], even
  // element in the high nibble; fp32 absmax [ceil(n/blocksize)]). quant_type: nf4 | fp4 | int4.
  m.def("quantize_4bit(Tensor w, int blocksize, str quant_type) -> (Tensor, Tensor)");
  // Inverse of quantize_4bit into `shape`/`dtype`. absmax is fp32, or uint8 codes of a double
  // quantization that is undone in the kernel: code[absmax] * nested_absmax[group] + offset.
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, int[] shape, "
      "ScalarType dtype, Tensor? nested_absmax=None, Tensor? nested_code=None, "
      "Tensor? nested_offset=None, int nested_blocksize=256) -> Tensor");
  // Blockwise 8-bit quantization against a sorted 256-entry code (bitsandbytes' dynamic map):
  // (uint8 codes shaped like A, fp32 absmax per block).
  m.def("quantize_blockwise_8bit(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)");
  // Inverse of quantize_blockwise_8bit: code[q] * absmax[block], cast to dtype.
  m.def(
      "dequantize_blockwise_8bit(Tensor q, Tensor absmax, Tensor code, int blocksize, "
      "ScalarType dtype) -> Tensor");
  // out = x @ dequant(W)^T (+ bias), x [..., K] float, W a 4-bit [N, K] weight (K a multiple of
  // blocksize). The weight is never dequantized whole: small M streams it, large M goes panel
  // by panel. out has x's dtype and shape [..., N].
  m.def(
      "gemm_4bit(Tensor x, Tensor packed, Tensor absmax, int N, int K, int blocksize, "
      "str quant_type, Tensor? bias=None, Tensor? nested_absmax=None, Tensor? nested_code=None, "
      "Tensor? nested_offset=None, int nested_blocksize=256) -> Tensor");
  // The input gradient of gemm_4bit: grad_A = grad_out @ dequant(W), [..., N] -> [..., K],
  // with the same no-materialization rule.
  m.def(
      "gemm_4bit_grad_input(Tensor grad_out, Tensor packed, Tensor absmax, int N, int K, "
      "int blocksize, str quant_type, Tensor? nested_absmax=None, Tensor? nested_code=None, "
      "Tensor? nested_offset=None, int nested_blocksize=256) -> Tensor");
  // LoRA over a 4-bit weight: (y, xa) with xa = dropout(x) @ lora_A^T (fp32, fp64 for fp64 x)
  // and y = x @ dequant(W)^T + scale * xa @ lora_B^T (+ bias); dropout by seed, no mask kept.
  m.def(
      "lora_4bit_forward(Tensor x, Tensor packed, Tensor absmax, int N, int K, int blocksize, "
      "str quant_type, Tensor lora_A, Tensor lora_B, float scale, float dropout_p=0., "
      "Tensor? seed=None, Tensor? bias=None, Tensor? nested_absmax=None, "
      "Tensor? nested_code=None, Tensor? nested_offset=None, int nested_blocksize=256) "
      "-> (Tensor, Tensor)");
  // Its gradients (grad_x, grad_A, grad_B) from grad_out, x and the forward's xa.
  m.def(
      "lora_4bit_backward(Tensor grad_out, Tensor x, Tensor xa, Tensor packed, Tensor absmax, "
      "int N, int K, int blocksize, str quant_type, Tensor lora_A, Tensor lora_B, float scale, "
      "float dropout_p=0., Tensor? seed=None, Tensor? nested_absmax=None, "
      "Tensor? nested_code=None, Tensor? nested_offset=None, int nested_blocksize=256) "
      "-> (Tensor, Tensor, Tensor)");
  // Fused AdamW step (torch.optim.AdamW's maths, Note [AdamW order] in optim_math.h), in place
  // on param and the fp32 states. Returns the number of non-finite grad elements (0-d int64); if
  // it is not 0 nothing is written. step is 1-based.
  m.def(
      "adamw_step_32bit(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "int step, float lr, float beta1, float beta2, float eps, float weight_decay) -> Tensor");
  // adamw_step_32bit over lists of tensors in one call (same arguments per tensor, its own
  // step each): the per-call overhead of hundreds of small LoRA tensors, not their bytes,
  // dominated a CPU step. Returns each tensor's non-finite count ([len(params)] int64); a
  // tensor with a non-zero count is left untouched, the others are updated.
  m.def(
      "adamw_step_32bit_multi(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, int[] steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay) -> Tensor");
  // The same step with both moments stored in 8 bits, blocks of 256 with an fp32 absmax each:
  // exp_avg against the signed dynamic map, exp_avg_sq against the unsigned one. Dequantize,
  // update and requantize in one pass (Note [8-bit state quantization]).
  m.def(
      "adamw_step_8bit_blockwise(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg_q, "
      "Tensor(c!) exp_avg_absmax, Tensor(d!) exp_avg_sq_q, Tensor(e!) exp_avg_sq_absmax, "
      "Tensor code_signed, Tensor code_unsigned, int step, float lr, float beta1, float beta2, "
      "float eps, float weight_decay) -> Tensor");
}
