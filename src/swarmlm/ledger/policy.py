"""Servers' admission under the ledger: a pure decision over cached chain state, and the I/O around it.

`decide` is the decision a server makes when a client opens a session with a ticket (receipts.py):
no chain call, no clock read, no signature check (the caller verified the ticket). It refuses:
- a ticket for another epoch, or a receipt not later than the one the server holds for the channel;
- any client but a priority-slot holder of this epoch while the server is under contention
  (`load >= priority_load`): slot holders are served first;
- a session that would take the client past its allowance at this server.

The allowance: never serving past a client's quota or deposit across several servers of one
chain, and across a failover, rests on one rule every server applies alone. With N servers
registered before the epoch (the contract fixes N per epoch: a server registered during epoch E
serves ledger clients from E+1), each server grants a client at most
    quota(client, E) / N  +  deposit_tokens(client) / (2 N)
tokens in epoch E, counted from the receipts it holds (kept on disk: a restarted server still
knows them). Summed over all N servers that is at most the quota plus half the deposit; the other
half backs the receipts of epoch E-1, which may be settled during E. A failover opens a session at
another server, which counts against that server's share: the sum cannot grow. On chain the
contract charges quota first, then deposit, and never more than the deposit holds.

`Gate` is the I/O: it caches each client's `AccountView` (read when a client is first seen, then
refreshed in the background), checks tickets' signatures, keeps the latest receipt per channel,
and settles channels of finished epochs. Knows nothing of tensors, peers or the swarm's wire.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from swarmlm.errors import AccessRefused, IntegrityError, LedgerError, WireError
from swarmlm.ledger import receipts
from swarmlm.ledger.journal import Journal
from swarmlm.log import get_logger

logger = get_logger(__name__)

REFUSED = "access refused by the ledger"     # every refusal starts with this (clients recognize it)


@dataclass(frozen=True)
class ChainView:
    epoch: int                   # the current epoch
    renews_in_s: float           # seconds until the next epoch
    n_servers: int               # servers sharing every client's allowance this epoch
    server_active: bool          # this server registered before this epoch
    price_per_token: int         # wei


@dataclass(frozen=True)
class AccountView:
    registered: bool
    quota: int                   # quota(client, epoch)
    deposit: int                 # wei, locked
    slot_holder: bool            # holds a priority slot this epoch
    settled: bool = False        # this server's channel with it for this epoch is already settled


@dataclass(frozen=True)
class Grant:
    tokens: int                  # the new cumulative receipt the server keeps
    new_tokens: int              # per row: what the session may generate


def allowance(chain: ChainView, account: AccountView) -> int:
    n = max(1, chain.n_servers)
    deposit_tokens = account.deposit // chain.price_per_token if chain.price_per_token else 0
    return account.quota // n + deposit_tokens // (2 * n)


def decide(chain: ChainView, account: AccountView, ticket: receipts.Ticket, *, held: int, batch: int,
           load: float, priority_load: float) -> Grant:
    """Admit (a `Grant`) or refuse (`AccessRefused`, one line: the reason, the quota left, when it renews)."""
    renew = f"renews in {chain.renews_in_s:.0f} s (epoch {chain.epoch + 1})"
    if not chain.server_active:
        raise AccessRefused(f"{REFUSED}: this server joined the ledger this epoch and serves from epoch "
                            f"{chain.epoch + 1}; {renew}")
    if ticket.epoch != chain.epoch:
        raise AccessRefused(f"{REFUSED}: receipt for epoch {ticket.epoch}, the ledger is in epoch {chain.epoch}")
    if not account.registered:
        raise AccessRefused(f"{REFUSED}: account {ticket.client} is not registered (swarmlm ledger register)")
    if account.settled:
        raise AccessRefused(f"{REFUSED}: this server already settled its channel with {ticket.client} for "
                            f"epoch {chain.epoch}; {renew}")
    allowed = allowance(chain, account)
    left = max(0, allowed - held)
    if load >= priority_load and not account.slot_holder:
        raise AccessRefused(f"{REFUSED}: server busy, priority slot holders only (load {load:.0%}); "
                            f"quota left {left} tokens here; {renew}")
    need = batch * ticket.new_tokens
    if need <= 0 or ticket.tokens < held + need:
        raise AccessRefused(f"{REFUSED}: receipt for {ticket.tokens} tokens is not {need} past the {held} "
                            f"this server holds")
    if ticket.tokens > allowed:
        raise AccessRefused(f"{REFUSED}: quota exceeded: {left} tokens left here this epoch (quota "
                            f"{account.quota} over {chain.n_servers} server(s), deposit {account.deposit} wei), "
                            f"{need} asked; {renew}")
    return Grant(tokens=ticket.tokens, new_tokens=ticket.new_tokens)


# ---- the I/O around it --------------------------------------------------------------------------

class ReceiptBook:
    """The latest receipt per (epoch, client), on disk, and which channels are settled. A kept receipt
    is one line appended to a journal (journal.py: microseconds, not a file rewrite per session); the
    snapshot is rewritten atomically when the book is opened and when a channel is settled."""

    def __init__(self, path: Path):
        self.path = path
        self.journal = Journal(path)
        self.entries: dict[tuple[int, str], tuple[int, bytes]] = {}
        self.settled: set[tuple[int, str]] = set()
        try:
            raw, lines = self.journal.load()
            for e in (raw or {}).get("receipts", []) + lines:
                self._fold(int(e["epoch"]), e["client"], int(e["tokens"]), bytes.fromhex(e["sig"]))
            self.settled = {(int(e), c) for e, c in (raw or {}).get("settled", [])}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"{path}: unreadable receipts ({err})") from None
        if lines:
            self.save()

    def _fold(self, epoch: int, client: str, tokens: int, sig: bytes) -> None:
        if tokens >= self.held(epoch, client):        # cumulative receipts: the larger is the later
            self.entries[(epoch, client)] = (tokens, sig)

    def held(self, epoch: int, client: str) -> int:
        return self.entries.get((epoch, client), (0, b""))[0]

    def keep(self, epoch: int, client: str, tokens: int, sig: bytes) -> None:
        self._fold(epoch, client, tokens, sig)
        self.journal.append({"epoch": epoch, "client": client, "tokens": tokens, "sig": sig.hex()})

    def mark_settled(self, epoch: int, client: str) -> None:
        self.settled.add((epoch, client))
        self.save()

    def save(self) -> None:
        self.journal.compact({"receipts": [{"epoch": e, "client": c, "tokens": t, "sig": s.hex()}
                                           for (e, c), (t, s) in sorted(self.entries.items())],
                              "settled": sorted([e, c] for e, c in self.settled)})


def book_path(data_dir: Path, ledger: str) -> Path:
    return data_dir / "ledger" / f"receipts-{ledger.lower()}.json"


class Gate:
    """A server's admission under the ledger at `client.address` (its own account: `client.account`).

    `await gate.admit(peer_id, ticket, batch, max_length, load)` is the hook the swarm server calls
    when a session opens: the per-row token cap of the session, or `AccessRefused`."""

    def __init__(self, client: Any, data_dir: Path, *, refresh_s: float = 5.0, priority_load: float = 0.75,
                 clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.book = ReceiptBook(book_path(data_dir, client.address))
        self.refresh_s = refresh_s
        self.priority_load = priority_load
        self.clock = clock
        self.genesis = client.call("genesis")
        self.epoch_seconds = client.call("epoch_seconds")
        self.price = client.call("price_per_token")
        self._chain_at: tuple[float, int] = (0.0, 0)      # (our clock, the chain's timestamp) at the last read
        self._server_epoch = client.call("server_epoch", client.account)
        self._is_server = client.call("is_server", client.account)
        self._n_servers: dict[int, int] = {}
        self.accounts: dict[tuple[int, str], tuple[float, AccountView]] = {}
        self.read_chain_time()

    # chain reads (blocking: called at open for an unknown client, else from the background loop)

    def read_chain_time(self) -> None:
        """Anchor the chain's clock at its latest block; kept while no new block comes (a dev chain mines
        only on transactions, so re-anchoring at an old block would move the clock back)."""
        ts = self.client.w3.eth.get_block("latest")["timestamp"]
        if ts != self._chain_at[1]:
            self._chain_at = (self.clock(), ts)

    def chain_now(self) -> float:
        at, ts = self._chain_at
        return ts + (self.clock() - at)

    def view(self) -> ChainView:
        now = self.chain_now()
        epoch = int(max(0.0, now - self.genesis) // self.epoch_seconds)
        if epoch not in self._n_servers:
            self._n_servers[epoch] = self.client.call("servers_in", epoch)
        return ChainView(epoch=epoch, renews_in_s=self.genesis + (epoch + 1) * self.epoch_seconds - now,
                         n_servers=self._n_servers[epoch],
                         server_active=self._is_server and self._server_epoch < epoch, price_per_token=self.price)

    def read_account(self, epoch: int, account: str) -> AccountView:
        c = self.client
        view = AccountView(registered=c.call("peer_key_of", account) != bytes(32),
                           quota=c.call("quota", account, epoch), deposit=c.call("deposit_of", account),
                           slot_holder=c.call("slot_holder", epoch, account),
                           settled=c.call("channel_done", c.call("channel_id", account, c.account, epoch)))
        self.accounts[(epoch, account)] = (self.clock(), view)
        return view

    # the hook

    async def admit(self, peer_id: str, ticket: bytes | None, batch: int, max_length: int, load: float) -> int:
        if ticket is None:
            raise AccessRefused(f"{REFUSED}: this server is metered by ledger {self.client.address}; "
                                f"run the client with --ledger {self.client.address} --chain-rpc URL")
        try:
            t = receipts.decode_ticket(ticket)
        except WireError as e:
            raise AccessRefused(f"{REFUSED}: bad ticket: {e}") from None
        chain = self.view()
        digest = receipts.receipt_digest(self.client.domain, t.client, self.client.account, t.epoch, t.tokens)
        try:
            if receipts.recover(digest, t.signature) != t.client:
                raise IntegrityError("signed by another key")
        except IntegrityError as e:
            raise AccessRefused(f"{REFUSED}: receipt not signed by {t.client}: {e}") from None
        cached = self.accounts.get((chain.epoch, t.client))
        if cached is None:
            account = await asyncio.to_thread(self.read_account, chain.epoch, t.client)    # once per client and epoch
        else:
            account = cached[1]
        grant = decide(chain, account, t, held=self.book.held(t.epoch, t.client), batch=batch, load=load,
                       priority_load=self.priority_load)
        self.book.keep(t.epoch, t.client, grant.tokens, t.signature)
        return grant.new_tokens

    # background work

    def refresh(self) -> None:
        """Re-read the chain's time and every client seen this epoch (blocking)."""
        self.read_chain_time()
        epoch = self.view().epoch
        for (e, account) in list(self.accounts):
            if e == epoch:
                self.read_account(e, account)
            elif e < epoch - 1:
                del self.accounts[(e, account)]

    def settle(self, *, current_too: bool = False) -> list[tuple[int, str, int]]:
        """Settle every held receipt of a finished epoch (and of this one with `current_too`); blocking."""
        epoch = self.view().epoch
        done = []
        for (e, account), (tokens, sig) in sorted(self.book.entries.items()):
            if (e, account) in self.book.settled or e > epoch or (e == epoch and not current_too) or e + 1 < epoch:
                continue
            v, r, s = receipts.split_signature(sig)
            try:
                self.client.transact("settle", account, e, tokens, v, r, s)
            except LedgerError as err:
                logger.warning("settling epoch %d with %s: %s", e, account, err)
                if "already settled" not in str(err):
                    continue
            self.book.mark_settled(e, account)
            done.append((e, account, tokens))
        return done

    async def run_forever(self) -> None:
        """Refresh the cached state every `refresh_s` and settle finished epochs; the server owns this task."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await asyncio.to_thread(self.refresh)
                if any(e < self.view().epoch and (e, a) not in self.book.settled for e, a in self.book.entries):
                    await asyncio.to_thread(self.settle)
            except Exception as e:          # the node unreachable for a while: keep the cached state, retry
                logger.warning("ledger refresh: %s", e)
