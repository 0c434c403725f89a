"""The demo's ledger hook (demo/ledger.py) over one server process: credit earned, one request refused."""

from __future__ import annotations

import pytest

from swarmlm.demo.ledger import DemoLedger
from swarmlm.model.tokenizer import Tokenizer
from tests.helpers.swarm_servers import ServerProcesses, build_checkpoint


@pytest.mark.slow
def test_the_demo_hook_reports_credit_and_one_refused_request(tmp_path):
    from swarmlm.swarm.client.model import RemoteModel

    ckpt = build_checkpoint(tmp_path / "llama", "llama")
    ledger = DemoLedger.start(tmp_path / "ledger", n_servers=1, new_tokens=12)
    servers = ServerProcesses(tmp_path)
    try:
        extra = ledger.server_args(tmp_path / "server0")
        ledger.open_epoch()
        server = servers.start(ckpt, blocks=(0, 4), extra_args=extra)
        prompt = Tokenizer.load(ckpt).encode("the quick brown fox")
        with RemoteModel.connect(str(ckpt), initial_peers=server.maddrs, options=ledger.client_options()) as remote:
            tokens = [s[0] for s in remote.stream_generate([prompt], max_new_tokens=12)]
        refused = ledger.refused_request(str(ckpt), server.maddrs, prompt)
        result = ledger.report([tmp_path / "server0"], refused)
    finally:
        servers.close()
        ledger.close()
    assert len(tokens) == 12
    assert "quota exceeded: 0 tokens left" in result.refused
    assert result.credit == {"server0": 12}
    assert "credit earned" in result.lines()[0]
