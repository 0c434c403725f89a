"""Signed DHT records: what a reader accepts and what it refuses."""

import time
from dataclasses import dataclass

import pytest

from swarmlm import serialize
from swarmlm.errors import IntegrityError, WireError
from swarmlm.p2p.identity import Identity
from swarmlm.p2p.records import open_record, record_type, seal, unseal


@record_type("test-records-note")
@dataclass(frozen=True)
class Note:
    text: str
    size_bytes: int

    def check(self) -> None:
        if self.size_bytes < 0:
            raise ValueError("size_bytes must not be negative")


KEY = "swarmlm/v1/test/notes"


def _later() -> float:
    return time.time() + 60


def test_record_round_trips_with_its_signer():
    me = Identity.generate()
    data = seal(me, KEY, Note("hi", 3), expires_at=_later(), subkey=me.peer_id)
    rec = open_record(data, key=KEY, subkey=me.peer_id)
    assert rec.value == Note("hi", 3)
    assert rec.signer == me.peer_id


def test_tampered_body_is_refused():
    me = Identity.generate()
    fields = serialize.unpack(seal(me, KEY, Note("hi", 3), expires_at=_later()))
    fields["body"] = serialize.encode_message(Note("hi", 4))
    with pytest.raises(IntegrityError):
        unseal(serialize.pack(fields))


def test_record_claiming_another_signer_is_refused():
    me, victim = Identity.generate(), Identity.generate()
    fields = serialize.unpack(seal(me, KEY, Note("hi", 3), expires_at=_later()))
    fields["signer"] = victim.peer_id
    with pytest.raises(IntegrityError):
        unseal(serialize.pack(fields))


def test_cannot_seal_under_another_peers_subkey():
    me, other = Identity.generate(), Identity.generate()
    with pytest.raises(ValueError):
        seal(me, KEY, Note("hi", 3), expires_at=_later(), subkey=other.peer_id)


def test_record_moved_to_another_key_is_refused():
    me = Identity.generate()
    data = seal(me, KEY, Note("hi", 3), expires_at=_later())
    with pytest.raises(IntegrityError):
        open_record(data, key=KEY + "/elsewhere", subkey=None)


def test_body_failing_its_schema_is_a_wire_error():
    me = Identity.generate()
    data = seal(me, KEY, Note("hi", -1), expires_at=_later())
    with pytest.raises(WireError):
        open_record(data, key=KEY, subkey=None)


@pytest.mark.parametrize("garbage", [b"", b"\xc1", serialize.pack([1, 2]), serialize.pack({"kind": 1}), 42])
def test_garbage_envelopes_are_wire_errors(garbage):
    with pytest.raises(WireError):
        unseal(garbage)


def test_unregistered_type_cannot_be_sealed():
    @dataclass(frozen=True)
    class Loose:
        x: int
    with pytest.raises(TypeError):
        seal(Identity.generate(), KEY, Loose(1), expires_at=_later())
