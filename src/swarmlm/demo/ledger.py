"""The demo's ledger part: its servers run under a ledger on the embedded chain.

    ledger = DemoLedger.start(root, n_servers=3, new_tokens=NEW_TOKENS)   # `swarmlm ledger chain`, a deployed ledger
    extra = ledger.server_args(root / "server0")     # funds and registers that server; its serve flags
    ledger.open_epoch()                              # servers serve from the epoch after they registered
    options = ledger.client_options()                # ClientOptions whose sessions carry signed receipts
    refused = ledger.refused_request(cid, initial, prompt_ids)   # one request past its quota: the refusal
    result = ledger.report([root / "server0", ...], refused)      # settled credit per server
    print("\\n".join(result.lines())); ledger.close()

The free quota is sized so that one generation of `new_tokens` fits every server's share of it
(each of the `n_servers` servers grants a client quota / n_servers: ledger/policy.py), and a
second one does not: that second request is the one refused. The chain's clock is moved one
epoch forward (`evm_increaseTime`) instead of waiting for it. Knows nothing of training.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from swarmlm.demo.summary import Part
from swarmlm.errors import AccessRefused, UserError
from swarmlm.ledger import chain as chainlib
from swarmlm.ledger import commands, keys
from swarmlm.ledger.payer import Payer

EPOCH_S = 3600
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LedgerReport:
    ledger: str                       # the contract's address
    credit: dict[str, int]            # server data dir name -> tokens of credit settled this epoch
    refused: str                      # the one-line refusal of the request over its quota ("" if none)

    def lines(self) -> list[str]:
        earned = ", ".join(f"{name} {c}" for name, c in self.credit.items())
        return [f"  ledger      {self.ledger} on the embedded chain; credit earned (tokens served, settled): {earned}",
                f"  refused     {self.refused or 'NOTHING (a request over its quota was served)'}"]

    def part(self) -> Part:
        found = [] if self.refused else ["the ledger let a request over its quota through"]
        if not any(self.credit.values()):
            found.append("no server earned credit on the ledger for the tokens it served")
        return Part("ledger", self.lines(), found, {"ledger": self.ledger, "credit": self.credit, "refused": self.refused})


class DemoLedger:
    def __init__(self, proc: subprocess.Popen, url: str, root: Path, ledger: str, new_tokens: int):
        self.proc, self.url, self.root, self.ledger, self.new_tokens = proc, url, root, ledger, new_tokens
        self.w3 = chainlib.connect(url)
        self.client_home = root / "ledger-client"
        self._payer: Payer | None = None

    @classmethod
    def start(cls, root: Path, *, n_servers: int, new_tokens: int) -> "DemoLedger":
        root.mkdir(parents=True, exist_ok=True)
        log = root / "chain.log"
        with open(log, "w+") as f:
            proc = subprocess.Popen([sys.executable, "-m", "swarmlm", "ledger", "chain", "--port", "0"],
                                    stdout=f, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + START_TIMEOUT_S
            while (m := re.search(r"^(http://127\.0\.0\.1:\d+)$", log.read_text(), re.M)) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise UserError(f"the dev chain did not start; its log: {log.read_text()[-500:]}")
                time.sleep(0.05)
        url = m.group(1)
        try:
            client_home = root / "ledger-client"
            commands.fund(url, client_home)
            w3 = chainlib.connect(url)
            params = chainlib.LedgerParams(epoch_seconds=EPOCH_S, free_tokens=n_servers * new_tokens, slots=1)
            ledger = chainlib.deploy(w3, keys.load_or_create_key(client_home), params)
            commands.register(chainlib.LedgerClient(w3, ledger, keys.load_or_create_key(client_home)), client_home,
                              server=False)
        except BaseException:
            proc.kill()
            raise
        return cls(proc, url, root, ledger, new_tokens)

    def server_args(self, data_dir: Path) -> list[str]:
        """Fund and register the server of `data_dir`; the flags its `swarmlm serve` takes."""
        commands.fund(self.url, data_dir)
        commands.register(chainlib.LedgerClient(self.w3, self.ledger, keys.load_or_create_key(data_dir)), data_dir,
                          server=True)
        return ["--ledger", self.ledger, "--chain-rpc", self.url]

    def open_epoch(self) -> None:
        commands.advance(self.url, EPOCH_S)

    def client_options(self, base=None):
        """ClientOptions (a copy of `base`) whose sessions hand each server a signed cumulative receipt."""
        import dataclasses

        from swarmlm.swarm.client.remote import ClientOptions
        if self._payer is None:
            client = chainlib.LedgerClient(self.w3, self.ledger, keys.load_or_create_key(self.client_home))
            self._payer = Payer(client, self.client_home, new_tokens=self.new_tokens)
        base = base or ClientOptions()
        return dataclasses.replace(base, session=dataclasses.replace(
            base.session, ticket=self._payer.ticket, ticket_accepted=self._payer.accepted))

    def refused_request(self, model: str, initial_peers: list[str], prompt_ids: list[int]) -> str:
        """One more generation by the same client, past its quota: the servers' one-line refusal."""
        from swarmlm.swarm.client.model import RemoteModel
        with RemoteModel.connect(model, initial_peers=initial_peers, options=self.client_options()) as remote:
            try:
                for _ in remote.stream_generate([prompt_ids], max_new_tokens=self.new_tokens):
                    pass
            except AccessRefused as e:
                return str(e)
        return ""

    def report(self, server_dirs: list[Path], refused: str) -> LedgerReport:
        """Settle every server's receipts now (a killed server's too: they are on its disk); read the credit."""
        from swarmlm.ledger.policy import Gate
        credit = {}
        for d in server_dirs:
            c = chainlib.LedgerClient(self.w3, self.ledger, keys.load_or_create_key(d))
            Gate(c, d).settle(current_too=True)
            credit[d.name] = c.call("credit_of", c.account, c.call("current_epoch"))
        return LedgerReport(ledger=self.ledger, credit=credit, refused=refused)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
