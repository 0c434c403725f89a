"""Training rounds' records on the ledger: what `train --swarm --ledger` signs, checks and submits.

`RoundBook` is one trainer's account on one ledger, with the plain methods collab's round witness
calls (cli.py hands them over; this package never imports collab, and collab never imports this):
`epoch()`, `recorded(record)`, `member_ok(peer_id, account)` (the registry binds that account to that peer ID, the peer
key's own Ed25519 signature checked here), `sign(record)`, `signed_by(record, account, signature)`
and `submit(record, signatures)` (the contract credits a record once; a record some other member
submitted first is not an error). A record is any object with run_id, round, epoch, members,
samples — hashed exactly as `Ledger.record_round` does (receipts.round_digest). Blocking calls
(web3): the caller runs them in a thread; one lock orders them, so transactions never race on a nonce.
"""

from __future__ import annotations

import threading
from typing import Any

from swarmlm.errors import IntegrityError, LedgerError, UserError
from swarmlm.ledger import keys, receipts
from swarmlm.ledger.chain import LedgerClient
from swarmlm.log import get_logger

log = get_logger(__name__)


def digest_of(domain: bytes, record: Any) -> bytes:
    """The EIP-712 digest of a round record; `ValueError` if it is not one the contract would take."""
    members = [receipts.checksum(m) for m in record.members]
    if members != list(record.members):
        raise ValueError("members must be checksummed addresses")
    if members != sorted(members, key=lambda m: int(m, 16)) or len(set(members)) != len(members):
        raise ValueError("members must be distinct and in ascending order")
    if len(record.samples) != len(members) or not 2 <= len(members) <= 16:
        raise ValueError("2..16 members, each with its samples")
    return receipts.round_digest(domain, receipts.run_tag(record.run_id), int(record.round), int(record.epoch),
                                 members, [int(s) for s in record.samples])


class RoundBook:
    def __init__(self, client: LedgerClient):
        self.c = client
        self.account = client.account
        self._lock = threading.Lock()
        self._bound: dict[tuple[str, str], bool] = {}

    @classmethod
    def open(cls, client: LedgerClient, data_dir: Any) -> RoundBook:
        """The book of the data dir's account, registered (bound to the data dir's peer) if it is not yet."""
        identity = keys.identity_of(data_dir)
        key = client.call("peer_key_of", client.account)
        if key == bytes(32):
            peer_key, sig = keys.sign_binding(identity, client.chain_id, client.address, client.account)
            client.transact("register", peer_key, sig, False)
            log.info("registered %s as peer %s", client.account, identity.peer_id)
        book = cls(client)
        if not book.member_ok(identity.peer_id, client.account):
            raise UserError(f"ledger account {client.account} is bound to another peer than this data dir's "
                            f"{identity.peer_id}")
        return book

    def epoch(self) -> int:
        with self._lock:
            return int(self.c.call("current_epoch"))

    def member_ok(self, peer_id: str, account: str) -> bool:
        try:
            account = receipts.checksum(account)
        except ValueError:
            return False
        if (peer_id, account) not in self._bound:
            with self._lock:
                peer_key = self.c.call("peer_key_of", account)
                sig = self.c.call("peer_sig_of", account)
            ok = keys.verify_binding(peer_id, peer_key, sig, self.c.chain_id, self.c.address, account)
            if not ok:
                return False          # not cached: it may register in a moment
            self._bound[(peer_id, account)] = True
        return True

    def sign(self, record: Any) -> bytes:
        return receipts.sign_digest(self.c.key, digest_of(self.c.domain, record))

    def signed_by(self, record: Any, account: str, signature: bytes) -> bool:
        try:
            return receipts.recover(digest_of(self.c.domain, record), signature) == receipts.checksum(account)
        except (IntegrityError, ValueError):
            return False

    def recorded(self, record: Any) -> bool:
        with self._lock:
            return bool(self.c.call("round_done", digest_of(self.c.domain, record)))

    def submit(self, record: Any, signatures: tuple[bytes, ...]) -> bool:
        """True if this submission recorded it; False if it was recorded already."""
        parts = [receipts.split_signature(s) for s in signatures]
        with self._lock:
            try:
                self.c.transact("record_round", receipts.run_tag(record.run_id), int(record.round),
                                int(record.epoch), list(record.members), [int(s) for s in record.samples],
                                [v for v, _, _ in parts], [r for _, r, _ in parts], [s for _, _, s in parts])
            except LedgerError as e:
                if "already recorded" not in str(e):
                    raise
                log.info("round %d of %s was already recorded", record.round, record.run_id)
                return False
        return True
