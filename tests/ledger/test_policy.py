"""The servers' admission decision: quota shares across servers, tickets, priority under contention."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmlm.errors import AccessRefused
from swarmlm.ledger import policy
from swarmlm.ledger.receipts import Ticket

CHAIN = policy.ChainView(epoch=3, renews_in_s=120.0, n_servers=1, server_active=True, price_per_token=10)
ACCOUNT = policy.AccountView(registered=True, quota=50, deposit=0, slot_holder=False)


def _ticket(tokens: int, new: int, epoch: int = 3) -> Ticket:
    return Ticket(client="0x" + "11" * 20, epoch=epoch, tokens=tokens, new_tokens=new, signature=b"s" * 65)


def _decide(ticket, *, chain=CHAIN, account=ACCOUNT, held=0, load=0.0):
    return policy.decide(chain, account, ticket, held=held, batch=1, load=load, priority_load=0.75)


def test_a_session_within_the_quota_is_admitted_and_the_next_one_past_it_refused_in_one_line():
    assert _decide(_ticket(40, 40)).tokens == 40
    with pytest.raises(AccessRefused) as refused:
        _decide(_ticket(80, 40), held=40)
    msg = str(refused.value)
    assert "\n" not in msg and "quota exceeded: 10 tokens left" in msg and "renews in 120 s" in msg


def test_a_receipt_not_past_the_held_one_or_for_another_epoch_is_refused():
    with pytest.raises(AccessRefused, match="is not 40 past"):
        _decide(_ticket(40, 40), held=40)                       # replayed
    with pytest.raises(AccessRefused, match="receipt for epoch 2"):
        _decide(_ticket(40, 40, epoch=2))


def test_under_contention_only_priority_slot_holders_are_admitted():
    with pytest.raises(AccessRefused, match="priority slot holders only"):
        _decide(_ticket(10, 10), load=0.8)
    holder = policy.AccountView(registered=True, quota=50, deposit=0, slot_holder=True)
    assert _decide(_ticket(10, 10), account=holder, load=0.8).new_tokens == 10


def test_a_server_that_joined_this_epoch_or_settled_the_channel_refuses():
    with pytest.raises(AccessRefused, match="serves from epoch 4"):
        _decide(_ticket(10, 10), chain=policy.ChainView(3, 1.0, 1, False, 10))
    with pytest.raises(AccessRefused, match="already settled"):
        _decide(_ticket(10, 10), account=policy.AccountView(True, 50, 0, False, settled=True))


@given(n_servers=st.integers(1, 8), quota=st.integers(0, 1000), deposit=st.integers(0, 10_000),
       asks=st.lists(st.tuples(st.integers(0, 7), st.integers(1, 60)), max_size=40))
def test_all_servers_together_never_grant_past_the_quota_and_half_the_deposit(n_servers, quota, deposit, asks):
    chain = policy.ChainView(epoch=3, renews_in_s=1.0, n_servers=n_servers, server_active=True, price_per_token=10)
    account = policy.AccountView(registered=True, quota=quota, deposit=deposit, slot_holder=False)
    held = [0] * n_servers
    for server, new in asks:                 # sessions opened anywhere, failovers included
        server %= n_servers
        try:
            held[server] = _decide(_ticket(held[server] + new, new), chain=chain, account=account,
                                   held=held[server]).tokens
        except AccessRefused:
            pass
    assert sum(held) <= quota + (deposit // 10) // 2
