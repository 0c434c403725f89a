"""Ledger.vy on an in-process py-evm chain: receipts and channels, quota over epochs, training rounds,
the priority auction, and deposits no one else can take."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmlm.errors import LedgerError
from swarmlm.ledger import receipts

from .conftest import Chain

SLOW_EXAMPLES = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))


def _open(ledger: Chain):
    """Server a and client b registered in epoch 0; the chain in epoch 1, where a may serve."""
    ledger.register(ledger.a, server=True)
    ledger.register(ledger.b)
    ledger.to_epoch(1)
    return ledger.a, ledger.b


def _settle(ledger: Chain, server, client, epoch: int, tokens: int, *, signer=None, fn: str = "settle"):
    v, r, s = ledger.receipt(signer or client, client.account, server.account, epoch, tokens)
    return server.transact(fn, client.account, epoch, tokens, v, r, s)


# ---- registry ---------------------------------------------------------------------------------

def test_an_account_and_a_peer_key_bind_only_once(ledger):
    ledger.register(ledger.a)
    with pytest.raises(LedgerError, match="account already registered"):
        ledger.register(ledger.a)
    with pytest.raises(LedgerError, match="peer already bound"):
        ledger.b.transact("register", receipts.keccak(ledger.a.account.encode()), b"", False)


def test_a_server_counts_from_the_epoch_after_it_registered(ledger):
    ledger.register(ledger.a, server=True)
    assert ledger.owner.call("servers_in", 0) == 0
    assert ledger.owner.call("servers_in", 1) == 1


# ---- channels -----------------------------------------------------------------------------------

def test_a_settled_receipt_credits_the_server_and_uses_the_clients_quota(ledger):
    server, client = _open(ledger)
    _settle(ledger, server, client, 1, 40)
    assert server.call("credit_of", server.account, 1) == 40
    assert server.call("quota_left", client.account, 1) == 10


def test_a_forged_receipt_is_rejected(ledger):
    server, client = _open(ledger)
    with pytest.raises(LedgerError, match="not signed by the client"):
        _settle(ledger, server, client, 1, 40, signer=ledger.c)


def test_a_receipt_is_settled_once_and_never_replayed(ledger):
    server, client = _open(ledger)
    _settle(ledger, server, client, 1, 40)
    with pytest.raises(LedgerError, match="already settled"):
        _settle(ledger, server, client, 1, 40)
    with pytest.raises(LedgerError, match="already settled"):
        _settle(ledger, server, client, 1, 45)
    assert server.call("credit_of", server.account, 1) == 40


def test_another_channels_receipt_is_rejected(ledger):
    server, client = _open(ledger)
    ledger.register(ledger.c, server=True)
    ledger.to_epoch(2)
    v, r, s = ledger.receipt(client, client.account, server.account, 2, 40)     # for server a
    with pytest.raises(LedgerError, match="not signed by the client"):
        ledger.c.transact("settle", client.account, 2, 40, v, r, s)          # claimed by server c
    with pytest.raises(LedgerError, match="not signed by the client"):
        server.transact("settle", client.account, 1, 40, v, r, s)            # for another epoch


def test_a_server_cannot_credit_itself_with_its_own_receipts(ledger):
    server, _ = _open(ledger)
    with pytest.raises(LedgerError, match="cannot serve itself"):
        _settle(ledger, server, server, 1, 40)


def test_a_receipt_from_an_unregistered_server_or_a_future_or_expired_epoch_is_rejected(ledger):
    server, client = _open(ledger)
    with pytest.raises(LedgerError, match="not a registered server"):
        _settle(ledger, ledger.c, client, 1, 5)
    with pytest.raises(LedgerError, match="epoch not started"):
        _settle(ledger, server, client, 2, 5)
    ledger.to_epoch(3)
    with pytest.raises(LedgerError, match="receipt expired"):
        _settle(ledger, server, client, 1, 5)


def test_a_dispute_with_a_later_receipt_wins_over_the_clients_close(ledger):
    server, client = _open(ledger)
    ledger.to_epoch(2)
    client.transact("close", server.account, 1, 10)
    with pytest.raises(LedgerError, match="not later"):
        _settle(ledger, server, client, 1, 10, fn="dispute")       # out of order: not later than the close
    _settle(ledger, server, client, 1, 30, fn="dispute")
    assert server.call("credit_of", server.account, 1) == 30
    ledger.at(ledger.now() + 200)
    with pytest.raises(LedgerError, match="already settled"):
        ledger.owner.transact("finalize", client.account, server.account, 1)


def test_an_undisputed_close_settles_at_the_clients_figure_after_the_timeout(ledger):
    server, client = _open(ledger)
    ledger.to_epoch(2)
    client.transact("close", server.account, 1, 10)
    with pytest.raises(LedgerError, match="dispute window open"):
        ledger.owner.transact("finalize", client.account, server.account, 1)
    ledger.at(ledger.now() + 200)
    with pytest.raises(LedgerError, match="dispute too late"):
        _settle(ledger, server, client, 1, 30, fn="dispute")
    ledger.owner.transact("finalize", client.account, server.account, 1)
    assert server.call("credit_of", server.account, 1) == 10


def test_tokens_over_the_quota_are_paid_from_the_deposit_and_never_beyond_it(ledger):
    server, client = _open(ledger)
    client.transact("deposit", value=300)                       # 30 tokens at 10 wei
    _settle(ledger, server, client, 1, 100)                     # 50 from the quota, 30 paid, 20 uncovered
    assert server.call("deposit_of", client.account) == 0
    assert server.call("balance_of", server.account) == 300
    assert server.call("credit_of", server.account, 1) == 80


# ---- quota over epochs ----------------------------------------------------------------------------

@SLOW_EXAMPLES
@given(served=st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=3))
def test_quota_is_free_tokens_plus_last_epochs_credit(served):
    from swarmlm.ledger.chain import LedgerParams
    ledger = Chain(LedgerParams(epoch_seconds=1000, free_tokens=50, quota_per_credit=1, price_per_token=0,
                                dispute_seconds=10))
    server, client = _open(ledger)
    ledger.register(ledger.c, server=True)          # the server's own client, serving in return
    ledger.to_epoch(2)
    for i, tokens in enumerate(served):
        epoch = 2 + i
        ledger.to_epoch(epoch)
        quota_before = server.call("quota", server.account, epoch)
        expected_quota = 50 + (min(served[i - 1], 50) if i else 0)
        assert quota_before == expected_quota
        # a serves b, then c serves a: what a may use this epoch bounds what c is credited
        _settle(ledger, server, client, epoch, tokens)
        assert server.call("credit_of", server.account, epoch) == min(tokens, 50)
        _settle(ledger, ledger.c, server, epoch, tokens)
        assert server.call("used_of", server.account, epoch) == min(tokens, expected_quota)
        assert ledger.c.call("credit_of", ledger.c.account, epoch) == min(tokens, expected_quota)


# ---- training rounds -----------------------------------------------------------------------------

def _round(ledger: Chain, members, samples, *, epoch: int, signers=None, run=b"r" * 32, round_=1):
    members = sorted(members, key=lambda m: int(m.account, 16))
    addrs = [m.account for m in members]
    digest = receipts.round_digest(ledger.owner.domain, run, round_, epoch, addrs, samples)
    sigs = [receipts.split_signature(receipts.sign_digest(s.key, digest)) for s in (signers or members)]
    return ledger.owner.transact("record_round", run, round_, epoch, addrs, samples,
                                 [v for v, _, _ in sigs], [r for _, r, _ in sigs], [s for _, _, s in sigs])


def test_a_round_signed_by_every_member_credits_samples_and_quota_next_epoch(ledger):
    for m in (ledger.c, ledger.d):
        ledger.register(m)
    ledger.to_epoch(1)
    _round(ledger, [ledger.c, ledger.d], [10, 20], epoch=1)
    members = sorted([ledger.c, ledger.d], key=lambda m: int(m.account, 16))
    assert ledger.owner.call("credit_of", members[0].account, 1) == 20      # 10 samples x 2
    assert ledger.owner.call("quota", members[1].account, 2) == 50 + 40
    with pytest.raises(LedgerError, match="already recorded"):
        _round(ledger, [ledger.c, ledger.d], [10, 20], epoch=1)


def test_a_round_missing_a_members_signature_is_rejected(ledger):
    for m in (ledger.c, ledger.d):
        ledger.register(m)
    with pytest.raises(LedgerError, match="not signed by every member"):
        _round(ledger, [ledger.c, ledger.d], [10, 20], epoch=0, signers=[ledger.c, ledger.c])
    with pytest.raises(LedgerError, match="two members"):
        _round(ledger, [ledger.c], [10], epoch=0)


# ---- priority auction ------------------------------------------------------------------------------

def _bid(ledger: Chain, bidder, target: int, amount: int, escrow: int, salt: bytes = b"s" * 32):
    sealed = bidder.call("seal", bidder.account, target, amount, salt)
    bidder.transact("commit", target, sealed, value=escrow)


def _reveal(ledger: Chain, bidder, target: int, amount: int, salt: bytes = b"s" * 32):
    bidder.transact("reveal", target, amount, salt)


def test_the_auction_sells_k_slots_at_the_k_plus_first_price_and_refunds_the_rest(ledger):
    target = 1                                       # commit and reveal in epoch 0
    bids = {ledger.a: 50, ledger.b: 30, ledger.c: 40, ledger.d: 10}
    for bidder, amount in bids.items():
        _bid(ledger, bidder, target, amount, escrow=100)
    ledger.to_epoch(0, offset=600)
    for bidder, amount in bids.items():
        _reveal(ledger, bidder, target, amount)
    ledger.to_epoch(1)
    ledger.owner.transact("settle_auction", target)
    assert ledger.owner.call("auction_price", target) == 30          # 2 slots: the third bid
    assert [ledger.owner.call("slot_holder", target, b.account) for b in bids] == [True, False, True, False]
    refunds = {b: b.call("claim_refund", target) for b in bids}      # read first, then claim
    for b in bids:
        b.transact("claim_refund", target)
    assert [refunds[b] for b in bids] == [70, 100, 70, 100]
    before = ledger.b.balance()
    ledger.b.transact("withdraw")
    assert ledger.b.balance() > before + 100 - 10 ** 16              # its escrow came back, less gas
    with pytest.raises(LedgerError, match="nothing to refund"):
        ledger.b.transact("claim_refund", target)


def test_an_auction_with_no_bids_settles_with_no_winner_and_only_once(ledger):
    ledger.to_epoch(1)
    ledger.owner.transact("settle_auction", 1)
    assert ledger.owner.call("auction_price", 1) == 0
    with pytest.raises(LedgerError, match="already settled"):
        ledger.owner.transact("settle_auction", 1)


def test_tied_bids_rank_by_reveal_order(ledger):
    for bidder in (ledger.a, ledger.b, ledger.c):
        _bid(ledger, bidder, 1, 20, escrow=20)
    ledger.to_epoch(0, offset=600)
    for bidder in (ledger.c, ledger.a, ledger.b):
        _reveal(ledger, bidder, 1, 20)
    ledger.to_epoch(1)
    ledger.owner.transact("settle_auction", 1)
    assert ledger.owner.call("auction_price", 1) == 20
    assert [ledger.owner.call("slot_holder", 1, b.account) for b in (ledger.c, ledger.a, ledger.b)] == [True, True, False]


def test_a_reveal_must_match_its_commit_and_come_in_the_reveal_phase(ledger):
    _bid(ledger, ledger.a, 1, 20, escrow=30)
    with pytest.raises(LedgerError, match="not the reveal phase"):
        _reveal(ledger, ledger.a, 1, 20)                               # too early
    ledger.to_epoch(0, offset=600)
    with pytest.raises(LedgerError, match="not the commit phase"):
        _bid(ledger, ledger.b, 1, 20, escrow=30)                       # committing too late
    with pytest.raises(LedgerError, match="does not match"):
        _reveal(ledger, ledger.a, 1, 25)
    with pytest.raises(LedgerError, match="does not match"):
        _reveal(ledger, ledger.a, 1, 20, salt=b"t" * 32)
    ledger.to_epoch(1)
    with pytest.raises(LedgerError, match="not the reveal phase"):
        _reveal(ledger, ledger.a, 1, 20)                               # late
    ledger.owner.transact("settle_auction", 1)
    assert not ledger.owner.call("slot_holder", 1, ledger.a.account)
    assert ledger.a.call("claim_refund", 1) == 30                      # unrevealed: escrow back


def test_a_bid_above_its_escrow_is_refused(ledger):
    _bid(ledger, ledger.a, 1, 50, escrow=30)
    ledger.to_epoch(0, offset=600)
    with pytest.raises(LedgerError, match="above its escrow"):
        _reveal(ledger, ledger.a, 1, 50)


# ---- nobody takes another's deposit ---------------------------------------------------------------

ATTACKS = st.lists(st.sampled_from(["withdraw", "unlock", "settle_forged", "close", "finalize",
                                    "claim_refund", "dispute_forged", "settle_auction"]), min_size=1, max_size=6)


@SLOW_EXAMPLES
@given(attacks=ATTACKS)
def test_no_sequence_of_calls_lets_a_peer_take_anothers_deposit(attacks):
    from swarmlm.ledger.chain import LedgerParams
    ledger = Chain(LedgerParams(epoch_seconds=1000, free_tokens=0, price_per_token=10, dispute_seconds=10))
    victim, thief = ledger.b, ledger.c
    ledger.register(victim)
    ledger.register(thief, server=True)
    victim.transact("deposit", value=1000)
    ledger.to_epoch(1)
    ledger.to_epoch(2)
    for attack in attacks:
        try:
            if attack == "withdraw":
                thief.transact("withdraw")
            elif attack == "unlock":
                thief.transact("unlock", 1000)
            elif attack in ("settle_forged", "dispute_forged"):
                v, r, s = ledger.receipt(thief, victim.account, thief.account, 1, 100)    # signed by the thief
                thief.transact(attack.split("_")[0], victim.account, 1, 100, v, r, s)
            elif attack == "close":
                thief.transact("close", thief.account, 1, 100)         # as if it were the client
            elif attack == "finalize":
                ledger.at(ledger.now() + 20)
                thief.transact("finalize", victim.account, thief.account, 1)
            elif attack == "claim_refund":
                thief.transact("claim_refund", 1)
            elif attack == "settle_auction":
                thief.transact("settle_auction", 2)
        except LedgerError:
            pass
    assert victim.call("deposit_of", victim.account) + victim.call("unlocking_of", victim.account) == 1000
    assert thief.call("balance_of", thief.account) == 0
