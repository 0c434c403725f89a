"""The dashboard's decisions about what it sees, as pure functions of plain records and times.

- `Freshness`: when a server's announcement was last refreshed; a record not refreshed for half its
  lifetime (plus slack) is *stale*: the server missed at least one re-announcement (it re-announces
  every third of the TTL), so it is shown offline before its record expires.
- `coverage(spans, n_layers)`: how many live servers hold each block; `holes(counts)`: the runs of
  blocks nobody holds, as [start, end) pairs.
- `LossHistory`: a run's (global step, loss) points, one per step, bounded.
- `ServedRate`: a server's served tokens/s, from the token counter its announcements carry.

No I/O, no clock: every time is an argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

STALE_SLACK_S = 2.0          # beyond half the TTL, before a record that was not refreshed counts as stale
MAX_POINTS = 2000            # loss points kept per run (the oldest dropped first)


@dataclass
class Freshness:
    """Per key (a server of a model), the record expiry last seen and when it was first seen (Unix s)."""
    seen: dict[tuple[str, str], tuple[float, float, float]] = field(default_factory=dict)  # key -> (expires, at, ttl)

    def observe(self, key: tuple[str, str], expires_at: float, now: float) -> None:
        old = self.seen.get(key)
        if old is None or expires_at > old[0]:
            self.seen[key] = (expires_at, now, max(expires_at - now, 0.0))

    def age(self, key: tuple[str, str], now: float) -> float:
        """Seconds since the record under `key` was last refreshed (0 if never seen)."""
        old = self.seen.get(key)
        return now - old[1] if old else 0.0

    def is_stale(self, key: tuple[str, str], now: float) -> bool:
        old = self.seen.get(key)
        if old is None:
            return False
        _, at, ttl = old
        return now - at > ttl / 2 + STALE_SLACK_S

    def forget_except(self, keys: Iterable[tuple[str, str]]) -> None:
        keep = set(keys)
        for key in [k for k in self.seen if k not in keep]:
            del self.seen[key]


def coverage(spans: Iterable[tuple[int, int]], n_layers: int) -> list[int]:
    """Live servers per block, from the [start, end) spans of the live servers."""
    counts = [0] * n_layers
    for start, end in spans:
        for i in range(max(start, 0), min(end, n_layers)):
            counts[i] += 1
    return counts


def holes(counts: Sequence[int]) -> list[list[int]]:
    """The maximal runs of blocks with no server, as [start, end) pairs."""
    out: list[list[int]] = []
    for i, n in enumerate(counts):
        if n:
            continue
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def bottleneck(throughputs: Sequence[float]) -> float:
    """The swarm's pipeline rate for a model: its slowest block's summed throughput (0 with a hole)."""
    return min(throughputs, default=0.0)


@dataclass
class LossHistory:
    """A run's loss per global step, in step order, at most `MAX_POINTS` points."""
    points: list[tuple[int, float]] = field(default_factory=list)

    def add(self, step: int, loss: float) -> bool:
        """Record `loss` at `step` if the step is new and the loss finite; True if a point was added."""
        if not math.isfinite(loss) or (self.points and step <= self.points[-1][0]):
            return False
        self.points.append((step, loss))
        del self.points[:-MAX_POINTS]
        return True


@dataclass
class ServedRate:
    """Per key (a server of a model), its served tokens/s: the rise of the token counter it announces between
    its two latest distinct announcements, over the time between them (told by the records' expiries: each is
    a fixed lifetime after its announcement, on the announcer's clock). A counter that fell (a restart) starts over."""
    last: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)    # key -> (tokens, announced at)
    rate: dict[tuple[str, str], float] = field(default_factory=dict)

    def observe(self, key: tuple[str, str], tokens: int, announced_at: float) -> float | None:
        """The rate after this look (None until two announcements were seen)."""
        old = self.last.get(key)
        if old is None or tokens < old[0] or announced_at < old[1]:
            self.last[key] = (tokens, announced_at)
            self.rate.pop(key, None)
        elif announced_at > old[1]:
            self.rate[key] = (tokens - old[0]) / (announced_at - old[1])
            self.last[key] = (tokens, announced_at)
        return self.rate.get(key)

    def forget_except(self, keys: Iterable[tuple[str, str]]) -> None:
        keep = set(keys)
        for d in (self.last, self.rate):
            for key in [k for k in d if k not in keep]:
                del d[key]
