"""Session and token limits of a server (pure bookkeeping)."""

import pytest

from swarmlm.errors import CapacityError, WireError
from swarmlm.swarm.server.budget import Budget, BudgetLimits


def test_reserve_refuses_more_sessions_than_allowed():
    b = Budget(BudgetLimits(max_sessions=2))
    b.reserve("a", batch=1, max_length=10, now=0.0)
    b.reserve("b", batch=1, max_length=10, now=0.0)
    with pytest.raises(CapacityError, match="2 sessions"):
        b.reserve("c", batch=1, max_length=10, now=0.0)


def test_reserve_refuses_more_cache_tokens_than_free():
    b = Budget(BudgetLimits(max_cache_tokens=100, max_session_tokens=100))
    b.reserve("a", batch=2, max_length=40, now=0.0)
    with pytest.raises(CapacityError, match="20 free"):
        b.reserve("b", batch=1, max_length=30, now=0.0)


def test_release_frees_the_tokens():
    b = Budget(BudgetLimits(max_cache_tokens=100, max_session_tokens=100))
    b.reserve("a", batch=1, max_length=100, now=0.0)
    assert b.release("a") and b.free_tokens == 100 and not b.release("a")


def test_reserving_an_open_session_twice_is_refused():
    b = Budget()
    b.reserve("a", batch=1, max_length=8, now=0.0)
    with pytest.raises(WireError):
        b.reserve("a", batch=1, max_length=8, now=0.0)


def test_idle_sessions_expire_after_the_timeout():
    b = Budget(BudgetLimits(idle_timeout_s=10.0))
    b.reserve("a", batch=1, max_length=8, now=0.0)
    b.reserve("b", batch=1, max_length=8, now=0.0)
    b.touch("b", 8.0)
    assert b.expired(12.0) == ["a"]


def test_requests_over_the_token_limit_are_refused():
    b = Budget(BudgetLimits(max_request_tokens=64))
    with pytest.raises(CapacityError, match="65 tokens"):
        b.check_request(1, 65)


@pytest.mark.parametrize("kw", [dict(max_sessions=0), dict(idle_timeout_s=0.0), dict(kept_timeout_s=-1.0),
                                dict(max_kept_bytes=-1)])
def test_bad_limits_are_refused(kw):
    with pytest.raises(ValueError):
        BudgetLimits(**kw)
