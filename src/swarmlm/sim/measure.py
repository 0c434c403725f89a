"""`--measure MODEL_DIR`: this machine's costs, so a small scenario can be set beside a real run.

    m = measure(model_dir)              # Measured(...): medians of repeated timings
    scenario = apply_measured(scenario, m)

- `block_tokens_per_s`: a one-token decoding step through one block (the figure a server announces,
  `swarm.blocks.measure_throughput`, with more repeats), and the prompt's speed-up over it;
- `step_overhead_s`: what a server's step handler costs beyond that compute: the real
  `BlockHost` handler (`swarm.server.host`) on a one-block model, bytes in to bytes out (decoding,
  checks, the cache, encoding), minus the block's compute;
- `client_token_s`: the client's own work per token: embedding, final norm, head, arg-max;
- `control_rtt_s`: a control RPC (`swarm/info`) to that server over libp2p, as re-linking is;
  `open_s`: opening an inference session on it (`InferenceSession.create`);
- `rtt_s`: the round trip a one-token step costs on loopback beyond that work: one real
  `swarmlm serve MODEL_DIR --blocks 0:L` child on 127.0.0.1 and a `RemoteModel` client generating
  greedily here, the time per token after the first, less the blocks' compute, the handler's
  overhead and the client's work (what is left: two process wake-ups, the side channel's records,
  the client's event loop and its thread). `channel_rtt_s` is the bare side channel's round trip
  between two peers of one process, for comparison.
The only module of sim/ that opens a socket (through p2p/ and swarm/) or reads a clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from swarmlm.errors import UserError
from swarmlm.sim.scenario import Scenario, const

PURPOSE = "swarmlm-sim-measure/1"


@dataclass(frozen=True)
class Measured:
    n_layers: int
    hidden_bytes: int              # one token's hidden state (dim x 4 bytes, float32)
    block_tokens_per_s: float
    prefill_speedup: float
    step_overhead_s: float
    client_token_s: float
    rtt_s: float
    channel_rtt_s: float
    one_server_token_s: float      # the real one-server swarm's time per token, from which rtt_s comes
    control_rtt_s: float           # a control RPC's round trip over libp2p (link)
    open_s: float                  # opening a session on one server (the open RPC, its steps channel)
    cold_open_s: float             # the first session opened on a freshly started server
    warmup_s: float                # the extra time of a fresh server's first computation

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()                                            # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model_dir: str | os.PathLike, *, repeats: int = 60, prompt_tokens: int = 8) -> Measured:
    import torch

    from swarmlm.model.cache import KVCache
    from swarmlm.model.hf import load_model

    if not Path(model_dir).expanduser().is_dir():
        raise UserError(f"--measure: no model directory at {model_dir}")
    torch.set_num_threads(1)
    model, cfg = load_model(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    one = range(0, 1)
    with torch.inference_mode():
        cache = KVCache.empty(cfg, 1, repeats * 3 + 16, layers=one, dtype=torch.float32)
        h1 = torch.randn(1, 1, cfg.dim)
        hp = torch.randn(1, prompt_tokens, cfg.dim)
        decode_s = _median_time(lambda: model.run_blocks(h1, start=0, end=1, cache=cache), repeats)
        cache = KVCache.empty(cfg, 1, (repeats + 2) * prompt_tokens, layers=one, dtype=torch.float32)
        prefill_s = _median_time(lambda: model.run_blocks(hp, start=0, end=1, cache=cache), repeats)
        ids = torch.zeros(1, 1, dtype=torch.long)
        client_s = _median_time(lambda: _client_token(model, ids), repeats)
    block, _ = load_model(model_dir, dtype=torch.float32, layers=one, with_embed=False, with_head=False)
    handler_s = asyncio.run(_step_handler_time(block.requires_grad_(False), cfg, repeats))
    channel_rtt = asyncio.run(_side_channel_rtt(cfg.dim * 4 + 64, repeats))
    token_s, control_rtt, open_s, cold_open_s, warmup_s = one_server_token_s(model_dir, cfg.n_layers, n_tokens=repeats)
    overhead = max(0.0, handler_s - decode_s)
    rtt = max(channel_rtt, token_s - cfg.n_layers * decode_s - overhead - client_s)
    return Measured(n_layers=cfg.n_layers, hidden_bytes=cfg.dim * 4, block_tokens_per_s=1.0 / decode_s,
                    prefill_speedup=prompt_tokens * decode_s / prefill_s, step_overhead_s=overhead,
                    client_token_s=client_s, rtt_s=rtt, channel_rtt_s=channel_rtt, one_server_token_s=token_s,
                    control_rtt_s=control_rtt, open_s=open_s, cold_open_s=cold_open_s, warmup_s=warmup_s)


def one_server_token_s(model_dir: str | os.PathLike, n_layers: int, *,
                       n_tokens: int = 60, runs: int = 5) -> tuple[float, float, float, float, float]:
    """Through one real server holding every block (loopback), started here: seconds per greedy token
    after the first (the median of `runs` generations); the median round trip of a control RPC over libp2p (`swarm/info`); the median
    time to open an inference session on it (`InferenceSession.create`: the open RPC, the steps
    channel); the first session's opening (cold); the extra time of its first computation."""
    import tempfile

    from swarmlm.swarm.client.model import RemoteModel
    from swarmlm.swarm.server.serve import start_server_process

    with tempfile.TemporaryDirectory(prefix="swarmlm-measure-") as tmp:
        server = start_server_process(model_dir, blocks=(0, n_layers), data_dir=tmp,
                                      env={"OMP_NUM_THREADS": "1"}, timeout_s=180)
        try:
            with RemoteModel.connect(str(model_dir), initial_peers=server.maddrs[:1], connect_timeout_s=60) as remote:
                cold_open = remote.runner.run(_open_s(remote.blocks, n_layers, 0))    # the server's first session
                t0 = time.perf_counter()
                first = next(iter(remote.stream_generate([[1, 2, 3, 4]], max_new_tokens=1)))   # its first computation
                cold_first = time.perf_counter() - t0
                t0 = time.perf_counter()
                first = next(iter(remote.stream_generate([[1, 2, 3, 4]], max_new_tokens=1)))
                warm_first = time.perf_counter() - t0
                del first
                per_token = []
                for _ in range(runs):
                    stamps = [time.perf_counter() for _ in remote.stream_generate([[1, 2, 3, 4]],
                                                                                  max_new_tokens=n_tokens)]
                    per_token.append((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1))
                return (statistics.median(per_token), remote.runner.run(_control_rtt(remote.blocks, server.peer_id, 20)),
                        remote.runner.run(_open_s(remote.blocks, n_layers, 9)), cold_open,
                        max(0.0, cold_first - warm_first))
        finally:
            server.kill()


