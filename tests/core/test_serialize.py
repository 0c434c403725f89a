import dataclasses

import msgpack
import pytest
import torch

from swarmlm.errors import WireError
from swarmlm.serialize import (check_tensor, decode_message, encode_message, pack, tensor_from_bytes,
                               tensor_to_bytes, unpack)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_tensor_round_trips_bit_exactly(dtype):
    t = (torch.randn(3, 4, 5) * 10).to(dtype)
    back = tensor_from_bytes(tensor_to_bytes(t))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_empty_tensor_round_trips():
    back = tensor_from_bytes(tensor_to_bytes(torch.empty(0, 7)))
    assert back.shape == (0, 7)


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", msgpack.packb(["float32", [2], b"abc"]), msgpack.packb(["complex7", [1], b"\0" * 8]),
    msgpack.packb(["float32", [-1], b""]), msgpack.packb(["float32", ["x"], b""]), msgpack.packb([1, 2]),
    msgpack.packb(["float32", [1 << 40], b""]),
])
def test_malformed_tensor_raises_wire_error(payload):
    with pytest.raises(WireError):
        tensor_from_bytes(payload)


@dataclasses.dataclass(frozen=True)
class Req:
    session: bytes
    pos: int
    hidden: torch.Tensor
    note: str | None = None


def test_message_round_trips_with_tensor():
    msg = Req(b"s1", 3, torch.ones(1, 2, 4))
    back = decode_message(encode_message(msg), Req)
    assert back.session == b"s1" and back.pos == 3 and torch.equal(back.hidden, msg.hidden) and back.note is None


@pytest.mark.parametrize("fields", [
    {"session": b"s", "pos": "3", "hidden": torch.ones(1)},      # wrong type
    {"session": b"s", "hidden": torch.ones(1)},                  # missing field
    {"session": b"s", "pos": 1, "hidden": 5},                    # not a tensor
    {"session": b"s", "pos": True, "hidden": torch.ones(1)},     # bool is not int
    {"session": b"s", "pos": 1, "hidden": torch.ones(1), "x": 1},  # unknown field
])
def test_malformed_message_raises_wire_error(fields):
    with pytest.raises(WireError):
        decode_message(pack(fields), Req)


def test_oversized_message_is_refused():
    with pytest.raises(WireError, match="exceeds"):
        unpack(pack(b"x" * 2000), max_bytes=1000)


def test_check_tensor_names_the_problem():
    with pytest.raises(WireError, match=r"expected \(\*, 8\)"):
        check_tensor(torch.ones(2, 7), name="hidden", shape=(None, 8))
    with pytest.raises(WireError, match="NaN"):
        check_tensor(torch.tensor([float("nan")]), finite=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_values_whose_sum_overflows_pass_the_finite_check(dtype):
    big = torch.full((8,), torch.finfo(dtype).max, dtype=dtype)
    assert check_tensor(big, name="h", finite=True) is big
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[3] = bad
        with pytest.raises(WireError, match="NaN or inf"):
            check_tensor(t, name="h", finite=True)
