"""The stages of one secure-aggregation round and the only transitions allowed between them.

    SETUP           clients advertise two X25519 public keys; the coordinator answers with the roster
    SHARE_KEYS      clients send Shamir shares of their mask key and self-mask seed, encrypted per neighbour
    COLLECT_MASKED  clients send their masked input; the coordinator names the survivors
    UNMASK          survivors reveal shares: self-mask seeds of survivors, mask keys of the dropped
    DONE / FAILED   the sum is known, or the round ended with no result

`check_transition` raises before any work is done, so a message of the wrong stage changes
nothing. Knows nothing of keys or vectors.
"""

from __future__ import annotations

import enum

from swarmlm.errors import PeerError


class StageError(PeerError):
    """A message or a step that does not belong to the round's current stage."""


class Stage(enum.Enum):
    SETUP = "setup"
    SHARE_KEYS = "share_keys"
    COLLECT_MASKED = "collect_masked"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


NEXT = {Stage.SETUP: Stage.SHARE_KEYS, Stage.SHARE_KEYS: Stage.COLLECT_MASKED,
        Stage.COLLECT_MASKED: Stage.UNMASK, Stage.UNMASK: Stage.DONE}
TERMINAL = {Stage.DONE, Stage.FAILED}


def check_transition(current: Stage, requested: Stage) -> Stage:
    """`requested` if it may follow `current` (its successor, or FAILED from a live stage), else `StageError`."""
    if current in TERMINAL:
        raise StageError(f"the round is over ({current.value}); nothing may follow it")
    if requested is Stage.FAILED or NEXT.get(current) is requested:
        return requested
    raise StageError(f"{requested.value} cannot follow {current.value}")


def check_stage(current: Stage, expected: Stage, what: str) -> None:
    """`StageError` unless the round is in `expected` (a message of another stage arrived)."""
    if current is not expected:
        raise StageError(f"{what} belongs to stage {expected.value}, but the round is in {current.value}")
