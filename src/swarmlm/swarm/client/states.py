"""The life of an inference session as named states with checked transitions.

    OPENING ─> CHAINED or HOP_BY_HOP   (each step: the same state again)
    CHAINED or HOP_BY_HOP ─> RECOVERING ─> REPLAYING ─> RELINKING ─> CHAINED or HOP_BY_HOP
                                 ^────────────┘ (a replacement lost during its replay)
    any ─> CLOSED

A session opens its chain (OPENING), then steps: CHAINED where every server pushes its outputs to
the next (a step goes to every hop at once, client/chained.py), else HOP_BY_HOP. A hop that fails
starts a failover: RECOVERING (routing around the lost server, opening a replacement chain, the
server after it told to take pushes from it), REPLAYING (the lost hop's recorded inputs fed through
the replacement; a replacement lost here sends it back to RECOVERING), RELINKING (the server before
it told to push into it), and the session steps on, chained again where every link was made. A
failover that finds no replacement in time leaves the session HOP_BY_HOP: that step fails, and a
later one fails over again. CLOSED is final; any state may close.

`check_transition` raises before any work is done, so a step on a closed session, or one while a
failover is under way, never sends anything; `check_stage` does the same for a re-link outside
its stage of a failover. `StepRecord` is the
session's account of how each step went. Knows nothing of servers or tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from swarmlm.errors import SwarmError


class SessionState(enum.Enum):
    OPENING = "opening"          # opening sessions on the first chain, back to front
    CHAINED = "chained"          # every server pushes to the next: a step goes to every hop at once
    HOP_BY_HOP = "hop by hop"    # a step goes to one hop after another
    RECOVERING = "recovering"    # a hop failed: opening a replacement chain for its span
    REPLAYING = "replaying"      # the lost hop's recorded inputs go through the replacement
    RELINKING = "relinking"      # the server before the replacement is told to push into it
    CLOSED = "closed"


S = SessionState
READY = frozenset({S.CHAINED, S.HOP_BY_HOP})   # the states a step may start in

NEXT: dict[SessionState, frozenset[SessionState]] = {
    S.OPENING: frozenset({S.CHAINED, S.HOP_BY_HOP, S.CLOSED}),
    S.CHAINED: frozenset({S.CHAINED, S.RECOVERING, S.CLOSED}),          # CHAINED again: a step
    S.HOP_BY_HOP: frozenset({S.HOP_BY_HOP, S.RECOVERING, S.CLOSED}),    # HOP_BY_HOP again: a step
    S.RECOVERING: frozenset({S.REPLAYING, S.RELINKING, S.HOP_BY_HOP, S.CLOSED}),  # RELINKING: nothing to
    S.REPLAYING: frozenset({S.RECOVERING, S.RELINKING, S.HOP_BY_HOP, S.CLOSED}),  # replay; HOP_BY_HOP: no
    S.RELINKING: frozenset({S.CHAINED, S.HOP_BY_HOP, S.CLOSED}),                  # replacement in time
    S.CLOSED: frozenset(),
}


def check_transition(current: SessionState, requested: SessionState) -> None:
    """`SwarmError` unless a session in `current` may go to `requested` (a step: `requested` is
    `current`, one of the READY states)."""
    if requested in NEXT[current]:
        return
    if current is S.CLOSED:
        raise SwarmError("this inference session is closed")
    what = "step" if requested is current else f"go {requested.value}"
    raise SwarmError(f"an inference session that is {current.value} cannot {what}")


def check_stage(current: SessionState, stage: SessionState, work: str) -> None:
    """`SwarmError` unless the session is in `stage`, the only one that does `work`."""
    if current is not stage:
        raise SwarmError(f"{work} happens while an inference session is {stage.value}; this one is {current.value}")


class StepMode(enum.Enum):
    CHAINED = "chained"          # sent to every hop at once; each server pushed to the next
    HOP_BY_HOP = "hop by hop"    # one hop after another (no links, or the first step with deep prompts)
    FAILED_OVER = "failed over"  # a hop failed during it: replaced, then the step went on hop by hop


@dataclass(frozen=True)
class StepRecord:
    position: int                # positions the chain held when the step started
    length: int                  # T: the step's new positions
    mode: StepMode
