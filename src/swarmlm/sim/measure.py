"""`--measure MODEL_DIR`: this machine's costs, so a small scenario can be set beside a real run.

    m = measure(model_dir)              # Measured(...): medians over rounds of repeated timings
    scenario = apply_measured(scenario, m)
    measure(model_dir, rounds=5, between=lambda r, m_r: ...)   # a real run after each round, with its own m_r

Every quantity is timed in each of `rounds` rounds (the cheap ones `repeats` times, a generation's
time per token as the median of three), and the medians over rounds are kept, so a burst of load on
a shared machine counts once. What a freshly started server pays once (its first session, its
first replay, its first computation) is taken as the measurement's own server starts.

- `block_tokens_per_s`: a one-token decoding step through the model's blocks as a server takes it
  (`swarm.blocks.run_span`), per block (the figure a server announces, `measure_throughput`, with more
  repeats), and the prompt's speed-up over it;
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
  between two peers of one process, for comparison;
- `replay_factor`: a failover's replay (a prompt and 40 one-token steps, replayed into a new session
  as `HopClient.replay` does: one request, each step its own chunk) over the decoding compute of the
  same steps; `cold_replay_factor` the same into the freshly started server; `cold_open_s` and
  `warmup_s` that server's first session and the extra time of its first generation.
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
TOKENS = 32                  # tokens of each generation timed (three per round, the median)


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
    replay_s: float = 0.0          # replaying a prompt and `replay_steps` one-token steps into a fresh session
    replay_steps: int = 0
    replay_factor: float = 1.0     # from it: a replayed step's compute over a decoding step's
    cold_replay_s: float = 0.0     # the same replay as a freshly started server's first work
    cold_replay_factor: float = 1.0
    rounds: int = 1                # rounds the medians are over

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


def measure(model_dir: str | os.PathLike, *, rounds: int = 3, repeats: int = 30, prompt_tokens: int = 8,
            replay_steps: int = 40, between: Callable[[int, Measured], Any] | None = None) -> Measured:
    """This machine's costs: `rounds` rounds, each timing every quantity (`repeats` times where it is cheap),
    medians over the rounds. `between(r, m)` runs after round r with that round's own measurement: a check
    against reality runs its real swarm there, so that what loads the machine weighs on both sides alike."""
    import torch

    from swarmlm.model.hf import load_model

    if not Path(model_dir).expanduser().is_dir():
        raise UserError(f"--measure: no model directory at {model_dir}")
    if rounds < 1 or repeats < 1:
        raise UserError("--measure: rounds and repeats must be at least 1")
    torch.set_num_threads(1)
    model, cfg = load_model(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    block, _ = load_model(model_dir, dtype=torch.float32, layers=range(0, 1), with_embed=False, with_head=False)
    block.requires_grad_(False)
    channel_rtt = asyncio.run(_side_channel_rtt(cfg.dim * 4 + 64, repeats))
    samples: dict[str, list[float]] = {}
    with OneServer(model_dir, cfg.n_layers, dim=cfg.dim, prompt_tokens=prompt_tokens,
                   replay_steps=replay_steps) as server:
        cold = {"cold_open_s": server.cold_open_s, "cold_replay_s": server.cold_replay_s, "warmup_s": server.warmup_s}
        for r in range(rounds):
            got = _compute_times(model, block, cfg, repeats, prompt_tokens)
            got.update(server.times(n_tokens=TOKENS))
            for k, v in got.items():
                samples.setdefault(k, []).append(v)
            if between is not None:
                between(r, _derive(got, cold, channel_rtt, cfg, prompt_tokens, replay_steps, 1))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return _derive(med, cold, channel_rtt, cfg, prompt_tokens, replay_steps, rounds)


def _derive(t: dict[str, float], cold: dict[str, float], channel_rtt: float, cfg: Any, prompt_tokens: int,
            replay_steps: int, rounds: int) -> Measured:
    """The model's parameters from timings `t` (one round's, or medians over rounds) and the fresh server's."""
    decode_s, n = t["decode_s"], cfg.n_layers
    speedup = prompt_tokens * decode_s / t["prefill_s"]
    overhead = max(0.0, t["handler_s"] - decode_s)
    rtt = max(channel_rtt, t["token_s"] - n * decode_s - overhead - t["client_s"])
    # a replay of a prompt and `replay_steps` one-token steps as one request: its round trip and the server's step
    # overhead, then every chunk's compute; its cost over the same steps' decoding compute is the replay's factor
    decoding = n * decode_s * (prompt_tokens / speedup + replay_steps)
    factor = lambda replay_s: max(1.0, (replay_s - rtt - overhead) / decoding)      # noqa: E731
    return Measured(n_layers=n, hidden_bytes=cfg.dim * 4, block_tokens_per_s=1.0 / decode_s,
                    prefill_speedup=speedup, step_overhead_s=overhead, client_token_s=t["client_s"], rtt_s=rtt,
                    channel_rtt_s=channel_rtt, one_server_token_s=t["token_s"], control_rtt_s=t["control_s"],
                    open_s=t["open_s"], cold_open_s=cold["cold_open_s"], warmup_s=cold["warmup_s"],
                    replay_s=t["replay_s"], replay_steps=replay_steps, replay_factor=factor(t["replay_s"]),
                    cold_replay_s=cold["cold_replay_s"], cold_replay_factor=factor(cold["cold_replay_s"]),
                    rounds=rounds)


