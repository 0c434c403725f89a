"""`Peer`: this process's one hivemind DHT node and libp2p daemon, behind a small API.

    peer = await Peer.create(initial_peers=[...], data_dir="~/.swarmlm")
    await peer.store(keys.providers_key(cid), ProviderRecord(...), ttl_s=60, subkey=peer.peer_id)
    found = await peer.get(keys.providers_key(cid))            # list[SignedRecord], checked
    await peer.add_handler("swarmlm/echo/1", echo, max_request_bytes=1 << 20)
    reply = await peer.call(other_id, "swarmlm/echo/1", b"hi", timeout_s=5, max_response_bytes=1 << 20)
    await peer.shutdown()

The DHT node runs in this process's event loop (hivemind's `DHTNode`, no forked helper
process); its `p2pd` child is started bound to `host` only, with UPnP and AutoNAT off, and is
told to die with this process (PR_SET_PDEATHSIG), so even a SIGKILL leaves no daemon behind.
Records are signed envelopes (records.py), checked by every DHT node that stores or returns
them and again by `get`. Unary calls travel over the daemon's persistent multiplexed
connection; streams (`call_stream`) over a libp2p stream each; that connection's reader is this
module's own (`_read_daemon_replies`: hivemind 1.1.12's ends at a reply to a call cancelled in
the same loop turn, and every later call times out). This is the only module that imports
hivemind; nothing above it sees a hivemind type.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence
from uuid import UUID


def _import_hivemind_lightly() -> None:
    """Let hivemind's DHT and p2p modules import without the package's __init__, which also
    imports its averager and optimizer (scipy, pydantic: 1-1.5 s of every peer's start-up) that
    swarmlm never uses. The package's own names (`hivemind.DHT`, ...) still work: the first
    access to one runs the real __init__. Does nothing if hivemind is already imported."""
    if "hivemind" in sys.modules:
        return
    spec = importlib.util.find_spec("hivemind")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    package = importlib.util.module_from_spec(spec)

    def complete(name: str) -> Any:
        submodule = sys.modules.get(f"hivemind.{name}")
        if submodule is not None:           # one still being imported (`import hivemind.p2p.x as y`)
            return submodule
        del package.__getattr__             # once: the real __init__ defines the rest
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = complete
    sys.modules["hivemind"] = package


_import_hivemind_lightly()

from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.control import ControlClient, P2PDaemonError, P2PHandlerError
from hivemind.p2p.p2p_daemon_bindings.utils import read_pbmsg_safe
from hivemind.proto import p2pd_pb2 as p2pd_pb
from hivemind.utils import MSGPackSerializer
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.multiaddr.codecs import codec_by_name

from swarmlm.errors import IntegrityError, PeerError, PeerTimeout, UserError, WireError
from swarmlm.log import get_logger
from swarmlm.p2p import rpc
from swarmlm.p2p.channel.service import SideChannel, close_started, start_once
from swarmlm.p2p.identity import IDENTITY_FILE, Identity
from swarmlm.p2p.records import SignedRecord, open_record, seal, unseal

logger = get_logger(__name__)


async def _read_daemon_replies(self: ControlClient, reader: asyncio.StreamReader) -> None:
    """hivemind's reader of the daemon's persistent connection, minus one fault: a unary call
    cancelled (a timeout) in the loop turn its reply arrives in leaves a cancelled future in
    `_pending_calls`, and hivemind's `set_result` on it raised InvalidStateError, which ended
    this task, so every later unary call of the process waited for a reply that never came.
    A reply for a call that is already over is dropped here; all else is dispatched as before."""
    while True:
        message = p2pd_pb.PersistentConnectionResponse()
        try:
            await read_pbmsg_safe(reader, message)
        except asyncio.IncompleteReadError:
            break
        call_id = UUID(bytes=message.callId)
        waiting = self._pending_calls.get(call_id)
        if waiting is not None and waiting.done():
            logger.debug("reply for a call already over (%s): dropped", call_id)
            continue
        if message.HasField("callUnaryResponse"):
            reply = message.callUnaryResponse
            if waiting is not None and reply.HasField("response"):
                waiting.set_result(reply.response)
            elif waiting is not None and reply.HasField("error"):
                waiting.set_exception(P2PHandlerError(reply.error.decode(errors="ignore")))
        elif message.HasField("requestHandling"):
            task = asyncio.create_task(self._handle_persistent_request(call_id, message.requestHandling))
            self._handler_tasks[call_id] = task
        elif message.HasField("cancel"):
            task = self._handler_tasks.get(call_id)
            if task is not None and not task.done():
                task.cancel()
        elif waiting is not None and message.HasField("daemonError"):
            waiting.set_exception(P2PDaemonError(message.daemonError.message))
        elif waiting is not None:
            waiting.set_result(None)


if not hasattr(ControlClient, "_read_from_persistent_conn"):       # not an assert: `python -O` would drop it
    raise ImportError("hivemind's ControlClient no longer has _read_from_persistent_conn: see _read_daemon_replies")
ControlClient._read_from_persistent_conn = _read_daemon_replies

MAX_UNARY_BYTES = 16 * 1024 * 1024       # one unary request or reply; larger payloads go by stream
_DAEMON_MSG_BYTES = MAX_UNARY_BYTES + 64 * 1024
_PR_SET_PDEATHSIG = 1


class Peer:
    """One peer: identity, DHT membership, RPC handlers and calls. Build with `await Peer.create(...)`."""

    def __init__(self, *, identity: Identity, p2p: P2P, node: DHTNode, maddrs: list[str], client_mode: bool,
                 host: str = "127.0.0.1"):
        self.identity = identity
        self.host = host                   # where this peer listens: libp2p and its side channel
        self.client_mode = client_mode     # a client stores nothing for others and serves no DHT requests
        self._p2p = p2p
        self._node = node
        self._maddrs = maddrs
        self._handlers: set[str] = set()
        self._closed = False
        self._side: asyncio.Future | None = None

    # ---- life cycle ------------------------------------------------------------------------

    @classmethod
    async def create(cls, *, initial_peers: Sequence[str] = (), host: str = "127.0.0.1", port: int = 0,
                     data_dir: str | os.PathLike | None = None, startup_timeout_s: float = 60.0,
                     client_mode: bool = False) -> Peer:
        """Start p2pd and a DHT node; join through `initial_peers` or start a new swarm.

        `data_dir` holds `identity.key` (created on first use), so a restarted peer keeps its
        peer ID; without one the identity is fresh for this run. `port=0` picks a free port.
        """
        initial_peers = [check_maddr(m) for m in initial_peers]
        if not 0 <= port < 65536:
            raise UserError(f"port {port} is out of range")
        if data_dir is not None:
            identity = Identity.load_or_create(Path(data_dir).expanduser() / IDENTITY_FILE)
            key_path, tmp_key = str(Path(data_dir).expanduser() / IDENTITY_FILE), None
        else:
            identity = Identity.generate()
            tmp_key = _write_temp_key(identity)
            key_path = tmp_key
        ip = "ip6" if ":" in host else "ip4"
        try:
            with _daemon_dies_with_us():
                p2p = await P2P.create(
                    initial_peers=initial_peers or None, host_maddrs=[f"/{ip}/{host}/tcp/{port}"],
                    identity_path=key_path, check_if_identity_free=False, nat_port_map=False, auto_nat=False,
                    dht_mode="client" if client_mode else "server", startup_timeout=startup_timeout_s,
                    persistent_conn_max_msg_size=_DAEMON_MSG_BYTES, use_relay=False)
        except Exception as e:
            raise PeerError(f"the libp2p daemon did not start: {e}") from None
        finally:
            if tmp_key is not None:
                with contextlib.suppress(OSError):
                    os.remove(tmp_key)
        try:
            node = await DHTNode.create(
                p2p=p2p, initial_peers=initial_peers or None, client_mode=client_mode,
                record_validator=_RecordValidator(), wait_timeout=5.0, bootstrap_timeout=10.0,
                num_workers=4, cache_nearest=0)
            maddrs = [str(m) for m in await p2p.get_visible_maddrs(latest=True)]
        except BaseException as e:
            await p2p.shutdown()
            if isinstance(e, Exception):
                raise PeerError(f"could not join the swarm through {initial_peers}: {e}") from None
            raise
        assert p2p.peer_id.to_base58() == identity.peer_id, "p2pd runs under a different key"
        logger.info("peer %s up at %s", identity.peer_id, maddrs)
        return cls(identity=identity, p2p=p2p, node=node, maddrs=maddrs, client_mode=client_mode, host=host)

    async def shutdown(self) -> None:
        """Stop the DHT node and the daemon, and wait for the daemon to exit. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await close_started(self._side)
        try:
            await asyncio.wait_for(self._node.shutdown(), 10.0)
        except Exception as e:
            logger.debug("DHT node shutdown: %s", e)
        await self._p2p.shutdown()
        logger.info("peer %s stopped", self.peer_id)

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    @property
    def peer_id(self) -> str:
        """This peer's base58 libp2p ID."""
        return self.identity.peer_id

    @property
    def maddrs(self) -> list[str]:
        """Full multiaddrs others can dial, each ending in /p2p/<peer_id>."""
        return list(self._maddrs)

    @property
    def is_alive(self) -> bool:
        return not self._closed and self._p2p.is_alive

    async def side_channel(self) -> SideChannel:
        """This peer's one side channel (channel/service.py), listening on its host; started on first use."""
        self._side = start_once(self._side, self)
        return await asyncio.shield(self._side)

    async def known_peers(self) -> list[str]:
        """Peer IDs of the DHT servers this peer knows of (its routing table), itself excluded."""
        table = self._node.protocol.routing_table
        return sorted(p.to_base58() for p in table.peer_id_to_uid if p.to_base58() != self.peer_id)

    # ---- DHT -----------------------------------------------------------------------------------

    async def store(self, key: str, value: Any, *, ttl_s: float, subkey: str | None = None) -> bool:
        """Sign `value` (a registered record type) and store it under `key` for `ttl_s` seconds.

        With `subkey` (which must start with this peer's ID, see keys.peer_subkey) the key holds
        one entry per subkey. Returns whether at least one DHT node accepted it.
        """
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        expires_at = time.time() + ttl_s
        envelope = seal(self.identity, key, value, expires_at=expires_at, subkey=subkey)
        return bool(await self._node.store(key, envelope, expires_at, subkey=subkey))

    async def get(self, key: str, *, latest: bool = True) -> list[SignedRecord]:
        """Every valid, unexpired record under `key` (one per subkey, or one plain value), or [].

        `latest=True` asks the DHT for the newest entries instead of any cached copy. Records
        that fail their signature or schema are logged and left out.
        """
        found = await self._node.get(key, latest=latest)
        if found is None:
            return []
        now = time.time()
        if isinstance(found.value, (bytes, bytearray)):
            items = [(None, found.value)]
        elif hasattr(found.value, "items"):
            items = [(sub, entry.value) for sub, entry in found.value.items()]
        else:
            logger.warning("ignoring a %s value under %r", type(found.value).__name__, key)
            return []
        out = []
        for subkey, data in items:
            try:
                if subkey is not None and not isinstance(subkey, str):
                    raise WireError(f"subkey {subkey!r} is not a string")
                record = open_record(data, key=key, subkey=subkey)
            except (WireError, IntegrityError) as e:
                logger.warning("ignoring a record under %r/%r: %s", key, subkey, e)
                continue
            if record.expires_at > now:
                out.append(record)
        return out

    # ---- RPC: serving ------------------------------------------------------------------------

    async def add_handler(self, name: str, handler: rpc.UnaryHandler, *, max_request_bytes: int) -> None:
        """Serve `name`: `await handler(peer_id, request) -> reply`. A raise becomes an error reply."""
        self._claim(name)
        limit = min(max_request_bytes, MAX_UNARY_BYTES)

        async def serve(request: bytes, remote_id: PeerID) -> bytes:
            return await rpc.run_unary(handler, remote_id.to_base58(), request, name=name,
                                       max_request_bytes=limit)

        await self._p2p._client.add_unary_handler(name, serve)

    async def add_stream_handler(self, name: str, handler: rpc.StreamHandler, *, max_request_bytes: int) -> None:
        """Serve `name` as a stream: `handler(peer_id, request)` is an async iterator of byte chunks."""
        self._claim(name)

        async def serve(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _widen(reader, max_request_bytes)
            await rpc.serve_stream(handler, info.peer_id.to_base58(), reader, writer, name=name,
                                   max_request_bytes=max_request_bytes)

        await self._p2p.add_binary_stream_handler(name, serve)

    def _claim(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a handler needs a non-empty name")
        if name in self._handlers:
            raise ValueError(f"handler {name!r} is already registered")
        self._handlers.add(name)

    # ---- RPC: calling ------------------------------------------------------------------------

    async def call(self, peer_id: str, name: str, request: bytes, *, timeout_s: float,
                   max_response_bytes: int) -> bytes:
        """One request, one reply. `PeerTimeout` after `timeout_s`; `RemoteError` if the handler
        failed (with its message); `PeerError` if the peer is unreachable or answers garbage."""
        if len(request) > MAX_UNARY_BYTES:
            raise ValueError(f"request of {len(request)} bytes exceeds {MAX_UNARY_BYTES}; use call_stream")
        pid = _parse_peer_id(peer_id)
        try:
            reply = await asyncio.wait_for(self._p2p._client.call_unary_handler(pid, name, request), timeout_s)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{name} at {peer_id}: no reply in {timeout_s:.1f} s") from None
        except Exception as e:          # daemon errors: unreachable peer, unknown protocol, reset
            raise PeerError(f"{name} at {peer_id}: {e}") from None
        return rpc.parse_reply(reply, peer_id=peer_id, name=name, max_bytes=max_response_bytes)

    async def call_stream(self, peer_id: str, name: str, request: bytes, *, timeout_s: float,
                          max_chunk_bytes: int) -> AsyncIterator[bytes]:
        """Send `request`, yield the reply's chunks. `timeout_s` bounds opening the stream and each
        wait for the next chunk. Close it early with `contextlib.aclosing` or by exhausting it."""
        pid = _parse_peer_id(peer_id)
        try:
            _, reader, writer = await asyncio.wait_for(self._p2p.call_binary_stream_handler(pid, name), timeout_s)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"{name} at {peer_id}: no stream in {timeout_s:.1f} s") from None
        except Exception as e:
            raise PeerError(f"{name} at {peer_id}: {e}") from None
        _widen(reader, max_chunk_bytes)
        try:
            async for chunk in rpc.request_stream(reader, writer, request, peer_id=peer_id, name=name,
                                                  timeout_s=timeout_s, max_chunk_bytes=max_chunk_bytes):
                yield chunk
        finally:
            writer.close()

    async def open_raw_stream(self, peer_id: str, name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A bare libp2p stream to a raw handler (benchmarks and protocols with their own framing)."""
        try:
            _, reader, writer = await self._p2p.call_binary_stream_handler(_parse_peer_id(peer_id), name)
        except Exception as e:
            raise PeerError(f"{name} at {peer_id}: {e}") from None
        return reader, writer

    async def add_raw_stream_handler(self, name: str, handler: Any) -> None:
        """Serve bare libp2p streams: `await handler(peer_id, reader, writer)`; no framing, no limits."""
        self._claim(name)

        async def serve(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await handler(info.peer_id.to_base58(), reader, writer)

        await self._p2p.add_binary_stream_handler(name, serve)


# ---- helpers ---------------------------------------------------------------------------------

def check_maddr(maddr: str) -> str:
    """A dialable multiaddr with a /p2p/ part, or `UserError` that says what is wrong with it."""
    try:
        parsed = Multiaddr(str(maddr))
        PeerID.from_base58(parsed["p2p"])
    except (ValueError, LookupError, TypeError) as e:    # the parser's errors; a bug keeps its traceback
        raise UserError(f"{maddr!r} is not a peer multiaddr like /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID: "
                        f"{e}") from None
    return str(parsed)


def _import_codecs() -> None:
    """Import the multiaddr codecs now: the parser imports each on first use and reports any
    ImportError as an unknown protocol, so a lazy import that fails (see qkernels.prepare) would
    read as a bad address."""
    for name in ("ip4", "ip6", "uint16be", "cid", "domain"):
        codec_by_name(name)


_import_codecs()


def _widen(reader: asyncio.StreamReader, frame_bytes: int) -> None:
    """Let the reader buffer a whole frame: at asyncio's default 64 KiB it pauses and resumes the
    socket several times per 256 KiB block (an epoll register/unregister each time)."""
    reader._limit = max(reader._limit, min(frame_bytes, 8 << 20) + 16)


def _parse_peer_id(peer_id: str) -> PeerID:
    try:
        return PeerID.from_base58(peer_id)
    except Exception:
        raise PeerError(f"{peer_id!r} is not a peer ID") from None


def _write_temp_key(identity: Identity) -> str:
    import tempfile
    fd, path = tempfile.mkstemp(prefix="swarmlm-identity-", suffix=".key")
    with os.fdopen(fd, "wb") as f:
        f.write(identity.to_bytes())
    return path


@contextlib.contextmanager
def _daemon_dies_with_us():
    """While hivemind launches p2pd, make the child ask the kernel for SIGTERM when we die.

    hivemind starts p2pd with asyncio's create_subprocess_exec and no way to pass a
    preexec_fn; we wrap that function for the duration of `P2P.create` and add one only to a
    `p2pd` launch. Linux only; elsewhere shutdown() and the signal handlers in cli.py remain.
    """
    original = asyncio.subprocess.create_subprocess_exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        yield
        return

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    async def launch(program: Any, *args: Any, **kwargs: Any):
        if os.path.basename(str(program)) == "p2pd" and "preexec_fn" not in kwargs:
            kwargs["preexec_fn"] = preexec
        return await original(program, *args, **kwargs)

    asyncio.subprocess.create_subprocess_exec = launch
    try:
        yield
    finally:
        asyncio.subprocess.create_subprocess_exec = original


class _RecordValidator(RecordValidatorBase):
    """Every DHT node checks each record it is asked to store or finds: a valid swarmlm
    envelope, signed by its signer, for the very key and subkey it sits under, kept no longer
    than it was signed for. Anything else is refused."""

    _REGULAR = DHTProtocol.IS_REGULAR_VALUE

    def validate(self, record: DHTRecord) -> bool:
        try:
            data = MSGPackSerializer.loads(record.value)
            env = unseal(data)
            if DHTID.generate(env.key).to_bytes() != record.key:
                return False
            expected_subkey = self._REGULAR if env.subkey is None else MSGPackSerializer.dumps(env.subkey)
            if record.subkey != expected_subkey:
                return False
            return record.expiration_time <= env.expires_at + 1e-3
        except Exception as e:
            logger.debug("refusing a DHT record: %s", e)
            return False
