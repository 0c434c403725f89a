"""Running a block server from start to clean exit, and starting one as a child process.

`run_server(ServeOptions(...), stop=event)`: join the swarm, resolve MODEL (directory or
manifest CID), choose the span (`--blocks A:B`, or `--num-blocks N` through selection.py),
load only those blocks (quantized at load with `--quantize`, one block at a time; with
`--max-memory`, memory.py first plans how many blocks and how much cache fit), measure
throughput (for a directory and `--blocks`, on a worker thread while the peer starts), register the `BlockHost`'s handlers, announce "online" and
report the peer's multiaddrs; then keep re-announcing, sweeping idle sessions
and (with `--num-blocks`) moving when the swarm would be better balanced, until `stop` is
set; then announce "offline" and shut the peer down (its p2pd dies with it).

`serve_from_args` is the `swarmlm serve` command: SIGTERM and SIGINT set `stop`, and the
multiaddrs are printed one per line, flushed, once announced. `start_server_process` starts
that command as a child (`ServerProcess`) and waits for its multiaddrs: the function tests,
benchmarks and the demo use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from swarmlm import heap
from swarmlm.errors import UserError
from swarmlm.log import get_logger
from swarmlm.model import qkernels
from swarmlm.model.quant import NONE as NO_QUANT
from swarmlm.model.quant import block_weight_bytes, check_quantizable, parse_scheme, quantize_model
from swarmlm.model.transformer import Transformer
from swarmlm.p2p.process import PeerProcess, start_child
from swarmlm.swarm.blocks import measure_throughput
from swarmlm.swarm.dht import read_servers
from swarmlm.swarm.server.announce import Announcer
from swarmlm.swarm.server.budget import BudgetLimits
from swarmlm.swarm.server.host import BlockHost
from swarmlm.swarm.server.memory import format_size, parse_size, plan_memory
from swarmlm.swarm.server.selection import block_throughputs, choose_span, should_move
from swarmlm.swarm.source import ModelSource, directory_model_id, open_model_source

logger = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ServeOptions:
    model: str                              # checkpoint directory or manifest CID
    blocks: tuple[int, int] | None = None   # fixed span [start, end), or None with num_blocks
    num_blocks: int | None = None           # choose (and move) a span of this many blocks
    initial_peers: tuple[str, ...] = ()     # multiaddrs to join through; none starts a new swarm
    host: str = "127.0.0.1"                 # interface p2pd listens on
    port: int = 0                           # 0 picks a free port
    data_dir: str | None = None             # identity and fetched blocks (default $SWARMLM_HOME)
    dtype: str = "float32"                  # compute dtype
    limits: BudgetLimits = field(default_factory=BudgetLimits)
    announce_ttl_s: float = 30.0            # DHT record lifetime; re-announced every third of it
    rebalance_period_s: float = 30.0        # how often a --num-blocks server reconsiders its span
    join_delay_s: float = 0.0               # a --num-blocks server waits this long (times a random 0..1)
                                            # before choosing, so servers started together spread out
    startup_timeout_s: float = 60.0         # p2pd start-up
    direct: bool = True                     # serve steps and pushes over the peer's side channel (p2p/channel/),
                                            # listening on its --host
    admit: Any = None                       # BlockHost's admission hook (host.Admit), e.g. the ledger's; None: all
    background: Any = None                  # an async callable run beside the server (the admit hook's refresh)
    settle_heap: bool = False               # the process is the server's own (`swarmlm serve`): heap.settle() after a move
    quantization: str = "none"              # weight quantization applied at load (model/quant.py), announced
    max_memory: int | None = None           # bytes the process may use: caps the span and the cache (memory.py)

    def check(self) -> None:
        if self.blocks is not None and self.num_blocks is not None or (
                self.blocks is None and self.num_blocks is None and self.max_memory is None):
            raise UserError("give exactly one of --blocks START:END and --num-blocks N (or --max-memory alone)")
        if self.blocks is not None and not 0 <= self.blocks[0] < self.blocks[1]:
            raise UserError(f"--blocks {self.blocks[0]}:{self.blocks[1]} is not a span START < END")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise UserError(f"--num-blocks must be positive, got {self.num_blocks}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
        parse_scheme(self.quantization)


def parse_blocks(text: str) -> tuple[int, int]:
    """"4:8" -> (4, 8)."""
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise UserError(f"--blocks must look like START:END, got {text!r}") from None


async def run_server(opts: ServeOptions, *, stop: asyncio.Event, on_ready: Callable[[list[str]], None] = lambda m: None,
                     peer: Any = None, rng: random.Random | None = None) -> None:
    """Serve until `stop` is set (see the module docstring). `peer` is created unless given (tests)."""
    opts.check()
    rng = rng or random.Random()
    own_peer = peer is None
    # a fixed span of a local directory needs nothing from the swarm: hash, load and measure it on
    # a worker thread while this one imports hivemind and starts the daemon (start-up time)
    early = None
    qkernels.prepare()      # before any thread: see its docstring
    if opts.blocks is not None and opts.max_memory is None and Path(opts.model).expanduser().is_dir():
        early = asyncio.get_running_loop().run_in_executor(None, _load_local_span, opts)
    if own_peer:
        try:
            from swarmlm.p2p.peer import Peer
            peer = await Peer.create(initial_peers=opts.initial_peers, host=opts.host, port=opts.port,
                                     data_dir=opts.data_dir, startup_timeout_s=opts.startup_timeout_s)
        except BaseException:
            if early is not None:
                await asyncio.gather(early, return_exceptions=True)
            raise
    host = announcer = None
    try:
        if early is not None:
            source, model, tps = await early
        else:
            # a fixed span is fetched at once; for --num-blocks, first only the config (no blocks)
            source = await open_model_source(opts.model, peer=peer, data_dir=opts.data_dir,
                                             blocks=range(*opts.blocks) if opts.blocks else range(0, 0),
                                             with_embed_head=False)
            cfg = source.config()
            if opts.max_memory is not None:
                opts = fit_memory(opts, cfg)
            span = await _first_span(opts, peer, source.model_id, cfg.n_layers, rng)
            if opts.num_blocks is not None:
                source = await _source_for(source, opts, peer, span)
            model, tps = await _load(source, span, opts.dtype, opts.quantization)
            if opts.max_memory is not None:
                opts = recap_cache(opts, cfg, len(span))
        if not source.model_id.startswith("dir-"):
            await _serve_store(peer, opts.data_dir)
        host = BlockHost(model, model_id=source.model_id, limits=opts.limits, block_tokens_per_s=tps,
                         admit=opts.admit)
        await host.register(peer, side=await peer.side_channel() if opts.direct else None)
        announcer = Announcer(peer, host.record, ttl_s=opts.announce_ttl_s, n_layers=host.cfg.n_layers)
        host.on_change = announcer.poke
        host.state = "online"
        await announcer.announce()
        logger.info("serving blocks %d:%d of %s at %.0f tokens/s per block", host.start, host.end,
                    source.model_id, tps)
        on_ready(peer.maddrs)
        tasks = [asyncio.create_task(announcer.run_forever()), asyncio.create_task(host.sweep_forever())]
        if opts.background is not None:
            tasks.append(asyncio.create_task(opts.background()))
        if opts.num_blocks is not None:
            tasks.append(asyncio.create_task(_rebalance_forever(opts, peer, source, host, announcer, rng)))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if host is not None and announcer is not None:
            host.state = "offline"
            await asyncio.wait_for(announcer.announce_offline(host.start, host.end), 10.0)
        if host is not None:
            host.close()
        if own_peer:
            await peer.shutdown()


async def _serve_store(peer: Any, data_dir: str | None) -> None:
    """Serve the blocks fetched into our store to others fetching the same model (verified by them)."""
    from swarmlm.store.dag import open_store
    from swarmlm.store.exchange import BlockService
    await BlockService(peer, open_store(data_dir)).start()


async def _first_span(opts: ServeOptions, peer: Any, model_id: str, n_layers: int, rng: random.Random) -> range:
    if opts.blocks is not None:
        return _fixed_span(opts, n_layers)
    if opts.num_blocks > n_layers:
        raise UserError(f"--num-blocks {opts.num_blocks} is more than the model's {n_layers} blocks")
    if opts.join_delay_s > 0:
        await asyncio.sleep(opts.join_delay_s * rng.random())
    return choose_span(await _swarm_throughputs(peer, model_id, n_layers, exclude=peer.peer_id), opts.num_blocks)


def _fixed_span(opts: ServeOptions, n_layers: int) -> range:
    if opts.blocks[1] > n_layers:
        raise UserError(f"--blocks {opts.blocks[0]}:{opts.blocks[1]} is beyond the model's {n_layers} blocks")
    return range(*opts.blocks)


def _load_local_span(opts: ServeOptions) -> tuple[ModelSource, Any, float]:
    """MODEL a directory, --blocks fixed: its source, its loaded span and the span's throughput (blocking)."""
    directory = Path(opts.model).expanduser()
    source = ModelSource(directory_model_id(directory), directory)
    span = _fixed_span(opts, source.config().n_layers)
    return (source, *_load_span(source, span, opts.dtype, opts.quantization))


