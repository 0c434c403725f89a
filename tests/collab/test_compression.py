import pytest
import torch

from swarmlm import serialize
from swarmlm.collab import compression
from swarmlm.errors import WireError


@pytest.mark.parametrize("codec,tol", [("none", 0.0), ("fp16", 1e-3), ("int8", 1e-2)])
def test_roundtrip_is_close(codec, tol):
    t = torch.randn(5000)
    back = compression.decode(compression.encode(t, codec), codec, numel=t.numel())
    assert back.dtype == torch.float32 and back.shape == t.shape
    assert (back - t).abs().max() <= tol * t.abs().max() + 1e-12


def test_int8_scales_per_chunk_keep_small_values_precise():
    t = torch.full((2 * compression.INT8_CHUNK,), 1e-3)
    t[0] = 1000.0                                   # one outlier costs precision in its chunk only
    back = compression.roundtrip(t, "int8")
    assert torch.allclose(back[compression.INT8_CHUNK:], t[compression.INT8_CHUNK:], rtol=1e-2)


def test_sizes_shrink():
    t = torch.randn(10_000)
    sizes = {c: len(compression.encode(t, c)) for c in compression.CODECS}
    assert sizes["fp16"] < 0.51 * sizes["none"] and sizes["int8"] < 0.27 * sizes["none"]


@pytest.mark.parametrize("form", ["message", "raw"])
def test_fp16_saturates_at_its_largest_value_instead_of_overflowing(form):
    t = torch.tensor([1e9, -1e9, 7e4, -65504.0, 1.5])   # beyond, beyond, just beyond, at the edge, inside
    if form == "message":
        back = compression.decode(compression.encode(t, "fp16"), "fp16", numel=5)
    else:
        back = compression.decode_raw(bytearray(compression.encode_raw(t, "fp16")), "fp16", numel=5)
    assert back.tolist() == [65504.0, -65504.0, 65504.0, -65504.0, 1.5]


@pytest.mark.parametrize("codec", compression.CODECS)
def test_wrong_length_is_a_wire_error(codec):
    data = compression.encode(torch.randn(100), codec)
    with pytest.raises(WireError):
        compression.decode(data, codec, numel=99)


def test_int8_with_wrong_dtype_inside_is_a_wire_error():
    bad = serialize.pack({"q": torch.zeros(10, dtype=torch.int16), "scales": torch.ones(1)})
    with pytest.raises(WireError):
        compression.decode(bad, "int8", numel=10)


@pytest.mark.parametrize("codec", ["none", "fp16", "int8"])
def test_raw_form_decodes_to_exactly_what_the_message_form_does(codec):
    t = torch.randn(1500)
    raw = compression.encode_raw(t, codec)
    assert len(raw) == compression.frame_bytes(codec, 1500)
    expected = compression.decode(compression.encode(t, codec), codec, numel=1500)
    assert torch.equal(compression.decode_raw(bytearray(raw), codec, numel=1500), expected)


@pytest.mark.parametrize("codec", ["none", "fp16", "int8"])
def test_raw_form_of_the_wrong_length_is_a_wire_error(codec):
    raw = bytearray(compression.encode_raw(torch.randn(100), codec))
    with pytest.raises(WireError):
        compression.decode_raw(raw[:-1], codec, numel=100)
