"""`MemoryPeer`: the `Peer` interface inside one process, for fast tests of the layers above.

    net = MemoryNetwork()
    a, b = await MemoryPeer.create(net), await MemoryPeer.create(net)
    await a.add_handler("echo", echo, max_request_bytes=1024)
    await b.call(a.peer_id, "echo", b"hi", timeout_s=1, max_response_bytes=1024)

Records are sealed, signed and checked exactly as on the real DHT (records.py), and requests
and replies pass through the same framing helpers (rpc.py), so size limits, error replies and
signature checks behave the same; only the transport is a dictionary. Raw streams
(`open_raw_stream`) are a pair of in-memory byte pipes. `net.kill(peer_id)` makes a peer
vanish mid-call and resets its streams, as a crashed process would. Imports no hivemind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

from swarmlm.errors import IntegrityError, PeerError, PeerTimeout, RemoteError, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import rpc
from swarmlm.p2p.channel.service import SideChannel, close_started, start_once
from swarmlm.p2p.identity import IDENTITY_FILE, Identity
from swarmlm.p2p.records import SignedRecord, open_record, seal, unseal

logger = get_logger(__name__)

MAX_UNARY_BYTES = 16 * 1024 * 1024       # as in peer.py


class MemoryNetwork:
    """The shared world of some MemoryPeers: who is up, and one DHT table for all."""

    def __init__(self) -> None:
        self.peers: dict[str, MemoryPeer] = {}
        # key -> subkey (None for a plain value) -> (envelope bytes, expires_at)
        self.table: dict[str, dict[str | None, tuple[bytes, float]]] = {}

    def kill(self, peer_id: str) -> None:
        """Make a peer vanish at once: its handlers stop answering, its calls fail, its streams reset."""
        peer = self.peers.pop(peer_id, None)
        if peer is not None:
            peer._closed = True
            for stream in list(peer._pipes):
                stream.reset()
            if peer._side is not None and peer._side.done() and not peer._side.cancelled() \
                    and peer._side.exception() is None:
                peer._side.result().abort()             # its direct connections die with it

    def _peer(self, peer_id: str, name: str) -> MemoryPeer:
        peer = self.peers.get(peer_id)
        if peer is None or peer._closed:
            raise PeerError(f"{name} at {peer_id}: peer is unreachable")
        return peer

    def _store(self, key: str, subkey: str | None, envelope: bytes, expires_at: float) -> bool:
        env = unseal(envelope)            # the same check every DHT node makes
        if env.key != key or env.subkey != subkey or expires_at > env.expires_at + 1e-3:
            return False
        entries = self.table.setdefault(key, {})
        old = entries.get(subkey)
        if old is not None and old[1] >= expires_at:
            return False                  # the DHT keeps the entry that expires last
        entries[subkey] = (envelope, expires_at)
        return True


class MemoryPeer:
    """Same methods and errors as `Peer`; see peer.py for what each one promises."""

    def __init__(self, network: MemoryNetwork, identity: Identity, client_mode: bool):
        self.network = network
        self.identity = identity
        self.client_mode = client_mode
        self._unary: dict[str, tuple[rpc.UnaryHandler, int]] = {}
        self._streams: dict[str, tuple[rpc.StreamHandler, int]] = {}
        self._raw: dict[str, Any] = {}
        self._pipes: set[_MemoryStream] = set()     # raw streams this peer is an end of
        self._serving: set[asyncio.Task] = set()    # raw handlers running for callers
        self._closed = False
        self.host = "127.0.0.1"                     # where its side channel listens (real TCP)
        self._side: asyncio.Future | None = None

    @classmethod
    async def create(cls, network: MemoryNetwork, *, data_dir: str | os.PathLike | None = None,
                     client_mode: bool = False, **_ignored: Any) -> MemoryPeer:
        """Join `network`; `data_dir` keeps the identity as for `Peer`. Other `Peer.create` options are ignored."""
        identity = (Identity.load_or_create(Path(data_dir).expanduser() / IDENTITY_FILE)
                    if data_dir is not None else Identity.generate())
        if identity.peer_id in network.peers:
            raise PeerError(f"peer {identity.peer_id} is already running")
        peer = cls(network, identity, client_mode)
        network.peers[identity.peer_id] = peer
        return peer

    async def shutdown(self) -> None:
        self.network.kill(self.peer_id)
        await close_started(self._side)

    async def side_channel(self) -> SideChannel:
        self._check_alive()
        self._side = start_once(self._side, self)
        return await asyncio.shield(self._side)

    async def __aenter__(self) -> MemoryPeer:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def maddrs(self) -> list[str]:
        return [f"/memory/p2p/{self.peer_id}"]

    @property
    def is_alive(self) -> bool:
        return not self._closed

    async def known_peers(self) -> list[str]:
        return sorted(p for p, peer in self.network.peers.items() if p != self.peer_id and not peer.client_mode)

    # ---- DHT -----------------------------------------------------------------------------------

    async def store(self, key: str, value: Any, *, ttl_s: float, subkey: str | None = None) -> bool:
        self._check_alive()
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        expires_at = time.time() + ttl_s
        envelope = seal(self.identity, key, value, expires_at=expires_at, subkey=subkey)
        return self.network._store(key, subkey, envelope, expires_at)

    async def get(self, key: str, *, latest: bool = True) -> list[SignedRecord]:
        self._check_alive()
        now = time.time()
        out = []
        for subkey, (data, expires_at) in list(self.network.table.get(key, {}).items()):
            if expires_at <= now:
                continue
            try:
                out.append(open_record(data, key=key, subkey=subkey))
            except (WireError, IntegrityError) as e:
                logger.warning("ignoring a record under %r/%r: %s", key, subkey, e)
        return out

    # ---- RPC -----------------------------------------------------------------------------------

    async def add_handler(self, name: str, handler: rpc.UnaryHandler, *, max_request_bytes: int) -> None:
        self._claim(name)
        self._unary[name] = (handler, min(max_request_bytes, MAX_UNARY_BYTES))

    async def add_stream_handler(self, name: str, handler: rpc.StreamHandler, *, max_request_bytes: int) -> None:
        self._claim(name)
        self._streams[name] = (handler, max_request_bytes)

    async def add_raw_stream_handler(self, name: str, handler: Any) -> None:
        self._claim(name)
        self._raw[name] = handler

    def _claim(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a handler needs a non-empty name")
        if name in self._unary or name in self._streams or name in self._raw:
            raise ValueError(f"handler {name!r} is already registered")

    async def call(self, peer_id: str, name: str, request: bytes, *, timeout_s: float,
                   max_response_bytes: int) -> bytes:
        self._check_alive()
        if len(request) > MAX_UNARY_BYTES:
            raise ValueError(f"request of {len(request)} bytes exceeds {MAX_UNARY_BYTES}; use call_stream")
        target = self.network._peer(peer_id, name)
        if name not in target._unary:
            raise PeerError(f"{name} at {peer_id}: protocol not supported")
        handler, limit = target._unary[name]
        serve = rpc.run_unary(handler, self.peer_id, bytes(request), name=name, max_request_bytes=limit)
        try:
            reply = await asyncio.wait_for(serve, timeout_s)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{name} at {peer_id}: no reply in {timeout_s:.1f} s") from None
        self.network._peer(peer_id, name)          # a peer that died meanwhile sends nothing back
        return rpc.parse_reply(reply, peer_id=peer_id, name=name, max_bytes=max_response_bytes)

    async def call_stream(self, peer_id: str, name: str, request: bytes, *, timeout_s: float,
                          max_chunk_bytes: int) -> AsyncIterator[bytes]:
        self._check_alive()
        target = self.network._peer(peer_id, name)
        if name not in target._streams:
            raise PeerError(f"{name} at {peer_id}: protocol not supported")
        handler, limit = target._streams[name]
        if len(request) > limit:
            raise RemoteError(f"{name} at {peer_id}: frame of {len(request)} bytes exceeds the limit of {limit}")
        chunks = handler(self.peer_id, bytes(request))
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), timeout_s)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise PeerTimeout(f"{name} at {peer_id}: no data for {timeout_s:.1f} s") from None
                except PeerError:
                    raise
                except Exception as e:
                    raise RemoteError(f"{name} at {peer_id}: {rpc.describe_failure(e)}") from None
                self.network._peer(peer_id, name)
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise RemoteError(f"{name} at {peer_id}: handler yielded {type(chunk).__name__}")
                if len(chunk) > max_chunk_bytes:
                    raise PeerError(f"{name} at {peer_id}: frame of {len(chunk)} bytes exceeds the limit "
                                    f"of {max_chunk_bytes}")
                yield bytes(chunk)
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()

    async def open_raw_stream(self, peer_id: str, name: str) -> tuple[asyncio.StreamReader, Any]:
        """A bare in-memory byte stream to `peer_id`'s raw handler `name`, which runs as a task
        of the serving peer; killing either peer resets the stream (both readers then raise
        `ConnectionResetError`)."""
        self._check_alive()
        target = self.network._peer(peer_id, name)
        if name not in target._raw:
            raise PeerError(f"{name} at {peer_id}: protocol not supported")
        stream = _MemoryStream(self, target)
        task = asyncio.create_task(target._raw[name](self.peer_id, stream.server_reader, stream.server_writer))
        target._serving.add(task)
        task.add_done_callback(target._serving.discard)
        return stream.client_reader, stream.client_writer

    def _check_alive(self) -> None:
        if self._closed:
            raise PeerError(f"peer {self.peer_id} is shut down")


class _MemoryStream:
    """Two in-memory pipes between a caller and a serving peer, registered with both."""

    def __init__(self, caller: MemoryPeer, server: MemoryPeer):
        self.ends = (caller, server)
        self.client_reader, self.server_reader = asyncio.StreamReader(), asyncio.StreamReader()
        self.client_writer = _PipeWriter(self.server_reader, self._closed_one)
        self.server_writer = _PipeWriter(self.client_reader, self._closed_one)
        for peer in self.ends:
            peer._pipes.add(self)

    def reset(self) -> None:
        """The connection is cut: both readers fail, both writers refuse."""
        for writer, reader in ((self.client_writer, self.client_reader), (self.server_writer, self.server_reader)):
            writer.closed = True
            if not reader.at_eof():
                reader.set_exception(ConnectionResetError("stream reset"))
        self._forget()

    def _closed_one(self) -> None:
        if self.client_writer.closed and self.server_writer.closed:
            self._forget()

    def _forget(self) -> None:
        for peer in self.ends:
            peer._pipes.discard(self)


class _PipeWriter:
    """The writing end of one direction: what it writes appears in the other side's reader."""

    def __init__(self, reader: asyncio.StreamReader, on_close: Any):
        self._reader = reader
        self._on_close = on_close
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("stream closed")
        self._reader.feed_data(bytes(data))

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("stream closed")
        await asyncio.sleep(0)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._reader.feed_eof()
            self._on_close()

    def is_closing(self) -> bool:
        return self.closed

    async def wait_closed(self) -> None:
        return None
