"""A fresh ledger on an in-process py-evm chain (eth-tester) for each test, with funded accounts and a
clock the test moves."""

from __future__ import annotations

import pytest

from swarmlm.ledger import chain, receipts

KEYS = [bytes(31) + bytes([i]) for i in range(1, 8)]      # eth-tester's funded accounts


class Chain:
    """The test's handle: one LedgerClient per account, and the chain's clock."""

    def __init__(self, params: chain.LedgerParams):
        from web3 import EthereumTesterProvider, Web3
        self.w3 = Web3(EthereumTesterProvider())
        self.tester = self.w3.provider.ethereum_tester
        self.params = params
        self.address = chain.deploy(self.w3, KEYS[0], params)
        self.owner, self.a, self.b, self.c, self.d, self.e, self.f = (
            chain.LedgerClient(self.w3, self.address, k) for k in KEYS)

    def now(self) -> int:
        return self.w3.eth.get_block("latest")["timestamp"]

    def at(self, timestamp: int) -> None:
        """Move the chain's clock to `timestamp` (the next block's time)."""
        self.tester.time_travel(timestamp)

    def to_epoch(self, epoch: int, offset: int = 0) -> None:
        self.at(self.owner.call("epoch_start", epoch) + offset)

    def register(self, client: chain.LedgerClient, *, server: bool = False) -> None:
        client.transact("register", receipts.keccak(client.account.encode()), b"\x00" * 64, server)

    def receipt(self, signer: chain.LedgerClient, client: str, server: str, epoch: int, tokens: int):
        sig = receipts.sign_digest(signer.key, receipts.receipt_digest(signer.domain, client, server, epoch, tokens))
        return receipts.split_signature(sig)


@pytest.fixture
def ledger():
    return Chain(chain.LedgerParams(epoch_seconds=1000, free_tokens=50, slots=2, price_per_token=10,
                                    quota_per_credit=1, sample_credit=2, dispute_seconds=100))