async def _swarm_throughputs(peer: Any, model_id: str, n_layers: int, *, exclude: str | None = None) -> list[float]:
    records = await read_servers(peer, model_id, n_layers)
    return block_throughputs([(r.start, r.end, r.block_tokens_per_s) for pid, r in records.items()
                              if pid != exclude and r.state in ("joining", "online")], n_layers)


async def _load(source: ModelSource, span: range, dtype: str, quantization: str) -> tuple[Any, float]:
    return await asyncio.get_running_loop().run_in_executor(None, _load_span, source, span, dtype, quantization)


def _load_span(source: ModelSource, span: range, dtype: str, quantization: str = "none") -> tuple[Any, float]:
    scheme = parse_scheme(quantization)
    cfg = source.config()
    check_quantizable(cfg, scheme)
    if scheme.bits == 0:
        model, _ = source.load(dtype=DTYPES[dtype], layers=span, with_embed=False, with_head=False)
    else:   # one block at a time, quantized before the next is read: only one float block is ever held
        with torch.device("meta"):
            model = Transformer(cfg, layers=span, with_embed=False, with_head=False)
        for i in span:
            part, _ = source.load(dtype=DTYPES[dtype], layers=range(i, i + 1), with_embed=False, with_head=False)
            block = quantize_model(part, scheme).layers[str(i)]
            for t in block.parameters():        # own copies of the float leftovers (norms, biases): a view
                t.data = t.data.clone()         # into the checkpoint's mapped file would keep all of it resident
            model.layers[str(i)] = block
        model.quantization = scheme.name
    model.eval().requires_grad_(False)
    return model, measure_throughput(model)


