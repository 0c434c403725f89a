"""Compression of what is averaged: `none` (float32), `fp16`, and `int8` with per-chunk scales.

    payload = encode(t, "int8")                 # bytes, through swarmlm.serialize
    t2 = decode(payload, "int8", numel=t.numel())

int8 splits the flat tensor into chunks of `INT8_CHUNK` values, each with its own float32
scale (absmax / 127), so one large value costs precision in its chunk only; the scales add
4 / INT8_CHUNK bytes per value. fp16 clamps to ±65504 first, so a large update saturates
instead of becoming inf. Decoding checks the codec, the dtypes and every length before use
and raises `WireError`; it is plain torch, with no numpy dtype tricks that break across
numpy versions. Knows nothing of peers or rounds.
"""

from __future__ import annotations

import torch

from swarmlm import serialize
from swarmlm.errors import WireError

CODECS = ("none", "fp16", "int8")
INT8_CHUNK = 512
_FP16_MAX = 65504.0


def encode(t: torch.Tensor, codec: str) -> bytes:
    """A 1-D float32 tensor as bytes under `codec`."""
    flat = t.detach().reshape(-1).float()
    if codec == "none":
        return serialize.tensor_to_bytes(flat)
    if codec == "fp16":
        return serialize.tensor_to_bytes(flat.clamp(-_FP16_MAX, _FP16_MAX).half())
    if codec == "int8":
        q, scales = quantize_int8(flat)
        return serialize.pack({"q": q, "scales": scales})
    raise ValueError(f"unknown compression {codec!r}; expected one of {CODECS}")


def decode(data: bytes, codec: str, *, numel: int) -> torch.Tensor:
    """Inverse of `encode`: a 1-D float32 tensor of `numel` values, or `WireError`."""
    if codec == "none":
        t = serialize.tensor_from_bytes(data, max_bytes=numel * 4)
        return serialize.check_tensor(t, name="update", dtype=torch.float32, shape=(numel,))
    if codec == "fp16":
        t = serialize.tensor_from_bytes(data, max_bytes=numel * 2)
        return serialize.check_tensor(t, name="update", dtype=torch.float16, shape=(numel,)).float()
    if codec == "int8":
        n_chunks = -(-numel // INT8_CHUNK)
        fields = serialize.unpack(data, max_bytes=numel + 4 * n_chunks + 1024)
        if not isinstance(fields, dict) or set(fields) != {"q", "scales"}:
            raise WireError("int8 update must be a map {q, scales}")
        q = serialize.check_tensor(fields["q"], name="int8 values", dtype=torch.int8, shape=(numel,))
        scales = serialize.check_tensor(fields["scales"], name="int8 scales", dtype=torch.float32,
                                        shape=(n_chunks,), finite=True)
        return dequantize_int8(q, scales)
    raise WireError(f"unknown compression {codec!r}")


def frame_bytes(codec: str, numel: int) -> int:
    """Length of the raw form (`encode_raw`) of `numel` values: known before a byte is read."""
    if codec == "none":
        return 4 * numel
    if codec == "fp16":
        return 2 * numel
    if codec == "int8":
        return numel + 4 * -(-numel // INT8_CHUNK)
    raise ValueError(f"unknown compression {codec!r}; expected one of {CODECS}")


def encode_raw(t: torch.Tensor, codec: str) -> memoryview:
    """The raw form for the side channel (side.py's headers carry the length): the values' bytes
    with no msgpack around them, a view of `t` itself for `none`. int8: values, then scales.
    Decodes to exactly what `decode(encode(t))` gives."""
    flat = t.detach().reshape(-1).float()
    if codec == "none":
        return serialize.tensor_to_raw(flat)
    if codec == "fp16":
        return serialize.tensor_to_raw(flat.clamp(-_FP16_MAX, _FP16_MAX).half())
    if codec == "int8":
        q, scales = quantize_int8(flat)
        return memoryview(bytes(serialize.tensor_to_raw(q)) + bytes(serialize.tensor_to_raw(scales)))
    raise ValueError(f"unknown compression {codec!r}; expected one of {CODECS}")


def decode_raw(data: bytearray, codec: str, *, numel: int) -> torch.Tensor:
    """Inverse of `encode_raw` over a writable buffer (shared for `none`): (numel,) float32, or `WireError`."""
    if codec == "none":
        return serialize.tensor_from_raw(data, torch.float32, (numel,))
    if codec == "fp16":
        return serialize.tensor_from_raw(data, torch.float16, (numel,)).float()
    if codec == "int8":
        n_chunks = -(-numel // INT8_CHUNK)
        if len(data) != frame_bytes(codec, numel):
            raise WireError(f"int8 update has {len(data)} bytes, {numel} values need {frame_bytes(codec, numel)}")
        view = memoryview(data)
        q = serialize.tensor_from_raw(view[:numel], torch.int8, (numel,))
        scales = serialize.tensor_from_raw(view[numel:], torch.float32, (n_chunks,))
        serialize.check_tensor(scales, name="int8 scales", finite=True)
        return dequantize_int8(q, scales)
    raise WireError(f"unknown compression {codec!r}")


def quantize_int8(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(numel,) float32 -> (numel,) int8 values and (n_chunks,) float32 scales."""
    numel = flat.numel()
    n_chunks = -(-numel // INT8_CHUNK)
    padded = torch.zeros(n_chunks * INT8_CHUNK, dtype=torch.float32)
    padded[:numel] = flat
    rows = padded.view(n_chunks, INT8_CHUNK)                          # (n_chunks, C)
    scales = rows.abs().amax(dim=1) / 127.0                           # (n_chunks,)
    scales = torch.where(torch.isfinite(scales) & (scales > 0), scales, torch.ones_like(scales))
    q = torch.round(rows / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[:numel].contiguous(), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    numel = q.numel()
    n_chunks = scales.numel()
    padded = torch.zeros(n_chunks * INT8_CHUNK, dtype=torch.float32)
    padded[:numel] = q.float()
    return (padded.view(n_chunks, INT8_CHUNK) * scales[:, None]).reshape(-1)[:numel]  # (numel,)


def roundtrip(t: torch.Tensor, codec: str) -> torch.Tensor:
    """What a peer receives for `t` under `codec`: the owner of a part uses this for itself, so
    every peer ends a round with bit-identical values."""
    if codec == "none":
        return t.detach().reshape(-1).float().clone()
    return decode(encode(t, codec), codec, numel=t.numel())
