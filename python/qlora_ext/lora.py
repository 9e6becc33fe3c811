r"""LoRA over a frozen 4-bit weight: ``lora_4bit`` (functional) and ``LoRALinear4bit``.

Forward (``torch.ops.qlora_ext.lora_4bit_forward``), for x [M, K], W = dequant(W4) [N, K],
A [r, K], B [N, r], s = alpha / r and the dropout D(x) = x * m / (1 - p) with a 0/1 mask m::

    xa = D(x) @ Aᵀ                      [M, r]  (returned, kept for the backward)
    y  = x @ Wᵀ + s · xa @ Bᵀ (+ bias)  [M, N]

Only the seed of the mask is kept (Note [Dropout by seed], cpp/lora_dropout.h): the backward
regenerates m, so nothing of size M x K is stored besides x itself, and no dense W ever is.

Backward (``lora_4bit_backward``), with G = dL/dy. y is linear in each of x, A and B, so:

- dL/dB: y depends on B through s · xa @ Bᵀ, so dL/dB[n, j] = s · Σ_m G[m, n] · xa[m, j],
  that is ``grad_B = s · Gᵀ @ xa``.
- dL/dxa = s · G @ B  (call it g, [M, r]).
- dL/dA: xa = D(x) @ Aᵀ, so ``grad_A = gᵀ @ D(x)``: the mask is regenerated from the seed.
- dL/dx has two paths. Through the frozen base, ``G @ W``: ``gemm_4bit_grad_input`` multiplies
  by W4 panel by panel. Through the adapter, xa = D(x) @ Aᵀ gives ``Dᵀ(g @ A)``; D is diagonal
  (elementwise mask times 1/(1-p)), so Dᵀ = D with the same mask.
  ``grad_x = G @ W + D(g @ A)``.
- dL/dbias = Σ_m G[m, :]; W4 and its quantization state are constants.

Mixed precision (Note [LoRA accumulation], cpp/lora_impl.h): x may be bf16/fp16 while A and B
are fp32. Every adapter product (D(x) @ Aᵀ, G @ B, Gᵀ @ xa, gᵀ @ D(x), g @ A) is computed with
fp32 operands and fp32 accumulation (fp64 for fp64 inputs); grad_A and grad_B are rounded once
to A's and B's dtypes. The base product accumulates in fp32 as well: on the CPU y stays fp32
until the rank-r term is added and is rounded to x's dtype once; on CUDA the base GEMM runs in
x's dtype with fp32 accumulation (cuBLAS) and the rank-r term, rounded to x's dtype, is added
in the beta = 1 epilogue of one more GEMM. grad_x follows the same pattern.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .functional import _STATE_NAMES, _check_state, _check_tensor, _nested_args, _renamed
from .nn import Linear4bit, _check_compute_dtype, _check_input
from .quant_state import QuantState

_ops = torch.ops.qlora_ext


def lora_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W4)ᵀ + scale · (dropout(x) @ lora_Aᵀ) @ lora_Bᵀ (+ bias)``.

    Differentiable in x, lora_A, lora_B and bias (see the module docstring), and traceable by
    ``torch.compile(fullgraph=True)``. With ``dropout_p > 0``, ``seed`` (a one-element int64
    tensor) fixes the mask; None draws one from torch's default generator.
    """
    _check_tensor(x, "x")
    _check_tensor(packed, "packed")
    _check_state(state, "lora_4bit")
    N, K = state.shape
    scale, dropout_p = _number(scale, "scale"), _number(dropout_p, "dropout_p")
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    if dropout_p > 0.0 and seed is None:
        seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64)
    try:
        y, _xa = _ops.lora_4bit_forward(
            x,
            packed.reshape(-1),
            state.absmax,
            N,
            K,
            state.blocksize,
            state.quant_type,
            lora_A,
            lora_B,
            scale,
            dropout_p,
            seed,
            bias,
            **_nested_args(state),
        )
    except (RuntimeError, TypeError, ValueError) as e:  # Note [Public argument names]
        raise _renamed(e, _STATE_NAMES) from None
    return y


def _number(v, name: str) -> float:
    if isinstance(v, (str, bytes)):  # float("2") would accept a string
        raise TypeError(f"{name} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}") from None


class LoRALinear4bit(Linear4bit):
    """A frozen 4-bit ``Linear4bit`` plus a trainable rank-r adapter (``lora_A``, ``lora_B``).

    ``y = x @ dequant(W4)ᵀ + (alpha / r) · (dropout(x) @ Aᵀ) @ Bᵀ + b``, computed by the fused
    ``lora_4bit_forward`` op. A is Kaiming-uniform and B is zero (as in PEFT), so a fresh layer
    computes exactly what the plain ``Linear4bit`` does. The adapters are ``nn.Linear``
    submodules, so their state_dict keys (``lora_A.weight``, ``lora_B.weight``) are PEFT's.
    The adapters stay in ``adapter_dtype`` (fp32 by default) while x runs in ``compute_dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.05,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        device=None,
        dtype: torch.dtype = torch.float32,
        adapter_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(
            in_features, out_features, bias, compute_dtype, quant_type, blocksize, double_quant,
            device, dtype,
        )  # fmt: skip
        self._init_adapter(r, alpha, dropout, adapter_dtype)

    def _init_adapter(self, r, alpha, dropout, adapter_dtype) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r (the LoRA rank) must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.r, self.lora_alpha, self.lora_dropout = r, float(alpha), float(dropout)
        dev = self.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=adapter_dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.05,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        blocksize: int = 64,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> LoRALinear4bit:
        """Quantize ``linear`` to 4 bits and attach a LoRA adapter of rank ``r``."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            # Checked before quantizing: a bad rank should not cost a quantization.
            raise ValueError(f"r (the LoRA rank) must be a positive integer, got {r!r}")
        m = super().from_linear(linear, quant_type, blocksize, double_quant, compute_dtype)
        m._init_adapter(r, alpha, dropout, adapter_dtype)
        return m

    @classmethod
    def from_linear4bit(
        cls,
        layer: Linear4bit,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.05,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> LoRALinear4bit:
        """Attach a LoRA adapter to an already quantized ``Linear4bit`` (sharing its weight)."""
        _check_compute_dtype(compute_dtype)
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = layer.in_features, layer.out_features
        m.compute_dtype = compute_dtype
        m.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        for name in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset"):
            m.register_buffer(name, None, persistent=False)
        m._set_weight(layer.weight.data, layer.quant_state)
        if layer.bias is not None:
            m.bias = nn.Parameter(layer.bias.detach())
        else:
            m.register_parameter("bias", None)
        m._init_adapter(r, alpha, dropout, adapter_dtype)
        return m

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        p = self.lora_dropout if self.training else 0.0
        y = lora_4bit(
            x,
            self.weight,
            self.quant_state,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            p,
            None,
            bias,
        )
        return y.to(in_dtype)

    def merged_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """``dequant(W4) + scaling · B @ A`` in fp32, rounded to ``dtype`` once.

        The base is the dequantized 4-bit weight this layer trained against, not any original
        16-bit weight (unsloth-zoo #810: merging into W16 adds W16 - dequant(W4), which can
        swamp the update).
        """
        w = self.dequantized_weight().float()
        w += self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return w.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha:g}, "
            f"lora_dropout={self.lora_dropout:g}"
        )
