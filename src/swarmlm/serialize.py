"""The one place (with compact.py) where bytes from the network or disk become tensors and messages.

Messages are msgpack; tensors travel as a msgpack extension holding dtype, shape and raw
little-endian bytes. A message class marked `@compact.compact` (a decoding step's request
and reply) uses compact.py's fixed binary layout instead. Decoding checks sizes, dtypes and shapes as it goes and raises
`WireError` on anything malformed, so a handler can answer a bad request with an error
instead of crashing. Never pickle. Knows nothing of peers, models or the store.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from typing import Any, Callable, Sequence

import msgpack
import numpy as np
import torch

from swarmlm import compact
from swarmlm.errors import WireError

MAX_MESSAGE_BYTES = 256 * 1024 * 1024   # default ceiling for one decoded message
MAX_NDIM = 8
_TENSOR_EXT = 1

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_NUMPY_DTYPES = frozenset(DTYPES.values()) - {torch.bfloat16}   # those `Tensor.numpy()` can show
assert sys.byteorder == "little", "the wire format is little-endian"


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise WireError(f"dtype {dtype} cannot be sent")
    return _DTYPE_NAMES[dtype]


def parse_dtype(name: Any) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise WireError(f"unknown dtype {name!r}")
    return DTYPES[name]


# ---- tensors ---------------------------------------------------------------------------

def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """dtype + shape + raw bytes, as one msgpack array."""
    return msgpack.packb([dtype_name(t.dtype), list(t.shape), compact.raw_bytes(t)], use_bin_type=True)


def tensor_from_bytes(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> torch.Tensor:
    """Inverse of `tensor_to_bytes`; raises `WireError` on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"tensor payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes + 1024:
        raise WireError(f"tensor payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        fields = msgpack.unpackb(data, raw=False, max_bin_len=max_bytes, max_array_len=MAX_NDIM + 3)
    except Exception as e:  # msgpack raises several unrelated types
        raise WireError(f"tensor payload does not decode: {e}") from None
    return _tensor_from_fields(fields, max_bytes)


def _tensor_from_fields(fields: Any, max_bytes: int) -> torch.Tensor:
    if not isinstance(fields, list) or len(fields) != 3:
        raise WireError("tensor payload must be [dtype, shape, bytes]")
    name, shape, raw = fields
    dtype = parse_dtype(name)
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise WireError(f"bad tensor shape {shape!r}")
    if not isinstance(raw, (bytes, bytearray)):
        raise WireError("tensor data must be bytes")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = dtype.itemsize
    if numel * itemsize > max_bytes:
        raise WireError(f"tensor of {numel * itemsize} bytes exceeds the limit of {max_bytes}")
    if numel * itemsize != len(raw):
        raise WireError(f"tensor data has {len(raw)} bytes, shape {shape} of {name} needs {numel * itemsize}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def tensor_to_raw(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of `t` (no dtype, no shape: a protocol that fixes both sends
    them this way); no copy when `t` is a contiguous CPU tensor."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_from_raw(data: bytearray | memoryview, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A `dtype` tensor of `shape` over `data` (a writable buffer, shared, not copied); `WireError`
    unless its length is exactly what the shape needs."""
    numel = 1
    for s in shape:
        numel *= s
    need = numel * dtype.itemsize
    if len(data) != need:
        raise WireError(f"tensor data has {len(data)} bytes, shape {tuple(shape)} of {dtype} needs {need}")
    if numel == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(tuple(shape))


def check_tensor(t: Any, *, name: str = "tensor", dtype: torch.dtype | Sequence[torch.dtype] | None = None,
                 shape: Sequence[int | None] | None = None, finite: bool = False) -> torch.Tensor:
    """Raise `WireError` unless `t` is a tensor of the given dtype(s) and shape (None = any size)."""
    if not isinstance(t, torch.Tensor):
        raise WireError(f"{name} must be a tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            raise WireError(f"{name} has dtype {t.dtype}, expected {' or '.join(map(str, allowed))}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise WireError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    if finite and t.is_floating_point() and not _all_finite(t):
        raise WireError(f"{name} contains NaN or inf")
    return t


def _all_finite(t: torch.Tensor) -> bool:
    # it runs on every step, just after a compute has chilled the caches, where each call costs
    # ~50 us: a finite sum proves every element finite in one kernel; only a sum that is not
    # (a NaN or inf inside, or an overflow) is checked element by element
    if math.isfinite(float(t.detach().sum())):
        return True
    if t.dtype in _NUMPY_DTYPES and t.device.type == "cpu" and not t.requires_grad:
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


# ---- generic values (msgpack with tensors inside) ----------------------------------------

def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return msgpack.ExtType(_TENSOR_EXT, tensor_to_bytes(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):     # a message inside a message
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def pack(obj: Any) -> bytes:
    """msgpack of plain values (dict, list, str, bytes, int, float, bool, None) and tensors."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpack(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Inverse of `pack`, with size limits; raises `WireError` on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"message must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")

    def ext_hook(code: int, payload: bytes) -> Any:
        if code != _TENSOR_EXT:
            raise WireError(f"unknown extension type {code}")
        return tensor_from_bytes(payload, max_bytes=max_bytes)

    try:
        return msgpack.unpackb(data, raw=False, ext_hook=ext_hook, strict_map_key=True,
                               max_bin_len=max_bytes, max_str_len=max_bytes,
                               max_array_len=1 << 20, max_map_len=1 << 16, max_ext_len=max_bytes + 1024)
    except WireError:
        raise
    except Exception as e:
        raise WireError(f"message does not decode: {type(e).__name__}: {e}") from None


# ---- typed messages (frozen dataclasses) -------------------------------------------------

def encode_message(msg: Any) -> bytes:
    """A dataclass instance as msgpack of its fields (or in its class's compact layout: compact.py)."""
    if not dataclasses.is_dataclass(msg) or isinstance(msg, type):
        raise TypeError("encode_message takes a dataclass instance")
    layout = compact.layout_of(type(msg))
    if layout is not None:
        return compact.encode(msg, layout)
    return pack({f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)})


