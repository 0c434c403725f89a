"""Compact binary layouts for the messages sent on every decoding step.

`serialize.encode_message` / `decode_message` use the layout of a class marked `@compact`
instead of msgpack: a step's request and reply travel a few times per token, right after a
span's compute has flushed the CPU caches, and there each Python call and torch call costs
ten times what it costs warm (`bench/swarm_inference.py`; msgpack with a tensor extension
took ~170 us to decode cold, this layout ~70 us).

A compact message is, little-endian:

    0xc1 (a byte msgpack never writes) | u32 flags | i64 per int field |
    then, in field order, each present variable field: bytes (and str, as UTF-8) as u32 length + bytes;
    a tensor as u8 dtype code, u8 ndim, u64 per dimension, raw bytes; a list of ints
    as u32 count + i64 each.

Flags hold the bools and, for each optional field, whether it is present. Decoding checks
every length, dtype code, rank and size against the data and the limit, and rejects unknown
flags and trailing bytes with `WireError`. The fields' types are the layout's, so no further
type check is needed. Knows nothing of what the messages mean.
"""

from __future__ import annotations

import dataclasses
import operator
import struct
import types
import typing
from typing import Any, Callable

import torch

from swarmlm.errors import WireError

MAGIC = 0xC1
_HEAD = struct.Struct("<BI")
_U32 = struct.Struct("<I")
_TENSOR_HEAD = struct.Struct("<BB")
_MAX_NDIM = 8
_MAX_LIST = 1 << 16
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)
_CODE = {d: i for i, d in enumerate(_DTYPES)}
_SHAPES = [struct.Struct(f"<{n}Q") for n in range(_MAX_NDIM + 1)]

Reader = Callable[[memoryview, int, int], tuple[Any, int]]   # (data, offset, max_bytes) -> (value, next offset)
Writer = Callable[[Any, list], None]                          # (value, parts to append to)


@dataclasses.dataclass(frozen=True)
class Layout:
    cls: type
    ints: tuple[int, ...]                 # field indices, in the fixed part
    bools: tuple[tuple[int, int], ...]    # (field index, flag bit)
    variable: tuple[tuple[int, int | None, Reader, Writer], ...]   # (field index, presence bit or None, read, write)
    fixed: struct.Struct
    n_fields: int
    known_flags: int
    values: Callable[[Any], tuple]        # a message's field values, in order


