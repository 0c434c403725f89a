"""A party of private inference: `swarmlm mpc-party MODEL --initial-peers ...`.

A party holds a model's public weights, announces itself in the DHT (a signed
`MpcPartyRecord` under the model's key) and serves sessions on its side channel:

1. a client connects and says HELLO (session id, this party's index, the three parties);
2. party i dials party i+1 (LINK, with a fresh PRG seed for the pair) and waits for party
   i-1's LINK, then answers READY; links are authenticated by the side channel, and a LINK
   must come from the peer the client named at that place;
3. per STEP the party reads its shares of the one-hot tokens, runs the forward protocol
   (model.forward) with the other two in a worker thread, whose messages travel as DATA
   records numbered per step, and answers RESULT with its component of the logits.

Every record is checked before use (kind, size, step order, token budget); a bad one ends that
session with an ERROR to the client and the party goes on serving. A party that stops
answering makes its neighbours' reads time out (`peer_timeout_s`), and they end the session
with an ERROR naming it; a party that dies closes its connections and ends it at once.
Knows nothing of tokenizers or sampling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmlm import heap
from swarmlm.errors import PeerError, PeerTimeout, SwarmlmError, UserError, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import keys
from swarmlm.p2p.directory import publish_entry
from swarmlm.privacy import metrics
from swarmlm.privacy.mpc import wire
from swarmlm.privacy.mpc.model import KVShares, PublicWeights, forward
from swarmlm.privacy.mpc.runtime import Comm, Party
from swarmlm.privacy.mpc.shares import AShare

logger = get_logger(__name__)


@dataclass(frozen=True)
class PartyOptions:
    model: str                               # checkpoint directory or manifest CID
    initial_peers: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    data_dir: str | None = None
    max_tokens: int = 256                    # prompt plus generated tokens per session
    max_sessions: int = 8                    # sessions open at once
    peer_timeout_s: float = 8.0              # the longest wait for the next message of a running step
    idle_timeout_s: float = 300.0            # a session with no step for this long is closed
    announce_ttl_s: float = 30.0


class LinkComm(Comm):
    """runtime.Comm over the two side-channel links of a session, used from the worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conns: dict[int, Any], inbox: dict[int, "queue.Queue"],
                 timeout_s: float, names: dict[int, str]):
        self.loop, self.conns, self.inbox, self.timeout_s, self.names = loop, conns, inbox, timeout_s, names
        self.step = 0
        self.sent = {j: 0 for j in conns}
        self.got = {j: 0 for j in conns}

    def start_step(self, step: int) -> None:
        self.step = step
        self.sent = {j: 0 for j in self.conns}
        self.got = {j: 0 for j in self.conns}

    def send(self, to: int, data: bytes) -> None:
        record = wire.data_record(self.step, self.sent[to], data)
        self.sent[to] += 1
        self.loop.call_soon_threadsafe(self.conns[to].write, record)

    def recv(self, fr: int) -> bytes:
        try:
            item = self.inbox[fr].get(timeout=self.timeout_s)
        except queue.Empty:
            raise PeerTimeout(f"party {fr} ({self.names[fr]}) sent nothing for {self.timeout_s:.0f} s") from None
        if isinstance(item, BaseException):
            why = "its connection closed" if isinstance(item, (asyncio.IncompleteReadError, OSError)) else str(item)
            raise PeerError(f"party {fr} ({self.names[fr]}) is gone: {why}")
        payload = wire.open_data(item, self.step, self.got[fr])
        self.got[fr] += 1
        return payload


