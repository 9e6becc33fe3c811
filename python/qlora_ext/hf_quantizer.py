"""transformers integration: ``QloraExtConfig`` and the quantizer behind it (method ``qlora_ext``).

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QloraExtConfig(),
                                                 dtype=torch.bfloat16, device_map="cuda")

transformers builds the model on the meta device; before any weight is read, the quantizer
swaps every targeted ``nn.Linear`` for an empty ``Linear4bit`` (Note [Empty Linear4bit]). Each
16-bit weight is then quantized as it streams out of its shard, on the device that
``device_map`` gives it, and dropped: no full-precision copy of the model ever exists. The
output layer (and anything tied to it) and ``skip_modules`` stay ``nn.Linear``.

A model loaded this way saves with bitsandbytes' keys (``weight``, ``weight.absmax``, ...,
``weight.quant_state.bitsandbytes__nf4``) and our config in ``config.json``; ``from_pretrained``
reloads it without requantizing. A bitsandbytes 4-bit checkpoint loads into our layers through
``config_from_bitsandbytes`` (transformers refuses a second config class on a quantized
checkpoint, so the checkpoint's own config is rewritten instead).

This module imports transformers; ``import qlora_ext`` does not import it (the package exposes
``QloraExtConfig`` lazily, and importing this module registers the method).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from ._ops import _BLOCKSIZES_4BIT
from .nn import Linear4bit
from .quant_state import QuantState, _dtype_name

QUANT_METHOD = "qlora_ext"
QUANT_TYPES = ("nf4", "fp4", "int4")
_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _dtype(value, name: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"{name} must be a floating-point torch dtype, got {value!r}")
    return dt


class QloraExtConfig(QuantizationConfigMixin):
    """Quantize a transformers model to 4 bits on load, into ``qlora_ext.nn.Linear4bit``.

    ``quant_type``: ``"nf4"`` (QLoRA's NormalFloat), ``"fp4"`` or ``"int4"``. ``blocksize``:
    weights per absmax scale; it must divide every quantized layer's ``in_features``.
    ``double_quant``: quantize the absmax scales to 8 bits as well (QLoRA's double
    quantization). ``compute_dtype``: the dtype the 4-bit layers compute in. ``skip_modules``:
    module names (or regexes, or name suffixes) left in 16 bits besides the output layer.
    """

    def __init__(
        self,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | str | None = torch.bfloat16,
        skip_modules: list[str] | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        if quant_type not in QUANT_TYPES:
            raise ValueError(
                f"QloraExtConfig: quant_type must be one of {', '.join(QUANT_TYPES)}, "
                f"got {quant_type!r}"
            )
        if isinstance(blocksize, bool) or blocksize not in _BLOCKSIZES_4BIT:
            raise ValueError(
                f"QloraExtConfig: blocksize must be one of "
                f"{', '.join(map(str, _BLOCKSIZES_4BIT))}, got {blocksize!r}"
            )
        if not isinstance(double_quant, bool):
            raise ValueError(f"QloraExtConfig: double_quant must be a bool, got {double_quant!r}")
        if skip_modules is not None and (
            isinstance(skip_modules, str) or not all(isinstance(s, str) for s in skip_modules)
        ):
            raise ValueError(
                f"QloraExtConfig: skip_modules must be a list of module names, got {skip_modules!r}"
            )
        unknown = set(kwargs) - {"quant_method"}
        if unknown:
            raise TypeError(f"QloraExtConfig: unexpected arguments {sorted(unknown)}")
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.double_quant = double_quant
        self.compute_dtype = _dtype(compute_dtype, "QloraExtConfig: compute_dtype")
        self.skip_modules = None if skip_modules is None else list(skip_modules)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if d["compute_dtype"] is not None:  # config.json is JSON
            d["compute_dtype"] = _dtype_name(d["compute_dtype"])
        return d


def _to_ours(bnb: dict) -> QloraExtConfig:
    """Our config for a checkpoint that transformers + bitsandbytes saved in 4 bits."""
    if bnb.get("load_in_8bit"):
        raise ValueError(
            "this checkpoint was saved by bitsandbytes in 8 bits (LLM.int8); qlora_ext loads "
            "only 4-bit (load_in_4bit) bitsandbytes checkpoints"
        )
    if not bnb.get("load_in_4bit"):
        raise ValueError(f"not a bitsandbytes 4-bit quantization_config: {bnb}")
    return QloraExtConfig(
        quant_type=bnb.get("bnb_4bit_quant_type", "fp4"),
        # bitsandbytes' 4-bit layers always quantize in blocks of 64 on load; the saved quant
        # state carries the blocksize anyway, so this only matters for the layer check.
        blocksize=64,
        double_quant=bool(bnb.get("bnb_4bit_use_double_quant", False)),
        compute_dtype=bnb.get("bnb_4bit_compute_dtype") or torch.float32,
        skip_modules=bnb.get("llm_int8_skip_modules"),
    )


def config_from_bitsandbytes(path: str | os.PathLike, **kwargs):
    """The transformers config of a bitsandbytes 4-bit checkpoint at ``path``, with its
    ``quantization_config`` replaced by ours: ``from_pretrained(path, config=...)`` then loads
    the saved 4-bit weights, unchanged, into our ``Linear4bit`` layers."""
    config = AutoConfig.from_pretrained(path, **kwargs)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise ValueError(f"{path}: config.json has no quantization_config (not a 4-bit checkpoint)")
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        raise ValueError(
            f"{path} was saved with quantization method {qc.get('quant_method')!r}, not "
            "bitsandbytes; qlora_ext loads bitsandbytes 4-bit and qlora_ext checkpoints"
        )
    config.quantization_config = _to_ours(qc).to_dict()
    return config


def _stash_state(module: Linear4bit) -> None:
    # Note [Quant state survives the load]: after the weights are read, transformers replaces
    # every non-persistent buffer with torch.empty_like (models re-create theirs in
    # _init_weights), and our quant state lives in such buffers. The state is kept aside here
    # (the same tensors: no copy) and put back once loading is over.
    module.__dict__["_loaded_state"] = (module.weight.data, module.quant_state)


class _QuantizeOnLoad(ConversionOps):
    """A 16-bit weight fresh from its shard, on its device, into its empty ``Linear4bit``."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        out = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, name)
            module.quantize_weight_(value)
            del value  # the 16-bit weight goes as soon as it is quantized
            _stash_state(module)
            module._is_hf_initialized = True
            out[name] = module.weight
        return out


class _LoadQuantized(ConversionOps):
    """A saved 4-bit weight and its quant-state tensors into their empty ``Linear4bit``."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        if not isinstance(module, Linear4bit):  # e.g. a skipped layer's plain weight
            return tensors
        if len(tensors) == 1:
            raise ValueError(
                f"{full_layer_name} has no quant-state tensors in the checkpoint: it was saved "
                "in 16 bits, yet config.json says the model is quantized (qlora_ext)"
            )
        packed = tensors.pop("weight")
        module.load_quantized_(packed, QuantState.from_dict(tensors, device=packed.device))
        _stash_state(module)
        module._is_hf_initialized = True
        return {"weight": module.weight}


class QloraExtHfQuantizer(HfQuantizer):
    """transformers' hooks for ``quant_method="qlora_ext"`` (see the module docstring)."""

    requires_calibration = False
    serialized_names = {
        "weight": ["weight", *(f"weight.{k}" for k in _STATE_KEYS)]
        + [f"weight.quant_state.bitsandbytes__{t}" for t in QUANT_TYPES]
    }

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "device_map: qlora_ext does not offload 4-bit layers to disk; give every module "
                "a device (cpu or cuda)"
            )

    def update_device_map(self, device_map):
        # As bitsandbytes: quantize where the model will run, the GPU if there is one.
        if device_map is None:
            device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, Linear4bit) and name == "weight"

    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        cfg = self.quantization_config
        skip = self.get_modules_to_not_convert(
            model, cfg.skip_modules, model._keep_in_fp32_modules, add_default_skips=True
        )
        self.modules_to_not_convert = skip
        for name, module in list(model.named_modules()):
            if type(module) is not nn.Linear or not should_convert_module(name, skip):
                continue
            if module.in_features % cfg.blocksize:
                raise ValueError(
                    f"QloraExtConfig(blocksize={cfg.blocksize}) does not divide in_features="
                    f"{module.in_features} of layer {name}: a 4-bit block would span two rows; "
                    f"pick a blocksize that divides it, or add {name!r} to skip_modules"
                )
            layer = Linear4bit.empty(
                module.in_features, module.out_features, module.bias, cfg.compute_dtype,
                cfg.quant_type, cfg.blocksize, cfg.double_quant,
            )  # fmt: skip
            model.set_submodule(name, layer)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for m in model.modules():  # Note [Quant state survives the load]
            stash = m.__dict__.pop("_loaded_state", None) if isinstance(m, Linear4bit) else None
            if stash is not None:
                m._set_weight(*stash)
        empty = [
            n for n, m in model.named_modules() if isinstance(m, Linear4bit) and m._meta is None
        ]
        if empty:
            raise ValueError(
                f"the checkpoint has no weight for {len(empty)} quantized layers ({empty[:3]}...)"
            )
        # PEFT's prepare_model_for_kbit_training reads this flag (as for bitsandbytes).
        model.is_loaded_in_4bit = True
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    def get_load_operations(self):
        return {"deserialize": _LoadQuantized}


def register() -> None:
    """Register ``qlora_ext`` with transformers (once; importing this module does it)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QloraExtConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QloraExtHfQuantizer)
    from . import peft_integration

    peft_integration.install()


register()