def fit_memory(opts: ServeOptions, cfg: Any) -> ServeOptions:
    """`opts` with the span length and the limits that fit `opts.max_memory` (memory.py), given what
    this process holds now; UserError when not even one block fits, or a fixed --blocks span does not."""
    scheme = parse_scheme(opts.quantization)
    item = torch.empty((), dtype=DTYPES[opts.dtype]).element_size()
    fixed = None if opts.blocks is None else opts.blocks[1] - opts.blocks[0]
    plan = plan_memory(opts.max_memory, overhead_bytes=resident_bytes() + PROCESS_RESERVE_BYTES,
                       block_bytes=block_weight_bytes(cfg, scheme, item),
                       load_bytes=2 * block_weight_bytes(cfg, NO_QUANT, 4),
                       kv_bytes_per_token=2 * cfg.n_kv_heads * cfg.dh * item,
                       scratch_bytes_per_token=(8 * cfg.dim + 4 * cfg.ffn_dim) * 4,
                       attn_bytes_per_token_pair=cfg.n_heads * 4, n_layers=cfg.n_layers,
                       want_blocks=fixed or opts.num_blocks, limits=opts.limits)
    if fixed is not None and plan.n_blocks < fixed:
        raise UserError(f"--blocks {opts.blocks[0]}:{opts.blocks[1]} does not fit in --max-memory "
                        f"{format_size(opts.max_memory)}: {plan.n_blocks} blocks do")
    logger.info("--max-memory %s: %d blocks (%s of weights), %d cache tokens (%s)", format_size(opts.max_memory),
                plan.n_blocks, format_size(plan.weights_bytes), plan.limits.max_cache_tokens,
                format_size(plan.cache_bytes))
    return dataclasses.replace(opts, num_blocks=None if fixed else plan.n_blocks, limits=plan.limits)


