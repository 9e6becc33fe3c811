"""Modules built on the 4-bit ops.

``Linear4bit`` is a frozen ``nn.Linear`` whose weight is stored in 4 bits. Its state_dict has
bitsandbytes' keys (``weight`` as packed uint8 ``[n/2, 1]``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__<type>``), so a
checkpoint of ``bitsandbytes.nn.Linear4bit`` loads here and ours loads there.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
from torch import nn

from .functional import _renamed, matmul_4bit, quantize_4bit
from .quant_state import NestedState, QuantState

_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")
_QUANT_STATE_ATTRS = frozenset(
    ("weight", "_meta", "_state_layout", "in_features", "out_features", *_STATE_BUFFERS)
)


def _autocast_dtype(x: torch.Tensor, compute_dtype: torch.dtype | None):
    """(dtype to compute in, the autocast context to run the op in).

    Note [4-bit ops under autocast]: our ops take x and the adapters in their own dtypes and
    choose their accumulation themselves (Note [LoRA accumulation]); autocast reaching the
    matmuls inside them would mix dtypes. So the op runs with autocast off, in autocast's
    dtype when autocast is on (as a dense nn.Linear would) and in compute_dtype otherwise.
    """
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind), torch.autocast(kind, enabled=False)
    return compute_dtype, contextlib.nullcontext()


_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_compute_dtype(compute_dtype) -> None:
    # Checked here: a bad one would otherwise surface at the first forward, naming x.
    if compute_dtype is not None and compute_dtype not in _COMPUTE_DTYPES:
        raise TypeError(
            "compute_dtype must be None, torch.float32, torch.float16, torch.bfloat16 or "
            f"torch.float64, got {compute_dtype!r}"
        )


def _check_input(x) -> None:
    # Before the cast to compute_dtype, which would turn integers into values and drop the
    # imaginary part of a complex x without a word.
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point torch.Tensor, got {got}")


def _check_blocksize(blocksize) -> None:
    # Before `in_features % blocksize`, which a non-integer or zero blocksize would break.
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")


def _dtensor_type():
    # Only a model that torch.distributed.tensor has been imported for can hold DTensors; not
    # importing it here keeps `import qlora_ext` light.
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else mod.DTensor


class Linear4bit(nn.Module):
    """``y = x @ dequant(W4)ᵀ + b`` with a frozen 4-bit weight.

    The weight is a ``uint8`` parameter (``requires_grad=False``) and the quantization state
    lives in non-persistent buffers, so ``.to(device)`` moves it and keeps it quantized
    (``qlora_ext.distributed.make_fsdp2_shardable`` turns the state into parameters, Note
    [Quant state as bytes]). ``compute_dtype`` (default: the input's dtype) is the dtype the
    matmul runs in; the output comes back in the input's dtype. Gradients flow to the input
    and the bias.

    Note [Quant state as bytes]: FSDP2 shards parameters, not buffers, and its mixed-precision
    policy casts every floating-point parameter to ``param_dtype`` before the all-gather. A
    bf16 copy of an fp32 absmax or code table would dequantize a different weight without an
    error. So a shardable layer (``_state_layout`` is a dict) holds each state tensor as a
    frozen 1-D ``uint8`` parameter of its raw bytes, which FSDP2 shards on dim 0 and never
    casts (it casts floating-point parameters only), and ``_state_layout`` records the dtype
    and shape each is viewed back as at compute. The state_dict is built from the typed views,
    so its keys and values are the same in both layouts.
    """

    _state_layout: dict | None = None  # Note [Quant state as bytes]
    _layer_name: str | None = None  # the module's name in its model, for errors

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        _check_compute_dtype(compute_dtype)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        _check_blocksize(blocksize)
        if in_features % blocksize:
            raise ValueError(
                f"in_features={in_features} is not a multiple of blocksize={blocksize}: a 4-bit "
                "block would span two rows of the weight; pick a blocksize that divides it"
            )
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        # nn.Linear's initialisation, then quantized: a usable layer even before a checkpoint.
        w = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        for name in _STATE_BUFFERS:
            self.register_buffer(name, None, persistent=False)
        self._set_weight(*quantize_4bit(w, blocksize, quant_type, double_quant))
        if bias:
            bound = 1 / math.sqrt(in_features)
            self.bias = nn.Parameter(
                torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound)
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """Quantize an ``nn.Linear``; its bias is kept in full precision (and trainable)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_compute_dtype(compute_dtype)
        _check_blocksize(blocksize)
        w = linear.weight.detach()
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.compute_dtype = compute_dtype
        if m.in_features % blocksize:
            raise ValueError(
                f"in_features={m.in_features} is not a multiple of blocksize={blocksize}: a "
                "4-bit block would span two rows of the weight; pick a blocksize that divides it"
            )
        m.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        for name in _STATE_BUFFERS:
            m.register_buffer(name, None, persistent=False)
        try:
            m._set_weight(*quantize_4bit(w, blocksize, quant_type, double_quant))
        except (RuntimeError, TypeError, ValueError) as e:  # Note [Public argument names]
            raise _renamed(e, {"w": "linear.weight"}) from None
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
        else:
            m.register_parameter("bias", None)
        return m

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: nn.Parameter | None,
        compute_dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> Linear4bit:
        """A layer whose 4-bit weight is still to come (Note [Empty Linear4bit]).

        Note [Empty Linear4bit]: transformers builds a model on the meta device and fills it
        tensor by tensor as the shards are read. This layer holds a meta ``uint8`` weight of the
        packed shape and no quant state until ``quantize_weight_`` (a 16-bit checkpoint) or
        ``load_quantized_`` (a 4-bit one) fills it; its state_dict meanwhile has only
        ``weight`` (and ``bias``), the keys the loader streams in. ``bias`` is the meta
        parameter of the ``nn.Linear`` it replaces, in the dtype the model is built in.
        """
        if in_features % blocksize:
            raise ValueError(
                f"in_features={in_features} is not a multiple of blocksize={blocksize}: a 4-bit "
                "block would span two rows of the weight; pick a blocksize that divides it"
            )
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = in_features, out_features
        m.compute_dtype = compute_dtype
        n = in_features * out_features
        packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device="meta")
        m.weight = nn.Parameter(packed, requires_grad=False)
        for name in _STATE_BUFFERS:
            m.register_buffer(name, None, persistent=False)
        m._meta = None
        m._pending = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        if bias is not None:
            m.bias = bias
        else:
            m.register_parameter("bias", None)
        return m

    def quantize_weight_(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision ``[out, in]`` weight into this layer, on its device."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight has shape {tuple(weight.shape)} but this layer is "
                f"[{self.out_features}, {self.in_features}]"
            )
        p = self._pending or dict(
            quant_type=self._meta["quant_type"],
            blocksize=self._meta["blocksize"],
            double_quant=self.nested_absmax is not None,
        )
        self._set_weight(*quantize_4bit(weight, p["blocksize"], p["quant_type"], p["double_quant"]))

    def load_quantized_(self, packed: torch.Tensor, state: QuantState) -> None:
        """Take a packed weight and its state as a 4-bit checkpoint stores them."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"the 4-bit weight has shape {tuple(state.shape)} but this layer is "
                f"[{self.out_features}, {self.in_features}]"
            )
        if packed.dtype != torch.uint8:  # bitsandbytes may store the bytes as another dtype
            packed = packed.contiguous().view(torch.uint8)
        n = self.out_features * self.in_features
        if packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"packed weight has {packed.numel()} bytes but [{self.out_features}, "
                f"{self.in_features}] needs {(n + 1) // 2}"
            )
        self._set_weight(packed, state.to(packed.device))

    # -- the quantized weight ------------------------------------------------------------------
    def _set_weight(self, packed: torch.Tensor, state: QuantState) -> None:
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"the 4-bit weight has shape {tuple(state.shape)} but this layer is "
                f"[{self.out_features}, {self.in_features}]"
            )
        self.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
        nested = state.state2
        for name, t in (
            ("absmax", state.absmax),
            ("quant_map", state.code),
            ("nested_absmax", None if nested is None else nested.absmax),
            ("nested_quant_map", None if nested is None else nested.code),
            ("nested_offset", None if nested is None else state.offset.reshape(())),
        ):
            self._store_state(name, t)
        self._pending = None
        self._meta = dict(
            dtype=state.dtype,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            nested_blocksize=None if nested is None else nested.blocksize,
        )

    def _store_state(self, name: str, t: torch.Tensor | None) -> None:
        layout = self._state_layout
        if layout is None:
            setattr(self, name, t)
            return
        # Note [Quant state as bytes]
        if t is None:
            layout.pop(name, None)
            setattr(self, name, None)
            return
        layout[name] = (t.dtype, tuple(t.shape))
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        setattr(self, name, nn.Parameter(raw, requires_grad=False))

    def _state_to_parameters_(self) -> None:
        """Hold the quantization state as frozen uint8 parameters (Note [Quant state as
        bytes]); idempotent. Called by ``qlora_ext.distributed.make_fsdp2_shardable``."""
        if self._state_layout is not None:
            return
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(self.weight, dtensor):
            raise RuntimeError(
                f"{self._describe()}: its weight is already sharded by fully_shard, so its "
                "quantization state can no longer join it; call "
                "qlora_ext.distributed.make_fsdp2_shardable(model) before fully_shard"
            )
        tensors = {name: getattr(self, name) for name in _STATE_BUFFERS}
        for name in _STATE_BUFFERS:
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
        self._state_layout = {}
        for name, t in tensors.items():
            self.register_parameter(name, None)
            self._store_state(name, t)
        self.__dict__.pop("_quant_state_cache", None)

    def _describe(self) -> str:
        return f"Linear4bit {self._layer_name!r}" if self._layer_name else "this Linear4bit"

    def _state_tensor(self, name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        """State tensor ``t`` (``name``) as the kernels read it: its typed view in the byte
        layout, after checking that it is whole (Note [Gathered together])."""
        layout = self._state_layout
        if t is None or layout is None:
            return t
        dtype, shape = layout[name]
        want = math.prod(shape) * dtype.itemsize
        if t.dtype != torch.uint8 or t.numel() != want:
            raise RuntimeError(self._not_whole(f"its {name}", t, f"{want} uint8 bytes"))
        t = t.reshape(-1)
        if t.storage_offset() % dtype.itemsize:  # a view must start on an element boundary
            t = t.clone()
        return t.view(dtype).view(shape)

    def _not_whole(self, what: str, t: torch.Tensor, want: str) -> str:
        # Note [Gathered together]: FSDP2 gathers a unit's parameters before its forward. A
        # packed weight and state that are not both whole here (one of them sharded, or in
        # another FSDP unit, or called outside its unit's forward) would dequantize with the
        # wrong scales or read past a shard, so the layer refuses to run.
        return (
            f"{self._describe()}: {what} has {t.numel()} elements of {t.dtype} but needs "
            f"{want}: it is sharded, or not gathered with the rest of the layer. A 4-bit "
            "layer's packed weight and quantization state must be in one FSDP unit and used "
            "inside its forward: call qlora_ext.distributed.make_fsdp2_shardable(model) "
            "before fully_shard (or use qlora_ext.distributed.fully_shard_model), and do not "
            "fully_shard a piece of a Linear4bit"
        )

    def __setattr__(self, name, value):
        if name in _QUANT_STATE_ATTRS:  # Note [Cached quant state]
            self.__dict__.pop("_quant_state_cache", None)
        super().__setattr__(name, value)

    @property
    def quant_state(self) -> QuantState:
        # Note [Cached quant state]: built once, not per forward (9 us, a third of a small
        # layer's forward). Every way its tensors are replaced goes through __setattr__, which
        # drops it: _set_weight, _apply's restore of the state buffers after .to(), assignment.
        # nn.Module._apply and load_state_dict change the weight in place, which it shares.
        state = self.__dict__.get("_quant_state_cache")
        if state is None:
            state = self.__dict__["_quant_state_cache"] = self._build_quant_state()
        return state

    def _build_quant_state(self, tensors: dict | None = None) -> QuantState:
        # tensors: the packed weight and state to build from instead of the layer's own (the
        # gathered copies of a sharded layer, _save_to_state_dict).
        if tensors is None:
            tensors = {n: getattr(self, n) for n in ("weight", *_STATE_BUFFERS)}
        meta = self._meta
        if meta is None:
            raise RuntimeError(
                "this Linear4bit has no weight yet (an empty layer of a model being loaded; "
                "Note [Empty Linear4bit])"
            )
        dtensor = _dtensor_type()
        if dtensor is not None:
            for name, t in tensors.items():
                if isinstance(t, dtensor):
                    raise RuntimeError(
                        f"{self._describe()}: its {name} is a sharded DTensor: the layer was "
                        "used outside the forward of the fully_shard unit that gathers it "
                        "(call the FSDP module, or unshard() it first)"
                    )
        want = (self.out_features * self.in_features + 1) // 2
        if tensors["weight"].numel() != want:  # Note [Gathered together]
            raise RuntimeError(
                self._not_whole("its packed weight", tensors["weight"], f"{want} uint8 bytes")
            )
        t = {n: self._state_tensor(n, tensors[n]) for n in _STATE_BUFFERS}
        state2 = None
        if t["nested_absmax"] is not None:
            state2 = NestedState(
                t["nested_absmax"], t["nested_quant_map"], meta["nested_blocksize"]
            )
        return QuantState(
            absmax=t["absmax"],
            shape=torch.Size((self.out_features, self.in_features)),
            code=t["quant_map"],
            dtype=meta["dtype"],
            blocksize=meta["blocksize"],
            quant_type=meta["quant_type"],
            offset=t["nested_offset"],
            state2=state2,
        )

    def _gathered(self) -> dict | None:
        """The packed weight and state gathered whole, if FSDP2 holds them sharded (None
        otherwise). A collective: every rank must call it, as with any full state_dict."""
        dtensor = _dtensor_type()
        tensors = {n: getattr(self, n) for n in ("weight", *_STATE_BUFFERS)}
        if dtensor is None or not any(isinstance(v, dtensor) for v in tensors.values()):
            return None
        return {
            n: v.full_tensor().detach() if isinstance(v, dtensor) else v for n, v in tensors.items()
        }

    def dequantized_weight(self) -> torch.Tensor:
        """The full-precision weight this layer computes with (for inspection and merging)."""
        from .functional import dequantize_4bit

        return dequantize_4bit(self.weight, self.quant_state)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the quantization state; .half()/.to(dtype) must not cast it (the
        # kernels read fp32 absmax and code tables), so its dtype is restored after fn.
        saved = {name: getattr(self, name) for name in _STATE_BUFFERS}
        super()._apply(fn, recurse)
        self.__dict__.pop("_quant_state_cache", None)  # it may have replaced the weight
        for name, old in saved.items():
            if old is None:
                continue
            new = getattr(self, name)
            if self._state_layout is None:
                setattr(self, name, old.to(new.device))
            elif new.dtype != torch.uint8:  # Note [Quant state as bytes]: bytes stay bytes
                setattr(self, name, nn.Parameter(old.detach().to(new.device), False))
        return self

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        in_dtype = x.dtype
        dtype, ctx = _autocast_dtype(x, self.compute_dtype)  # Note [4-bit ops under autocast]
        if dtype is not None:
            x = x.to(dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        with ctx:
            y = matmul_4bit(x, self.weight, self.quant_state, bias)
        # Under autocast the result stays in autocast's dtype, as a dense layer's would.
        return y if dtype is not None and dtype != self.compute_dtype else y.to(in_dtype)

    def extra_repr(self) -> str:
        m = self._meta
        if m is None:
            return f"in_features={self.in_features}, out_features={self.out_features}, empty"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={m['quant_type']}, "
            f"blocksize={m['blocksize']}, double_quant={self.nested_absmax is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # -- bitsandbytes-compatible state_dict ---------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Sharded by FSDP2 (outside a forward): the bitsandbytes-format entries need the whole
        # tensors, so they are gathered, as a full state_dict gathers every parameter.
        gathered = None if self._meta is None else self._gathered()
        w = self.weight if gathered is None else gathered["weight"]
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        if self._meta is None:  # Note [Empty Linear4bit]
            return
        state = self.quant_state if gathered is None else self._build_quant_state(gathered)
        for k, v in state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        wkey = prefix + "weight"
        qs = {k[len(wkey) + 1 :]: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
        if wkey not in state_dict:
            missing_keys.append(wkey)
            return
        packed = state_dict[wkey]
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(self.weight, dtensor):
            # FSDP2 would go on gathering its own shards over whatever was loaded here.
            errors.append(
                f"{wkey}: this 4-bit layer is sharded by fully_shard; load its weight before "
                "sharding (the adapters alone load into a sharded model)"
            )
            return
        try:
            if not qs:
                raise ValueError(
                    "no quant-state keys (weight.absmax, weight.quant_state.bitsandbytes__*); "
                    "this looks like an unquantized checkpoint: load it into nn.Linear and use "
                    "Linear4bit.from_linear"
                )
            state = QuantState.from_dict(qs, device=packed.device)
            self.load_quantized_(packed.to(self.weight.device), state)
        except ValueError as e:
            errors.append(f"{wkey}: {e}")
            return
        bkey = prefix + "bias"
        if self.bias is not None:
            if bkey in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bkey])
            else:
                missing_keys.append(bkey)
        elif bkey in state_dict:
            unexpected_keys.append(bkey)


from .lora import LoRALinear4bit  # noqa: E402,F401  (lora.py builds on Linear4bit above)
