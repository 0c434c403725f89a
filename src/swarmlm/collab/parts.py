"""The parts of an averaging round, as bookkeeping: who owns which part, what has arrived, the result.

    plan = PartPlan(group.members, me, part_bounds(numel, len(group.members)))
    plan.owner(p); plan.owned; plan.sends()           # {owner: [parts]}, every part in global order
    own = OwnedPart(plan.size(p))
    if own.add(sender, Contribution(t, weight)) and own.complete(len(plan.members)):
        result = combine(own, aggregator="mean", compression="none")
    assembly.accept(p, reply, total_weight)           # an owner's answer, checked, into the result

The flat (numel,) vector is cut into parts; member i of the sorted member list owns parts
i, i + n, ... (at least one each; more for big vectors, so no part exceeds `MAX_PART_ELEMS`).
An owner waits until every member's contribution for a part has arrived, drops the malformed
ones with a reason, combines the rest with the robust aggregator, and keeps the decoded form
of what it sends, so with lossy compression every member ends with bit-identical values.

Pure: no I/O, no clock, no asyncio. Knows nothing of transports, peers' addresses or models.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from swarmlm.collab import compression as codecs
from swarmlm.collab.robust import aggregate, all_finite, validate_updates
from swarmlm.errors import WireError

MAX_PART_ELEMS = 1 << 18           # 1 MiB of float32 per part: several parts in flight fill the pipe


def part_bounds(numel: int, n_members: int, max_part_elems: int = MAX_PART_ELEMS) -> list[tuple[int, int]]:
    """[start, end) of each part: a multiple of n_members parts, near-equal, none over max_part_elems."""
    n_parts = max(1, math.ceil(numel / max_part_elems))
    n_parts = math.ceil(n_parts / n_members) * n_members
    edges = [numel * i // n_parts for i in range(n_parts + 1)]
    return list(itertools.pairwise(edges))


@dataclass(frozen=True)
class PartPlan:
    """Which member owns which part of one round, seen from member `me`."""
    members: tuple[str, ...]                 # sorted peer IDs
    me: str
    bounds: list[tuple[int, int]]            # part -> [start, end)

    def owner(self, part: int) -> str:
        return self.members[part % len(self.members)]

    def size(self, part: int) -> int:
        a, b = self.bounds[part]
        return b - a

    @property
    def owned(self) -> list[int]:
        """The parts `me` owns."""
        i = self.members.index(self.me)
        return list(range(i, len(self.bounds), len(self.members)))

    def sent(self) -> list[int]:
        """The parts `me` sends to their owners, in the global order every member uses."""
        mine = set(self.owned)
        return [p for p in range(len(self.bounds)) if p not in mine]

    def sends(self) -> dict[str, list[int]]:
        """{owner: the parts `me` sends it}, each list in the global order."""
        out: dict[str, list[int]] = {}
        for p in self.sent():
            out.setdefault(self.owner(p), []).append(p)
        return out


@dataclass(frozen=True)
class Contribution:
    tensor: torch.Tensor | None              # (size,) float32 as decoded; None if it did not decode
    weight: float                            # the sender's sample count (mean weights by it)
    reason: str | None = None                # why it did not decode


@dataclass(frozen=True)
class PartResult:
    aggregate: torch.Tensor                  # (size,) float32: what the owner encodes and sends
    local: torch.Tensor                      # (size,) what every member decodes from it (the owner too)
    total_weight: float                      # summed weight of the contributions kept
    n_kept: int
    dropped: list[tuple[str, str]]           # (sender, reason)


@dataclass
class OwnedPart:
    """One part this member owns: the contributions that have arrived for it."""
    size: int
    contribs: dict[str, Contribution] = field(default_factory=dict)

    def add(self, sender: str, contribution: Contribution) -> bool:
        """Keep `sender`'s first contribution; False for a repeat (a retry after a broken connection)."""
        if sender in self.contribs:
            return False
        self.contribs[sender] = contribution
        return True

    def complete(self, n_members: int) -> bool:
        return len(self.contribs) == n_members

    def missing(self, members: tuple[str, ...]) -> set[str]:
        return set(members) - set(self.contribs)


def combine(own: OwnedPart, *, aggregator: str, compression: str) -> PartResult:
    """The aggregate of a complete part: malformed contributions dropped with a reason, the rest
    combined; `ValueError` if none is left."""
    updates = [(s, c.tensor, c.weight) for s, c in own.contribs.items() if c.reason is None]
    kept, dropped = validate_updates(updates, shape=(own.size,), dtype=torch.float32)
    dropped += [(s, c.reason) for s, c in own.contribs.items() if c.reason is not None]
    if not kept:
        raise ValueError("no contribution to this part is well-formed")
    agg = aggregate(aggregator, [t for _, t, _ in kept], [w for _, _, w in kept])
    local = agg if compression == "none" else codecs.roundtrip(agg, compression)
    return PartResult(agg, local, sum(w for _, _, w in kept), len(kept), dropped)


def suspects(plan: PartPlan, owned: dict[int, OwnedPart], named: set[str], *, timed_out: bool) -> set[str]:
    """Who a failed round blames: those its failure names, and on a timeout whoever never sent
    this member a contribution it waited for."""
    out = set(named)
    if timed_out:
        for own in owned.values():
            out |= own.missing(plan.members)
    out.discard(plan.me)
    return out


class Assembly:
    """The round's result as it comes together: each part's aggregate, and the weight behind it."""

    def __init__(self, plan: PartPlan, numel: int):
        self.plan = plan
        self.out = torch.empty(numel)                  # (numel,) float32
        self.weights: dict[int, float] = {}

    def slot(self, part: int) -> torch.Tensor:
        """Where `part` lands in the result: a view a reply may be decoded straight into."""
        a, b = self.plan.bounds[part]
        return self.out[a:b]

    def accept(self, part: int, values: torch.Tensor, total_weight: float) -> None:
        """Take an owner's aggregate for `part` (possibly already in `slot(part)`); `WireError` if it
        is not finite, or if this part was already answered."""
        if part in self.weights:
            raise WireError(f"part {part} answered twice")
        if not all_finite(values):
            raise WireError(f"part {part} contains NaN or inf")
        slot = self.slot(part)
        if values.data_ptr() != slot.data_ptr():
            slot.copy_(values)
        self.weights[part] = float(total_weight)

    @property
    def complete(self) -> bool:
        return len(self.weights) == len(self.plan.bounds)

    def total_weight(self) -> float:
        """The smallest summed weight behind any part: the samples every value of the result saw."""
        return min(self.weights.values())
