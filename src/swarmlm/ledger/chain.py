"""Talking to the ledger contract on any Ethereum JSON-RPC node, through web3.

`LedgerClient` is one account's handle on one deployed ledger: `call(name, *args)` reads,
`transact(name, *args, value=...)` signs a transaction with the account's key, sends it raw and
waits for its receipt. A transaction the contract would refuse is refused before it is sent
(the gas estimate runs it), and its revert reason becomes a one-line `LedgerError`.
`deploy` puts a new ledger on a chain. Knows nothing of sessions, quotas or the swarm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarmlm.errors import LedgerError
from swarmlm.ledger.build import load_artifact
from swarmlm.ledger.receipts import address_of, domain_separator

RPC_TIMEOUT_S = 10.0
RECEIPT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LedgerParams:
    epoch_seconds: int = 3600        # length of an epoch
    free_tokens: int = 1000          # quota every registered account gets each epoch
    slots: int = 2                   # K priority slots per epoch (at most 8)
    price_per_token: int = 10 ** 9   # wei per token over the quota (0: nothing sold)
    quota_per_credit: int = 1        # extra quota per unit of the last epoch's credit
    sample_credit: int = 1           # credit per training sample of a recorded round
    dispute_seconds: int = 600       # a client's close waits this long for the server's later receipt

    def args(self) -> list[int]:
        return [self.epoch_seconds, self.free_tokens, self.slots, self.price_per_token, self.quota_per_credit,
                self.sample_credit, self.dispute_seconds]


def connect(url: str) -> Any:
    """A web3 handle on the node at `url` (http://...), checked to answer."""
    from web3 import Web3
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": RPC_TIMEOUT_S}))
    try:
        w3.eth.chain_id
    except Exception as e:
        raise LedgerError(f"no Ethereum JSON-RPC node answers at {url}: {e}") from None
    return w3


def _reason(e: Exception) -> str:
    msg = getattr(e, "message", None) or str(e)
    return msg.replace("execution reverted: ", "").strip().splitlines()[0] if msg else type(e).__name__


def send(w3: Any, key: bytes, tx: dict) -> dict:
    """Sign `tx` (to, data, value) with `key`, send it, and return its mined receipt."""
    sender = address_of(key)
    tx = dict(tx)
    tx.setdefault("value", 0)
    tx["from"] = sender
    try:
        tx["gas"] = int(w3.eth.estimate_gas(tx) * 1.2) + 10_000
    except Exception as e:
        raise LedgerError(f"refused by the ledger: {_reason(e)}") from None
    base = w3.eth.get_block("latest").get("baseFeePerGas", 10 ** 9)
    tx.update(nonce=w3.eth.get_transaction_count(sender, "pending"), chainId=_chain_id(w3),
              maxPriorityFeePerGas=10 ** 9, maxFeePerGas=2 * base + 10 ** 9)
    tx.pop("from")
    signed = w3.eth.account.sign_transaction(tx, key)
    try:
        txh = w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = w3.eth.wait_for_transaction_receipt(txh, timeout=RECEIPT_TIMEOUT_S, poll_latency=0.05)
    except Exception as e:
        raise LedgerError(f"transaction failed: {_reason(e)}") from None
    if receipt["status"] != 1:
        raise LedgerError(f"transaction {txh.hex()} reverted")
    return receipt


def _chain_id(w3: Any) -> int:
    """A node's chain id, asked once per web3 handle (it never changes under a running node)."""
    cached = getattr(w3, "_swarmlm_chain_id", None)
    if cached is None:
        cached = w3._swarmlm_chain_id = w3.eth.chain_id
    return cached


def deploy(w3: Any, key: bytes, params: LedgerParams) -> str:
    """Deploy a new ledger with `params`; its address."""
    art = load_artifact()
    data = w3.eth.contract(abi=art.abi, bytecode=art.bytecode).constructor(*params.args()).data_in_transaction
    receipt = send(w3, key, {"data": data})
    return receipt["contractAddress"]


class LedgerClient:
    """`key`'s account on the ledger at `address`."""

    def __init__(self, w3: Any, address: str, key: bytes):
        from web3 import Web3
        self.w3 = w3
        self.address = Web3.to_checksum_address(address)
        self.key = key
        self.account = address_of(key)
        self.contract = w3.eth.contract(address=self.address, abi=load_artifact().abi)
        try:
            self.chain_id = w3.eth.chain_id
            if not w3.eth.get_code(self.address):
                raise LedgerError(f"no contract at {self.address}")
        except LedgerError:
            raise
        except Exception as e:
            raise LedgerError(f"cannot read the chain: {e}") from None
        self.domain = domain_separator(self.chain_id, self.address)

    def call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.contract.functions, name)(*args).call({"from": self.account})
        except Exception as e:
            raise LedgerError(f"reading {name}: {_reason(e)}") from None

    def transact(self, name: str, *args: Any, value: int = 0) -> dict:
        fn = getattr(self.contract.functions, name)(*args)
        return send(self.w3, self.key, {"to": self.address, "data": fn._encode_transaction_data(), "value": value})

    def balance(self, account: str | None = None) -> int:
        return self.w3.eth.get_balance(account or self.account)