async def _open_s(blocks: Any, n_layers: int, repeats: int) -> float:
    from swarmlm.swarm.client.session import InferenceSession

    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        session = await InferenceSession.create(blocks, 0, n_layers, batch=1, max_length=64)
        if i or not repeats:                # repeats 0: the first (cold) one is the measurement
            times.append(time.perf_counter() - t0)
        await session.close()
    return statistics.median(times)


async def _control_rtt(blocks: Any, peer_id: str, repeats: int) -> float:
    from swarmlm.swarm import wire

    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        await blocks.call(peer_id, wire.RPC_INFO, wire.InfoRequest(), wire.InfoReply, timeout_s=10.0)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _client_token(model: Any, ids: Any) -> int:
    return int(model.head(model.embed(ids))[0, -1].argmax())


async def _step_handler_time(model: Any, cfg: Any, repeats: int) -> float:
    """The real server's step handler on one block, bytes to bytes, one token at a time (median)."""
    import torch

    from swarmlm import serialize
    from swarmlm.swarm import wire
    from swarmlm.swarm.server.host import BlockHost

    host = BlockHost(model, model_id="sim-measure")
    try:
        sid = os.urandom(wire.SESSION_ID_BYTES)
        await host.rpc_open("client", wire.OpenRequest(session_id=sid, start=0, end=1, batch=1,
                                                       max_length=repeats + 8))
        handle = _handler(host)
        times = []
        for pos in range(repeats + 1):
            req = serialize.encode_message(wire.StepRequest(session_id=sid, start=0, end=1, position=pos,
                                                            hidden=torch.randn(1, 1, cfg.dim)))
            t0 = time.perf_counter()
            await handle("client", req)
            if pos:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        host.close()


def _handler(host: Any) -> Callable:
    from swarmlm.p2p.rpc import message_handler
    from swarmlm.swarm import wire
    return message_handler(wire.StepRequest, host.rpc_step, max_request_bytes=host.max_request_bytes())


async def _side_channel_rtt(record_bytes: int, repeats: int) -> float:
    """Median round trip of a `record_bytes` record over two peers' side channel on 127.0.0.1."""
    from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer

    net = MemoryNetwork()
    a, b = await MemoryPeer.create(net), await MemoryPeer.create(net)
    try:
        async def echo(conn: Any) -> None:
            try:
                while True:
                    conn.write(await conn.read_record())
            except Exception:            # the other end closed
                return

        await (await a.side_channel()).serve(PURPOSE, echo, max_record_bytes=record_bytes + 1024)
        conn = await (await b.side_channel()).open(a.peer_id, PURPOSE, timeout_s=10.0,
                                                   max_record_bytes=record_bytes + 1024)
        payload = os.urandom(record_bytes)
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            conn.write(payload)
            await conn.read_record()
            if i:
                times.append(time.perf_counter() - t0)
        conn.close()
        return statistics.median(times)
    finally:
        await b.shutdown()
        await a.shutdown()


def apply_measured(scenario: Scenario, m: Measured) -> Scenario:
    """`scenario` with this machine's measured costs in place of its own (model size, speeds, RTT), every
    peer on this one machine (`network.shared_host`)."""
    return dataclasses.replace(
        scenario,
        model=dataclasses.replace(scenario.model, n_layers=m.n_layers, hidden_bytes=m.hidden_bytes),
        network=dataclasses.replace(scenario.network, rtt_s=const(m.rtt_s), step_overhead_s=m.step_overhead_s,
                                    shared_host=True),
        servers=dataclasses.replace(scenario.servers, block_tokens_per_s=const(m.block_tokens_per_s),
                                    prefill_speedup=m.prefill_speedup, cold_open_s=m.cold_open_s,
                                    warmup_s=m.warmup_s),
        clients=dataclasses.replace(scenario.clients, token_overhead_s=m.client_token_s, control_rtt_s=m.control_rtt_s,
                                    open_s=m.open_s))