def compact(cls: type) -> type:
    """Class decorator: give a frozen dataclass of int, bool, bytes, str, Tensor and list[int] fields
    (each may be Optional) a compact layout."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    ints, bools, variable = [], [], []
    bit = 0
    for i, f in enumerate(fields):
        hint, optional = _unwrap(hints[f.name])
        if hint is bool and not optional:
            bools.append((i, 1 << bit))
            bit += 1
        elif hint is int and not optional:
            ints.append(i)
        elif hint in _CODECS:
            presence = None
            if optional:
                presence, bit = 1 << bit, bit + 1
            variable.append((i, presence, *_CODECS[hint]))
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: {hints[f.name]} has no compact layout")
    if bit > 32:
        raise TypeError(f"{cls.__name__} has more than 32 flags")
    cls.__compact__ = Layout(cls, tuple(ints), tuple(bools), tuple(variable), struct.Struct("<" + "q" * len(ints)),
                             len(fields), (1 << bit) - 1, _values_of([f.name for f in fields]))
    return cls


def layout_of(cls: type) -> Layout | None:
    return cls.__dict__.get("__compact__")


def encode(msg: Any, layout: Layout, *, prefix: bytes = b"") -> bytes:
    """The message's bytes, after `prefix` (a caller's own header, joined in the same single copy)."""
    values = layout.values(msg)
    flags = 0
    for i, b in layout.bools:
        if values[i]:
            flags |= b
    parts: list = [b"", b""]
    for i, presence, _, write in layout.variable:
        v = values[i]
        if v is None:
            if presence is None:
                raise TypeError(f"{layout.cls.__name__}: a required field is None")
            continue
        if presence is not None:
            flags |= presence
        write(v, parts)
    try:
        parts[0] = prefix + _HEAD.pack(MAGIC, flags)
        parts[1] = layout.fixed.pack(*(values[i] for i in layout.ints))
    except struct.error as e:
        raise TypeError(f"{layout.cls.__name__}: {e}") from None
    return b"".join(parts)


def decode(data: bytes | bytearray | memoryview, layout: Layout, *, max_bytes: int, views: bool = False) -> Any:
    """The message in `data`, checked. `views`: bytes fields come back as memoryviews into `data`
    (no copy of a large payload; only for immutable `data`, which they keep alive)."""
    view = memoryview(data)
    name = layout.cls.__name__
    if len(view) > max_bytes:
        raise WireError(f"{name} of {len(view)} bytes exceeds the limit of {max_bytes}")
    try:
        magic, flags = _HEAD.unpack_from(view, 0)
        if magic != MAGIC:
            raise WireError(f"{name} is not a compact message")
        if flags & ~layout.known_flags:
            raise WireError(f"{name} has unknown flags {flags & ~layout.known_flags:#x}")
        values: list[Any] = [None] * layout.n_fields
        for i, v in zip(layout.ints, layout.fixed.unpack_from(view, _HEAD.size)):
            values[i] = v
        for i, b in layout.bools:
            values[i] = bool(flags & b)
        at = _HEAD.size + layout.fixed.size
        for i, presence, read, _ in layout.variable:
            if presence is None or flags & presence:
                if views and read is _read_bytes:
                    read = _read_view
                values[i], at = read(view, at, max_bytes)
    except struct.error:
        raise WireError(f"{name} is cut short") from None
    if at != len(view):
        raise WireError(f"{name} has {len(view) - at} bytes after its last field")
    return layout.cls(*values)


# ---- field codecs ------------------------------------------------------------------------------

def _write_bytes(v: Any, parts: list) -> None:
    if isinstance(v, memoryview):              # a large payload (a numpy vector's buffer) joined without a copy
        if not v.c_contiguous:
            raise TypeError("a memoryview to send must be contiguous")
        v = v.cast("B") if v.format != "B" or v.ndim != 1 else v
    elif not isinstance(v, (bytes, bytearray)):
        raise TypeError(f"expected bytes, got {type(v).__name__}")
    parts += (_U32.pack(len(v)), v)


def _read_bytes(view: memoryview, at: int, max_bytes: int) -> tuple[bytes, int]:
    (n,) = _U32.unpack_from(view, at)
    at += _U32.size
    if at + n > len(view):
        raise WireError(f"a field of {n} bytes runs past the message")
    return bytes(view[at:at + n]), at + n


def _read_view(view: memoryview, at: int, max_bytes: int) -> tuple[memoryview, int]:
    (n,) = _U32.unpack_from(view, at)
    at += _U32.size
    if at + n > len(view):
        raise WireError(f"a field of {n} bytes runs past the message")
    return view[at:at + n], at + n


def _write_tensor(t: Any, parts: list) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(t).__name__}")
    code = _CODE.get(t.dtype)
    if code is None:
        raise WireError(f"dtype {t.dtype} cannot be sent")
    shape = t.shape
    if len(shape) > _MAX_NDIM:
        raise WireError(f"a tensor of rank {len(shape)} cannot be sent")
    parts += (_TENSOR_HEAD.pack(code, len(shape)), _SHAPES[len(shape)].pack(*shape), raw_bytes(t))


def raw_bytes(t: torch.Tensor) -> bytes:
    """`t`'s elements as little-endian bytes in C order (serialize.py's tensors use it too)."""
    try:
        return t.numpy().tobytes()      # C order whatever the strides: the common case is this one call
    except (TypeError, RuntimeError):   # bfloat16, on a GPU, or requiring grad
        return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _read_tensor(view: memoryview, at: int, max_bytes: int) -> tuple[torch.Tensor, int]:
    code, ndim = _TENSOR_HEAD.unpack_from(view, at)
    if code >= len(_DTYPES):
        raise WireError(f"unknown tensor dtype code {code}")
    if ndim > _MAX_NDIM:
        raise WireError(f"tensor of rank {ndim} (at most {_MAX_NDIM})")
    shape = _SHAPES[ndim].unpack_from(view, at + _TENSOR_HEAD.size)
    at += _TENSOR_HEAD.size + 8 * ndim
    dtype = _DTYPES[code]
    numel = 1
    for s in shape:
        numel *= s
    n = numel * dtype.itemsize
    if n > max_bytes:
        raise WireError(f"tensor of {n} bytes exceeds the limit of {max_bytes}")
    if at + n > len(view):
        raise WireError(f"tensor data runs past the message: shape {list(shape)} of {dtype} needs {n} bytes")
    if numel == 0:
        return torch.empty(shape, dtype=dtype), at
    return torch.frombuffer(bytearray(view[at:at + n]), dtype=dtype).reshape(shape), at + n


def _write_ints(v: Any, parts: list) -> None:
    if not isinstance(v, (list, tuple)) or len(v) > _MAX_LIST:
        raise TypeError("expected a list of at most 65536 ints")
    try:
        parts += (_U32.pack(len(v)), struct.pack(f"<{len(v)}q", *v))
    except struct.error as e:
        raise TypeError(f"expected a list of ints: {e}") from None


def _read_ints(view: memoryview, at: int, max_bytes: int) -> tuple[list[int], int]:
    (n,) = _U32.unpack_from(view, at)
    if n > _MAX_LIST:
        raise WireError(f"a list of {n} items (at most {_MAX_LIST})")
    at += _U32.size
    return list(struct.unpack_from(f"<{n}q", view, at)), at + 8 * n


def _write_str(v: Any, parts: list) -> None:
    if not isinstance(v, str):
        raise TypeError(f"expected a str, got {type(v).__name__}")
    _write_bytes(v.encode(), parts)


def _read_str(view: memoryview, at: int, max_bytes: int) -> tuple[str, int]:
    raw, at = _read_bytes(view, at, max_bytes)
    try:
        return raw.decode(), at
    except UnicodeDecodeError:
        raise WireError("a text field is not UTF-8") from None


_CODECS: dict[Any, tuple[Reader, Writer]] = {
    bytes: (_read_bytes, _write_bytes),
    str: (_read_str, _write_str),
    torch.Tensor: (_read_tensor, _write_tensor),
    list[int]: (_read_ints, _write_ints),
}


def _values_of(names: list[str]) -> Callable[[Any], tuple]:
    get = operator.attrgetter(*names)
    return get if len(names) > 1 else (lambda msg: (get(msg),))


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of `X` or `X | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False
