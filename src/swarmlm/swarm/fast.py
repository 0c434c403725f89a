"""The fast lane's records: a chained decoding step of one new position, in a fixed binary layout.

A chained one-token step (client/chained.py's steady state) is the swarm's hottest path: per
token it crosses three processes, each right after a span's compute has flushed the CPU caches,
where every Python call costs several times what it costs warm. On a server's side channel
(p2p/channel/conn.py's `set_record_handler`) such a step travels as one of these records and is
handled in the connection's own callback: no rpc frame, no compact message, no task woken.
Everything else (prompts, replays, key masks, chunks, failover) stays on wire.py's messages.

A record is, little-endian:

    0xF5 | kind (u8) | flags (u8) | session id (16 bytes) | position (u64) | payload

0xF5 is a byte an rpc frame never starts with (its tags are 0-3), so a connection carries both.
Kinds and payloads:
- STEP (client -> server): the hidden states (B, 1, D) of the new position, raw, in the server's
  dtype; flag PUSH: push the outputs on to the next server too.
- WAIT (client -> server): the step at `position` takes its input from the previous server's
  push (flag PUSH as in STEP); no payload.
- PUSH (server -> next server, on its push connection): the outputs (B, 1, D), as STEP's.
- REPLY (server -> client): the outputs (B, 1, D); flag PUSHED: they went to the next server.
- ERROR (server -> client): why the step at `position` did not run (UTF-8, at most
  rpc.MAX_ERROR_BYTES); the client takes the slow path from that hop.
The session id is the one the record's receiver knows the session by (the next server's own for
a PUSH). Knows nothing of sessions or connections: server/fast.py and client/fast.py use it.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from swarmlm.errors import WireError

MARK = 0xF5
STEP, WAIT, PUSH, REPLY, ERROR = 1, 2, 3, 4, 5
PUSH_FLAG = 1          # STEP, WAIT: push the outputs on; REPLY: they were pushed
_KNOWN_FLAGS = PUSH_FLAG
_HEAD = struct.Struct("<BBB16sQ")
HEAD_BYTES = _HEAD.size
MAX_ERROR_BYTES = 4096
MAX_ROWS = 16          # rows of a fast step: a server computes it inline, on its event loop
MAX_REFUSALS = 3       # fast steps refused in a row before a session stops offering them


def record(kind: int, session_id: bytes, position: int, payload: bytes | memoryview = b"", *, flags: int = 0) -> bytes:
    return _HEAD.pack(MARK, kind, flags, session_id, position) + payload


def is_fast(plain: bytes) -> bool:
    """Whether a record's plaintext is a fast-lane record (else an rpc frame)."""
    return len(plain) > 0 and plain[0] == MARK


def parse(plain: bytes) -> tuple[int, int, bytes, int, memoryview]:
    """(kind, flags, session id, position, payload) of a fast record; `WireError` if malformed."""
    if len(plain) < HEAD_BYTES:
        raise WireError(f"a fast-lane record of {len(plain)} bytes is shorter than its header")
    _, kind, flags, session_id, position = _HEAD.unpack_from(plain)
    if not STEP <= kind <= ERROR:
        raise WireError(f"unknown fast-lane record kind {kind}")
    if flags & ~_KNOWN_FLAGS:
        raise WireError(f"unknown fast-lane flags {flags:#x}")
    return kind, flags, session_id, position, memoryview(plain)[HEAD_BYTES:]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A hidden-state tensor's raw bytes (no copy where it is contiguous). Each torch call costs 15-30 us
    on a decoding step's cold caches: a contiguous float tensor's bytes take one (`numpy`)."""
    if t.dtype is not torch.bfloat16:        # numpy has no bfloat16: its bytes as uint8, below
        try:
            return memoryview(t.numpy()).cast("B")
        except TypeError:                    # strided: a memoryview of it cannot be cast
            pass
    t = t.contiguous()
    if t.dtype is torch.bfloat16:
        return memoryview(t.view(-1).view(torch.uint8).numpy())
    return memoryview(t.numpy()).cast("B")


def check_size(payload: memoryview, *, batch: int, dim: int, dtype: torch.dtype) -> None:
    """`WireError` unless `payload` holds exactly one position of `batch` rows x `dim` in `dtype`."""
    want = batch * dim * dtype.itemsize
    if len(payload) != want:
        raise WireError(f"a fast step of {len(payload)} bytes; one position of {batch} rows x {dim} in "
                        f"{dtype} is {want}")


def hidden_of(payload: memoryview, *, batch: int, dim: int, dtype: torch.dtype, finite: bool = True) -> torch.Tensor:
    """The (batch, 1, dim) hidden states in `payload`, checked for size and (`finite`) finiteness (`WireError`).
    A tensor of its own (a copy of the bytes), made by one torch call where numpy has the dtype."""
    check_size(payload, batch=batch, dim=dim, dtype=dtype)
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        if finite and not all_finite(payload, dtype):
            raise WireError("hidden states hold NaN or infinity")
        return torch.frombuffer(bytearray(payload), dtype=dtype).view(batch, 1, dim)
    values = np.frombuffer(bytearray(payload), dtype=np_dtype)
    if finite and not _sum_is_finite(values):
        raise WireError("hidden states hold NaN or infinity")
    return torch.from_numpy(values.reshape(batch, 1, dim))


_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


def all_finite(payload: memoryview, dtype: torch.dtype) -> bool:
    """Whether every value in `payload` is finite (one numpy call where numpy has the dtype:
    `torch.isfinite(t).all()` costs twice as much on a decoding step's cold caches)."""
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        return bool(torch.isfinite(torch.frombuffer(bytearray(payload), dtype=dtype)).all())
    return _sum_is_finite(np.frombuffer(payload, dtype=np_dtype))


def _sum_is_finite(values: np.ndarray) -> bool:
    """Their sum in float64, which no float32 or float16 values can overflow, is finite exactly when
    they all are."""
    return math.isfinite(np.add.reduce(values, dtype=np.float64))


def error_text(payload: memoryview) -> str:
    return bytes(payload[:MAX_ERROR_BYTES]).decode("utf-8", "replace")
