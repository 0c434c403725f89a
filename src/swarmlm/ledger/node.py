"""The embedded dev chain: py-evm (through eth-tester) behind Ethereum JSON-RPC on 127.0.0.1.

`swarmlm ledger chain` runs it. It answers the methods a web3 client needs to deploy, call and
transact (eth_chainId, eth_call, eth_estimateGas, eth_sendRawTransaction, eth_getTransactionReceipt,
...), plus the dev methods anvil also has: `evm_increaseTime` and `evm_mine` (tests move the clock
instead of waiting for epochs) and `anvil_setBalance` (a faucet: it tops an account up from the
chain's funded genesis account). Every transaction is mined at once into its own block.

`dispatch` is the pure JSON-RPC translation (wire hex <-> eth-tester's Python values); `serve`
wraps it in a starlette app on uvicorn (web.py). Only loopback is allowed as the host. Knows nothing of
the ledger contract.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Callable

from swarmlm.errors import UserError
from swarmlm.log import get_logger
from swarmlm.web import serve_app

logger = get_logger(__name__)
MAX_REQUEST_BYTES = 1 << 20
_REVERT_SELECTOR = bytes.fromhex("08c379a0")       # Error(string)


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: str | None = None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def to_wire(value: Any) -> Any:
    """eth-tester's values as JSON-RPC wants them: camelCase keys, quantities and bytes as 0x hex."""
    if isinstance(value, dict):
        return {_camel(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    return value


_TX_FIELDS = {"from": "from", "to": "to", "data": "data", "input": "data", "value": "value", "gas": "gas",
              "gasPrice": "gas_price", "maxFeePerGas": "max_fee_per_gas",
              "maxPriorityFeePerGas": "max_priority_fee_per_gas"}
_QUANTITIES = {"value", "gas", "gas_price", "max_fee_per_gas", "max_priority_fee_per_gas"}


def _tx_from_wire(tx: Any) -> dict:
    if not isinstance(tx, dict):
        raise RpcError(-32602, "a transaction object is expected")
    out = {}
    for k, v in tx.items():
        name = _TX_FIELDS.get(k)
        if name is None or v is None:
            continue
        out[name] = _quantity(v) if name in _QUANTITIES else v
    out.setdefault("data", "0x")
    return out


def _quantity(v: Any) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"0x[0-9a-fA-F]{1,64}", v):
        return int(v, 16)
    raise RpcError(-32602, f"not a quantity: {v!r}")


def _block_id(v: Any) -> Any:
    if v in (None, "latest", "pending", "safe", "finalized"):
        return "latest"
    if v == "earliest":
        return "earliest"
    return _quantity(v)


def _revert(e: Exception) -> RpcError:
    from eth_abi import decode, encode
    raw = e.args[0] if e.args else str(e)
    reason = str(raw)
    if isinstance(raw, bytes):
        try:
            reason = decode(["string"], raw[4:])[0] if raw[:4] == _REVERT_SELECTOR else raw.hex()
        except Exception:
            reason = raw.hex()
    data = "0x" + (_REVERT_SELECTOR + encode(["string"], [reason])).hex()
    return RpcError(3, f"execution reverted: {reason}", data)


class DevChain:
    """One py-evm chain and its JSON-RPC methods."""

    def __init__(self):
        from eth_tester import EthereumTester, PyEVMBackend
        self.tester = EthereumTester(PyEVMBackend())
        self.funder = self.tester.get_accounts()[0]
        self.methods: dict[str, Callable[..., Any]] = {
            "web3_clientVersion": lambda: "swarmlm-devchain/py-evm",
            "net_version": lambda: str(self.chain_id()),
            "eth_chainId": lambda: hex(self.chain_id()),
            "eth_blockNumber": lambda: hex(self.tester.get_block_by_number("latest")["number"]),
            "eth_gasPrice": lambda: hex(self._base_fee() + 10 ** 9),
            "eth_maxPriorityFeePerGas": lambda: hex(10 ** 9),
            "eth_accounts": lambda: [],
            "eth_getBalance": lambda a, b=None: hex(self.tester.get_balance(a, _block_id(b))),
            "eth_getTransactionCount": lambda a, b=None: hex(self.tester.get_nonce(a, _block_id(b))),
            "eth_getCode": lambda a, b=None: to_wire(self.tester.get_code(a, _block_id(b))),
            "eth_getBlockByNumber": lambda b, full=False: to_wire(self.tester.get_block_by_number(_block_id(b), bool(full))),
            "eth_getBlockByHash": lambda h, full=False: to_wire(self.tester.get_block_by_hash(h, bool(full))),
            "eth_getTransactionByHash": self._tx_by_hash,
            "eth_getTransactionReceipt": self._receipt,
            "eth_call": lambda tx, b=None: self._guard(lambda: self.tester.call(_tx_from_wire(tx), _block_id(b))),
            "eth_estimateGas": lambda tx, b=None: hex(self._guard(lambda: self.tester.estimate_gas(_tx_from_wire(tx)))),
            "eth_sendRawTransaction": lambda raw: self._guard(lambda: self.tester.send_raw_transaction(raw)),
            "evm_increaseTime": self._increase_time,
            "evm_mine": self._mine,
            "anvil_setBalance": self._set_balance,
        }

    def chain_id(self) -> int:
        return self.tester.backend.chain.chain_id

    def _base_fee(self) -> int:
        return self.tester.get_block_by_number("latest").get("base_fee_per_gas", 10 ** 9)

    @staticmethod
    def _guard(fn: Callable[[], Any]) -> Any:
        from eth_tester.exceptions import TransactionFailed, ValidationError
        try:
            return fn()
        except TransactionFailed as e:
            raise _revert(e) from None
        except ValidationError as e:
            raise RpcError(-32000, str(e)) from None

    def _tx_by_hash(self, h: str) -> Any:
        from eth_tester.exceptions import TransactionNotFound
        try:
            return to_wire(self.tester.get_transaction_by_hash(h))
        except TransactionNotFound:
            return None

    def _receipt(self, h: str) -> Any:
        from eth_tester.exceptions import TransactionNotFound
        try:
            return to_wire(self.tester.get_transaction_receipt(h))
        except TransactionNotFound:
            return None

    def _increase_time(self, seconds: Any) -> str:
        s = _quantity(seconds)
        now = self.tester.get_block_by_number("latest")["timestamp"]
        self.tester.time_travel(now + s)
        return hex(s)

    def _mine(self, *_: Any) -> str:
        self.tester.mine_blocks(1)
        return "0x0"

    def _set_balance(self, account: str, amount: Any) -> bool:
        """Top `account` up to `amount` wei from the genesis account (a dev faucet; never lowers a balance)."""
        want = _quantity(amount)
        have = self.tester.get_balance(account)
        if want > have:
            self.tester.send_transaction({"from": self.funder, "to": account, "value": want - have, "gas": 21000,
                                          "max_fee_per_gas": 2 * self._base_fee() + 10 ** 9,
                                          "max_priority_fee_per_gas": 10 ** 9})
        return True

    def dispatch(self, request: Any) -> dict:
        """One JSON-RPC request object -> its response object."""
        rid = request.get("id") if isinstance(request, dict) else None
        try:
            if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                raise RpcError(-32600, "invalid request")
            fn = self.methods.get(request["method"])
            if fn is None:
                raise RpcError(-32601, f"method {request['method']} not supported by the dev chain")
            params = request.get("params") or []
            if not isinstance(params, list):
                raise RpcError(-32602, "params must be a list")
            try:
                result = fn(*params)
            except TypeError as e:
                raise RpcError(-32602, f"bad params for {request['method']}: {e}") from None
            return {"jsonrpc": "2.0", "id": rid, "result": result}
        except RpcError as e:
            err = {"code": e.code, "message": e.message}
            if e.data is not None:
                err["data"] = e.data
            return {"jsonrpc": "2.0", "id": rid, "error": err}
        except Exception as e:          # a bug or an engine error: an error reply, never a dead server
            logger.warning("dev chain: %s failed: %r", request.get("method"), e)
            return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32603, "message": str(e)[:500]}}


def app(chain: DevChain) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def rpc(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_REQUEST_BYTES:
            return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "too large"}})
        try:
            payload = json.loads(body)
        except ValueError:
            return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}})
        if isinstance(payload, list):
            return JSONResponse([chain.dispatch(p) for p in payload[:100]])
        return JSONResponse(chain.dispatch(payload))

    return Starlette(routes=[Route("/", rpc, methods=["POST"])])


async def serve(host: str, port: int, *, on_ready: Callable[[str], None], stop: asyncio.Event) -> None:
    """Run the dev chain at host:port (port 0: a free one) until `stop` is set; `on_ready(url)` once listening."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(f"the dev chain listens on loopback only, not {host}")
    await serve_app(app(DevChain()), host, port, stop=stop, on_ready=on_ready)
