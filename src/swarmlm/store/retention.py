"""What a block store keeps: pins, and garbage collection least recently used first.

A pin is a root: `gc` never deletes a block reachable from a pinned root (walking the links of
the dag-pb and dag-json blocks present), and deletes the other blocks least recently used first
until the store fits its limit. `choose_evictions` is that decision, pure; `PinsAndGc` runs it
over the primitives both stores of blockstore.py provide. Knows nothing of where blocks live.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from swarmlm.errors import IntegrityError, NotFoundError, WireError
from swarmlm.log import get_logger
from swarmlm.store.cid import RAW, Cid
from swarmlm.store.unixfs import links_of

logger = get_logger(__name__)


class Entry(NamedTuple):
    cid: Cid              # CIDv1
    size_bytes: int
    last_used: float      # comparable within one store: larger is more recent


def choose_evictions(entries: Iterable[Entry], protected: set[Cid], limit_bytes: int) -> list[Cid]:
    """Unprotected blocks to delete, least recently used first, until the total is <= limit_bytes."""
    entries = list(entries)
    excess = sum(e.size_bytes for e in entries) - limit_bytes
    victims = []
    for e in sorted(entries, key=lambda e: (e.last_used, e.cid.digest)):
        if excess <= 0:
            break
        if e.cid not in protected:
            victims.append(e.cid)
            excess -= e.size_bytes
    return victims


class PinsAndGc:
    """Pins and garbage collection over the primitives each store provides: `has`, `get`,
    `delete`, `entries`, and the three pin-list hooks below. A store that reads no clock keeps
    every block through `min_idle_s` (its `_recent_cutoff` is infinite)."""

    def _load_pins(self) -> list[str]: raise NotImplementedError
    def _save_pins(self, pins: list[str]) -> None: raise NotImplementedError
    def _pins_lock(self): raise NotImplementedError

    def pin(self, cid: Cid) -> None:
        """Keep `cid` and every block under it through GC (persistently, for BlockStore)."""
        with self._pins_lock():
            pins = self._load_pins()
            if all(Cid.parse(p).to_v1() != cid.to_v1() for p in pins):
                self._save_pins(pins + [cid.encode()])

    def unpin(self, cid: Cid) -> bool:
        with self._pins_lock():
            pins = self._load_pins()
            kept = [p for p in pins if Cid.parse(p).to_v1() != cid.to_v1()]
            if len(kept) != len(pins):
                self._save_pins(kept)
            return len(kept) != len(pins)

    def pinned(self) -> list[Cid]:
        """The pinned roots, as they were pinned (v0 stays v0)."""
        return [Cid.parse(p) for p in self._load_pins()]

    def is_pinned(self, cid: Cid) -> bool:
        return any(p.to_v1() == cid.to_v1() for p in self.pinned())

    def protected(self) -> set[Cid]:
        """CIDv1s of every present block reachable from a pinned root."""
        seen: set[Cid] = set()
        stack = [p.to_v1() for p in self.pinned()]
        while stack:
            cid = stack.pop()
            if cid in seen or not self.has(cid):
                continue
            seen.add(cid)
            if cid.codec == RAW:
                continue                 # raw leaves have no links: no need to read them
            try:
                stack.extend(c.to_v1() for c in links_of(cid, self.get(cid)))
            except (IntegrityError, NotFoundError):
                seen.discard(cid)        # corrupted (now deleted) or gone meanwhile
            except WireError as e:
                logger.warning("pinned block %s does not decode, its children are not protected: %s", cid, e)
        return seen

    def gc(self, limit_bytes: int, *, min_idle_s: float = 0.0) -> int:
        """Delete unpinned blocks, least recently used first, until the store holds <= limit_bytes.

        Blocks used within the last `min_idle_s` seconds are kept (a fetch in progress, not yet
        pinned). Returns the bytes freed.
        """
        protected = self.protected()
        cutoff = self._recent_cutoff(min_idle_s)
        everything = list(self.entries())
        idle = [e for e in everything if e.last_used < cutoff]
        busy_bytes = sum(e.size_bytes for e in everything) - sum(e.size_bytes for e in idle)
        freed = 0
        sizes = {e.cid: e.size_bytes for e in idle}
        for cid in choose_evictions(idle, protected, max(0, limit_bytes - busy_bytes)):
            if self.delete(cid):
                freed += sizes[cid]
        if freed:
            logger.info("gc freed %d bytes", freed)
        return freed

    def _recent_cutoff(self, min_idle_s: float) -> float:
        return float("inf")
