"""PEFT on our kernels: ``get_peft_model`` makes each targeted ``Linear4bit`` a fused LoRA layer.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QloraExtConfig())
    model = peft.prepare_model_for_kbit_training(model)
    model = peft.get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))

``PeftLoraLinear4bit`` is a PEFT ``LoraLayer`` (PEFT's adapter keys, save/load, enable/disable,
``merge_and_unload``) whose forward is our fused ``lora_4bit`` op for the usual case of one
active adapter: PEFT's own path (a dequantized or 16-bit base matmul, then a separate adapter
matmul) never runs.

Why ``install`` patches two PEFT functions: PEFT's custom-module registration
(``LoraConfig._register_custom_module``) lives on the user's ``LoraConfig`` object, so a plain
``LoraConfig(...)`` would not see it, and ``target_modules="all-linear"`` only collects
``nn.Linear``. ``install`` wraps ``LoraModel._create_new_module`` (our layer for a
``Linear4bit`` base, PEFT's dispatchers for anything else) and the "all-linear" expansion (it
adds our 4-bit layers, leaving the output layer out as PEFT does). Both wrappers fall through
to PEFT unchanged for every other module, and ``install`` is idempotent.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import lora_4bit
from .nn import Linear4bit, _autocast_dtype

_INSTALLED = "_qlora_ext_installed"


def _make_layer_class():
    from peft.tuners.lora.layer import LoraLayer

    class PeftLoraLinear4bit(nn.Module, LoraLayer):
        """A PEFT LoRA layer over our ``Linear4bit``; forward is the fused ``lora_4bit`` op."""

        def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module):
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            return base.in_features, base.out_features

        def _fused_adapter(self) -> str | None:
            # The fused op covers one plain LoRA adapter; anything else (several active
            # adapters, DoRA and other variants, a LoRA bias) goes through the generic sum.
            if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
                return None
            name = self.active_adapters[0]
            if name not in self.lora_A or self.lora_variant.get(name) is not None:
                return None
            if self.lora_B[name].bias is not None:
                return None
            return name

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            base: Linear4bit = self.get_base_layer()
            self._input_dtype = x.dtype  # the dtype a merged nn.Linear must take (see below)
            name = self._fused_adapter()
            if name is None:
                return self._generic_forward(x, *args, **kwargs)
            in_dtype = x.dtype
            dtype, ctx = _autocast_dtype(x, base.compute_dtype)  # Note [4-bit ops under autocast]
            if dtype is not None:
                x = x.to(dtype)
            bias = None if base.bias is None else base.bias.to(x.dtype)
            drop = self.lora_dropout[name]
            p = drop.p if (self.training and isinstance(drop, nn.Dropout)) else 0.0
            with ctx:
                y = lora_4bit(
                    x, base.weight, base.quant_state, self.lora_A[name].weight,
                    self.lora_B[name].weight, self.scaling[name], p, None, bias,
                )  # fmt: skip
            return y if dtype is not None and dtype != base.compute_dtype else y.to(in_dtype)

        def _generic_forward(self, x, *args, **kwargs):
            y = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters or self.merged:
                return y
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                xd = self.lora_dropout[name](x.to(a.weight.dtype))
                y = y + (b(a(xd)) * self.scaling[name]).to(y.dtype)
            return y

        def merged_weight(self, adapter_names=None) -> torch.Tensor:
            """``dequant(W4) + Σ scaling · B @ A`` in fp32, as ``qlora_ext.merge_adapter``."""
            w = self.get_base_layer().dequantized_weight().float()
            for name in adapter_names or self.active_adapters:
                if name in self.lora_A:
                    ba = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()
                    w += self.scaling[name] * ba
            return w

        def unload_and_optionally_merge_module(self, merge, safe_merge, adapter_names):
            base: Linear4bit = self.get_base_layer()
            if not merge:
                return base
            # A 16-bit nn.Linear with W = dequant(W4) + s·B@A, rounded once: the weight the
            # adapter was trained against, as merge_adapter does (requantizing would round
            # most of the update away).
            w = self.merged_weight(adapter_names)
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError("merging the adapter gives non-finite weights")
            # The merged layer is a plain nn.Linear, so it must be in the dtype of the
            # activations it receives: after prepare_model_for_kbit_training those are fp32,
            # not the checkpoint's dtype. Before any forward, the checkpoint's dtype.
            dtype = getattr(self, "_input_dtype", None) or base._meta["dtype"]
            linear = nn.Linear(
                base.in_features, base.out_features, bias=base.bias is not None,
                device=w.device, dtype=dtype,
            )  # fmt: skip
            with torch.no_grad():
                linear.weight.copy_(w)
                if base.bias is not None:
                    linear.bias.copy_(base.bias)
            return linear.requires_grad_(False)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise NotImplementedError(
                "merging into a 4-bit weight would round the update away: use "
                "merge_and_unload(), which gives a 16-bit nn.Linear of dequant(W4) + s·B@A"
            )

        def unmerge(self) -> None:
            raise NotImplementedError("PeftLoraLinear4bit layers are never merged in place")

        def __repr__(self) -> str:
            return "qlora_ext." + super().__repr__()

    return PeftLoraLinear4bit


_layer_class = None


def layer_class():
    """The PEFT LoRA layer class for our ``Linear4bit`` (needs peft)."""
    global _layer_class
    if _layer_class is None:
        _layer_class = _make_layer_class()
    return _layer_class


def install() -> bool:
    """Make PEFT's ``get_peft_model`` use our fused layer for ``Linear4bit``; False without peft."""
    try:
        import peft.tuners.lora.model as lora_model
        import peft.tuners.tuners_utils as tuners_utils
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    if getattr(lora_model.LoraModel, _INSTALLED, False):
        return True
    cls = layer_class()
    create = lora_model.LoraModel._create_new_module
    include_all_linear = tuners_utils._maybe_include_all_linear_layers

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Linear4bit) and type(base) is Linear4bit:
            return cls(target, adapter_name, config=lora_config, **kwargs)
        return create(lora_config, adapter_name, target, **kwargs)

    def _maybe_include_all_linear_layers(peft_config, model):
        tm = getattr(peft_config, "target_modules", None)
        all_linear = isinstance(tm, str) and tm.lower() == "all-linear"
        peft_config = include_all_linear(peft_config, model)
        if all_linear:
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            inside_tuner = set()
            for prefix, m in model.named_modules():
                if isinstance(m, BaseTunerLayer):
                    inside_tuner |= {f"{prefix}.{s}" for s, _ in m.named_modules() if s}
            ours = {
                n
                for n, m in model.named_modules()
                if type(m) is Linear4bit and m is not out and n not in inside_tuner
            }
            peft_config.target_modules = set(peft_config.target_modules) | ours
        return peft_config

    lora_model.LoraModel._create_new_module = staticmethod(_create_new_module)
    tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers
    setattr(lora_model.LoraModel, _INSTALLED, True)
    return True
