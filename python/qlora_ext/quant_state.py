"""QuantState: everything needed to undo a 4-bit quantization, in bitsandbytes' format.

The fields and the serialized keys are bitsandbytes 0.50.2's, so a checkpoint written by
``bitsandbytes.nn.Linear4bit`` loads here with no conversion, and ours loads there:

======================================  ===========================================
key (after the parameter's prefix)      content
======================================  ===========================================
``absmax``                              fp32 [n_blocks], or uint8 codes when nested
``quant_map``                           fp32 [16], the 4-bit code table
``nested_absmax``                       fp32 [ceil(n_blocks / 256)] (nested only)
``nested_quant_map``                    fp32 [256], the signed dynamic map (nested)
``quant_state.bitsandbytes__<type>``    uint8 UTF-8 JSON: quant_type, blocksize,
                                        dtype, shape, nested_blocksize,
                                        nested_dtype, nested_offset
======================================  ===========================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

_JSON_KEYS = (
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
)
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{key}: '{name}' is not a torch dtype")
    return dt


@dataclass
class NestedState:
    """The second level of a double quantization: 8-bit codes of (absmax - offset)."""

    absmax: torch.Tensor  # fp32, one scale per group of `blocksize` absmax codes
    code: torch.Tensor  # fp32 [256], sorted
    blocksize: int = 256
    dtype: torch.dtype = torch.float32


@dataclass
class QuantState:
    absmax: torch.Tensor  # fp32 per block, or uint8 codes when `state2` is set
    shape: torch.Size
    code: torch.Tensor  # fp32 [16] quant_map
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    offset: torch.Tensor | None = None  # fp32 0-d, mean subtracted before nesting
    state2: NestedState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def to(self, device) -> QuantState:
        """A copy on `device` (the state stays quantized)."""
        s2 = None
        if self.state2 is not None:
            s2 = NestedState(
                self.state2.absmax.to(device),
                self.state2.code.to(device),
                self.state2.blocksize,
                self.state2.dtype,
            )
        return QuantState(
            absmax=self.absmax.to(device),
            shape=self.shape,
            code=self.code.to(device),
            dtype=self.dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            offset=None if self.offset is None else self.offset.to(device),
            state2=s2,
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """Serialize with bitsandbytes' keys. packed=True folds the non-tensor fields into one
        uint8 JSON tensor, ``quant_state.bitsandbytes__<quant_type>``, fit for safetensors."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.state2 is not None:
            d.update(
                nested_absmax=self.state2.absmax,
                nested_blocksize=self.state2.blocksize,
                # A copy: safetensors refuses tensors that share storage.
                nested_quant_map=self.state2.code.clone(),
                nested_dtype=_dtype_name(self.state2.dtype),
                nested_offset=float(self.offset.item()),
            )
        if not packed:
            return d
        out = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        meta = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        blob = json.dumps(meta).encode("utf-8")
        out[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(blob), dtype=torch.uint8
        )
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device | str = "cpu") -> QuantState:
        """Inverse of as_dict (packed or not). Keys may carry a prefix such as ``weight.``."""
        d = dict(d)
        packed_keys = [
            k for k, v in d.items() if "quant_state" in k and isinstance(v, torch.Tensor)
        ]
        if len(packed_keys) > 1:
            raise ValueError(f"expected one quant_state.bitsandbytes__* entry, got {packed_keys}")
        if packed_keys:
            key = packed_keys[0]
            qt = key.rsplit("__", 1)[-1]
            if qt not in ("nf4", "fp4", "int4"):
                raise ValueError(f"{key}: unknown quant type '{qt}'")
            blob = d.pop(key)
            try:
                meta = json.loads(bytes(blob.cpu().to(torch.uint8).tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{key}: not a UTF-8 JSON quant-state blob ({e})") from e
            d.update(meta)
        elif "quant_type" not in d:
            raise ValueError(
                "expected a quant_state.bitsandbytes__<type> tensor or unpacked quant-state keys"
            )
        d = {k.split(".")[-1]: v for k, v in d.items()}
        unknown = set(d) - set(_JSON_KEYS) - set(_TENSOR_KEYS)
        if unknown:
            raise ValueError(f"unknown quant-state keys: {sorted(unknown)}")
        for k in ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"):
            if k not in d:
                raise ValueError(f"quant state is missing '{k}'")
        state2 = offset = None
        if "nested_absmax" in d:
            for k in ("nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset"):
                if k not in d:
                    raise ValueError(f"nested quant state is missing '{k}'")
            state2 = NestedState(
                absmax=d["nested_absmax"].to(device),
                code=d["nested_quant_map"].to(device),
                blocksize=int(d["nested_blocksize"]),
                dtype=_dtype_from_name(d["nested_dtype"], "nested_dtype"),
            )
            offset = torch.tensor(float(d["nested_offset"]), dtype=torch.float32, device=device)
        return cls(
            absmax=d["absmax"].to(device),
            shape=torch.Size(d["shape"]),
            code=d["quant_map"].to(device),
            dtype=_dtype_from_name(d["dtype"], "dtype"),
            blocksize=int(d["blocksize"]),
            quant_type=str(d["quant_type"]),
            offset=offset,
            state2=state2,
        )
