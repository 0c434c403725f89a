"""The server's Gate over an in-process chain: tickets checked, receipts kept on disk, channels settled."""

from __future__ import annotations

import asyncio

import pytest

from swarmlm.errors import AccessRefused
from swarmlm.ledger import receipts
from swarmlm.ledger.policy import Gate


@pytest.fixture
def gate(ledger, tmp_path):
    ledger.register(ledger.a, server=True)
    ledger.register(ledger.b)
    ledger.to_epoch(1)
    ledger.tester.mine_blocks(1)
    return Gate(ledger.a, tmp_path)


def _ticket(ledger, signer, tokens: int, new: int, *, client=None) -> bytes:
    t = receipts.sign_ticket(signer.key, signer.domain, ledger.a.account, 1, tokens, new)
    if client is not None:
        t = receipts.Ticket(client.account, t.epoch, t.tokens, t.new_tokens, t.signature)
    return t.encode()


def _admit(gate, ticket, batch: int = 1):
    return asyncio.run(gate.admit("peer", ticket, batch, 64, 0.0))


def test_a_session_without_a_ticket_or_with_a_bad_one_is_refused(ledger, gate):
    with pytest.raises(AccessRefused, match="metered by ledger"):
        _admit(gate, None)
    with pytest.raises(AccessRefused, match="bad ticket"):
        _admit(gate, b"\x93\x01\x02")
    with pytest.raises(AccessRefused, match="not signed by"):
        _admit(gate, _ticket(ledger, ledger.c, 10, 10, client=ledger.b))      # forged: c signs as b


def test_a_ticket_is_kept_on_disk_and_never_admitted_twice(ledger, gate, tmp_path):
    assert _admit(gate, _ticket(ledger, ledger.b, 20, 10, client=None), batch=2) == 10
    with pytest.raises(AccessRefused, match="is not 20 past"):
        _admit(gate, _ticket(ledger, ledger.b, 20, 10), batch=2)              # replayed
    again = Gate(ledger.a, tmp_path)                                          # a restarted server
    assert again.book.held(1, ledger.b.account) == 20
    assert again.settle(current_too=True) == [(1, ledger.b.account, 20)]
    assert ledger.a.call("credit_of", ledger.a.account, 1) == 20
