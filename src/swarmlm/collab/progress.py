"""Global training progress from per-peer DHT records, and the pure decisions built on it.

Each peer publishes one `ProgressRecord` under `keys.collab_progress_key(run_id)` (subkey =
its peer ID) every fraction of a second: the step it works on, the samples it has
accumulated towards it, its throughput and its recent loss. From the records every peer
builds the same kind of `SwarmView` and decides, with no I/O:

- `is_time_to_average`: have we (together) reached the target global batch for this step?
- `round_candidates`: whom should a round at this step wait for?
- `peer_to_follow`: is someone past this step, or at it with a different model (two groups
  formed where there should have been one), so this peer must download the state?

Knows nothing of tensors, RPCs or the DHT client; the optimizer does the I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from swarmlm.p2p.records import SignedRecord, record_type

RUNS_SERVICE = "collab.runs"    # the directory (p2p/directory.py) where each peer lists the run it trains in


@record_type("collab.progress")
@dataclass(frozen=True)
class ProgressRecord:
    step: int                 # global step (synchronous) or outer step (DiLoCo) the peer works on
    samples: int              # samples accumulated towards that step so far
    samples_per_s: float      # the peer's recent compute throughput; 0 when not yet measured
    loss: float               # its recent training loss (for progress bars); NaN when unknown
    time: float               # wall clock (Unix s) when published
    active: bool = True       # False once the peer has finished or is leaving
    lineage: str = ""         # digest of the chain of rounds behind its model; equal step + lineage = same model

    def check(self) -> None:
        if self.step < 0 or self.samples < 0:
            raise ValueError("step and samples must not be negative")
        if not (math.isfinite(self.samples_per_s) and self.samples_per_s >= 0):
            raise ValueError("samples_per_s must be a finite, non-negative number")
        if not math.isfinite(self.time):
            raise ValueError("time must be finite")


@dataclass(frozen=True)
class SwarmView:
    """The live peers of a run, as this peer sees them at one moment."""
    peers: Mapping[str, ProgressRecord]      # peer ID -> its latest record (active, fresh, not banned)

    @property
    def size(self) -> int:
        return len(self.peers)

    def samples_per_s(self) -> float:
        return sum(r.samples_per_s for r in self.peers.values())

    def mean_loss(self) -> float:
        losses = [r.loss for r in self.peers.values() if math.isfinite(r.loss)]
        return sum(losses) / len(losses) if losses else math.nan


def build_view(records: Iterable[SignedRecord], *, me: str, mine: ProgressRecord, now: float, max_age_s: float,
               banned: Iterable[str] = ()) -> SwarmView:
    """Fresh, active records signed by their own peer, minus `banned`; this peer's own record is `mine`."""
    banned = set(banned)
    peers: dict[str, ProgressRecord] = {}
    for rec in records:
        value = rec.value
        if not isinstance(value, ProgressRecord) or rec.subkey != rec.signer or rec.signer in banned:
            continue
        if not value.active or now - value.time > max_age_s or rec.signer == me:
            continue
        peers[rec.signer] = value
    peers[me] = mine
    return SwarmView(peers)


def fair_share(view: SwarmView, me: str, target: int, micro_batch: int) -> int:
    """Samples this peer should contribute to a step of `target` samples: its share of the
    swarm's throughput (equal shares until every rate is known), in whole micro-batches, at least one."""
    rates = [r.samples_per_s for r in view.peers.values()]
    if all(r > 0 for r in rates):
        share = target * view.peers[me].samples_per_s / sum(rates)
    else:
        share = target / max(1, view.size)
    return max(1, round(share / micro_batch)) * micro_batch


def is_time_to_average(view: SwarmView, me: str, *, step: int, my_samples: int, target: int | None,
                       micro_batch: int) -> bool:
    """True once this peer has done its share of step `step`, or the peers at that step together
    reached `target` samples. `target=None` means one micro-batch from each peer."""
    if my_samples <= 0:
        return False
    if target is None:
        return my_samples >= micro_batch
    if my_samples >= fair_share(view, me, target, micro_batch):
        return True
    together = my_samples + sum(r.samples for p, r in view.peers.items() if p != me and r.step == step)
    return together >= target


def round_candidates(view: SwarmView, me: str, step: int) -> list[str]:
    """Peers a round at `step` should wait for: everyone live not past it (a record may lag the
    peer's progress by several steps). Sorted, this peer included."""
    return sorted(p for p, r in view.peers.items() if p == me or r.step <= step)


def peer_to_follow(view: SwarmView, me: str) -> str | None:
    """The peer whose model this one must adopt, or None. The reference model is that of the
    most advanced peer (smallest ID among equals); this peer follows it when it is behind, or
    at the same step with another lineage — so a swarm that split into two groups for a step
    converges back to one model at the next look."""
    mine = view.peers[me]
    ref = reference_peer(view)
    if ref == me:
        return None
    other = view.peers[ref]
    if other.step > mine.step or other.lineage != mine.lineage:
        return ref
    return None


def reference_peer(view: SwarmView) -> str:
    """The most advanced peer; the smallest peer ID among equals."""
    top = max(r.step for r in view.peers.values())
    return min(p for p, r in view.peers.items() if r.step == top)
