"""RemoteModel: a model whose blocks run in the swarm, used like a local one.

The client keeps the embeddings and the lm head (and any trainable adapters) and runs
blocks [0, n_layers) through `RemoteBlocks`, on an event loop of its own in a background
thread, so the API is plain synchronous Python:

    with RemoteModel.connect("path/or/CID", initial_peers=[maddr]) as model:
        out = model.generate([[1, 2, 3]], max_new_tokens=20)          # as model/generate.py's
        logits = model(input_ids)                                     # differentiable (see finetune.py)

`generate` drives model/generate.py's decode loop (`TokenLoop`) over an `InferenceSession`,
so sampling and stopping are exactly local generation's, and greedy tokens equal a local
run's. The loop runs on the event loop's thread, ahead of the caller, who gets each step's
tokens through a queue: no step waits for a hop between threads. Knows nothing of how the
servers compute.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, AsyncIterator, Coroutine, Iterator, Sequence

import torch

from swarmlm.errors import UserError
from swarmlm.model.cache import KVCache
from swarmlm.model.generate import TokenLoop, check_context
from swarmlm.model.transformer import Transformer
from swarmlm.p2p.loop import new_event_loop
from swarmlm.swarm.client.remote import ClientOptions, RemoteBlocks, SwarmSpan
from swarmlm.swarm.client.session import InferenceSession


class LoopThread:
    """An asyncio loop in a daemon thread; `run(coro)` waits for the result from synchronous code."""

    def __init__(self) -> None:
        self.loop = new_event_loop()         # asyncio's, or uvloop if asked (p2p/loop.py)
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-client-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float | None = None) -> Any:
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called from its own loop (would deadlock)")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stream(self, items: AsyncIterator[Any], *, window: int = 2, stop_timeout_s: float = 30.0) -> Iterator[Any]:
        """The items of an async iterator run on the loop, as a plain iterator. The loop runs up to
        `window` items ahead of the caller (handing them over through a queue), so its own steps
        do not wait for this thread while the caller keeps up; its exceptions are raised here.
        Closing the iterator early cancels it and waits (up to `stop_timeout_s`) until it has ended."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.stream called from its own loop (would deadlock)")
        handed: queue.SimpleQueue = queue.SimpleQueue()
        ended = object()
        credit = _Credit(self.loop, window)

        # each item is handed over once the producer next waits (call_soon), not at once: woken then,
        # the caller's thread takes the GIL while the loop's thread idles on a reply, not while it
        # prepares the next step (a decode loop sends the next step's request before its token leaves)
        def hand(ok: bool, item: Any) -> None:
            self.loop.call_soon(handed.put, (ok, item))

        async def pump() -> None:
            try:
                async for item in items:
                    hand(True, item)
                    await credit.spend()
            except Exception as e:           # raised at the caller; cancellation only ends the pump
                hand(False, e)
            finally:
                hand(False, ended)

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        item = None
        try:
            while True:
                ok, item = handed.get()
                if ok:
                    credit.give()
                    yield item
                elif item is ended:
                    return
                else:
                    raise item
        finally:
            if item is not ended:              # closed early, or the iterator raised: the pump ends next
                future.cancel()
                try:
                    while handed.get(timeout=stop_timeout_s)[1] is not ended:
                        pass
                except queue.Empty:
                    pass

    def close(self) -> None:
        """Cancel what is still running on the loop (and wait for it), then stop the loop."""
        if self.loop.is_closed():
            return

        async def cancel_the_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.run(cancel_the_rest(), timeout_s=10)
        except Exception:   # closing goes on whatever the tasks raised
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class _Credit:
    """How many more items a producer on `loop` may hand over before the consumer (another thread)
    takes one: the producer waits only when it has none, and only then is the loop woken for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, window: int):
        self._loop = loop
        self._left = window
        self._lock = threading.Lock()
        self._waiter: asyncio.Future | None = None

    async def spend(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left >= 0:
                return
            self._waiter = waiter = self._loop.create_future()
        await waiter

    def give(self) -> None:
        with self._lock:
            self._left += 1
            waiter, self._waiter = (self._waiter, None) if self._left >= 0 else (None, self._waiter)
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class RemoteModel:
    """Embeddings and head here, blocks in the swarm. Build with `connect` (or from parts, in tests)."""

    def __init__(self, local: Transformer, blocks: RemoteBlocks, runner: LoopThread, *,
                 on_close: Sequence[Coroutine[Any, Any, Any]] = (), owns_runner: bool = False):
        self.local = local                  # embeddings + head, no blocks
        self.cfg = local.cfg
        self.blocks = blocks
        self.runner = runner
        self._on_close = list(on_close)     # e.g. the peer's shutdown, run on the loop at close()
        self._owns_runner = owns_runner
        self.last_session: InferenceSession | None = None   # of the latest generate (its chain, recoveries)
        self.source_dir = None              # the local checkpoint directory (tokenizer), set by connect

    @classmethod
    def connect(cls, model: str, *, initial_peers: Sequence[str], connect_timeout_s: float = 60.0,
                dtype: torch.dtype = torch.float32, data_dir: str | None = None,
                options: ClientOptions | None = None, seed: int | None = None,
                quantization: str | None = None) -> "RemoteModel":
        """Join the swarm as a client, load the embeddings and head of `model` (a directory or a
        manifest CID), and wait up to `connect_timeout_s` until every block is served by servers
        of `quantization` (model/quant.py; the head here is quantized the same way local
        generation quantizes it, so the tokens equal local generation's)."""
        from swarmlm.model.quant import parse_scheme, quantize_model
        from swarmlm.p2p.peer import Peer

        scheme = parse_scheme(quantization)
        from swarmlm.swarm.source import open_model_source

        runner = LoopThread()
        try:
            peer = runner.run(Peer.create(initial_peers=initial_peers, data_dir=None, client_mode=True))
        except BaseException:
            runner.close()
            raise
        try:
            source = runner.run(open_model_source(model, peer=peer, data_dir=data_dir))
            local, cfg = source.load(dtype=dtype, layers=range(0, 0), with_embed=True, with_head=True)
            local.requires_grad_(False)
            quantize_model(local, scheme)
            blocks = RemoteBlocks(peer, source.model_id, cfg.n_layers, options=options, seed=seed,
                                  quantization=scheme.name)
            runner.run(blocks.wait_ready(connect_timeout_s))
        except BaseException:
            runner.run(peer.shutdown())
            runner.close()
            raise
        remote = cls(local, blocks, runner, on_close=[peer.shutdown()], owns_runner=True)
        remote.source_dir = source.directory
        return remote

    def close(self) -> None:
        for coro in self._on_close:
            try:
                self.runner.run(coro, timeout_s=30)
            except Exception:
                pass
        self._on_close = []
        if self._owns_runner:
            self.runner.close()

    def __enter__(self) -> "RemoteModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- forward (differentiable) -----------------------------------------------------------------

    def run_blocks(self, h: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                   prompts: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, T, D) through every block in the swarm -> (B, T, D); gradients flow to h and prompts."""
        return SwarmSpan.apply(h, prompts, self.blocks, self.runner.run, key_mask, 0, self.cfg.n_layers)

    def forward(self, input_ids: torch.Tensor, *, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V), as `Transformer.forward` without a cache."""
        positions = self.local.default_positions(input_ids.shape[1], cache=None, key_mask=key_mask,
                                                 device=input_ids.device)
        h = self.local.embed(input_ids, positions)
        return self.local.head(self.run_blocks(h, key_mask=key_mask))

    __call__ = forward

    # ---- inference ----------------------------------------------------------------------------------

    def inference_session(self, *, batch: int, max_length: int,
                          prompts: torch.Tensor | None = None) -> "SyncSession":
        """A decoding session over the swarm: `.step(hidden, key_mask)` sends only new positions."""
        session = self.runner.run(self.blocks.open_session(batch=batch, max_length=max_length, prompts=prompts))
        return SyncSession(session, self.runner)

    async def _decode(self, session: InferenceSession, loop: TokenLoop) -> AsyncIterator[list[int | None]]:
        """`loop`'s steps through `session`, on the event loop: embeddings and head here (with no
        await inside, so inference mode covers them alone), blocks in the swarm. A step's head and
        the next step's embedding share one inference-mode section (entering one costs ~20 us on a
        decoding step's cold caches); the tokens are handed on right after it."""
        # position ids matter here only to learned position embeddings (gpt2); RoPE is the servers'
        # business, and these torch calls cost ~100 us a token on a decoding step's cold caches
        tracker = None
        if self.local.pos_embeddings is not None:
            with torch.inference_mode():
                tracker = KVCache.empty(self.cfg, session.batch, session.max_length, layers=range(0, 0))

        def embed() -> tuple[torch.Tensor, torch.Tensor | None]:
            """The embeddings (B, T, D) of `loop`'s next ids, and their key mask (under inference mode)."""
            ids, key_mask = loop.ids, loop.key_mask
            T = ids.shape[1]
            new_mask = None if key_mask is None else key_mask[:, -T:]
            positions = None
            if tracker is not None:
                positions = self.local.default_positions(T, cache=tracker, key_mask=key_mask, device=ids.device)
                tracker.key_mask(new_mask, T)
                tracker.advance(T, new_mask)
            return self.local.embed(ids, positions), new_mask

        if loop.finished:
            return
        with torch.inference_mode():
            h, new_mask = embed()
        while True:
            h = await session.step(h, new_mask, more=not loop.last)
            with torch.inference_mode():
                tokens = loop.take(self.local.head(h[:, -1]))              # from (B, V): one slice, not two
                if not loop.finished:
                    h, new_mask = embed()
            yield tokens
            if loop.finished:
                return

    async def generate_steps(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                             eos_id: int | None = None) -> AsyncIterator[list[int | None]]:
        """`stream_generate`'s steps as an async iterator to run on this model's event loop
        (`runner.loop`). Its session opens at the first step and closes as soon as the iterator
        ends, fails, is closed or is cancelled (a caller that went away frees the servers' caches)."""
        prompts = [list(p) for p in prompt_ids]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        max_new_tokens = check_context(self.local, prompts, max_new_tokens)
        if max_new_tokens <= 0:
            return
        loop = TokenLoop(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, generator=torch.Generator().manual_seed(seed), eos_id=eos_id)
        session = await self.blocks.open_session(batch=len(prompts),
                                                 max_length=max(map(len, prompts)) + max_new_tokens)
        self.last_session = session
        try:
            async for tokens in self._decode(session, loop):
                yield tokens
        finally:
            await session.close()

    def stream_generate(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                        top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                        eos_id: int | None = None) -> Iterator[list[int | None]]:
        """Per-step tokens, one per row (None once a row has ended), as model.generate.stream_generate."""
        yield from self.runner.stream(self.generate_steps(prompt_ids, max_new_tokens=max_new_tokens,
                                                          temperature=temperature, top_k=top_k, top_p=top_p,
                                                          seed=seed, eos_id=eos_id))

    def generate(self, prompt_ids: Sequence[int] | Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_id: int | None = None) -> list[int] | list[list[int]]:
        """Generated tokens (prompt excluded, ending at the first eos), as model.generate.generate."""
        single = len(prompt_ids) > 0 and not isinstance(prompt_ids[0], (list, tuple))
        prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
        rows: list[list[int]] = [[] for _ in prompts]
        for tokens in self.stream_generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id):
            for row, t in zip(rows, tokens):
                if t is not None:
                    row.append(t)
        return rows[0] if single else rows


