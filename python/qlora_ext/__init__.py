"""qlora_ext: QLoRA building blocks as torch custom ops (C++/CUDA).

The ops live in ``torch.ops.qlora_ext``; this package adds their fake kernels (``_ops``) and
the user-facing API (``functional``, ``QuantState``).
"""

import torch  # noqa: F401  (must load libtorch before the extension: _C has no RUNPATH to it)

# _C registers the ops; _ops adds their fake kernels and autograd; _torch_fixes, once they
# exist, speeds up torch's side of each autograd call (Note [fill_defaults]).
from . import _C, _ops, _torch_fixes, nn  # noqa: F401
from .functional import (
    dequantize_4bit,
    dequantize_blockwise_8bit,
    dynamic_code_8bit,
    get_4bit_code,
    matmul_4bit,
    quantize_4bit,
    quantize_blockwise_8bit,
)
from .quant_state import QuantState

__version__ = "0.1.0"


def build_info() -> dict:
    """What this build contains: CUDA kernels or not, their archs, and the CPU ISA in use."""
    return dict(_C.build_info())


__all__ = [
    "QuantState",
    "build_info",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dynamic_code_8bit",
    "get_4bit_code",
    "matmul_4bit",
    "quantize_4bit",
    "quantize_blockwise_8bit",
]

# LoRA: the fused LoRA layer and whole-model preparation and adapters.
from .adapters import load_adapter, merge_adapter, prepare_model, save_adapter  # noqa: E402
from .lora import LoRALinear4bit, lora_4bit  # noqa: E402

__all__ += [
    "LoRALinear4bit",
    "load_adapter",
    "lora_4bit",
    "merge_adapter",
    "prepare_model",
    "save_adapter",
]
from . import optim  # noqa: E402,F401  (qlora_ext.optim.PagedAdamW, PagedAdamW8bit)

# transformers integration, imported on first use so that `import qlora_ext` never imports
# transformers: touching qlora_ext.QloraExtConfig registers the "qlora_ext" quantization method.
_LAZY = {"QloraExtConfig": "hf_quantizer", "config_from_bitsandbytes": "hf_quantizer"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name == "distributed":  # FSDP2 / DDP helpers; imports torch.distributed
        import importlib

        return importlib.import_module(".distributed", __name__)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'qlora_ext' has no attribute {name!r}")
