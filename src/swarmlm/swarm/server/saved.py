"""SavedForwards: what a forward keeps for its backward, bounded by bytes and by age.

A client that will differentiate a span asks the server to keep its forward
(`SpanForwardRequest.keep_id`); the matching backward (`SpanBackwardRequest.keep_id`) then
runs autograd on the kept graph instead of running the forward again, which saves a third of
the server's compute in a training step. An entry is keyed by (caller, id) and dropped by
its backward, when it is older than `max_age_s`, or, oldest first, when a new one would not
fit in `max_bytes`; a backward that finds nothing recomputes, so eviction costs time, never
correctness. Plain bookkeeping: the caller passes the time and each entry's size. Knows
nothing of tensors, models or the wire.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable


@dataclass
class _Kept:
    value: Any                   # what the host keeps (inputs, output and its graph)
    size_bytes: int              # memory it holds beyond the model's own weights
    saved_at: float              # caller's clock


class SavedForwards:
    def __init__(self, *, max_bytes: int, max_age_s: float):
        if max_bytes < 0 or not max_age_s > 0:
            raise ValueError(f"need max_bytes >= 0 and max_age_s > 0, got {max_bytes} and {max_age_s}")
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._entries: OrderedDict[Hashable, _Kept] = OrderedDict()   # oldest first
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Hashable, value: Any, *, size_bytes: int, now: float) -> bool:
        """Keep `value` under `key`, evicting the oldest entries to make room; False if it can never fit."""
        self.expire(now)
        self._pop(key)
        if size_bytes > self.max_bytes:
            return False
        while self.used_bytes + size_bytes > self.max_bytes:
            self._pop(next(iter(self._entries)))
        self._entries[key] = _Kept(value, size_bytes, now)
        self.used_bytes += size_bytes
        return True

    def take(self, key: Hashable, *, now: float) -> Any | None:
        """The value kept under `key` (and forget it), or None if there is none or it is too old."""
        kept = self._pop(key)
        if kept is None or now - kept.saved_at > self.max_age_s:
            return None
        return kept.value

    def expire(self, now: float) -> int:
        """Drop the entries older than `max_age_s` at time `now`; returns how many."""
        old = [k for k, e in self._entries.items() if now - e.saved_at > self.max_age_s]
        for key in old:
            self._pop(key)
        return len(old)

    def clear(self) -> None:
        self._entries.clear()
        self.used_bytes = 0

    def _pop(self, key: Hashable) -> _Kept | None:
        kept = self._entries.pop(key, None)
        if kept is not None:
            self.used_bytes -= kept.size_bytes
        return kept
