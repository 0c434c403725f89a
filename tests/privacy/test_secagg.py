"""Secure aggregation in one process: exact sums, dropouts, failure below the threshold, what the
coordinator sees, and every bad input of the issue."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from swarmlm import serialize
from swarmlm.errors import IntegrityError, RoundFailed, WireError
from swarmlm.p2p.identity import Identity
from swarmlm.privacy.secagg import shamir
from swarmlm.privacy.secagg.client import SecAggClient
from swarmlm.privacy.secagg.local import run_round
from swarmlm.privacy.secagg.masking import FixedPoint, expand
from swarmlm.privacy.secagg.messages import KeyAdvert, MaskedInput, Roster, Signed, Unmask, open_signed, seal
from swarmlm.privacy.secagg.server import SecAggConfig, SecAggServer
from swarmlm.privacy.secagg.stages import Stage, StageError, check_transition

D = 512
IDS = [Identity.generate() for _ in range(100)]     # key generation is cheap, but not free: once per module


def updates(n: int, seed: int = 0, d: int = D) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.3, d) for _ in range(n)]


def plain_sum(ups, codec: FixedPoint) -> np.ndarray:
    total = np.zeros(ups[0].size, dtype=np.uint32)
    for u in ups:
        total += codec.encode(u)
    return codec.decode_sum(total, len(ups))


# ---- exact sums and dropouts --------------------------------------------------------------------

@pytest.mark.parametrize("n,degree", [(5, 0), (20, 0), (100, 0), (100, 99)])
def test_unmasked_sum_equals_the_plain_fixed_point_sum(n, degree):
    ups = updates(n)
    cfg = SecAggConfig(clip=1.0, max_clients=n, degree=degree)
    total, survivors = run_round(IDS[:n], ups, config=cfg)
    assert len(survivors) == n
    assert np.array_equal(total, plain_sum(ups, FixedPoint(1.0, n)))
    assert np.abs(total - np.clip(ups, -1, 1).sum(axis=0)).max() <= n * 0.5 / FixedPoint(1.0, n).scale + 1e-12


@pytest.mark.parametrize("early", [False, True], ids=["masks-late", "masks-early"])
@pytest.mark.parametrize("n", [5, 20, 100])
def test_survivors_sum_is_recovered_when_clients_drop_after_keys_and_after_masked_input(n, early):
    ids, ups = IDS[:n], updates(n, seed=1)
    after_keys = {ids[0].peer_id}                    # shared keys, never sent a masked input
    after_input = {ids[1].peer_id}                   # sent its masked input, never unmasked
    never = {ids[2].peer_id} if n > 5 else set()     # advertised keys, never shared them (5 holders, t = 3)
    drop = {Stage.SHARE_KEYS: never, Stage.COLLECT_MASKED: after_keys, Stage.UNMASK: after_input}
    total, survivors = run_round(ids, ups, config=SecAggConfig(max_clients=n), drop=drop, early_masks=early)
    kept = [u for i, u in zip(ids, ups) if i.peer_id not in after_keys | never]
    assert sorted(survivors) == sorted(i.peer_id for i in ids if i.peer_id not in after_keys | never)
    assert np.array_equal(total, plain_sum(kept, FixedPoint(1.0, n)))


def test_round_below_the_threshold_fails_with_no_partial_result():
    ids, ups = IDS[:5], updates(5)                   # 5 holders per secret, threshold 3
    server_box = {}
    drop = {Stage.COLLECT_MASKED: {ids[0].peer_id, ids[1].peer_id, ids[2].peer_id}}
    with pytest.raises(RoundFailed, match="fewer than"):
        run_round(ids, ups, config=SecAggConfig(min_clients=2), drop=drop, server_box=server_box)
    server = server_box["server"]
    assert server.stage is Stage.FAILED and server.result is None


def test_round_fails_when_fewer_than_min_clients_remain():
    ids, ups = IDS[:6], updates(6)
    drop = {Stage.SHARE_KEYS: {i.peer_id for i in ids[:3]}}
    with pytest.raises(RoundFailed, match="minimum of 4"):
        run_round(ids, ups, config=SecAggConfig(min_clients=4), drop=drop)


# ---- what the coordinator sees -------------------------------------------------------------------

def masked_inputs(update: np.ndarray, n_rounds: int) -> np.ndarray:
    """The bytes of client 0's masked input, as the coordinator receives it, over several rounds."""
    seen = []
    for r in range(n_rounds):
        box = {}
        ups = [update] + updates(4, seed=r, d=update.size)
        run_round(IDS[:5], ups, config=SecAggConfig(max_clients=5), round=r, server_box=box, keep_inputs=True)
        seen.append(box["server"].inputs[IDS[0].peer_id].view(np.uint8))
    return np.concatenate(seen)


