// Which BLAS multiplies the dequantized weight panels of the CPU 4-bit GEMMs.
//
// Note [Panel BLAS]: torch's CPU at::mm runs fp32 GEMMs on MKL. MKL picks its fast kernels by
// CPU vendor, so on AMD it runs well below the cores' peak: on an AMD EPYC (Zen 4, 2 cores)
// at M = 1024 with SmolLM2's layer shapes, oneDNN's fp32 matmul (the one torch.compile's CPU
// linear uses, mkldnn::_linear_pointwise) took 0.66-0.82x MKL's time for x @ W^T and
// 0.71-0.94x for grad @ W. On Intel CPUs MKL stays the default. "auto" therefore takes oneDNN
// on a non-Intel x86 CPU when torch was built with it; set_cpu_blas forces either, so the
// tests run both.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace qlora_ext::cpu {

enum class PanelBlas : int { Aten = 0, OneDnn = 1 };

PanelBlas panel_blas();                        // what the panel GEMMs use now
void set_panel_blas(const std::string& name);  // "auto", "aten" or "onednn"
std::string panel_blas_name(PanelBlas b);

// x @ w^T (+ bias) for 2-D fp32 x and w through oneDNN (only when panel_blas() is OneDnn).
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& bias);

}  // namespace qlora_ext::cpu
