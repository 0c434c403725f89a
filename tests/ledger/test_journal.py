"""The ledger's per-session state on disk: one journal line per update, replayed over the snapshot;
a torn last line (a crash mid-write) is skipped; the server's book and the client's totals survive a
restart, and the larger cumulative figure wins whatever the order on disk."""

import json

import pytest

from swarmlm.errors import LedgerError
from swarmlm.ledger.journal import Journal
from swarmlm.ledger.policy import ReceiptBook

A = "0x" + "ab" * 20


def test_a_book_survives_a_restart_through_its_journal_and_a_torn_line_is_skipped(tmp_path):
    path = tmp_path / "ledger" / "receipts.json"
    book = ReceiptBook(path)
    book.keep(3, A, 10, b"\x01" * 65)
    book.keep(3, A, 25, b"\x02" * 65)
    assert not path.exists() and json.loads(book.journal.path.read_text().splitlines()[-1])["tokens"] == 25
    with open(book.journal.path, "a") as f:
        f.write('{"epoch": 3, "client": "0xab')                       # a crash mid-write
    again = ReceiptBook(path)                                         # replays, then compacts
    assert again.held(3, A) == 25 and again.entries[(3, A)][1] == b"\x02" * 65
    assert path.exists() and book.journal.path.read_text() == ""
    again.keep(3, A, 20, b"\x03" * 65)                                # an older receipt never replaces a later one
    again.mark_settled(3, A)
    third = ReceiptBook(path)
    assert third.held(3, A) == 25 and (3, A) in third.settled


def test_a_corrupt_journal_is_a_one_line_ledger_error(tmp_path):
    path = tmp_path / "receipts.json"
    Journal(path).path.write_text('not json\n{"epoch": 1, "client": "x", "tokens": 1, "sig": "00"}\n')
    with pytest.raises(LedgerError, match="unreadable receipts"):
        ReceiptBook(path)
    Journal(path).path.write_text('{"epoch": 1}\n')
    with pytest.raises(LedgerError, match="unreadable receipts"):
        ReceiptBook(path)
