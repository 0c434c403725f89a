"""Block servers for the swarm tests: tiny checkpoints, in-process swarms, and server processes.

- `build_checkpoint(dir, family)`: a tiny random transformers model (GPT-2 or Llama, 4 blocks)
  saved with `save_pretrained`, plus a small BPE tokenizer for the CLI tests.
- `InProcessSwarm`: a `MemoryNetwork` on a background event loop; `add_server(model, blocks)`
  runs the real `run_server` on a `MemoryPeer`, `kill(peer_id)` makes one vanish mid-call,
  `remote_model(model)` gives a `RemoteModel` on its own `MemoryPeer`. `close()` stops all.
- `ServerProcesses`: `swarmlm serve` subprocesses on 127.0.0.1 (through
  `swarm.server.serve.start_server_process`), stopped or killed in `close()`.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from swarmlm.model.hf import load_model
from swarmlm.model.quant import parse_scheme, quantize_model
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
from swarmlm.swarm.client.model import LoopThread, RemoteModel
from swarmlm.swarm.client.remote import ClientOptions, RemoteBlocks
from swarmlm.swarm.client.session import SessionOptions
from swarmlm.swarm.server.budget import BudgetLimits
from swarmlm.swarm.server.serve import ServeOptions, ServerProcess, run_server, start_server_process
from swarmlm.swarm.source import open_model_source

VOCAB = 320
N_LAYERS = 4
FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=N_LAYERS, n_head=4, n_positions=128,
                                     bos_token_id=None, eos_token_id=None, initializer_range=0.3)),
    "llama": ("LlamaForCausalLM", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                                       pad_token_id=None, initializer_range=0.3)),
}
TEXT = ("the quick brown fox jumps over the lazy dog. " * 8 + "a swarm of small machines runs one large model. " * 8)


def build_checkpoint(directory: Path, family: str = "llama", *, seed: int = 0, tokenizer: bool = True) -> Path:
    """A tiny random transformers checkpoint of `family` in `directory` (4 blocks, vocab 320)."""
    import transformers

    arch, kwargs = FAMILIES[family]
    cls = getattr(transformers, arch)
    torch.manual_seed(seed)
    model = cls(cls.config_class(**kwargs)).eval()
    with torch.no_grad():              # norms start at exactly one; perturb them so mix-ups show
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(directory)
    if tokenizer:
        Tokenizer.train_bpe([TEXT], vocab_size=VOCAB - 8).save(directory)
    return Path(directory)


FAST_CLIENT = ClientOptions(connect_timeout_s=10.0, refresh_s=0.2,
                            session=SessionOptions(step_timeout_s=10.0, recovery_timeout_s=5.0,
                                                   replacement_wait_s=2.0))


class InProcessSwarm:
    """Servers and clients on MemoryPeers, driven from synchronous test code."""

    def __init__(self, *, direct: bool = False) -> None:
        self.direct = direct               # servers also serve steps over their side channels on 127.0.0.1
        self.runner = LoopThread()
        self.net = MemoryNetwork()
        self.servers: dict[str, tuple[asyncio.Event, Any]] = {}   # peer id -> (stop, task)
        self.hosts: dict[str, Any] = {}
        self.clients: list[RemoteModel] = []

    def add_server(self, model: str | Path, blocks: tuple[int, int] | None = None, *, num_blocks: int | None = None,
                   limits: BudgetLimits | None = None, seed: int = 0, **options: Any) -> str:
        """Start `run_server` on a new MemoryPeer; returns its peer ID once it has announced."""
        async def start() -> str:
            peer = await MemoryPeer.create(self.net)
            stop, ready = asyncio.Event(), asyncio.Event()
            options.setdefault("direct", self.direct)
            opts = ServeOptions(model=str(model), blocks=blocks, num_blocks=num_blocks,
                                limits=limits or BudgetLimits(), **options)
            task = asyncio.create_task(run_server(opts, stop=stop, on_ready=lambda m: ready.set(), peer=peer,
                                                  rng=random.Random(seed)))
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                waiter.cancel()
                task.result()              # raises the server's error
            self.servers[peer.peer_id] = (stop, task)
            return peer.peer_id

        return self.runner.run(start(), timeout_s=60)

    def stop_server(self, peer_id: str) -> None:
        """A clean shutdown (announces offline)."""
        stop, task = self.servers.pop(peer_id)

        async def go() -> None:
            stop.set()
            await task
            self.net.kill(peer_id)

        self.runner.run(go(), timeout_s=30)

    def kill(self, peer_id: str) -> None:
        """The peer vanishes at once, announcing nothing (as a SIGKILLed process)."""
        self.runner.run(self.vanish(peer_id), timeout_s=30)

    async def vanish(self, peer_id: str) -> None:
        """`kill`, from code already on the swarm's event loop."""
        self.net.kill(peer_id)
        stop, task = self.servers.pop(peer_id)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def remote_model(self, model: str | Path, *, options: ClientOptions = FAST_CLIENT, seed: int = 0,
                     data_dir: str | None = None, quantization: str = "none") -> RemoteModel:
        async def make() -> tuple[Any, Any]:
            peer = await MemoryPeer.create(self.net, client_mode=True)
            source = await open_model_source(str(model), peer=peer, data_dir=data_dir)
            local, cfg = source.load(layers=range(0, 0))
            local.requires_grad_(False)
            quantize_model(local, quantization)
            blocks = RemoteBlocks(peer, source.model_id, cfg.n_layers, options=options, seed=seed,
                                  quantization=parse_scheme(quantization).name)
            await blocks.wait_ready()
            return local, blocks

        local, blocks = self.runner.run(make(), timeout_s=60)
        client = RemoteModel(local, blocks, self.runner)
        self.clients.append(client)
        return client

    def run(self, coro: Any, timeout_s: float = 60) -> Any:
        return self.runner.run(coro, timeout_s=timeout_s)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for peer_id in list(self.servers):
            self.stop_server(peer_id)
        self.runner.close()


class ServerProcesses:
    """`swarmlm serve` children on 127.0.0.1; `close()` stops them all (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = Path(tmp_path)
        self.procs: list[ServerProcess] = []

    def start(self, model: str | Path, *, blocks: tuple[int, int] | None = None, num_blocks: int | None = None,
              initial_peers: Sequence[str] = (), extra_args: Sequence[str] = (), wait: bool = True) -> ServerProcess:
        data_dir = self.tmp_path / f"server{len(self.procs)}"
        proc = start_server_process(str(model), blocks=blocks, num_blocks=num_blocks, initial_peers=initial_peers,
                                    data_dir=data_dir, extra_args=extra_args, wait=False)
        self.procs.append(proc)
        if wait:
            proc.wait_ready(180.0)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.stop(timeout_s=20.0)


def local_model(model_dir: Path):
    """The whole checkpoint in this process (the reference a swarm result is compared with)."""
    model, _ = load_model(model_dir)
    return model.requires_grad_(False)
