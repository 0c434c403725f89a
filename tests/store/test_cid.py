"""CIDs against values IPFS itself publishes, and malformed CIDs rejected clearly."""

import base64
import hashlib

import pytest

from swarmlm.errors import IntegrityError, UserError, WireError
from swarmlm.store.cid import DAG_JSON, DAG_PB, RAW, Cid, CidError, encode_varint, read_varint, verify

EMPTY_V1 = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
HELLO_WORLD_V1 = "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"
EMPTY_V0 = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
# kubo's t0114 gateway fixture: `echo hello | ipfs add --cid-version 0`, then `ipfs cid base32`
HELLO_V0 = "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN"
HELLO_V0_AS_V1 = "bafybeiffndsajwhk3lwjewwdxqntmjm4b5wxaaanokonsggenkbw6slwk4"


def test_raw_cids_of_published_examples():
    assert Cid.of(b"").encode() == EMPTY_V1
    assert str(Cid.of(b"hello world")) == HELLO_WORLD_V1


def test_v1_text_is_multibase_base32_of_the_binary_form():
    cid = Cid.of(b"hello world")
    digest = hashlib.sha256(b"hello world").digest()
    assert cid.to_bytes() == b"\x01\x55\x12\x20" + digest
    assert str(cid) == "b" + base64.b32encode(cid.to_bytes()).decode().lower().rstrip("=")


def test_parse_round_trips_both_versions():
    for text in (EMPTY_V1, HELLO_WORLD_V1, EMPTY_V0, HELLO_V0, HELLO_V0_AS_V1):
        cid = Cid.parse(text)
        assert cid.encode() == text
        assert Cid.from_bytes(cid.to_bytes()) == cid


def test_v0_is_the_bare_multihash_and_converts_to_the_published_v1():
    cid = Cid.parse(HELLO_V0)
    assert (cid.version, cid.codec) == (0, DAG_PB)
    assert cid.to_bytes() == b"\x12\x20" + cid.digest
    assert cid.to_v1().encode() == HELLO_V0_AS_V1


def test_dag_json_codec_uses_a_two_byte_varint():
    cid = Cid.of(b"{}", DAG_JSON)
    assert cid.to_bytes()[:5] == b"\x01\xa9\x02\x12\x20"
    assert Cid.parse(str(cid)) == cid


@pytest.mark.parametrize("text", [
    "", "hello", "Qm", EMPTY_V0[:-1], EMPTY_V0.replace("b", "0"),      # 0 is not base58
    EMPTY_V1.upper(), EMPTY_V1[:-2], "z" + EMPTY_V1[1:], "b" + "a" * 200,
    "b" + base64.b32encode(b"\x01\x55\x13\x20" + bytes(32)).decode().lower().rstrip("="),   # sha2-512 code
    "b" + base64.b32encode(b"\x01\x71\x12\x20" + bytes(32)).decode().lower().rstrip("="),   # dag-cbor
    "b" + base64.b32encode(b"\x12\x20" + bytes(32)).decode().lower().rstrip("="),           # v0 in base32
    "b" + base64.b32encode(b"\x02\x55\x12\x20" + bytes(32)).decode().lower().rstrip("="),   # version 2
    "b" + base64.b32encode(b"\x01\x55\x12\x20" + bytes(31)).decode().lower().rstrip("="),   # short digest
    "bafkqaaa",                                                                               # identity hash
])
def test_malformed_cids_raise_a_clear_error_quoting_the_cid(text):
    with pytest.raises(CidError) as info:
        Cid.parse(text)
    assert isinstance(info.value, UserError) and isinstance(info.value, WireError)
    shown = text if len(text) <= 70 else text[:67] + "..."
    assert str(info.value).startswith(f"malformed CID {shown!r}: ")


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x01\x55\x12\x20" + bytes(31), b"\x01\x55\x12\x21" + bytes(33),
                                  b"\xff" * 12, b"\x12\x20" + bytes(31)])
def test_malformed_binary_cids_raise(data):
    with pytest.raises(CidError):
        Cid.from_bytes(data)


def test_non_string_input_is_rejected():
    with pytest.raises(CidError):
        Cid.parse(123)


def test_cid_rejects_a_v0_of_another_codec_and_short_digests():
    with pytest.raises(CidError):
        Cid(0, RAW, bytes(32))
    with pytest.raises(CidError):
        Cid(1, RAW, bytes(31))


def test_verify_accepts_matching_and_rejects_other_bytes():
    cid = Cid.of(b"hello world")
    verify(cid, b"hello world")
    with pytest.raises(IntegrityError):
        verify(cid, b"hello world!")


def test_varints_round_trip_and_reject_truncation():
    for n in (0, 1, 127, 128, 300, 262144, 2**40):
        data = encode_varint(n)
        assert read_varint(data, 0) == (n, len(data))
    with pytest.raises(WireError):
        read_varint(b"\x80\x80", 0)
