"""What the client and the parties say to each other on the side channel (purpose `privacy/mpc`).

Every record starts with one kind byte:

    client -> party   HELLO  ClientHello      (first record of a client's connection)
                      STEP   StepHeader, then one raw record: the party's two components of the
                             one-hot tokens (1, T, V) int64, little-endian
    party -> client   READY  Ready            (its links to both other parties are up)
                      RESULT StepResult, then one raw record: its component of the logits (1, V)
                      ERROR  ErrorReply       (the session is over)
    party -> party    LINK   LinkHello        (party i dials party i+1; carries their PRG seed)
                      DATA   step (u32) | seq (u32) | one protocol message (runtime.encode_message)

`MpcPartyRecord` is the signed DHT record a party announces under `keys.mpc_parties_key(model)`.
Knows nothing of models or of protocols.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from swarmlm import serialize
from swarmlm.errors import WireError
from swarmlm.p2p.records import record_type

PURPOSE = "privacy/mpc"
HELLO, STEP, READY, RESULT, ERROR, LINK, DATA = range(1, 8)
SESSION_BYTES = 16
SEED_BYTES = 32
DATA_HEADER = struct.Struct("<II")          # step, sequence number on this link
MAX_RECORD_BYTES = 64 << 20                 # the largest record a party reads (share messages included)
MAX_ERROR_CHARS = 500
PARTIES_SERVICE = "mpc.parties"            # the directory (p2p/directory.py) where parties list their model


@record_type("privacy.mpc_party")
@dataclass(frozen=True)
class MpcPartyRecord:
    model: str                    # model id: a manifest CID, or the content hash of a checkpoint directory
    max_tokens: int               # the longest session (prompt plus generated tokens) it accepts

    def check(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError("max_tokens must be positive")


@dataclass(frozen=True)
class ClientHello:
    session: bytes                # SESSION_BYTES random bytes, named by the client
    index: int                    # this party's place, 0..2
    parties: list[str]            # the three parties' peer IDs, in order
    model: str                    # the model id the client expects
    max_tokens: int               # prompt plus new tokens the session will ask for


@dataclass(frozen=True)
class LinkHello:
    session: bytes
    index: int                    # the dialing party's place; the listener is index + 1 (mod 3)
    seed: bytes                   # SEED_BYTES: the PRG seed of this pair of parties


@dataclass(frozen=True)
class Ready:
    index: int


@dataclass(frozen=True)
class StepHeader:
    step: int                     # 0, 1, 2, ... in order
    n_tokens: int                 # T of the one-hot payload that follows


@dataclass(frozen=True)
class StepResult:
    step: int
    rounds: int                   # communication rounds of this step
    bytes_sent: int               # bytes this party sent to the other parties during the step


@dataclass(frozen=True)
class ErrorReply:
    message: str


def pack(kind: int, msg) -> bytes:
    return bytes([kind]) + serialize.encode_message(msg)


_TYPES = {HELLO: ClientHello, STEP: StepHeader, READY: Ready, RESULT: StepResult, ERROR: ErrorReply, LINK: LinkHello}


def unpack(record: bytes, *expected: int):
    """(kind, message) of a record whose kind is one of `expected`; WireError otherwise."""
    if not record:
        raise WireError("an empty record")
    kind = record[0]
    if kind not in expected or kind not in _TYPES:
        raise WireError(f"a record of kind {kind} where one of {list(expected)} was expected")
    msg = serialize.decode_message(bytes(record[1:]), _TYPES[kind], max_bytes=1 << 16)
    if isinstance(msg, (ClientHello, LinkHello)) and len(msg.session) != SESSION_BYTES:
        raise WireError(f"a session id is {SESSION_BYTES} bytes")
    if isinstance(msg, LinkHello) and len(msg.seed) != SEED_BYTES:
        raise WireError(f"a seed is {SEED_BYTES} bytes")
    return kind, msg


def data_record(step: int, seq: int, payload: bytes) -> bytes:
    return bytes([DATA]) + DATA_HEADER.pack(step, seq) + payload


def open_data(record: bytes, step: int, seq: int) -> bytes:
    """The payload of a DATA record for exactly this step and sequence number, or WireError."""
    if len(record) < 1 + DATA_HEADER.size or record[0] != DATA:
        raise WireError("expected a protocol message from the other party")
    got_step, got_seq = DATA_HEADER.unpack_from(record, 1)
    if (got_step, got_seq) != (step, seq):
        raise WireError(f"a message for step {got_step} #{got_seq} where step {step} #{seq} was expected")
    return bytes(record[1 + DATA_HEADER.size:])