def test_masked_input_is_indistinguishable_from_uniform_and_from_another_inputs():
    d = 4096
    zeros = masked_inputs(np.zeros(d), 4)
    ramp = masked_inputs(np.linspace(-0.9, 0.9, d), 4)
    hist_a = np.bincount(zeros, minlength=256)
    hist_b = np.bincount(ramp, minlength=256)
    assert stats.chisquare(hist_a).pvalue > 1e-3              # bytes uniform
    assert stats.chisquare(hist_b).pvalue > 1e-3
    assert stats.chi2_contingency(np.stack([hist_a, hist_b])).pvalue > 1e-3   # same distribution
    # the test has power: the encoded inputs without masks are told apart at once
    plain = FixedPoint(1.0, 5).encode(np.linspace(-0.9, 0.9, d)).view(np.uint8)
    assert stats.chisquare(np.bincount(plain, minlength=256)).pvalue < 1e-6


def test_prg_words_are_uniform_per_bucket():
    words = expand(b"\x07" * 32, 1 << 16)
    hist = np.bincount(words >> 24, minlength=256)             # top byte: 256 buckets of equal probability
    assert stats.chisquare(hist).pvalue > 1e-3
    assert not np.array_equal(words, expand(b"\x07" * 32, 1 << 16, context=b"other"))


# ---- stages -------------------------------------------------------------------------------------

def test_transitions_follow_the_named_order():
    assert check_transition(Stage.SETUP, Stage.SHARE_KEYS) is Stage.SHARE_KEYS
    assert check_transition(Stage.UNMASK, Stage.FAILED) is Stage.FAILED
    with pytest.raises(StageError):
        check_transition(Stage.SETUP, Stage.UNMASK)
    with pytest.raises(StageError):
        check_transition(Stage.DONE, Stage.FAILED)


class Round:
    """A round driven by hand, stage by stage, to inject bad messages."""

    def __init__(self, n: int = 4, round: int = 0, d: int = 64):
        self.coord = Identity.generate()
        self.ids = IDS[:n]
        self.server = SecAggServer(self.coord, run_id="t", round=round, config=SecAggConfig(max_clients=n),
                                   length=d, expected=[i.peer_id for i in self.ids])
        self.clients = [SecAggClient(i, run_id="t", round=round, coordinator=self.coord.peer_id, update=u)
                        for i, u in zip(self.ids, updates(n, d=d))]
        self.sent: dict[Stage, list[bytes]] = {}

    def run_stage(self, inbox=None) -> dict[str, bytes]:
        stage = self.server.stage
        msgs = []
        for c in self.clients:
            if stage is Stage.SETUP:
                msgs.append(c.advertise())
            else:
                fn = {Stage.SHARE_KEYS: c.share_keys, Stage.COLLECT_MASKED: c.masked_input, Stage.UNMASK: c.unmask}
                msgs.append(fn[stage](inbox[c.identity.peer_id]))
        for m in msgs:
            self.server.receive(m)
        self.sent[stage] = msgs
        return self.server.advance()


def test_message_of_the_wrong_stage_is_refused_and_changes_nothing():
    r = Round()
    inbox = r.run_stage()                                        # now SHARE_KEYS
    stale = r.sent[Stage.SETUP][0]
    with pytest.raises(StageError):
        r.server.receive(stale)
    assert r.server.stage is Stage.SHARE_KEYS and not r.server.shared
    with pytest.raises(StageError):                             # a client asked to skip a stage
        r.clients[0].unmask(inbox[r.ids[0].peer_id])
    with pytest.raises(StageError, match="roster"):               # no neighbours known: no masks to expand
        r.clients[0].expand_masks()
    inbox = r.run_stage(inbox)                                   # now COLLECT_MASKED
    r.clients[0].expand_masks()
    with pytest.raises(StageError, match="already"):
        r.clients[0].expand_masks()


def test_replayed_message_and_joining_twice_are_refused():
    r = Round()
    msg = r.clients[0].advertise()
    r.server.receive(msg)
    with pytest.raises(StageError, match="already sent"):
        r.server.receive(msg)                                   # the same bytes again
    with pytest.raises(StageError, match="already sent"):
        r.server.receive(r.clients[0].advertise())              # a second join, freshly signed


