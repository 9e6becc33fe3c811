"""Whole-model QLoRA: ``prepare_model`` and PEFT-compatible adapters.

    model = qlora_ext.prepare_model(model, r=16, alpha=32, target_modules="all-linear")
    ...train the LoRA parameters (the only ones with requires_grad)...
    qlora_ext.save_adapter(model, "out/")      # PEFT's adapter_config.json + safetensors
    qlora_ext.load_adapter(model, "out/")      # ours or one PEFT trained; JSON + safetensors only
    merged = qlora_ext.merge_adapter(model)    # plain 16-bit model, W = dequant(W4) + s·B@A

Module paths are those of the model passed in; PEFT's keys are the same paths under
``base_model.model.`` (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` for
a ``LlamaForCausalLM``), so ``peft.PeftModel.from_pretrained(base, dir)`` loads our adapters.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from .lora import LoRALinear4bit
from .nn import Linear4bit

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _output_layer_names(model: nn.Module) -> set[str]:
    # "all-linear" leaves the output projection alone, as PEFT does: it is tied to or as large
    # as the embedding, and quantizing it hurts most.
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        names |= {n for n, m in model.named_modules() if m is out}
    return names


def _select_targets(model: nn.Module, target_modules) -> list[str]:
    # A Linear4bit (from a 4-bit load) is a target too; a LoRALinear4bit already has its adapter.
    linears = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m) is Linear4bit
    ]
    if target_modules == "all-linear":
        skip = _output_layer_names(model)
        chosen = [n for n in linears if n not in skip and n.rsplit(".", 1)[-1] not in skip]
    elif isinstance(target_modules, str):
        chosen = [n for n in linears if re.fullmatch(target_modules, n)]  # PEFT: a regex
    elif isinstance(target_modules, (list, tuple, set)) and all(
        isinstance(t, str) for t in target_modules
    ):
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in target_modules)]
    else:
        raise TypeError(
            f"target_modules must be 'all-linear', a regex string or a list of module-name "
            f"suffixes, got {target_modules!r}"
        )
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear layer of "
            f"{type(model).__name__}; its nn.Linear layers are named {leaves or 'nothing'}"
        )
    return chosen


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear4bit)}


def _tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters that were not quantized (embeddings, norms, lm_head,
    biases) to ``dtype``, leaving the adapters in their own dtype. Buffers keep theirs (RoPE's
    fp32 inv_freq must stay fp32)."""
    adapters = set()
    for m in _lora_layers(model).values():
        adapters |= {id(m.lora_A.weight), id(m.lora_B.weight)}
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in adapters or not p.is_floating_point() or p.dtype == dtype:
                    continue
                module._parameters[name] = nn.Parameter(p.to(dtype), requires_grad=False)