def recap_cache(opts: ServeOptions, cfg: Any, n_blocks: int) -> ServeOptions:
    """Once the span is loaded, size the cache from what the process really holds now (the plan
    counted estimates): every byte left under the bound, less the working memory and the reserve,
    goes to cached tokens, never more than planned. UserError if fewer than the minimum remain."""
    release_free_memory()
    item = torch.empty((), dtype=DTYPES[opts.dtype]).element_size()
    kv = 2 * cfg.n_kv_heads * cfg.dh * item * n_blocks
    plan = plan_memory(opts.max_memory, overhead_bytes=resident_bytes() + PROCESS_RESERVE_BYTES, block_bytes=0,
                       load_bytes=0, kv_bytes_per_token=kv, scratch_bytes_per_token=(8 * cfg.dim + 4 * cfg.ffn_dim) * 4,
                       attn_bytes_per_token_pair=cfg.n_heads * 4, n_layers=1, want_blocks=1, limits=opts.limits)
    logger.info("--max-memory %s: %d cache tokens once loaded (%s resident)", format_size(opts.max_memory),
                plan.limits.max_cache_tokens, format_size(resident_bytes()))
    return dataclasses.replace(opts, limits=plan.limits)


def release_free_memory() -> None:
    """Hand freed heap pages back to the system (glibc keeps them after a load's temporaries are freed)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


PROCESS_RESERVE_BYTES = 64 << 20    # what the process grows by after planning (buffers, sessions' bookkeeping)


def resident_bytes() -> int:
    """This process's resident set now (Linux /proc; 0 where it cannot be read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def _rebalance_forever(opts: ServeOptions, peer: Any, source: ModelSource, host: BlockHost,
                             announcer: Announcer, rng: random.Random) -> None:
    """Every period (jittered, so servers do not all move at once), move if the swarm would gain."""
    n_layers = host.cfg.n_layers
    while True:
        await asyncio.sleep(opts.rebalance_period_s * (0.5 + rng.random()))
        others = await _swarm_throughputs(peer, source.model_id, n_layers, exclude=peer.peer_id)
        current = range(host.start, host.end)
        mine = [t + (host.block_tokens_per_s if i in current else 0.0) for i, t in enumerate(others)]
        target = should_move(mine, current, host.block_tokens_per_s)
        if target is None:
            continue
        logger.info("moving from blocks %d:%d to %d:%d", current.start, current.stop, target.start, target.stop)
        source = await _source_for(source, opts, peer, target)
        host.state = "joining"
        await announcer.announce_offline(current.start, current.stop)
        model, tps = await _load(source, target, opts.dtype, opts.quantization)
        host.swap(model, tps)
        if opts.settle_heap:
            heap.settle()            # the new span's objects, as after start-up
        host.state = "online"
        await announcer.announce()


