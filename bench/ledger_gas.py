"""The ledger's costs: gas per served session, admission decision time, transactions per second.

In one run:
- gas per served session at 1, 10 and 100 sessions per epoch on one client-server channel: the
  client signs one cumulative receipt per session, the server settles the latest once per epoch;
  the settlement's gas over the sessions (target: <= 2,000 at 100). For comparison, the gas of
  checking one receipt on chain per request is the settlement's gas at 1.
- admission decision time: `policy.decide` (the pure decision, target <= 0.1 ms), and the whole
  `Gate.admit` a server runs at a session's open (ticket decoding, signature recovery, receipt
  kept on disk); decoding steps never touch the ledger;
- ledger transactions per second (deposits, each signed, sent and waited for) on py-evm in this
  process, on the embedded chain (`swarmlm ledger chain`, JSON-RPC over loopback) and on anvil
  (.tools/, from scripts/setup; skipped with a note if absent).

Prints one JSON line per result: {"name", "value", "unit"}.

    python bench/ledger_gas.py [--txs 60] [--decisions 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from swarmlm.ledger import chain as chainlib
from swarmlm.ledger import keys, policy, receipts

ROOT = Path(__file__).resolve().parents[1]
ANVIL = ROOT / ".tools" / "node_modules" / ".bin" / "anvil"
KEYS = [bytes(31) + bytes([i]) for i in range(1, 4)]
EPOCH_S = 3600


def emit(name: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"name": name, "value": round(value, 6), "unit": unit, **extra}), flush=True)


def in_process_chain():
    from web3 import EthereumTesterProvider, Web3
    w3 = Web3(EthereumTesterProvider())
    address = chainlib.deploy(w3, KEYS[0], chainlib.LedgerParams(epoch_seconds=EPOCH_S, free_tokens=10 ** 9))
    return w3, address


def gas_per_session() -> None:
    w3, address = in_process_chain()
    tester = w3.provider.ethereum_tester
    owner, server, client = (chainlib.LedgerClient(w3, address, k) for k in KEYS)
    server.transact("register", b"\x01" * 32, b"", True)
    client.transact("register", b"\x02" * 32, b"", False)
    one = None
    for epoch, n in enumerate((1, 10, 100), start=1):
        tester.time_travel(owner.call("epoch_start", epoch))
        tokens = 40 * n                       # n sessions of 40 tokens: the last receipt is cumulative
        sig = receipts.sign_digest(client.key, receipts.receipt_digest(client.domain, client.account,
                                                                       server.account, epoch, tokens))
        gas = server.transact("settle", client.account, epoch, tokens, *receipts.split_signature(sig))["gasUsed"]
        one = one or gas
        emit(f"gas_per_session_{n}_per_epoch", gas / n, "gas", settle_gas=gas, target=2000 if n == 100 else None)
    emit("gas_receipt_per_request", one, "gas", note="a receipt settled on chain for every request")


def decision_time(n: int) -> None:
    chain = policy.ChainView(epoch=3, renews_in_s=100.0, n_servers=3, server_active=True, price_per_token=10)
    account = policy.AccountView(registered=True, quota=10 ** 9, deposit=10 ** 6, slot_holder=False)
    ticket = receipts.Ticket(client="0x" + "11" * 20, epoch=3, tokens=40, new_tokens=40, signature=b"s" * 65)
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            policy.decide(chain, account, ticket, held=0, batch=1, load=0.1, priority_load=0.75)
        runs.append((time.perf_counter() - t0) / n)
    emit("admission_decision_time", statistics.median(runs) * 1e3, "ms", target=0.1)

    w3, address = in_process_chain()
    server, client = (chainlib.LedgerClient(w3, address, k) for k in KEYS[1:])
    server.transact("register", b"\x01" * 32, b"", True)
    client.transact("register", b"\x02" * 32, b"", False)
    w3.provider.ethereum_tester.time_travel(server.call("epoch_start", 1))
    w3.provider.ethereum_tester.mine_blocks(1)
    with tempfile.TemporaryDirectory() as tmp:
        gate = policy.Gate(server, Path(tmp))
        gate.read_account(1, client.account)
        times = []
        loop = asyncio.new_event_loop()
        for i in range(1, 201):
            t = receipts.sign_ticket(client.key, client.domain, server.account, 1, 40 * i, 40).encode()
            t0 = time.perf_counter()
            loop.run_until_complete(gate.admit("peer", t, 1, 64, 0.1))
            times.append(time.perf_counter() - t0)
        loop.close()
        emit("admission_at_open_time", statistics.median(times) * 1e3, "ms",
             note="Gate.admit: ticket, signature recovery, receipt kept on disk; once per session open")


def tx_rate(w3, address: str, key: bytes, n: int) -> float:
    c = chainlib.LedgerClient(w3, address, key)
    c.transact("deposit", value=1)            # warm up
    t0 = time.perf_counter()
    for _ in range(n):
        c.transact("deposit", value=1)
    return n / (time.perf_counter() - t0)


def start(command: list[str], pattern: str, log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "w+") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            f.seek(0)
            m = re.search(pattern, f.read())
            if m:
                return proc, f"http://{m.group(1)}"
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{command[0]} did not start: {log.read_text()}")


def tx_rates(n: int) -> None:
    w3, address = in_process_chain()
    emit("ledger_tx_per_s_py_evm_in_process", tx_rate(w3, address, KEYS[0], n), "tx/s")
    with tempfile.TemporaryDirectory() as tmp:
        chains = [("embedded", [sys.executable, "-m", "swarmlm", "ledger", "chain", "--port", "0"],
                   r"http://(127\.0\.0\.1:\d+)")]
        if ANVIL.exists():
            chains.append(("anvil", [str(ANVIL), "--host", "127.0.0.1", "--port", "0"],
                           r"Listening on (127\.0\.0\.1:\d+)"))
        else:
            print(f"# anvil not found at {ANVIL} (run scripts/setup): skipped", file=sys.stderr)
        for name, command, pattern in chains:
            proc, url = start(command, pattern, Path(tmp) / f"{name}.log")
            try:
                w3 = chainlib.connect(url)
                key = keys.load_or_create_key(Path(tmp) / name)
                w3.provider.make_request("anvil_setBalance", [receipts.address_of(key), hex(10 ** 20)])
                address = chainlib.deploy(w3, key, chainlib.LedgerParams())
                emit(f"ledger_tx_per_s_{name}", tx_rate(w3, address, key, n), "tx/s", url=url)
            finally:
                proc.kill()
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--txs", type=int, default=60)
    parser.add_argument("--decisions", type=int, default=20000)
    args = parser.parse_args()
    gas_per_session()
    decision_time(args.decisions)
    tx_rates(args.txs)


if __name__ == "__main__":
    main()