def decode_message(data: bytes, cls: type, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Decode bytes into dataclass `cls`, checking every field against its type hint."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"message must be bytes, got {type(data).__name__}")
    layout = compact.layout_of(cls)
    if layout is not None:
        return compact.decode(data, layout, max_bytes=max_bytes)
    fields = unpack(data, max_bytes=max_bytes)
    return message_from_dict(fields, cls)


def message_from_dict(fields: Any, cls: type) -> Any:
    if not isinstance(fields, dict):
        raise WireError(f"{cls.__name__} must be a map, got {type(fields).__name__}")
    schema, required = _schema(cls)
    values = {}
    for name, value in fields.items():
        check = schema.get(name)
        if check is None:
            unknown = set(fields) - set(schema)
            raise WireError(f"{cls.__name__} has unknown fields {sorted(map(str, unknown))}")
        values[name] = check(value, f"{cls.__name__}.{name}")
    for name in required:
        if name not in values:
            raise WireError(f"{cls.__name__} lacks field {name!r}")
    return cls(**values)


Check = Callable[[Any, str], Any]     # (value, where) -> the checked value, or WireError


@functools.lru_cache(maxsize=None)
def _schema(cls: type) -> tuple[dict[str, Check], tuple[str, ...]]:
    """A dataclass's field checkers and required fields, built once per class (a message is
    decoded on every step, and reading type hints each time is slow)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    required = tuple(f.name for f in fields
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    return {f.name: _checker(hints[f.name]) for f in fields}, required


@functools.lru_cache(maxsize=None)
def _checker(hint: Any) -> Check:
    """The check for values of type `hint`, built once per hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return lambda value, where: value
    if origin in (typing.Union, types.UnionType):
        options = [_checker(arg) for arg in args]

        def union(value: Any, where: str) -> Any:
            if value is None and type(None) in args:
                return None
            for check in options:
                try:
                    return check(value, where)
                except WireError:
                    continue
            raise WireError(f"{where}: {type(value).__name__} is not {hint}")
        return union
    if hint is type(None):
        def none(value: Any, where: str) -> None:
            if value is not None:
                raise WireError(f"{where} must be null")
        return none
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        as_tuple = origin is tuple or hint is tuple
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = [_checker(a) for a in args]

            def fixed(value: Any, where: str) -> tuple:
                if not isinstance(value, list):
                    raise WireError(f"{where} must be a list, got {type(value).__name__}")
                if len(items) != len(value):
                    raise WireError(f"{where} must have {len(items)} items")
                return tuple(check(v, where) for v, check in zip(value, items))
            return fixed
        item = _checker(args[0] if args else Any)

        def sequence(value: Any, where: str) -> list | tuple:
            if not isinstance(value, list):
                raise WireError(f"{where} must be a list, got {type(value).__name__}")
            out = [item(v, f"{where}[]") for v in value]
            return tuple(out) if as_tuple else out
        return sequence
    if origin is dict or hint is dict:
        key_check, value_check = (_checker(args[0]), _checker(args[1])) if args else (_checker(Any), _checker(Any))

        def mapping(value: Any, where: str) -> dict:
            if not isinstance(value, dict):
                raise WireError(f"{where} must be a map")
            return {key_check(k, where): value_check(v, where) for k, v in value.items()}
        return mapping
    if dataclasses.is_dataclass(hint):
        return lambda value, where: message_from_dict(value, hint)
    if hint is float:
        def number(value: Any, where: str) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise WireError(f"{where} must be a number, got {type(value).__name__}")
            return float(value)
        return number
    if hint is int:
        def integer(value: Any, where: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise WireError(f"{where} must be an integer, got {type(value).__name__}")
            return value
        return integer
    if hint is bytes:
        def raw(value: Any, where: str) -> bytes:
            if not isinstance(value, (bytes, bytearray)):
                raise WireError(f"{where} must be bytes, got {type(value).__name__}")
            return bytes(value)
        return raw
    if isinstance(hint, type):
        def instance(value: Any, where: str) -> Any:
            if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool) and hint is not int):
                raise WireError(f"{where} must be {hint.__name__}, got {type(value).__name__}")
            return value
        return instance
    return lambda value, where: value
