"""Server processes on 127.0.0.1: SIGKILL mid-generation, the CLI verbs, clean SIGTERM shutdown."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmlm.errors import NotFoundError
from swarmlm.model.generate import generate
from swarmlm.swarm.client.model import RemoteModel
from swarmlm.swarm.client.remote import ClientOptions
from swarmlm.swarm.client.session import SessionOptions
from tests.helpers.swarm import poll_until, wait_until_dead
from tests.helpers.swarm_servers import ServerProcesses, local_model

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 99, 3, 250]
CLIENT = ClientOptions(connect_timeout_s=60.0, refresh_s=0.5,
                       session=SessionOptions(step_timeout_s=20.0, recovery_timeout_s=20.0, replacement_wait_s=3.0))


def _env():
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


@pytest.fixture()
def procs(tmp_path):
    p = ServerProcesses(tmp_path)
    yield p
    p.close()


@pytest.fixture(scope="module")
def whole_server(tmp_path_factory, checkpoints):
    """One server process holding every block of the llama checkpoint, shared by the CLI tests."""
    p = ServerProcesses(tmp_path_factory.mktemp("whole"))
    server = p.start(checkpoints["llama"], blocks=(0, 4))
    yield server
    p.close()


def test_sigkilled_server_is_replaced_and_tokens_stay_identical(procs, checkpoints):
    ckpt = checkpoints["llama"]
    a = procs.start(ckpt, blocks=(0, 2))
    b = procs.start(ckpt, blocks=(2, 4), initial_peers=a.maddrs, wait=False)
    c = procs.start(ckpt, blocks=(2, 4), initial_peers=a.maddrs, wait=False)
    b.wait_ready(180.0), c.wait_ready(180.0)
    by_peer = {b.peer_id: b, c.peer_id: c}
    tokens = []
    with RemoteModel.connect(str(ckpt), initial_peers=a.maddrs, options=CLIENT) as model:
        for i, step in enumerate(model.stream_generate([PROMPT], max_new_tokens=16)):
            tokens.append(step[0])
            if i == 4:
                victim = next(h.peer_id for h in model.last_session.chain if h.peer_id in by_peer)
                by_peer[victim].proc.send_signal(signal.SIGKILL)
        recoveries = model.last_session.recoveries

    assert tokens == generate(local_model(ckpt), PROMPT, max_new_tokens=16)
    assert recoveries == 1


def test_no_cover_for_a_sigkilled_server_fails_naming_its_blocks_in_time(procs, checkpoints):
    ckpt = checkpoints["llama"]
    a = procs.start(ckpt, blocks=(0, 2))
    b = procs.start(ckpt, blocks=(2, 4), initial_peers=a.maddrs)
    with RemoteModel.connect(str(ckpt), initial_peers=a.maddrs, options=CLIENT) as model:
        with pytest.raises(NotFoundError, match=r"blocks 2\.\.3") as err:
            for i, _ in enumerate(model.stream_generate([PROMPT], max_new_tokens=16)):
                if i == 2:
                    b.proc.send_signal(signal.SIGKILL)
                    t0 = time.monotonic()
        elapsed = time.monotonic() - t0

    assert elapsed < 30, err.value


def _swarmlm(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "swarmlm", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())


def test_cli_generate_and_finetune_through_the_swarm(whole_server, checkpoints, tmp_path):
    ckpt = checkpoints["llama"]
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    peers = ["--initial-peers", *whole_server.maddrs, "--connect-timeout", "60"]
    gen = _swarmlm("generate", str(ckpt), "--swarm", *peers, "--prompt", "the quick brown fox", "--temperature", "0",
                   "--max-new-tokens", "12", "--json")
    tune = _swarmlm("finetune", str(ckpt), "--swarm", *peers, "--data", str(data), "--steps", "3", "--prompt-len", "4",
                    "--lora-rank", "2", "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "out"))
    gen_out, gen_err = gen.communicate(timeout=300)
    tune_out, tune_err = tune.communicate(timeout=300)

    assert gen.returncode == 0, gen_err[-3000:]
    got = json.loads(gen_out.strip().splitlines()[-1])
    from swarmlm.model.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(ckpt)
    assert got["prompt_ids"] == tokenizer.encode("the quick brown fox")
    assert got["output_ids"] == generate(local_model(ckpt), got["prompt_ids"], max_new_tokens=12)
    assert got["text"] == tokenizer.decode(got["output_ids"]) and got["tokens_per_s"] > 0
    assert tune.returncode == 0, tune_err[-3000:]
    assert (tmp_path / "out" / "adapters.safetensors").is_file()
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 3


def test_generate_for_a_model_nobody_serves_fails_within_the_connect_timeout(whole_server, checkpoints):
    gen = _swarmlm("generate", str(checkpoints["gpt2"]), "--swarm", "--initial-peers", *whole_server.maddrs,
                   "--connect-timeout", "3", "--prompt", "hi", "--json")
    _, err = gen.communicate(timeout=300)

    assert gen.returncode == 2 and "no server holds blocks 0..3" in err and "Traceback" not in err


def test_serve_prints_its_maddrs_then_what_it_serves(whole_server, checkpoints):
    # printed with the multiaddrs, read by another thread
    poll_until(lambda: any(line.startswith("ready:") for line in whole_server.output), 30)

    n = len(whole_server.maddrs)
    assert n >= 1 and whole_server.output[:n] == whole_server.maddrs   # scripts take the multiaddr lines
    assert whole_server.output[n] == f"ready: serving blocks 0:4 of {checkpoints['llama']}"


def test_sigterm_stops_the_server_and_its_daemon(whole_server):
    # runs last in this module: it stops the shared server
    children = _children(whole_server.proc.pid)

    rc = whole_server.stop()

    assert rc == 0 and children
    assert wait_until_dead(children, timeout_s=10) == []    # each gone (or a zombie) within 10 s