class SyncSession:
    """An `InferenceSession` driven from synchronous code."""

    def __init__(self, session: InferenceSession, runner: LoopThread):
        self.session = session
        self.runner = runner
        self.batch = session.batch
        self.max_length = session.max_length

    def step(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.runner.run(self.session.step(hidden, key_mask))

    @property
    def recoveries(self) -> int:
        return self.session.recoveries

    def close(self) -> None:
        self.runner.run(self.session.close())

    def __enter__(self) -> "SyncSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- the CLI -----------------------------------------------------------------------------------

def generate_from_args(args: Any, *, ticket: Any = None, ticket_accepted: Any = None) -> int:
    """`swarmlm generate MODEL --swarm --initial-peers ...`: the same output as local generation. `ticket`,
    `ticket_accepted`: SessionOptions' (cli.py passes the ledger's)."""

    from swarmlm.model.generate import DTYPES, check_sampling_args, emit_generation
    from swarmlm.model.tokenizer import Tokenizer

    if not args.initial_peers:
        raise UserError("--swarm needs --initial-peers MADDR ...")
    check_sampling_args(args)
    if args.connect_timeout <= 0:
        raise UserError("--connect-timeout must be positive")
    options = None
    if ticket is not None:
        from swarmlm.swarm.client.remote import ClientOptions
        from swarmlm.swarm.client.session import SessionOptions
        options = ClientOptions(connect_timeout_s=args.connect_timeout,
                                session=SessionOptions(ticket=ticket, ticket_accepted=ticket_accepted))
    with RemoteModel.connect(args.model, initial_peers=args.initial_peers, connect_timeout_s=args.connect_timeout,
                             dtype=DTYPES[getattr(args, "dtype", "float32")], options=options,
                             quantization=getattr(args, "quantize", None)) as model:
        tokenizer = Tokenizer.load(model.source_dir)
        prompt_ids = tokenizer.encode(args.prompt)
        if not prompt_ids:
            raise UserError("the prompt encodes to no tokens")
        eos_id = model.cfg.eos_token_id if model.cfg.eos_token_id is not None else tokenizer.eos_id
        steps = model.stream_generate([prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=eos_id)
        out = emit_generation(steps, tokenizer, eos_id, stream=not args.json)
        recoveries = model.last_session.recoveries if model.last_session is not None else 0
    out.report(prompt_ids, as_json=args.json, how=f" through the swarm, {recoveries} recoveries", recoveries=recoveries)
    return 0
