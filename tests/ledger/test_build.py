"""The contract's build is reproducible, and off-chain digests and signatures are the ones it checks."""

from __future__ import annotations

import pytest

from swarmlm.errors import IntegrityError, WireError
from swarmlm.ledger import build, receipts


def test_compiling_the_same_source_twice_gives_the_same_bytecode():
    source = build.contract_source()
    first, second = build.compile_source(source), build.compile_source(source)
    assert first.bytecode == second.bytecode and first.abi == second.abi
    assert build.load_artifact().bytecode == first.bytecode          # the cached build is that build


def test_receipt_and_round_digests_match_the_contracts(ledger):
    a, b = ledger.a.account, ledger.b.account
    assert ledger.owner.call("receipt_digest", a, b, 3, 40) == receipts.receipt_digest(ledger.owner.domain, a, b, 3, 40)
    for epoch, tokens in ((0, 0), (2 ** 64 - 1, 2 ** 63 + 7), (12345, 2 ** 256 - 1)):   # the hand-made encoding
        assert (ledger.owner.call("receipt_digest", b, a, epoch, tokens)
                == receipts.receipt_digest(ledger.owner.domain, b, a, epoch, tokens))
    members = sorted([a, b], key=lambda x: int(x, 16))
    assert (ledger.owner.call("round_digest", b"r" * 32, 1, 2, members, [5, 6])
            == receipts.round_digest(ledger.owner.domain, b"r" * 32, 1, 2, members, [5, 6]))
    assert ledger.owner.call("domain_separator") == receipts.domain_separator(ledger.w3.eth.chain_id, ledger.address)


def test_a_signed_ticket_round_trips_and_recovers_its_signer():
    key = bytes(31) + b"\x05"
    ticket = receipts.sign_ticket(key, b"d" * 32, "0x" + "11" * 20, 4, 40, 40)
    decoded = receipts.decode_ticket(ticket.encode())
    assert decoded == ticket
    digest = receipts.receipt_digest(b"d" * 32, ticket.client, "0x" + "11" * 20, 4, 40)
    assert receipts.recover(digest, decoded.signature) == receipts.address_of(key)


@pytest.mark.parametrize("bad", [b"\x00" * 600, b"\xc1", b"\x90",
                                 receipts.Ticket("0x" + "11" * 20, -1, 1, 1, b"s" * 65).encode(),
                                 receipts.Ticket("0x" + "11" * 20, 1, 1, 1, b"s" * 64).encode(),
                                 receipts.Ticket("0xzz" + "11" * 19, 1, 1, 1, b"s" * 65).encode()])
def test_a_bad_ticket_is_a_wire_error(bad):
    with pytest.raises(WireError):
        receipts.decode_ticket(bad)


def test_a_malformed_signature_is_an_integrity_error():
    with pytest.raises(IntegrityError):
        receipts.recover(b"d" * 32, b"\x00" * 64 + b"\x05")
