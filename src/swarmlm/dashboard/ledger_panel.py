"""The ledger's panel (`swarmlm dashboard --ledger ADDRESS --chain-rpc URL`): the epoch, and per
registered account its credit and quota, read from the ledger contract through ledger/chain.py.

The accounts are those the contract's `Registered` events name (the newest `MAX_ACCOUNTS`); each is
shown with the peer ID its registered key belongs to, so the page can set it beside the servers and
training peers it knows. The reads are web3 calls, run in a thread; the dashboard holds no account
of its own (a throwaway key makes the LedgerClient; its calls name no sender). Only reads: it never sends
a transaction.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from swarmlm.errors import LedgerError, UserError
from swarmlm.p2p.identity import peer_id_of

MAX_ACCOUNTS = 100
EVERY_S = 5.0              # the chain is read at most this often (a look at the swarm may come every second)


class LedgerPanel:
    name = "ledger"

    def __init__(self, client: Any, *, every_s: float = EVERY_S):
        self.client = client                  # ledger/chain.py's LedgerClient
        self.every_s = every_s
        self._last: tuple[float, dict[str, Any]] | None = None

    @classmethod
    def connect(cls, address: str, chain_rpc: str) -> "LedgerPanel":
        """A panel on the ledger at `address` of the chain at `chain_rpc` (`UserError` in one line if it is not)."""
        from swarmlm.ledger import chain

        try:
            return cls(chain.LedgerClient(chain.connect(chain_rpc), address, os.urandom(32)))
        except (LedgerError, ValueError) as e:
            raise UserError(f"--ledger {address} at {chain_rpc}: {e}") from None

    async def collect(self, peer: Any, now: float) -> dict[str, Any]:
        if self._last is None or now - self._last[0] >= self.every_s or now < self._last[0]:
            self._last = (now, {"ledger": await asyncio.to_thread(ledger_view, self.client)})
        return self._last[1]


def _reader(c: Any) -> Any:
    """`call(name, *args)`: a read-only call with no sender (a node may refuse an unfunded one's)."""
    def call(name: str, *args: Any) -> Any:
        try:
            return getattr(c.contract.functions, name)(*args).call()
        except Exception as e:
            raise LedgerError(f"reading {name}: {e}") from None
    return call


def ledger_view(c: Any) -> dict[str, Any]:
    """The epoch and every registered account's standing, as plain data."""
    call = _reader(c)
    epoch = call("current_epoch")
    head = c.w3.eth.get_block("latest")["timestamp"]
    registered = c.contract.events.Registered.get_logs(from_block=0)
    accounts: dict[str, tuple[bytes, bool]] = {}
    for event in registered:
        accounts[event["args"]["account"]] = (bytes(event["args"]["peer_key"]), bool(event["args"]["server"]))
    rows = []
    for account, (peer_key, server) in list(accounts.items())[-MAX_ACCOUNTS:]:
        rows.append({"account": account, "peer_id": _peer_id(peer_key), "server": server,
                     "credit": call("credit_of", account, epoch),
                     "credit_last_epoch": call("credit_of", account, epoch - 1) if epoch else 0,
                     "quota": call("quota", account, epoch), "quota_left": call("quota_left", account, epoch),
                     "deposit": call("deposit_of", account), "slot": call("slot_holder", epoch, account)})
    return {"address": c.address, "chain_id": c.chain_id, "epoch": epoch,
            "epoch_seconds": call("epoch_seconds"), "renews_in_s": call("epoch_start", epoch + 1) - head,
            "servers": call("servers_in", epoch), "free_tokens": call("free_tokens"),
            "price_per_token": call("price_per_token"), "accounts": rows}


def _peer_id(peer_key: bytes) -> str | None:
    try:
        return peer_id_of(peer_key)
    except Exception:                  # a key registered by hand that is no Ed25519 peer key
        return None
