"""Clients' side of metered use: the tickets a client hands the servers it opens sessions on.

`Payer.ticket(server_peer_id, batch, max_length)` signs the next cumulative receipt of the
channel (this client, that server, this epoch): what it already signed there plus
`batch * new_tokens` (a session is paid when opened, for the tokens it may generate; the prompt's
positions are free). The server's ledger account comes from the registry, trusted only once the
binding's Ed25519 signature checks against the server's peer ID. `Payer.accepted(server_peer_id)`
records a ticket the server took; only then is the new figure written to
`<data_dir>/ledger/payer-<ledger>.json` (a line appended to its journal, journal.py), so a refused session is never charged by the next one.
A server without a ledger account gets no ticket (None). Knows nothing of sessions or tensors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from swarmlm.errors import AccessRefused, LedgerError
from swarmlm.ledger import receipts
from swarmlm.ledger.journal import Journal
from swarmlm.ledger.keys import verify_binding
from swarmlm.p2p.identity import public_key_of


class Payer:
    def __init__(self, client: Any, data_dir: Path, *, new_tokens: int):
        self.client = client
        self.new_tokens = new_tokens
        self.path = data_dir / "ledger" / f"payer-{client.address.lower()}.json"
        self.journal = Journal(self.path)
        self.signed: dict[str, int] = {}
        try:
            snap, lines = self.journal.load()
            for channel, tokens in [*(snap or {}).items(), *((r["channel"], r["tokens"]) for r in lines)]:
                self.signed[channel] = max(int(tokens), self.signed.get(channel, 0))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LedgerError(f"{self.path}: unreadable signed totals ({e})") from None
        if lines:
            self.journal.compact(self.signed)
        self.genesis = client.call("genesis")
        self.epoch_seconds = client.call("epoch_seconds")
        self._chain_at = (time.monotonic(), client.w3.eth.get_block("latest")["timestamp"])
        self._servers: dict[str, str | None] = {}
        self._pending: dict[str, tuple[str, int]] = {}

    def epoch(self) -> int:
        at, ts = self._chain_at
        return int(max(0.0, ts + time.monotonic() - at - self.genesis) // self.epoch_seconds)

    def server_account(self, peer_id: str) -> str | None:
        """The ledger account bound to `peer_id`, checked; None if it has none."""
        if peer_id not in self._servers:
            account = self.client.call("account_of", public_key_of(peer_id))
            ok = (int(account, 16) != 0 and self.client.call("is_server", account)
                  and verify_binding(peer_id, public_key_of(peer_id), self.client.call("peer_sig_of", account),
                                     self.client.chain_id, self.client.address, account))
            self._servers[peer_id] = account if ok else None
        return self._servers[peer_id]

    def pay_for(self, new_tokens: int) -> None:
        """The tokens per row the next sessions' tickets pay for (the API sets it per request)."""
        self.new_tokens = max(1, int(new_tokens))

    def ticket(self, peer_id: str, batch: int, max_length: int) -> bytes | None:
        server = self.server_account(peer_id)
        if server is None:
            return None
        epoch = self.epoch()
        channel = f"{epoch}:{server}"
        tokens = self.signed.get(channel, 0) + batch * self.new_tokens
        self._pending[peer_id] = (channel, tokens)
        return receipts.sign_ticket(self.client.key, self.client.domain, server, epoch, tokens, self.new_tokens,
                                    client=self.client.account).encode()

    def accepted(self, peer_id: str) -> None:
        channel, tokens = self._pending.pop(peer_id, (None, 0))
        if channel is None or tokens <= self.signed.get(channel, 0):
            return
        self.signed[channel] = tokens
        self.journal.append({"channel": channel, "tokens": tokens})     # one line, not a file rewrite


def is_refusal(message: str) -> bool:
    from swarmlm.ledger.policy import REFUSED
    return REFUSED in message


__all__ = ["Payer", "is_refusal", "AccessRefused"]