def _compute_times(model: Any, block: Any, cfg: Any, repeats: int, prompt_tokens: int) -> dict[str, float]:
    """In this process: a one-token step per block (through the whole span, as a server runs it), a prompt's
    through one block, the client's work per token, the real step handler on one block (bytes to bytes)."""
    import torch

    from swarmlm.model.cache import KVCache

    from swarmlm.swarm.blocks import run_span

    one, n = range(0, 1), cfg.n_layers
    with torch.inference_mode():
        # a decoding step as a server takes it for its span (run_span: the lean step, one call for every
        # block where the compiled step applies), per block: one block alone would count the call's own
        # cost once per block
        cache = KVCache.empty(cfg, 1, repeats * 3 + 16, layers=range(n), dtype=torch.float32)
        h1 = torch.randn(1, 1, cfg.dim)
        hp = torch.randn(1, prompt_tokens, cfg.dim)
        decode_s = _median_time(lambda: run_span(model, h1, 0, n, cache=cache), repeats) / n
        cache = KVCache.empty(cfg, 1, (repeats + 2) * prompt_tokens, layers=one, dtype=torch.float32)
        prefill_s = _median_time(lambda: model.run_blocks(hp, start=0, end=1, cache=cache), repeats)
        ids = torch.zeros(1, 1, dtype=torch.long)
        client_s = _median_time(lambda: _client_token(model, ids), repeats)
    handler_s = asyncio.run(_step_handler_time(block, cfg, repeats))
    return {"decode_s": decode_s, "prefill_s": prefill_s, "client_s": client_s, "handler_s": handler_s}


def time_per_token(remote: Any, n_tokens: int, prompt: list[int] | None = None, *, runs: int = 1) -> float:
    """Seconds per greedy token after the first through `remote` (a RemoteModel): the median over `runs`
    generations of `n_tokens` (a generation that a burst of load on the machine slowed counts once)."""
    times = []
    for _ in range(runs):
        stamps = [time.perf_counter() for _ in remote.stream_generate([prompt or [1, 2, 3, 4, 5, 6, 7, 8]],
                                                                      max_new_tokens=n_tokens)]
        times.append((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1))
    return statistics.median(times)


def patient_client() -> Any:
    """Client options that wait up to a minute for a server to show in the DHT again, and for a session
    to open: on a loaded machine a DHT read (or a server's re-announcement) can be late for a while, and
    an open's reply over libp2p was seen to take over the default 10 s; with one server, a client that
    gave up on it would have none left, and a measurement should not fail then."""
    from swarmlm.swarm.client.remote import ClientOptions
    from swarmlm.swarm.client.session import SessionOptions

    return ClientOptions(session=SessionOptions(replacement_wait_s=60.0, open_timeout_s=60.0))


