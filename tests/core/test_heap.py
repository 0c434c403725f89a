"""heap.settle: start-up's garbage collected, its survivors frozen out of later full collections."""

from __future__ import annotations

import gc

import pytest

from swarmlm import heap


class _Node:
    def __init__(self) -> None:
        self.me = self                 # a reference cycle: only the collector frees it


@pytest.fixture
def thawed():
    yield
    gc.unfreeze()                      # give the test process its heap back


def test_settle_collects_the_garbage_then_freezes_the_survivors(thawed):
    import weakref

    kept = [_Node() for _ in range(1000)]
    garbage = weakref.ref(_Node())     # unreachable, but alive until a collection
    assert garbage() is not None
    n = heap.settle()
    assert garbage() is None           # collected, not frozen
    assert n >= len(kept)                              # (frozen objects freed since count down)
    assert heap.FROZEN._value.get() == n
    gc.collect()
    walked = {id(o) for o in gc.get_objects(generation=2)}
    assert not any(id(o) in walked for o in kept)      # a full collection no longer walks them


def test_objects_made_after_settling_are_still_collected(thawed):
    import weakref

    heap.settle()
    later = weakref.ref(_Node())
    gc.collect()
    assert later() is None
