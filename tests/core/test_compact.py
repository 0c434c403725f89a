"""compact.py: the fixed binary layout of a decoding step's messages, and its bad input."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import pytest
import torch

from swarmlm import compact, serialize
from swarmlm.errors import WireError
from swarmlm.swarm import wire


@compact.compact
@dataclass(frozen=True)
class Sample:
    name: bytes
    count: int
    data: torch.Tensor
    mask: torch.Tensor | None = None
    sizes: list[int] | None = None
    flag: bool = False
    other: bool = False


def roundtrip(msg, cls=None, max_bytes=1 << 20):
    data = serialize.encode_message(msg)
    assert data[0] == compact.MAGIC
    return serialize.decode_message(data, cls or type(msg), max_bytes=max_bytes)


def same(a, b):
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        else:
            assert x == y


@pytest.mark.parametrize("dtype", serialize.DTYPES.values())
def test_every_dtype_round_trips(dtype):
    t = (torch.randn(2, 3, 4) * 10).to(dtype)
    msg = Sample(b"x", 3, t)
    same(roundtrip(msg), msg)


@pytest.mark.parametrize("t", [torch.randn(4, 6)[:, ::2], torch.tensor(3.5), torch.empty(0, 5), torch.randn(2, 1, 1, 1, 1, 1, 1, 1),
                               torch.randn(3, requires_grad=True)], ids=["strided", "scalar", "empty", "rank 8", "grad"])
def test_odd_tensors_round_trip(t):
    got = roundtrip(Sample(b"", -7, t))
    assert got.count == -7 and got.data.shape == t.shape and torch.equal(got.data, t.detach())
    assert got.data.is_contiguous() and not got.data.requires_grad


def test_optional_fields_and_flags_round_trip():
    full = Sample(os.urandom(16), 2**62, torch.ones(2), mask=torch.tensor([True, False]), sizes=[3, -1, 0],
                  flag=True, other=False)
    same(roundtrip(full), full)
    bare = Sample(b"", 0, torch.zeros(1))
    same(roundtrip(bare), bare)


def test_the_step_messages_are_compact():
    req = wire.StepRequest(session_id=os.urandom(16), start=0, end=4, position=9, hidden=None, push=True)
    same(roundtrip(req), req)
    rep = wire.StepReply(hidden=torch.randn(1, 1, 8), pushed=True)
    same(roundtrip(rep), rep)


def test_decoded_tensors_are_writable_and_own_their_memory():
    got = roundtrip(Sample(b"", 1, torch.arange(4.0)))
    got.data.add_(1)                 # no warning, no shared read-only buffer
    assert got.data.tolist() == [1.0, 2.0, 3.0, 4.0]


GOOD = serialize.encode_message(Sample(b"ab", 5, torch.randn(2, 3), mask=torch.ones(2, dtype=torch.bool), sizes=[1]))


@pytest.mark.parametrize("cut", range(len(GOOD)))
def test_every_truncation_is_a_wire_error(cut):
    with pytest.raises(WireError):
        serialize.decode_message(GOOD[:cut], Sample)


def _tensor_at(data: bytes) -> int:
    """Offset of the first tensor's header in a `Sample` (after magic, flags, the int and the name)."""
    return 1 + 4 + 8 + 4 + 2


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b"\x00" + b[1:], "not a compact message"),
    (lambda b: b[:1] + struct.pack("<I", 1 << 20) + b[5:], "unknown flags"),
    (lambda b: b + b"\x00", "after its last field"),
    (lambda b: b[:_tensor_at(b)] + b"\x63" + b[_tensor_at(b) + 1:], "dtype code"),
    (lambda b: b[:_tensor_at(b) + 1] + b"\x09" + b[_tensor_at(b) + 2:], "rank"),
    (lambda b: b[:_tensor_at(b) + 2] + struct.pack("<Q", 1 << 40) + b[_tensor_at(b) + 10:], "exceeds|runs past"),
    (lambda b: b[:_tensor_at(b) + 2] + struct.pack("<Q", 3) + b[_tensor_at(b) + 10:], "runs past|after its last|cut short"),
    (lambda b: b[:13] + struct.pack("<I", 1 << 30) + b[17:], "runs past"),
    (lambda b: b"\xc1" + b"\xff" * 40, "unknown flags|cut short|runs past|exceeds"),
], ids=["magic", "flags", "trailing", "dtype", "rank", "huge shape", "shape vs data", "bytes length", "garbage"])
def test_malformed_messages_are_wire_errors(mutate, match):
    with pytest.raises(WireError, match=match):
        serialize.decode_message(mutate(GOOD), Sample)