def prepare_model(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    target_modules="all-linear",
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    gradient_checkpointing: bool = True,
    blocksize: int = 64,
) -> nn.Module:
    """Turn ``model`` (any nn.Module, e.g. a transformers ``LlamaForCausalLM``) into a QLoRA
    model, in place, and return it.

    Every targeted ``nn.Linear`` becomes a ``LoRALinear4bit`` (4-bit weight, rank-``r``
    adapter, ``scale = alpha / r``). ``target_modules`` is ``"all-linear"`` (every nn.Linear
    but the output layer), a regex matched against full module names, or a list of name
    suffixes such as ``["q_proj", "v_proj"]``, as in PEFT. Layers are quantized one at a time
    and each full-precision weight is released before the next is quantized, so the peak is
    one layer above the 4-bit model, never two full-precision copies. Every base parameter is
    frozen; the other floating-point parameters (embeddings, lm_head, norms) are cast to
    ``compute_dtype``. With ``gradient_checkpointing`` a transformers model gets non-reentrant
    checkpointing. Prints a one-line summary.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r (the LoRA rank) must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    names = _select_targets(model, target_modules)
    bytes_before = _tensor_bytes(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, leaf = _parent(model, name)
        linear = getattr(parent, leaf)
        try:
            if type(linear) is Linear4bit:  # quantized on load: keep its 4-bit weight as it is
                layer = LoRALinear4bit.from_linear4bit(linear, r, alpha, dropout, compute_dtype)
            else:
                layer = LoRALinear4bit.from_linear(
                    linear, r, alpha, dropout, quant_type, double_quant, compute_dtype, blocksize
                )
        except ValueError as e:
            raise ValueError(f"cannot quantize {name}: {e}") from e
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        setattr(parent, leaf, layer)
        del linear, layer  # the last reference to this layer's full-precision weight goes here
    if compute_dtype is not None:
        _cast_unquantized(model, compute_dtype)
    gc_on = False
    # Non-reentrant checkpointing: the inputs of a checkpointed block need no requires_grad
    # (the embeddings are frozen), unlike the reentrant variant.
    if gradient_checkpointing and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})  # transformers >= 5.x
        gc_on = True
    elif gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        gc_on = True
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(
        (m.in_features * m.out_features if isinstance(m, Linear4bit) else 0)
        + sum(p.numel() for p in m.parameters(recurse=False) if p.dtype != torch.uint8)
        for m in model.modules()
    )
    print(
        f"qlora_ext.prepare_model: {len(names)} nn.Linear -> LoRALinear4bit (r={r}, "
        f"alpha={alpha:g}, {quant_type}); trainable params {trainable:,} / {total:,} "
        f"({100 * trainable / max(total, 1):.2f}%); weight bytes {bytes_before:,} -> "
        f"{_tensor_bytes(model):,}; gradient checkpointing {'on' if gc_on else 'off'}"
    )
    return model


# ---- adapters ---------------------------------------------------------------------------------


def _uniform(layers: dict[str, LoRALinear4bit], attr: str):
    values = {getattr(m, attr) for m in layers.values()}
    if len(values) != 1:
        raise ValueError(
            f"the LoRA layers have different {attr} values {sorted(values)}; PEFT's format "
            "stores one (rank_pattern is not written)"
        )
    return values.pop()


def _target_list(model: nn.Module, layers: dict[str, LoRALinear4bit]) -> list[str]:
    # Short leaf names (q_proj, ...) when, matched as PEFT matches them, they select exactly
    # our layers; the full paths otherwise.
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    linear_like = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))]
    hit = {n for n in linear_like if any(n == t or n.endswith("." + t) for t in leaves)}
    return leaves if hit == set(layers) else sorted(layers)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the LoRA adapters of ``model`` in PEFT's format: ``adapter_config.json`` and
    ``adapter_model.safetensors`` with keys ``base_model.model.<path>.lora_{A,B}.weight``.

    Each file is written to a temporary name in ``directory`` and renamed into place, weights
    first and config last, so a crash leaves either the previous adapter or no loadable one.
    """
    from safetensors.torch import save_file

    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            "model has no LoRALinear4bit layers: prepare it with qlora_ext.prepare_model first"
        )
    tensors = {}
    for name, m in layers.items():
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part).weight
            tensors[f"{_PEFT_PREFIX}{name}.{part}.weight"] = w.detach().cpu().contiguous()
    r = _uniform(layers, "r")
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "r": r,
        "lora_alpha": _uniform(layers, "lora_alpha"),
        "lora_dropout": _uniform(layers, "lora_dropout"),
        "target_modules": _target_list(model, layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path, st_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} does not exist: an adapter directory holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (a .bin adapter is not read: it would need unpickling)"
            )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    try:
        tensors = load_file(str(st_path))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
        raise ValueError(f"{st_path} is not a readable safetensors file: {e}") from e
    return cfg, tensors