@dataclass
class Session:
    hello: wire.ClientHello
    seeds: dict[int, bytes] = field(default_factory=dict)
    links: dict[int, Any] = field(default_factory=dict)
    prev_link: asyncio.Future | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class PartyServer:
    """The sessions of one party process."""

    def __init__(self, peer, side, weights: PublicWeights, model_id: str, options: PartyOptions):
        self.peer, self.side, self.weights, self.model_id, self.opt = peer, side, weights, model_id, options
        self.sessions: dict[bytes, Session] = {}
        self._waiting_links: dict[bytes, asyncio.Future] = {}

    async def start(self) -> None:
        await self.side.serve(wire.PURPOSE, self.handle, max_record_bytes=wire.MAX_RECORD_BYTES)

    def record(self) -> wire.MpcPartyRecord:
        return wire.MpcPartyRecord(self.model_id, self.opt.max_tokens)

    async def announce(self) -> bool:
        """Its record under the model's parties key, and the model in the swarm's directory (for the dashboard)."""
        stored = await self.peer.store(keys.mpc_parties_key(self.model_id), self.record(),
                                       ttl_s=self.opt.announce_ttl_s, subkey=keys.peer_subkey(self.peer.peer_id))
        await publish_entry(self.peer, wire.PARTIES_SERVICE, self.model_id, ttl_s=self.opt.announce_ttl_s)
        return stored

    # ---- connections ---------------------------------------------------------------------------

    async def handle(self, conn) -> None:
        try:
            first = await asyncio.wait_for(conn.read_record(), 10.0)
            kind, msg = wire.unpack(first, wire.HELLO, wire.LINK)
        except (asyncio.TimeoutError, PeerError, WireError, asyncio.IncompleteReadError, ConnectionError) as e:
            logger.info("refusing a connection from %s: %s", conn.peer_id, e)
            with contextlib.suppress(Exception):
                conn.write(wire.pack(wire.ERROR, wire.ErrorReply(str(e)[:wire.MAX_ERROR_CHARS])))
            return
        if kind == wire.LINK:
            await self._link_in(conn, msg)
        else:
            await self._client(conn, msg)

    async def _link_in(self, conn, hello: wire.LinkHello) -> None:
        fut = self._waiting_links.setdefault(hello.session, asyncio.get_running_loop().create_future())
        if fut.done():
            return                                                    # a second LINK for the same session
        fut.set_result((conn, hello))
        session = None
        for _ in range(200):                                          # the client's HELLO may come a little later
            session = self.sessions.get(hello.session)
            if session is not None:
                break
            await asyncio.sleep(0.05)
        if session is None:
            self._waiting_links.pop(hello.session, None)
            with contextlib.suppress(Exception):
                conn.write(wire.pack(wire.ERROR, wire.ErrorReply("no client opened that session here")))
            return
        await session.done.wait()

    def _check_hello(self, conn, hello: wire.ClientHello) -> None:
        if hello.model != self.model_id:
            raise UserError(f"this party serves model {self.model_id}, not {hello.model}")
        if not 0 <= hello.index < 3 or len(hello.parties) != 3 or len(set(hello.parties)) != 3:
            raise UserError("a session has three distinct parties and an index 0..2")
        if hello.parties[hello.index] != self.peer.peer_id:
            raise UserError(f"party {hello.index} of this session is {hello.parties[hello.index]}, not this peer")
        if not 0 < hello.max_tokens <= min(self.opt.max_tokens, self.weights.cfg.context_len):
            raise UserError(f"a session may ask for 1 to {self.opt.max_tokens} tokens, not {hello.max_tokens}")
        if hello.session in self.sessions:
            raise UserError("that session id is taken")
        if len(self.sessions) >= self.opt.max_sessions:
            raise UserError(f"this party is full ({self.opt.max_sessions} sessions)")

    async def _client(self, conn, hello: wire.ClientHello) -> None:
        session: Session | None = None
        try:
            self._check_hello(conn, hello)
            session = Session(hello)
            self.sessions[hello.session] = session
            metrics.MPC_SESSIONS.inc()
            metrics.MPC_SESSIONS_OPEN.set(len(self.sessions))
            await self._link(session)
            conn.write(wire.pack(wire.READY, wire.Ready(hello.index)))
            await self._serve_steps(conn, session)
        except Exception as e:                                          # the session ends, the party serves on
            text = str(e) or type(e).__name__
            metrics.MPC_SESSION_FAILURES.inc()
            if isinstance(e, (SwarmlmError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError)):
                logger.info("session %s ends: %s", hello.session.hex()[:8], text)
            else:
                logger.warning("session %s failed", hello.session.hex()[:8], exc_info=e)
            with contextlib.suppress(Exception):
                conn.write(wire.pack(wire.ERROR, wire.ErrorReply(text[:wire.MAX_ERROR_CHARS])))
                await conn.drain()
        finally:
            if session is not None:
                self.sessions.pop(hello.session, None)
                metrics.MPC_SESSIONS_OPEN.set(len(self.sessions))
                self._waiting_links.pop(hello.session, None)
                session.done.set()
                for link in session.links.values():
                    link.close()

    async def _link(self, session: Session) -> None:
        h = session.hello
        nxt, prv = (h.index + 1) % 3, (h.index - 1) % 3
        seed = os.urandom(wire.SEED_BYTES)
        out = await self.side.open(h.parties[nxt], wire.PURPOSE, timeout_s=self.opt.peer_timeout_s,
                                   max_record_bytes=wire.MAX_RECORD_BYTES)
        out.write(wire.pack(wire.LINK, wire.LinkHello(h.session, h.index, seed)))
        session.links[nxt], session.seeds[nxt] = out, seed
        fut = self._waiting_links.setdefault(h.session, asyncio.get_running_loop().create_future())
        try:
            conn, link = await asyncio.wait_for(asyncio.shield(fut), self.opt.peer_timeout_s)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"party {prv} ({h.parties[prv]}) did not link within {self.opt.peer_timeout_s:.0f} s") \
                from None
        if conn.peer_id != h.parties[prv] or link.index != prv:
            raise PeerError(f"a link for this session came from {conn.peer_id} as party {link.index}, "
                            f"not from party {prv} ({h.parties[prv]})")
        session.links[prv], session.seeds[prv] = conn, link.seed

    async def _serve_steps(self, conn, session: Session) -> None:
        h = session.hello
        loop = asyncio.get_running_loop()
        inbox = {j: queue.Queue() for j in session.links}
        readers = [asyncio.create_task(self._pump(session.links[j], inbox[j])) for j in session.links]
        comm = LinkComm(loop, session.links, inbox, self.opt.peer_timeout_s,
                        {j: h.parties[j] for j in session.links})
        party = Party(h.index, comm, session.seeds)
        cache = KVShares()
        V = self.weights.cfg.vocab_size
        try:
            step = 0
            while True:
                try:
                    record = await asyncio.wait_for(conn.read_record(), self.opt.idle_timeout_s)
                except (PeerError, asyncio.IncompleteReadError, ConnectionError, OSError):
                    return                                              # the client left
                _, head = wire.unpack(record, wire.STEP)
                if head.step != step:
                    raise WireError(f"step {head.step} where step {step} was expected")
                if head.n_tokens < 1 or cache.length + head.n_tokens > h.max_tokens:
                    raise UserError(f"{head.n_tokens} more tokens would pass the session's {h.max_tokens}")
                payload = await asyncio.wait_for(conn.read_record(), self.opt.peer_timeout_s)
                shares = _read_shares(payload, head.n_tokens, V)
                comm.start_step(step)
                logger.info("session %s step %d: %d tokens", h.session.hex()[:8], step, head.n_tokens)
                rounds0, bytes0, t0 = party.rounds, party.bytes_sent, time.perf_counter()
                logits = await asyncio.to_thread(party.run, forward(party, self.weights, shares, cache))
                metrics.MPC_STEPS.inc()
                metrics.MPC_TOKENS.inc(head.n_tokens)
                metrics.MPC_ROUNDS.inc(party.rounds - rounds0)
                metrics.MPC_SENT.inc(party.bytes_sent - bytes0)
                metrics.MPC_STEP_SECONDS.observe(time.perf_counter() - t0)
                conn.write(wire.pack(wire.RESULT, wire.StepResult(step, party.rounds - rounds0,
                                                                  party.bytes_sent - bytes0)))
                conn.write(logits.a.contiguous().numpy().tobytes())
                await conn.drain()
                step += 1
        finally:
            for r in readers:
                r.cancel()

    @staticmethod
    async def _pump(conn, box: "queue.Queue") -> None:
        """Hand a link's records to the worker thread; an ended link becomes an error it will raise."""
        try:
            while True:
                record = await conn.read_record()
                metrics.MPC_RECEIVED.inc(len(record))
                box.put(record)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            box.put(e if isinstance(e, BaseException) else PeerError(str(e)))