def test_size_limits_hold():
    with pytest.raises(WireError, match="exceeds"):
        serialize.decode_message(GOOD, Sample, max_bytes=len(GOOD) - 1)
    big = serialize.encode_message(Sample(b"", 0, torch.zeros(1000)))
    with pytest.raises(WireError, match="exceeds"):
        serialize.decode_message(big, Sample, max_bytes=3000)        # the message fits, its tensor does not


def test_msgpack_bytes_for_a_compact_class_are_refused():
    packed = serialize.pack({"session_id": b"x", "start": 0, "end": 1, "position": 0, "hidden": None})
    with pytest.raises(WireError, match="not a compact message"):
        serialize.decode_message(packed, wire.StepRequest)


@pytest.mark.parametrize("msg", [
    Sample("not bytes", 1, torch.ones(1)),
    Sample(b"", 1, "not a tensor"),
    Sample(b"", 2**63, torch.ones(1)),
    Sample(b"", 1, torch.ones(1), sizes=["a"]),
    Sample(b"", 1, None),
], ids=["str for bytes", "str for tensor", "int overflow", "bad list", "required None"])
def test_what_cannot_be_encoded_raises_at_the_sender(msg):
    with pytest.raises((TypeError, WireError)):
        serialize.encode_message(msg)


def test_a_class_with_a_field_of_no_layout_is_refused():
    with pytest.raises(TypeError, match="no compact layout"):
        @compact.compact
        @dataclass(frozen=True)
        class Bad:
            name: float


@compact.compact
@dataclass(frozen=True)
class Named:
    who: str
    n: int
    body: bytes


def test_text_fields_round_trip_and_bad_utf8_is_refused():
    msg = Named("pèer-ID ✓", 5, b"\0" * 3)
    same(roundtrip(msg), msg)
    data = bytearray(serialize.encode_message(msg))
    at = data.index("pèer".encode())
    data[at] = 0xFF                                     # no UTF-8 sequence starts with 0xff
    with pytest.raises(WireError, match="UTF-8"):
        serialize.decode_message(bytes(data), Named)
    with pytest.raises(TypeError):
        serialize.encode_message(Named(b"not text", 1, b""))


def test_views_decode_bytes_fields_without_copying_them():
    data = serialize.encode_message(Named("p", 1, b"payload" * 1000))
    got = compact.decode(data, compact.layout_of(Named), max_bytes=1 << 20, views=True)
    assert isinstance(got.body, memoryview) and got.body.obj is data and got.body == b"payload" * 1000
    assert got.who == "p"
    with pytest.raises(WireError, match="runs past"):
        compact.decode(data[:-1], compact.layout_of(Named), max_bytes=1 << 20, views=True)


def test_a_contiguous_memoryview_is_sent_as_its_bytes_and_a_prefix_is_joined():
    import numpy as np
    v = np.arange(10, dtype="<f4")
    as_view = serialize.encode_message(Named("p", 1, memoryview(v)))
    assert as_view == serialize.encode_message(Named("p", 1, v.tobytes()))
    assert compact.encode(Named("p", 1, memoryview(v)), compact.layout_of(Named), prefix=b"\x05") == b"\x05" + as_view
    with pytest.raises(TypeError, match="contiguous"):
        serialize.encode_message(Named("p", 1, memoryview(v)[::2]))
