"""A host's fast lane: chained one-token steps handled in the side channel's own callback.

swarm/fast.py has the records and why. Here, on a client's steps connection:
- STEP runs the step at once (it was relayed, or goes to the first server of the chain) and
  REPLYs; with PUSH it pushes the outputs on to the session's next server first;
- WAIT arms the session's inbox: from that position on, each push from the previous server runs
  its step the moment it is decrypted (chain.py's `Inbox.arm`), and the REPLY goes back on the
  connection the WAIT came on, until a slow step disarms it;
and on a previous server's push connection, once bound (`PushBind`, host.py), PUSH delivers an
input into the bound session only.

Every check of the slow path holds: the session is the caller's own, the position is exactly
the one the cache holds (no trimming, no first step: those go slow), the payload is one position
of the session's rows in the host's dtype, and finite. Finiteness is checked once, on the
outputs: a block adds its input to its output (the residual stream), so a NaN or infinity in the
input is one in the output. The span's compiled step checks them as it copies them into the
session's output buffer (blocks.run_span's `into`: a loop in C++, no call from here) and then
advances nothing; other paths (several rows) check their bytes (fast.all_finite: one numpy pass)
and trim the cache back. Either way the step is refused, and nothing was pushed: the push and the
REPLY leave only with checked outputs. Each record's bytes go straight into and out of the
session's buffers (`_Buffers`): a torch call costs 15-30 us on the caches a span's compute
leaves (bench/swarm_step_trace.py --detail). A step that cannot run here for any
reason (a bad record included) gets an ERROR record naming its position, and the client takes
the slow path (wire.py's messages) from that hop; a bad push ends the push connection, as in
host.py. Nothing here awaits: a step is computed inline, as host.py does for short steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from swarmlm.errors import CapacityError, SwarmlmError, WireError
from swarmlm.log import get_logger
from swarmlm.model.fastdecode import span_step
from swarmlm.p2p import rpc
from swarmlm.swarm import fast
from swarmlm.swarm.blocks import run_span
from swarmlm.swarm.server import metrics
from swarmlm.swarm.server.pushes import bound_session

if TYPE_CHECKING:
    from swarmlm.swarm.server.host import BlockHost, _Session

logger = get_logger(__name__)

Handler = Callable[[bytes | None], bool]
_NO_SESSION = bytes(16)
_NOT_FINITE = "hidden states hold NaN or infinity (a block adds its input to its output: the input's)"
# torch.inference_mode's own guard, without its Python wrapper (~5 us less on a step's cold caches)
_inference_mode = getattr(torch._C, "_InferenceMode", torch.inference_mode)


class FastLane:
    def __init__(self, host: BlockHost, *, max_rows: int = fast.MAX_ROWS):
        self.host = host
        self.max_rows = max_rows          # rows of one step computed inline

    def prepare(self, key: tuple[str, bytes]) -> None:
        """Make session `key` ready for one-token steps: its buffers, and its span's decode step
        (blocks.run_span's lean path, built on first use and kept on the cache: ~1 ms for half the
        small preset, its compiled plan bound to this session's cache). The host calls it once a
        prompt's reply has left, while the client computes the first token, so the first decoding
        step does not wait for it. Nothing where the session is gone or running a step."""
        session = self.host.sessions.get(key)
        if session is None or session.lock.locked() or session.fast_io is not None:
            return
        _buffers(session, self.host)
        with _inference_mode(True):           # as the steps that use it
            span_step(self.host.model, session.cache, session.start, session.end)

    # ---- a client's steps connection ----------------------------------------------------------------

    def on_steps(self, conn: Any) -> Handler:
        """The record handler of a client's steps connection: fast records here, rpc frames declined."""
        def handle(plain: bytes | None) -> bool:
            if plain is None or not fast.is_fast(plain):
                return False
            self._steps_record(conn, plain)
            return True
        return handle

    def _steps_record(self, conn: Any, plain: bytes) -> None:
        session_id, position = _NO_SESSION, 0
        try:
            kind, flags, session_id, position, payload = fast.parse(plain)
            key = (conn.peer_id, session_id)
            session = self.host.session(key)
            push = bool(flags & fast.PUSH_FLAG)
            if kind == fast.STEP:
                hidden = self._input(session, payload)                     # _run checks the outputs
                self._run(conn, key, session, position, hidden, push)     # relayed, or the first hop's
            elif kind == fast.WAIT:
                if len(payload):
                    raise WireError("a fast wait carries no payload")
                self.host.check_push_position(session, position)
                session.inbox.arm(position, lambda at, hidden: self._waited(conn, key, at, push, hidden))
            else:
                raise WireError(f"a client sends fast steps and waits, not records of kind {kind}")
        except SwarmlmError as e:
            self._refuse(conn, session_id, position, e)

    def _waited(self, conn: Any, key: tuple[str, bytes], position: int, push: bool, hidden: Any) -> None:
        """An input came for the armed session (`hidden` None: the step at `position` was called off)."""
        try:
            if not isinstance(hidden, torch.Tensor):
                raise WireError(f"the step at position {position} was called off")
            self._run(conn, key, self.host.session(key), position, hidden, push)
        except SwarmlmError as e:
            self._refuse(conn, key[1], position, e)

    def _run(self, conn: Any, key: tuple[str, bytes], session: _Session, position: int, hidden: torch.Tensor,
             push: bool) -> None:
        B = hidden.shape[0]
        if B > self.max_rows:
            raise CapacityError(f"{B} rows are more than a fast step computes inline ({self.max_rows})")
        if session.lock.locked():
            raise CapacityError("the session is running another step")
        length = session.cache.length
        if position != length or position == 0:
            raise WireError(f"a fast step at position {position}, but the session holds {length} positions")
        if position + 1 > session.max_length:
            raise CapacityError(f"the session allows {session.max_length} positions; {position} + 1 would exceed it")
        host = self.host
        host.budget.check_request(B, B)
        host.budget.touch(key, host.clock())
        io = _buffers(session, host)
        try:
            with _inference_mode(True):
                out = run_span(host.model, hidden, session.start, session.end, cache=session.cache, into=io.out)
        except Exception as e:              # as serve_channel answers a handler's failure
            logger.warning("a fast step from %s failed", key[0], exc_info=e)
            raise WireError(f"the step failed: {rpc.describe_failure(e)}") from None
        if out is None:                     # run_span checked its outputs into io.out: the cache was not advanced
            raise WireError(_NOT_FINITE)
        if out is io.out:                   # checked, and its bytes at hand
            raw = io.out_bytes
        else:                               # another path (several rows: not the compiled step)
            raw = fast.tensor_bytes(out)
            if not fast.all_finite(raw, out.dtype):
                session.cache.trim(position)
                raise WireError(_NOT_FINITE)
        pushed = push and session.next is not None and session.next.push_fast(position, raw)   # written now
        _write(conn, fast.record(fast.REPLY, key[1], position, raw, flags=fast.PUSH_FLAG if pushed else 0))
        metrics.count_step(B)
        host.tokens_served += B

    def _refuse(self, conn: Any, session_id: bytes, position: int, e: SwarmlmError) -> None:
        logger.info("a fast step from %s refused: %s", conn.peer_id, e)
        metrics.later(metrics.count_fast_refusal)
        _write(conn, fast.record(fast.ERROR, session_id, position, str(e).encode("utf-8", "replace")[:fast.MAX_ERROR_BYTES]))

    # ---- a previous server's push connection ------------------------------------------------------------

    def on_push(self, conn: Any, key: tuple[str, bytes]) -> Handler:
        """The record handler of a push connection bound to session `key`: fast pushes into it only."""
        def handle(plain: bytes | None) -> bool:
            if plain is None or not fast.is_fast(plain):
                return False
            try:
                kind, _, session_id, position, payload = fast.parse(plain)
                session = bound_session(self.host, key, conn.peer_id, session_id, kind == fast.PUSH)
                # _run checks the outputs; an input that waits for its step gets a tensor of its own
                hidden = (self._input(session, payload) if session.inbox.armed else
                          fast.hidden_of(payload, batch=session.batch, dim=self.host.cfg.dim, dtype=self.host.dtype,
                                         finite=False))
                self.host.check_push_position(session, position)
                session.inbox.deliver(position, hidden)     # a fast wait runs now; a slow step wakes
            except SwarmlmError as e:
                logger.info("a push from %s refused: %s", conn.peer_id, e)
                _write(conn, rpc.frame(rpc.ERROR, str(e).encode("utf-8", "replace")[:rpc.MAX_ERROR_BYTES]))
                conn.close()
            return True
        return handle

    def _input(self, session: _Session, payload: memoryview) -> torch.Tensor:
        """The session's input buffer, holding `payload` (a step that runs now: `_run` is done with it
        before another record is read)."""
        fast.check_size(payload, batch=session.batch, dim=self.host.cfg.dim, dtype=self.host.dtype)
        io = _buffers(session, self.host)
        io.inp_bytes[:] = payload
        return io.inp


class _Buffers:
    """A session's fast-lane input and output, made once: an input is copied into `inp` (a memory copy,
    where making a tensor of each record's bytes costs two torch calls, ~25 us on a step's cold caches),
    and the span's compiled step writes its outputs into `out` (blocks.run_span's `into`), whose bytes
    `out_bytes` are what the push and the reply send (~45 us: no view, no numpy array per step)."""

    def __init__(self, batch: int, dim: int, dtype: torch.dtype):
        self.inp = torch.empty((batch, 1, dim), dtype=dtype)
        self.inp_bytes = fast.tensor_bytes(self.inp)
        self.out = torch.empty((batch, 1, dim), dtype=dtype)
        self.out_bytes = fast.tensor_bytes(self.out)


def _buffers(session: _Session, host: BlockHost) -> _Buffers:
    if session.fast_io is None:
        session.fast_io = _Buffers(session.batch, host.cfg.dim, host.dtype)
    return session.fast_io


def _write(conn: Any, data: bytes) -> None:
    try:
        conn.write(data)
    except ConnectionError as e:            # the client is gone: nobody to tell
        logger.debug("a fast-lane record to %s lost: %s", conn.peer_id, e)