def _read_shares(payload: bytes, T: int, V: int) -> AShare:
    """Two int64 components of one-hot tokens (1, T, V), checked for their exact size."""
    want = 2 * T * V * 8
    if len(payload) != want:
        raise WireError(f"token shares of {len(payload)} bytes where {want} ({T} tokens) were expected")
    both = torch.frombuffer(bytearray(payload), dtype=torch.int64).view(2, 1, T, V)
    return AShare(both[0].clone(), both[1].clone())


# ---- the process ------------------------------------------------------------------------------

async def run_party(opt: PartyOptions, stop: asyncio.Event, ready=None) -> None:
    from swarmlm.p2p.peer import Peer
    from swarmlm.privacy.mpc.source import open_model

    peer = await Peer.create(initial_peers=opt.initial_peers, host=opt.host, port=opt.port, data_dir=opt.data_dir)
    try:
        model_id, model = await open_model(opt.model, peer=peer, data_dir=opt.data_dir)
        weights = PublicWeights.from_model(model)
        side = await peer.side_channel()
        server = PartyServer(peer, side, weights, model_id, opt)
        await server.start()
        await server.announce()
        if ready is not None:
            ready(peer, server)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), opt.announce_ttl_s / 3)
            if not stop.is_set():
                with contextlib.suppress(Exception):
                    await server.announce()
    finally:
        await peer.shutdown()


def mpc_party_from_args(args) -> int:
    """`swarmlm mpc-party MODEL --initial-peers ...`: print the multiaddrs, then serve until SIGTERM/SIGINT."""
    from swarmlm import log
    log.configure()
    opt = PartyOptions(model=args.model, initial_peers=tuple(args.initial_peers), host=args.host, port=args.port,
                       data_dir=args.data_dir, max_tokens=args.max_tokens, max_sessions=args.max_sessions,
                       peer_timeout_s=args.peer_timeout)

    def ready(peer, server) -> None:
        heap.settle()                # start-up is over: full collections walk only what sessions make
        for m in peer.maddrs:
            print(m, flush=True)
        print(f"ready: MPC party for model {server.model_id} (up to {opt.max_tokens} tokens per session)", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_party(opt, stop, ready)

    asyncio.run(main())
    return 0
