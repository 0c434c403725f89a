"""The embedded dev chain's JSON-RPC: web3's view of it, and bad requests answered with errors."""

from __future__ import annotations

import pytest

from swarmlm.ledger.node import DevChain


@pytest.fixture(scope="module")
def chain():
    return DevChain()


@pytest.mark.parametrize("request_, code", [
    ("not an object", -32600),
    ({"id": 1, "method": "eth_nothing", "params": []}, -32601),
    ({"id": 1, "method": "eth_getBalance", "params": {"a": 1}}, -32602),
    ({"id": 1, "method": "eth_getBalance", "params": []}, -32602),
    ({"id": 1, "method": "evm_increaseTime", "params": ["0xzz"]}, -32602),
    ({"id": 1, "method": "eth_sendRawTransaction", "params": ["0x00"]}, -32603),
])
def test_a_bad_request_gets_an_error_reply(chain, request_, code):
    reply = chain.dispatch(request_)
    assert reply["error"]["code"] == code and "result" not in reply


def test_the_clock_moves_forward_and_the_faucet_funds(chain):
    before = int(chain.dispatch({"id": 1, "method": "eth_getBlockByNumber", "params": ["latest", False]})
                 ["result"]["timestamp"], 16)
    chain.dispatch({"id": 2, "method": "evm_increaseTime", "params": ["0x64"]})
    chain.dispatch({"id": 2, "method": "evm_mine", "params": []})           # the next block is 100 s on
    after = int(chain.dispatch({"id": 3, "method": "eth_getBlockByNumber", "params": ["latest", False]})
                ["result"]["timestamp"], 16)
    assert after >= before + 100
    account = "0x" + "42" * 20
    chain.dispatch({"id": 4, "method": "anvil_setBalance", "params": [account, hex(10 ** 18)]})
    assert int(chain.dispatch({"id": 5, "method": "eth_getBalance", "params": [account]})["result"], 16) == 10 ** 18