async def _source_for(source: ModelSource, opts: ServeOptions, peer: Any, span: range) -> ModelSource:
    """A source holding `span`'s blocks: a directory holds all; a manifest CID fetches them, verified."""
    if source.model_id.startswith("dir-"):
        return source
    return await open_model_source(opts.model, peer=peer, data_dir=opts.data_dir, blocks=span, with_embed_head=False)


# ---- the command ---------------------------------------------------------------------------------

def options_from_args(args: Any) -> ServeOptions:
    try:
        limits = BudgetLimits(max_sessions=args.max_sessions, max_cache_tokens=args.max_cache_tokens,
                              max_session_tokens=min(args.max_cache_tokens, BudgetLimits().max_session_tokens))
    except ValueError as e:
        raise UserError(str(e)) from None
    return ServeOptions(model=args.model, blocks=parse_blocks(args.blocks) if args.blocks else None,
                        num_blocks=args.num_blocks, initial_peers=tuple(args.initial_peers or ()), host=args.host,
                        port=args.port, data_dir=args.data_dir, dtype=args.dtype, limits=limits,
                        announce_ttl_s=args.announce_ttl, rebalance_period_s=args.rebalance_period,
                        join_delay_s=args.join_delay, direct=args.direct,
                        quantization=parse_scheme(getattr(args, "quantize", None)).name,
                        max_memory=parse_size(args.max_memory) if getattr(args, "max_memory", None) else None)


def serve_from_args(args: Any, *, admit: Any = None, background: Any = None) -> int:
    """`swarmlm serve`: run until SIGTERM/SIGINT, printing the multiaddrs once announced. `admit` and
    `background`: ServeOptions' (cli.py passes the ledger's)."""
    import dataclasses
    opts = dataclasses.replace(options_from_args(args), admit=admit, background=background, settle_heap=True)
    opts.check()

    def ready(maddrs: list[str]) -> None:
        heap.settle()                # start-up is over: full collections walk only what comes next
        for m in maddrs:
            print(m)
        span = (f"blocks {opts.blocks[0]}:{opts.blocks[1]}" if opts.blocks else f"{opts.num_blocks} blocks (where needed)"
                if opts.num_blocks else "as many blocks as fit in --max-memory (where needed)")
        print(f"ready: serving {span} of {opts.model}")
        sys.stdout.flush()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_server(opts, stop=stop, on_ready=ready)

    from swarmlm.p2p.loop import run
    run(main())               # asyncio's loop, or uvloop if SWARMLM_EVENT_LOOP says so (p2p/loop.py)
    return 0


# ---- a server as a child process ---------------------------------------------------------------------

ServerProcess = PeerProcess     # a `swarmlm serve` child: maddrs, peer_id, stop() (SIGTERM), kill() (SIGKILL)


def start_server_process(model: str, *, blocks: tuple[int, int] | None = None, num_blocks: int | None = None,
                         initial_peers: Sequence[str] = (), data_dir: str | os.PathLike, extra_args: Sequence[str] = (),
                         env: dict[str, str] | None = None, wait: bool = True,
                         timeout_s: float = 120.0) -> ServerProcess:
    """Start `python -m swarmlm serve MODEL ...` on 127.0.0.1 and (by default) wait until it announced.

    Its stderr goes to `<data_dir>/serve.log`. The caller stops it (`stop()`/`kill()`).
    """
    data_dir = Path(data_dir)
    command = [sys.executable, "-m", "swarmlm", "serve", str(model), "--host", "127.0.0.1", "--data-dir", str(data_dir)]
    if blocks is not None:
        command += ["--blocks", f"{blocks[0]}:{blocks[1]}"]
    if num_blocks is not None:
        command += ["--num-blocks", str(num_blocks)]
    if initial_peers:
        command += ["--initial-peers", *initial_peers]
    command += list(extra_args)
    return start_child(command, log_path=data_dir / "serve.log", env=env, wait=wait, timeout_s=timeout_s)
