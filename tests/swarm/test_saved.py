"""Forwards kept for their backward: bounded by bytes and age (pure bookkeeping)."""

import pytest

from swarmlm.swarm.server.saved import SavedForwards


def test_take_returns_the_kept_value_once():
    s = SavedForwards(max_bytes=100, max_age_s=10.0)
    assert s.put("a", "graph", size_bytes=40, now=0.0)
    assert s.take("a", now=1.0) == "graph"
    assert s.take("a", now=1.0) is None and s.used_bytes == 0


def test_oldest_entries_are_evicted_to_make_room():
    s = SavedForwards(max_bytes=100, max_age_s=10.0)
    s.put("a", 1, size_bytes=40, now=0.0)
    s.put("b", 2, size_bytes=40, now=1.0)
    s.put("c", 3, size_bytes=40, now=2.0)
    assert s.take("a", now=3.0) is None and s.take("b", now=3.0) == 2 and s.used_bytes == 40


def test_an_entry_larger_than_the_budget_is_not_kept():
    s = SavedForwards(max_bytes=100, max_age_s=10.0)
    s.put("a", 1, size_bytes=40, now=0.0)
    assert not s.put("b", 2, size_bytes=101, now=0.0)
    assert s.take("a", now=0.0) == 1 and len(s) == 0


def test_old_entries_expire_and_are_not_returned():
    s = SavedForwards(max_bytes=100, max_age_s=10.0)
    s.put("a", 1, size_bytes=10, now=0.0)
    s.put("b", 2, size_bytes=10, now=5.0)
    assert s.take("a", now=10.5) is None
    assert s.expire(now=16.0) == 1 and s.used_bytes == 0


def test_keeping_a_key_again_replaces_its_entry():
    s = SavedForwards(max_bytes=100, max_age_s=10.0)
    s.put("a", 1, size_bytes=60, now=0.0)
    s.put("a", 2, size_bytes=60, now=1.0)
    assert s.used_bytes == 60 and s.take("a", now=1.0) == 2


@pytest.mark.parametrize("kw", [dict(max_bytes=-1, max_age_s=1.0), dict(max_bytes=1, max_age_s=0.0)])
def test_bad_limits_are_refused(kw):
    with pytest.raises(ValueError):
        SavedForwards(**kw)