class OneServer:
    """One real server holding every block (loopback), started here, and a client of it: the first session
    opened on it (`cold_open_s`) and the extra time of its first computation (`warmup_s`) are taken as it
    starts; `times()` takes the rest, once per round."""

    def __init__(self, model_dir: str | os.PathLike, n_layers: int, *, dim: int, prompt_tokens: int,
                 replay_steps: int):
        self.model_dir, self.n_layers = model_dir, n_layers
        self.dim, self.prompt_tokens, self.replay_steps = dim, prompt_tokens, replay_steps

    def __enter__(self) -> "OneServer":
        import tempfile

        from swarmlm.swarm.client.model import RemoteModel
        from swarmlm.swarm.server.serve import start_server_process

        dim, prompt_tokens, replay_steps = self.dim, self.prompt_tokens, self.replay_steps
        self._tmp = tempfile.TemporaryDirectory(prefix="swarmlm-measure-")
        self.server = start_server_process(self.model_dir, blocks=(0, self.n_layers), data_dir=self._tmp.name,
                                           env={"OMP_NUM_THREADS": "1"}, timeout_s=180)
        try:
            self.remote = RemoteModel.connect(str(self.model_dir), initial_peers=self.server.maddrs[:1],
                                              connect_timeout_s=60, options=patient_client())
            run = self.remote.runner.run
            # a fresh server as a failover's replacement is: its first session, a history replayed into it
            self.cold_open_s, self.cold_replay_s = run(_cold_replay_s(self.remote.blocks, self.n_layers,
                                                                      prompt_tokens, replay_steps, dim))
            run(self.remote.blocks.wait_ready(60.0))    # on a loaded machine a DHT read may take a while
            t0 = time.perf_counter()
            next(iter(self.remote.stream_generate([[1, 2, 3, 4]], max_new_tokens=1)))     # its first generation
            cold_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            next(iter(self.remote.stream_generate([[1, 2, 3, 4]], max_new_tokens=1)))
            self.warmup_s = max(0.0, cold_first - (time.perf_counter() - t0))
            time_per_token(self.remote, 16, runs=5)     # the first generations of a fresh process are slower
        except BaseException:
            self.__exit__()
            raise
        return self

    def times(self, *, n_tokens: int) -> dict[str, float]:
        run = self.remote.runner.run
        return {"token_s": time_per_token(self.remote, n_tokens, runs=3),
                "control_s": run(_control_rtt(self.remote.blocks, self.server.peer_id, 10)),
                "open_s": run(_open_s(self.remote.blocks, self.n_layers, 5)),
                "replay_s": run(_replay_s(self.remote.blocks, self.n_layers, self.prompt_tokens, self.replay_steps,
                                          self.dim, 3))}

    def __exit__(self, *exc: Any) -> None:
        remote = getattr(self, "remote", None)
        if remote is not None:
            remote.close()
        self.server.kill()
        self._tmp.cleanup()


async def _cold_replay_s(blocks: Any, n_layers: int, prompt_tokens: int, steps: int,
                         dim: int) -> tuple[float, float]:
    """On a freshly started server: opening its first session; then a recorded history (a prompt, `steps`
    one-token steps: random inputs) replayed into it as its first computation. (seconds, seconds)"""
    import torch

    from swarmlm.swarm.client.session import InferenceSession

    t0 = time.perf_counter()
    session = await InferenceSession.create(blocks, 0, n_layers, batch=1, max_length=prompt_tokens + steps + 8,
                                            options=patient_client().session)
    opened = time.perf_counter() - t0
    try:
        inputs = [torch.randn(1, prompt_tokens, dim)] + [torch.randn(1, 1, dim) for _ in range(steps)]
        t0 = time.perf_counter()
        await session.calls.replay(session.hops, inputs, [None] * len(inputs))
        return opened, time.perf_counter() - t0
    finally:
        await session.close()


async def _replay_s(blocks: Any, n_layers: int, prompt_tokens: int, steps: int, dim: int, repeats: int) -> float:
    """A session's history (a prompt, then `steps` one-token steps) replayed into a fresh session on the same
    server, as a failover replays it (`HopClient.replay`): the median time."""
    import torch

    from swarmlm.swarm.client.session import InferenceSession

    session = await InferenceSession.create(blocks, 0, n_layers, batch=1, max_length=prompt_tokens + steps + 8,
                                            options=patient_client().session)
    try:
        await session.step(torch.randn(1, prompt_tokens, dim))
        for _ in range(steps):
            await session.step(torch.randn(1, 1, dim))
        held = session.hops[0]
        times = []
        for _ in range(repeats):
            fresh = await session.calls.open(held.hop)
            t0 = time.perf_counter()
            await session.calls.replay([fresh], held.inputs, held.masks)
            times.append(time.perf_counter() - t0)
            await session.calls.close(fresh)
        return statistics.median(times)
    finally:
        await session.close()


async def _open_s(blocks: Any, n_layers: int, repeats: int) -> float:
    from swarmlm.swarm.client.session import InferenceSession

    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        session = await InferenceSession.create(blocks, 0, n_layers, batch=1, max_length=64,
                                                    options=patient_client().session)
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
                                    warmup_s=m.warmup_s, replay_factor=m.replay_factor,
                                    cold_replay_factor=m.cold_replay_factor),
        clients=dataclasses.replace(scenario.clients, token_overhead_s=m.client_token_s, control_rtt_s=m.control_rtt_s,
                                    open_s=m.open_s))