def _check_config(cfg: dict, path: Path) -> tuple[int, float]:
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key}=true is not supported by LoRALinear4bit")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{path}: a per-layer {key} is not supported (one r and alpha)")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{path}: r must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    # JSON numbers only (json reads NaN and Infinity too); the scale alpha / r must be finite.
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    return r, float(alpha)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a LoRA adapter written by ``save_adapter`` or by PEFT into a model prepared by
    ``prepare_model``; returns the model.

    Reads only JSON and safetensors, never an executable format. Refuses, naming the problem,
    an adapter whose rank differs from the model's, whose tensors do not fit the layers (a
    different base shape), or whose targets are not exactly this model's LoRA layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    d = Path(directory)
    cfg, tensors = _read_adapter(d)
    r, alpha = _check_config(cfg, d / CONFIG_NAME)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            "model has no LoRALinear4bit layers: prepare it with qlora_ext.prepare_model "
            f"(r={r}, target_modules={cfg.get('target_modules')!r}) first"
        )
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{d / WEIGHTS_NAME}: unexpected key {key!r} (not a LoRA A/B weight)")
        found.setdefault(m.group(1), {})[m.group(2)] = t
    unknown = sorted(set(found) - set(layers))
    missing = sorted(set(layers) - set(found))
    if unknown or missing:
        raise ValueError(
            f"the adapter in {d} targets other modules than this model's LoRA layers: "
            f"in the adapter only {unknown[:4]}{'...' if len(unknown) > 4 else ''}, "
            f"in the model only {missing[:4]}{'...' if len(missing) > 4 else ''} "
            f"(adapter target_modules={cfg.get('target_modules')!r})"
        )
    for name, layer in layers.items():
        if layer.r != r:
            raise ValueError(f"the adapter has rank r={r} but layer {name} has r={layer.r}")
        for part, shape in (
            ("lora_A", (r, layer.in_features)),
            ("lora_B", (layer.out_features, r)),
        ):
            t = found[name].get(part)
            st = d / WEIGHTS_NAME
            if t is None:
                raise ValueError(f"{st}: the adapter has no {part} weight for {name}")
            if not t.is_floating_point():
                raise ValueError(
                    f"{st}: {name}.{part} is {t.dtype}; LoRA weights must be floating point"
                )
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{st}: {name}.{part} is {list(t.shape)} but this model needs "
                    f"{list(shape)}: the adapter was trained on a base model of another shape"
                )
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.weight.copy_(found[name]["lora_A"])
            layer.lora_B.weight.copy_(found[name]["lora_B"])
            layer.lora_alpha = alpha
    return model


def merge_adapter(
    model: nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    requantize: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """A plain model with every ``LoRALinear4bit`` replaced by ``nn.Linear`` of ``dtype``
    holding ``W = dequant(W4) + scale · B @ A`` (computed in fp32, rounded once).

    The base is ``dequant(W4)``, the weight the adapter was trained against; merging into an
    original 16-bit W would add ``W16 - dequant(W4)`` as well (unsloth-zoo #810). The other
    floating-point parameters are cast to ``dtype``. ``model`` is left untouched unless
    ``inplace``.

    ``requantize=True`` quantizes each merged weight back to 4 bits (a ``Linear4bit`` with the
    layer's quant_type and blocksize) for 4-bit deployment. Rounding caveat: a 4-bit code step
    is about a tenth of a block's absmax, usually far larger than most entries of
    ``scale · B @ A``, so re-quantizing rounds a good part of the update away and the 4-bit
    merged model does not reproduce the QLoRA model's outputs, only approximates them to 4-bit
    error (PEFT #851 and #2321 say the same of their 4-bit merge). Keep the 16-bit merge, or
    the unmerged adapter, where exact outputs matter.
    """
    out = model if inplace else copy.deepcopy(model)
    layers = _lora_layers(out)
    if not layers:
        raise ValueError("model has no LoRALinear4bit layers to merge")
    for name, layer in layers.items():
        w = layer.merged_weight(torch.float32)
        has_bias = layer.bias is not None
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=has_bias, device=w.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(w)
            if has_bias:
                linear.bias.copy_(layer.bias)
        new: nn.Module = linear
        if requantize:
            meta = layer._meta
            src = nn.Linear(layer.in_features, layer.out_features, bias=has_bias, device=w.device)
            with torch.no_grad():
                src.weight.copy_(w)  # quantized from fp32, not from the rounded 16-bit weight
                if has_bias:
                    src.bias.copy_(layer.bias)
            new = Linear4bit.from_linear(
                src,
                meta["quant_type"],
                meta["blocksize"],
                layer.nested_absmax is not None,
                dtype,
            )
            new.bias = None if not has_bias else nn.Parameter(new.bias.detach().to(dtype))
        new.requires_grad_(False)
        parent, leaf = _parent(out, name)
        setattr(parent, leaf, new)
    _cast_unquantized(out, dtype)
    if not requantize:
        _drop_quantization_config(out)
    return out


def _drop_quantization_config(model: nn.Module) -> None:
    # A model loaded with QloraExtConfig carries it in its config; once every 4-bit layer is a
    # 16-bit nn.Linear, saving it so would write a checkpoint whose config.json says 4 bits.
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        return
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "is_quantized", "quantization_method", "is_loaded_in_4bit"):
        if attr in model.__dict__:
            delattr(model, attr)
