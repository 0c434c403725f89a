"""Messages of a federated run on one side-channel connection (purpose `privacy/fl`) between a
client and the coordinator, held open for the whole run: the connection is the membership.

    client -> coordinator   JOIN, then per round: REPORT, and UPDATE (plain) or SECAGG records
    coordinator -> client   WELCOME, then per round: ROUND, SECAGG records (secure rounds), and END

A record is one kind byte then `serialize.encode_message` of the kind's dataclass. The side
channel already proves who dialed (`conn.peer_id`) and encrypts and orders every record;
secure-aggregation payloads are signed besides (secagg/messages.py), since the coordinator is
not trusted with them. Knows nothing of models or training.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarmlm import compact, serialize
from swarmlm.errors import WireError

PURPOSE = "privacy/fl"
MAX_RECORD_BYTES = 256 << 20       # an update of 64M float32 coordinates


@dataclass(frozen=True)
class Join:
    run_id: str


@dataclass(frozen=True)
class Welcome:
    run_id: str
    members: int                   # clients joined so far, this one included


@dataclass(frozen=True)
class RoundStart:
    round: int
    attempt: int                   # a failed round is retried under a new attempt number
    manifest_cid: str              # the global model, in the store
    length: int                    # coordinates of an update
    local_steps: int               # E
    lr: float                      # local SGD learning rate
    fedprox_mu: float              # FedProx proximal term (0: FedAvg)
    batch_size: int
    seq_len: int
    secure: bool                   # secure aggregation: SECAGG records follow
    coord_clip: float              # every coordinate of an update is clipped to this (the fixed-point range)
    dp_clip: float                 # 0: no DP; else each update's L2 norm is clipped to this
    dp_noise: float                # σ: each client adds N(0, (σ·dp_clip)² / min_clients)
    min_clients: int
    max_clients: int               # the fixed-point ring holds this many updates
    lora_rank: int = 0             # 0: whole-model updates; else only LoRA B matrices (A frozen, drawn from lora_seed)
    lora_alpha: float = 16.0
    lora_seed: int = 0
    dp_sgd_clip: float = 0.0       # 0: plain local SGD; else DP-SGD, each sample's gradient clipped to this
    dp_sgd_noise: float = 0.0      # σ of DP-SGD: N(0, (σ·dp_sgd_clip)²) on each step's gradient sum
    dp_delta: float = 1e-5         # δ at which a client accounts its sample-level ε


@dataclass(frozen=True)
class Report:
    round: int
    attempt: int
    train_loss: float              # mean loss over the local steps
    val_loss: float                # the received global model on this client's validation split
    n_samples: int                 # sequences trained on this round
    dp_sgd_rate: float = 0.0       # DP-SGD only (public): this client's Poisson rate q = batch / local examples,
    dp_sgd_steps: int = 0          # its DP-SGD steps so far in this run,
    dp_sgd_epsilon: float = 0.0    # and the accountant's ε for them at the round's δ


@compact.compact                   # the large records (both kinds alike): a binary layout, not msgpack
@dataclass(frozen=True)
class Update:                      # plain rounds only
    round: int
    attempt: int
    vector: bytes                  # float32 little-endian, `length` coordinates


@compact.compact
@dataclass(frozen=True)
class SecAgg:
    round: int
    attempt: int
    data: bytes                    # a signed secagg message (secagg/messages.py)


@dataclass(frozen=True)
class End:
    reason: str


@dataclass(frozen=True)
class Error:
    message: str


KINDS: dict[int, type] = {1: Join, 2: Welcome, 3: RoundStart, 4: Report, 5: Update, 6: SecAgg, 7: End, 8: Error}
_CODES = {cls: code for code, cls in KINDS.items()}


def encode(msg: object) -> bytes:
    layout = compact.layout_of(type(msg))
    if layout is not None:                     # kind byte and payload in one copy
        return compact.encode(msg, layout, prefix=bytes([_CODES[type(msg)]]))
    return bytes([_CODES[type(msg)]]) + serialize.encode_message(msg)


def decode(data: bytes, *, max_bytes: int = MAX_RECORD_BYTES) -> object:
    """The message in one record, or `WireError`."""
    if not data or data[0] not in KINDS:
        raise WireError("a federated-learning record must start with a known kind byte")
    cls = KINDS[data[0]]
    layout = compact.layout_of(cls)
    if layout is not None and isinstance(data, bytes):     # an update's payload: a view of the record, no copy
        return compact.decode(memoryview(data)[1:], layout, max_bytes=max_bytes, views=True)
    return serialize.decode_message(memoryview(data)[1:], cls, max_bytes=max_bytes)
