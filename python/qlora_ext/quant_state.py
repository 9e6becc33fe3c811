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
import math
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
        """Inverse of as_dict (packed or not). Keys may carry a prefix such as ``weight.``.

        Every entry is checked, and a dict that could not have come from as_dict is refused
        naming its key: a checkpoint is outside input, and a wrong entry would otherwise
        surface as a wrong dequantization or an error far from its cause.
        """
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict of quant-state entries, got {type(d).__name__}")
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
            if not isinstance(meta, dict):
                raise ValueError(f"{key}: the blob must hold a JSON object, got {meta!r:.80}")
            if meta.get("quant_type", qt) != qt:
                raise ValueError(
                    f"{key} names quant type '{qt}' but its blob says {meta['quant_type']!r}"
                )
            d.update(meta)
        d = {k.split(".")[-1]: v for k, v in d.items()}
        if not packed_keys and "quant_type" not in d:
            raise ValueError(
                "expected a quant_state.bitsandbytes__<type> tensor or unpacked quant-state keys "
                "with 'quant_type'; got neither"
            )
        unknown = set(d) - set(_JSON_KEYS) - set(_TENSOR_KEYS)
        if unknown:
            raise ValueError(f"unknown quant-state keys: {sorted(unknown)}")
        for k in ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"):
            if k not in d:
                raise ValueError(f"quant state is missing '{k}'")
        nested = "nested_absmax" in d
        for k in _TENSOR_KEYS if nested else _TENSOR_KEYS[:2]:
            if k in d and not isinstance(d[k], torch.Tensor):
                raise TypeError(f"{k} must be a torch.Tensor, got {type(d[k]).__name__}")
        quant_type = d["quant_type"]
        if quant_type not in ("nf4", "fp4", "int4"):
            raise ValueError(f"quant_type must be 'nf4', 'fp4' or 'int4', got {quant_type!r}")
        blocksize = _int_entry(d, "blocksize")
        if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize}")
        shape = d["shape"]
        if not isinstance(shape, (list, tuple, torch.Size)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**62 for s in shape
        ):
            raise ValueError(f"shape must be a list of sizes >= 0, got {shape!r:.80}")
        n = math.prod(shape)
        if n >= 2**62:
            raise ValueError(f"shape {list(shape)} has too many elements")
        dtype = _dtype_from_name(d["dtype"], "dtype")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {d['dtype']!r}")
        absmax, quant_map = d["absmax"], d["quant_map"]
        if absmax.dtype == torch.uint8 and not nested:
            raise ValueError(
                "absmax is uint8 (double-quantized) but nested_absmax, its scales, is missing"
            )
        want = (torch.uint8 if nested else torch.float32, -(-n // blocksize))
        if (absmax.dtype, absmax.numel()) != want:
            raise ValueError(
                f"absmax must be {want[0]} with {want[1]} elements for shape {list(shape)} and "
                f"blocksize {blocksize}, got {absmax.dtype} with {absmax.numel()}"
            )
        # The kernels decode with quant_type's own table, so a quant_map that is another table
        # would be ignored silently; a table bitsandbytes wrote matches to float32 rounding.
        from .functional import get_4bit_code

        table = get_4bit_code(quant_type)
        if quant_map.shape != table.shape or not torch.allclose(
            quant_map.detach().cpu().float(), table, rtol=1e-5, atol=1e-7
        ):
            raise ValueError(f"quant_map is not the {quant_type} table: {quant_map!r:.120}")
        state2 = offset = None
        if nested:
            for k in ("nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset"):
                if k not in d:
                    raise ValueError(f"nested quant state is missing '{k}'")
            nested_blocksize = _int_entry(d, "nested_blocksize")
            if nested_blocksize <= 0:
                raise ValueError(f"nested_blocksize must be positive, got {nested_blocksize}")
            offset_value = d["nested_offset"]
            if isinstance(offset_value, bool) or not isinstance(offset_value, (int, float)):
                raise ValueError(f"nested_offset must be a number, got {offset_value!r:.80}")
            state2 = NestedState(
                absmax=d["nested_absmax"].to(device),
                code=d["nested_quant_map"].to(device),
                blocksize=nested_blocksize,
                dtype=_dtype_from_name(d["nested_dtype"], "nested_dtype"),
            )
            offset = torch.tensor(float(offset_value), dtype=torch.float32, device=device)
        return cls(
            absmax=absmax.to(device),
            shape=torch.Size(shape),
            code=quant_map.to(device),
            dtype=dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            offset=offset,
            state2=state2,
        )


def _int_entry(d: dict, key: str) -> int:
    v = d[key]
    if torch.is_tensor(v) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
        raise ValueError(f"{key} must be an integer, got {v!r:.80}")
    return int(v)