def test_message_from_another_round_is_refused():
    old = Round(round=1)
    new = Round(round=2)
    with pytest.raises(IntegrityError, match="round 1"):
        new.server.receive(old.clients[0].advertise())


def test_unsigned_or_forged_messages_are_refused():
    r = Round()
    env = serialize.decode_message(r.clients[0].advertise(), Signed)
    for bad in (dataclasses.replace(env, sig=b""), dataclasses.replace(env, sig=bytes(64)),
                dataclasses.replace(env, sender=r.ids[1].peer_id)):
        with pytest.raises(IntegrityError, match="not signed"):
            r.server.receive(serialize.encode_message(bad))
    with pytest.raises(IntegrityError, match="not a live client"):   # signed, but not invited
        r.server.receive(seal(Identity.generate(), run_id="t", round=0, stage=Stage.SETUP,
                              body=serialize.decode_message(env.body, KeyAdvert)))
    with pytest.raises(WireError):
        r.server.receive(b"\x93garbage")


def test_client_refuses_a_roster_with_other_keys_or_not_from_its_coordinator():
    r = Round()
    roster = r.run_stage()[r.ids[0].peer_id]
    me = r.ids[0].peer_id
    _, body = open_signed(roster, Roster, run_id="t", round=0, stage=Stage.SETUP, recipient=me)
    pks = list(body.mask_pks)
    pks[body.clients.index(r.ids[0].peer_id)] = bytes(range(32))       # the coordinator's own key, say
    swapped = dataclasses.replace(body, mask_pks=pks)
    forged = seal(r.coord, run_id="t", round=0, stage=Stage.SETUP, body=swapped, recipient=me)
    with pytest.raises(IntegrityError, match="other keys"):
        r.clients[0].share_keys(forged)
    impostor = seal(Identity.generate(), run_id="t", round=0, stage=Stage.SETUP, body=body, recipient=me)
    with pytest.raises(IntegrityError, match="expected"):
        r.clients[0].share_keys(impostor)


def test_forwarded_shares_for_another_client_are_refused():
    r = Round()
    forwarded = r.run_stage(r.run_stage())
    with pytest.raises(IntegrityError, match="meant for"):
        r.clients[0].masked_input(forwarded[r.ids[1].peer_id])
    assert r.clients[0].stage is Stage.SHARE_KEYS


def test_masked_input_of_the_wrong_size_is_refused():
    r = Round(d=64)
    inbox = r.run_stage()
    r.run_stage(inbox)
    short = seal(r.ids[0], run_id="t", round=0, stage=Stage.COLLECT_MASKED,
                 body=MaskedInput(bytes(4 * 63)))
    with pytest.raises(WireError, match="64 elements"):
        r.server.receive(short)
    assert not r.server.masked


def test_update_outside_the_ring_is_refused():
    codec = FixedPoint(1.0, 4)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([0.0, np.nan]))
    assert codec.decode_one(codec.encode(np.array([5.0, -5.0]))).tolist() == [1.0, -1.0]   # clipped into range
    with pytest.raises(IntegrityError, match="out of their range"):
        codec.decode_sum(np.full(8, 0x7FFFFFFF, dtype=np.uint32), 1)   # no sum of one input can reach this


def test_encoding_onto_masks_rounds_half_to_even_and_wraps_like_the_reference():
    codec = FixedPoint(0.75, 3)
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 0.3, 1000), [0.75, -0.75, 2.0, -np.inf, 0.0, -0.0],
                        np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5]) / codec.scale])   # exact halves
    x = x[np.isfinite(x)]
    ref = np.rint(np.clip(x * codec.scale, -0.75 * codec.scale, 0.75 * codec.scale)).astype(np.int64)
    assert (codec.encode(x).view(np.int32) == ref).all()
    masks = rng.integers(0, 2**32, x.size, dtype=np.uint64).astype(np.uint32)
    acc = masks.copy()
    codec.add_encoded(acc, x.astype(np.float32), scratch=np.empty(x.size))          # float32 input too
    assert (acc == ((masks.astype(np.int64) + np.rint(np.clip(x.astype(np.float32) * codec.scale,
            -0.75 * codec.scale, 0.75 * codec.scale)).astype(np.int64)) % 2**32).astype(np.uint32)).all()
    before = acc.copy()
    with pytest.raises(ValueError, match="infinity"):
        codec.add_encoded(acc, np.where(np.arange(x.size) == 7, np.inf, x))
    assert (acc == before).all()                                                    # a refused input changes nothing


