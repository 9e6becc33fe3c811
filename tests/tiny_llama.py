"""A tiny randomly initialised LlamaForCausalLM for the LoRA tests (no hub access: built from a
LlamaConfig). hidden 64 and intermediate 128 are multiples of the 4-bit blocksize 64."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB = 128


def tiny_llama(seed: int = 0, layers: int = 2):
    # Skips, rather than fails, where transformers is not installed (the offline GPU machine).
    transformers = pytest.importorskip("transformers")
    LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).float()
    model.eval()
    return model


def tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)
