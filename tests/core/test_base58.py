"""The one base58btc codec (peer IDs and CIDv0s), against values other implementations give."""

import pytest

from swarmlm import base58


@pytest.mark.parametrize("data,text", [
    (b"", ""),
    (b"hello world", "StV1DL6CwTryKyV"),
    (b"\0\0\x01", "112"),                   # each leading zero byte is a "1"
    (bytes.fromhex("12200000000000000000000000000000000000000000000000000000000000000000"),
     "QmNLei78zWmzUdbeRB3CiUfAizWUrbeeZh5K1rhAQKCh51"),
])
def test_encode_and_decode_match_known_values(data, text):
    assert base58.encode(data) == text
    assert base58.decode(text) == data


@pytest.mark.parametrize("text", ["0", "O", "I", "l", "abc+"])
def test_characters_outside_the_alphabet_are_a_value_error(text):
    with pytest.raises(ValueError):
        base58.decode(text)