def unmask_setup():
    r = Round(n=5)
    inbox = r.run_stage()
    inbox = r.run_stage(inbox)
    inbox = r.run_stage(inbox)                                  # now UNMASK; inbox = survivor lists
    return r, inbox


def test_shares_for_an_unknown_client_are_refused():
    r, inbox = unmask_setup()
    stranger = Identity.generate().peer_id
    fake = seal(r.ids[0], run_id="t", round=0, stage=Stage.UNMASK,
                body=Unmask([stranger], [shamir.Share(1, 5).to_bytes()], [], []))
    with pytest.raises(WireError, match="holds no share"):
        r.server.receive(fake)


def test_malformed_shares_are_refused():
    r, inbox = unmask_setup()
    good = serialize.decode_message(r.clients[0].unmask(inbox[r.ids[0].peer_id]), Signed)
    body = serialize.decode_message(good.body, Unmask)
    for bad_share in (body.seed_shares[0][:-1], b"\0\0\0\1" + b"\xff" * shamir.SHARE_BYTES):
        bad = dataclasses.replace(body, seed_shares=[bad_share, *body.seed_shares[1:]])
        with pytest.raises(IntegrityError):
            r.server.receive(seal(r.ids[0], run_id="t", round=0, stage=Stage.UNMASK, body=bad))
    assert not r.server.unmasks


def test_inconsistent_shares_fail_the_round_clearly():
    r, inbox = unmask_setup()
    msgs = [c.unmask(inbox[c.identity.peer_id]) for c in r.clients]
    env = serialize.decode_message(msgs[0], Signed)
    body = serialize.decode_message(env.body, Unmask)
    share = shamir.Share.from_bytes(body.seed_shares[0])
    lie = shamir.Share(share.x, (share.y + 1) % shamir.PRIME).to_bytes()
    msgs[0] = seal(r.ids[0], run_id="t", round=0, stage=Stage.UNMASK,
                   body=dataclasses.replace(body, seed_shares=[lie, *body.seed_shares[1:]]))
    for m in msgs:
        r.server.receive(m)
    with pytest.raises(RoundFailed, match="inconsistent|commitment"):
        r.server.advance()
    assert r.server.result is None


def test_self_masks_come_off_as_threshold_shares_arrive_and_the_close_still_checks_them():
    r, inbox = unmask_setup()                                  # 5 survivors, threshold 3
    msgs = [c.unmask(inbox[c.identity.peer_id]) for c in r.clients]
    for m in msgs[:2]:
        r.server.receive(m)
    assert not r.server.unmasked                              # two shares of each seed: nothing known yet
    r.server.receive(msgs[2])
    assert r.server.unmasked == set(r.server.survivors)      # the third share of each: every seed rebuilt
    for m in msgs[3:]:
        r.server.receive(m)
    r.server.advance()
    ups = updates(5, d=64)
    assert np.array_equal(r.server.result, plain_sum(ups, FixedPoint(1.0, 5)))


def test_shamir_any_threshold_shares_rebuild_and_extras_are_checked():
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    assert shamir.combine(shares[2:], 3) == secret
    assert shamir.combine([shares[4], shares[0], shares[2], shares[1]], 3) == secret
    with pytest.raises(IntegrityError, match="fewer than the threshold"):
        shamir.combine(shares[:2], 3)
    with pytest.raises(IntegrityError, match="same point"):
        shamir.combine([shares[0], shares[0], shares[1]], 3)
    bent = shamir.Share(shares[3].x, (shares[3].y + 1) % shamir.PRIME)
    with pytest.raises(IntegrityError, match="inconsistent"):
        shamir.combine(shares[:3] + [bent], 3)


def test_secagg_plus_graph_is_sparse_regular_and_symmetric():
    box = {}
    n = 40
    run_round(IDS[:n], updates(n), config=SecAggConfig(max_clients=n), server_box=box)
    server = box["server"]
    degree = server.roster.degree
    assert degree < n - 1 and degree % 2 == 0
    assert all(len(v) == degree for v in server.nbrs.values())
    assert all(u in server.nbrs[v] for u in server.nbrs for v in server.nbrs[u])      # symmetric
