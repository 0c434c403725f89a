"""An append-only journal of JSON lines beside a snapshot file: how the ledger's per-session state
(a server's latest receipts, a client's signed totals) reaches the disk without slowing a session.

Rewriting a whole file per session (write a temporary file, rename it over) costs milliseconds on
ext4, whose rename-over heuristic flushes the data (measured ~1.3-3 ms here, against ~1 µs to append
a line and flush it to the kernel). Both survive the process dying the same way: what was written
is in the page cache. So each update is one appended line; `load()` reads the snapshot and then
the lines (a torn last line, from a crash mid-write, is skipped); `compact(snapshot)` writes the
snapshot atomically and empties the journal — the caller does it rarely (at load, on settling).
Replaying must be idempotent (the callers keep the maximum of cumulative figures). Knows nothing of
what the records mean.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from swarmlm.log import get_logger

log = get_logger(__name__)


class Journal:
    def __init__(self, snapshot: Path):
        self.snapshot = snapshot
        self.path = snapshot.with_name(snapshot.name + ".log")
        self._f: Any = None

    def load(self) -> tuple[Any, list[dict]]:
        """(the snapshot's JSON or None, the journal's records in order); `ValueError` for a bad snapshot."""
        snap = json.loads(self.snapshot.read_text()) if self.snapshot.exists() else None
        records: list[dict] = []
        if self.path.exists():
            lines = self.path.read_text().split("\n")
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    if i >= len(lines) - 2:          # the last line, torn by a crash: the update was not made
                        log.warning("%s: skipping a torn last line", self.path)
                        continue
                    raise
                if isinstance(rec, dict):
                    records.append(rec)
        return snap, records

    def append(self, record: dict) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open; closed by compact/close)
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()

    def compact(self, snapshot: Any) -> None:
        """Write `snapshot` (everything the journal said, folded) atomically, then empty the journal."""
        self.snapshot.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshot.with_name(self.snapshot.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(snapshot))
        os.replace(tmp, self.snapshot)
        self.close()
        with open(self.path, "w", encoding="utf-8"):
            pass

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
