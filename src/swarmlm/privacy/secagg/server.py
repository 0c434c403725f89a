"""`SecAggServer`: the coordinator's side of a secure-aggregation round. It learns the sum of
the surviving clients' inputs and nothing else.

    server = SecAggServer(identity, run_id="r", round=3, config=SecAggConfig(...), length=d)
    server.receive(msg)            # any client message of the current stage; raises on bad input,
                                   # changing nothing
    out = server.advance()         # closes the stage: {client: message} to send, or RoundFailed
    ...                            # after UNMASK, server.result is the float sum and server.survivors who

Dropouts: a client that misses a stage is left out of every later one. Clients that dropped
after sharing keys (in U2, not in U3) have their pairwise masks rebuilt from their mask key,
reconstructed from the shares their surviving neighbours reveal; survivors' self-masks are
removed with their seeds, rebuilt the same way. Every rebuilt secret is checked against its
commitment (the advertised public key, the seed's hash) before use. If any stage ends with
fewer live clients than `min_clients`, or a secret cannot be rebuilt, the round fails with
`RoundFailed` and no partial sum. A survivor's self-mask is taken away as soon as threshold
shares of its seed are in and match its commitment, while the last UNMASK messages are still
coming; the close checks every seed again. Pure: no I/O, no clock; the caller closes each stage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from swarmlm.errors import IntegrityError, RoundFailed, WireError
from swarmlm.p2p.identity import Identity
from swarmlm.privacy.secagg import graph, masking, shamir
from swarmlm.privacy.secagg.client import check_roster, context_of
from swarmlm.privacy.secagg.keys import pair_seed, private_from_bytes, public_bytes
from swarmlm.privacy.secagg.masking import FixedPoint
from swarmlm.privacy.secagg.messages import (MAX_CONTROL_BYTES, Forwarded, KeyAdvert, MaskedInput, Roster,
                                             SharedKeys, Survivors, Unmask, check_keys, open_signed, seal)
from swarmlm.privacy.secagg.stages import Stage, StageError, check_transition

_BODY = {Stage.SETUP: KeyAdvert, Stage.SHARE_KEYS: SharedKeys, Stage.COLLECT_MASKED: MaskedInput,
         Stage.UNMASK: Unmask}


@dataclass(frozen=True)
class SecAggConfig:
    clip: float = 1.0              # FixedPoint.clip: each coordinate of an input is clipped to this
    max_clients: int = 1000        # FixedPoint.max_clients: the ring holds the sum of this many
    min_clients: int = 2           # below this many live clients at any stage the round fails
    degree: int = 0                # neighbours per client; 0: graph.default_degree(n)
    threshold: int = 0             # shares per secret; 0: graph.default_threshold(degree)
    graph_seed: int = 0            # the SecAgg+ ring's shuffle (public)


class SecAggServer:
    def __init__(self, identity: Identity, *, run_id: str, round: int, config: SecAggConfig, length: int,
                 expected: list[str] | None = None, keep_inputs: bool = False):
        self.identity = identity
        self.run_id, self.round, self.config, self.length = run_id, round, config, length
        self.expected = set(expected) if expected is not None else None   # who may join; None: anyone
        self.stage = Stage.SETUP
        self.context = context_of(run_id, round)
        self.codec = FixedPoint(config.clip, config.max_clients)
        self.roster: Roster | None = None                   # the whole round's (each client gets its own part)
        self.index: dict[str, int] = {}
        self.nbrs: dict[str, list[str]] = {}
        self.adverts: dict[str, KeyAdvert] = {}
        self.shared: dict[str, SharedKeys] = {}
        self.masked: set[str] = set()                       # whose masked input is in the running sum
        self.total = np.zeros(length, dtype=np.uint32)      # the sum of the masked inputs, mod 2^32
        self.inputs: dict[str, np.ndarray] | None = {} if keep_inputs else None   # each one, for tests
        self.unmasks: dict[str, Unmask] = {}
        self.seed_shares: dict[str, list[bytes]] = {}       # UNMASK: each survivor's self-mask seed shares so far
        self.unmasked: set[str] = set()                     # survivors whose self-mask is out of self.total
        self._scratch: np.ndarray | None = None
        self.survivors: list[str] = []
        self.result: np.ndarray | None = None
        self.failure: str | None = None

    # ---- receiving -----------------------------------------------------------------------------

    def receive(self, data: bytes) -> str:
        """Take one client message of the current stage; its sender. Bad input raises and changes nothing."""
        if self.stage not in _BODY:
            raise StageError(f"the round is over ({self.stage.value})")
        limit = MAX_CONTROL_BYTES + (4 * self.length if self.stage is Stage.COLLECT_MASKED else 0)
        sender, body = open_signed(data, _BODY[self.stage], run_id=self.run_id, round=self.round,
                                   stage=self.stage, max_bytes=limit)
        if sender in self._received():
            raise StageError(f"{sender} already sent its {self.stage.value} message (a replay, or joining twice)")
        if sender not in self._live():
            raise IntegrityError(f"{sender} is not a live client of this round")
        getattr(self, f"_take_{self.stage.value}")(sender, body)
        return sender

    def waiting_for(self) -> set[str]:
        """Live clients whose message of this stage has not arrived."""
        return set() if self.stage not in _BODY else self._live() - set(self._received())

    def _received(self) -> dict | set:
        return {Stage.SETUP: self.adverts, Stage.SHARE_KEYS: self.shared, Stage.COLLECT_MASKED: self.masked,
                Stage.UNMASK: self.unmasks}[self.stage]

    def _live(self) -> set[str]:
        if self.stage is Stage.SETUP:
            return self.expected if self.expected is not None else _Anyone()
        if self.stage is Stage.SHARE_KEYS:
            return set(self.roster.clients)
        if self.stage is Stage.COLLECT_MASKED:
            return set(self.shared)
        return set(self.survivors)

    def _take_setup(self, sender: str, body: KeyAdvert) -> None:
        check_keys(body.enc_pk, body.mask_pk)
        self.adverts[sender] = body

    def _take_share_keys(self, sender: str, body: SharedKeys) -> None:
        if body.recipients != self.nbrs[sender] or len(body.ciphertexts) != len(body.recipients):
            raise WireError(f"{sender} must share keys with exactly its {len(self.nbrs[sender])} neighbours")
        if len(body.seed_commitment) != 32:
            raise WireError(f"{sender}'s seed commitment is not a sha256")
        self.shared[sender] = body

    def _take_collect_masked(self, sender: str, body: MaskedInput) -> None:
        vector = masking.ring_from_bytes(body.vector, self.length)   # WireError if the size is wrong
        self.total += vector                                         # only the sum is needed: memory O(d)
        self.masked.add(sender)
        if self.inputs is not None:
            self.inputs[sender] = vector

    def _take_unmask(self, sender: str, body: Unmask) -> None:
        if len(body.seed_owners) != len(body.seed_shares) or len(body.key_owners) != len(body.key_shares):
            raise WireError(f"{sender}'s unmask message pairs owners and shares one to one")
        point = self.index[sender] + 1
        survivors, nbrs = set(self.survivors), set(self.nbrs[sender]) | {sender}
        for owners, alive in ((body.seed_owners, True), (body.key_owners, False)):
            for v in owners:
                if v not in nbrs or v not in self.shared or (v != sender and sender not in self._shared_to(v)):
                    raise WireError(f"{sender} sent a share for {v}, a client it holds no share of")
                if (v in survivors) != alive:
                    raise IntegrityError(f"{sender} revealed the wrong kind of share for {v}")
        if len(set(body.seed_owners) | set(body.key_owners)) != len(body.seed_owners) + len(body.key_owners):
            raise WireError(f"{sender} sent two shares for one client")
        for raw in (*body.seed_shares, *body.key_shares):
            if shamir.Share.from_bytes(raw).x != point:        # malformed, or a share that is not its own
                raise IntegrityError(f"{sender} sent a share for another holder's point")
        self.unmasks[sender] = body
        self._remove_ready_self_masks(body)

    def _remove_ready_self_masks(self, body: Unmask) -> None:
        """Take away each self-mask whose seed `threshold` shares now rebuild (and match its commitment),
        while the other survivors' shares are still on their way: the stage's close is left with the
        rest. A seed that does not match waits for the close, where every share is checked."""
        t = self.roster.threshold
        for v, raw in zip(body.seed_owners, body.seed_shares):
            self.seed_shares.setdefault(v, []).append(raw)
            if v in self.unmasked or len(self.seed_shares[v]) < t:
                continue
            try:
                seed = shamir.combine([shamir.Share.from_bytes(r) for r in self.seed_shares[v][:t]], t)
            except IntegrityError:
                continue
            if hashlib.sha256(seed).digest() == self.shared[v].seed_commitment:
                masking.add_mask(self.total, seed, context=self.context, subtract=True, buffer=self._buffer())
                self.unmasked.add(v)

    def _buffer(self) -> np.ndarray:
        if self._scratch is None:
            self._scratch = masking.scratch(self.length)
        return self._scratch

    def _shared_to(self, v: str) -> list[str]:
        return self.shared[v].recipients

    # ---- advancing -----------------------------------------------------------------------------

    def advance(self) -> dict[str, bytes]:
        """Close the current stage: the messages for each live client of the next one ({} after UNMASK)."""
        step = {Stage.SETUP: self._close_setup, Stage.SHARE_KEYS: self._close_share_keys,
                Stage.COLLECT_MASKED: self._close_masked, Stage.UNMASK: self._close_unmask}.get(self.stage)
        if step is None:
            raise StageError(f"the round is over ({self.stage.value})")
        try:
            out = step()
        except (RoundFailed, IntegrityError) as e:
            self.fail(str(e))
            raise RoundFailed(f"secure aggregation round {self.round}: {e}") from None
        return out

    def fail(self, why: str) -> None:
        check_transition(self.stage, Stage.FAILED)
        self.stage, self.failure, self.result = Stage.FAILED, why, None

    def _enough(self, n: int, what: str) -> None:
        if n < max(self.config.min_clients, 1):
            raise RoundFailed(f"{n} clients {what}, fewer than the minimum of {self.config.min_clients}")

    def _close_setup(self) -> dict[str, bytes]:
        clients = sorted(self.adverts)
        self._enough(len(clients), "advertised keys")
        n = len(clients)
        if n < 2:
            raise RoundFailed("secure aggregation needs two clients at least (one client's sum is its input)")
        degree = self.config.degree or graph.default_degree(n)
        degree = min(degree, n - 1)
        if degree < n - 1 and degree % 2:
            degree -= 1
        threshold = min(self.config.threshold or graph.default_threshold(degree), degree + 1)
        self.index = {c: i for i, c in enumerate(clients)}
        self.roster = Roster(clients, list(range(1, n + 1)), [self.adverts[c].enc_pk for c in clients],
                             [self.adverts[c].mask_pk for c in clients], n, degree, threshold,
                             self.config.graph_seed, self.codec.clip, self.codec.max_clients, self.length)
        self.nbrs = graph.neighbours(clients, degree, self.config.graph_seed)
        out = {}
        for c in clients:                      # each client hears of its neighbours only: O(k) per client
            members = sorted([c, *self.nbrs[c]])
            own = Roster(members, [self.index[m] + 1 for m in members],
                         [self.roster.enc_pks[self.index[m]] for m in members],
                         [self.roster.mask_pks[self.index[m]] for m in members], n, degree, threshold,
                         self.config.graph_seed, self.codec.clip, self.codec.max_clients, self.length)
            check_roster(own)
            out[c] = seal(self.identity, run_id=self.run_id, round=self.round, stage=Stage.SETUP, body=own,
                          recipient=c)
        check_transition(self.stage, Stage.SHARE_KEYS)
        self.stage = Stage.SHARE_KEYS
        return out

    def _close_share_keys(self) -> dict[str, bytes]:
        self._enough(len(self.shared), "shared keys")
        out = {}
        for u in sorted(self.shared):
            senders = [v for v in self.nbrs[u] if v in self.shared]
            cts = [self.shared[v].ciphertexts[self.shared[v].recipients.index(u)] for v in senders]
            out[u] = seal(self.identity, run_id=self.run_id, round=self.round, stage=Stage.SHARE_KEYS,
                          body=Forwarded(senders, cts), recipient=u)
        check_transition(self.stage, Stage.COLLECT_MASKED)
        self.stage = Stage.COLLECT_MASKED
        return out

    def _close_masked(self) -> dict[str, bytes]:
        self._enough(len(self.masked), "sent masked inputs")
        self.survivors = sorted(self.masked)
        check_transition(self.stage, Stage.UNMASK)
        self.stage = Stage.UNMASK
        alive = set(self.survivors)
        return {u: seal(self.identity, run_id=self.run_id, round=self.round, stage=Stage.COLLECT_MASKED,
                        body=Survivors(sorted(v for v in [u, *self.nbrs[u]] if v in alive)), recipient=u)
                for u in self.survivors}

    def _close_unmask(self) -> dict[str, bytes]:
        self._enough(len(self.unmasks), "revealed shares")
        t = self.roster.threshold
        seed_shares: dict[str, list[bytes]] = {}
        key_shares: dict[str, list[bytes]] = {}
        for body in self.unmasks.values():
            for v, s in zip(body.seed_owners, body.seed_shares):
                seed_shares.setdefault(v, []).append(s)
            for v, s in zip(body.key_owners, body.key_shares):
                key_shares.setdefault(v, []).append(s)
        total = self.total                             # in place: a failed round has no result at all
        buffer = self._buffer()                        # one keystream buffer for every mask removed
        for u in self.survivors:
            # every seed is rebuilt again here with one more share than needed: an inconsistent share
            # fails the round even when the seed was already taken away as the shares came in
            seed = self._rebuild(u, seed_shares.get(u, []), t, "self-mask seed")
            if hashlib.sha256(seed).digest() != self.shared[u].seed_commitment:
                raise IntegrityError(f"the self-mask seed rebuilt for {u} does not match its commitment")
            if u not in self.unmasked:
                masking.add_mask(total, seed, context=self.context, subtract=True, buffer=buffer)
        survivors = set(self.survivors)
        for v in sorted(set(self.shared) - survivors):          # dropped after sharing keys
            raw = self._rebuild(v, key_shares.get(v, []), t, "mask key")
            key = private_from_bytes(raw)
            i = self.index[v]
            if public_bytes(key) != self.roster.mask_pks[i]:
                raise IntegrityError(f"the mask key rebuilt for {v} does not match its public key")
            for u in self.nbrs[v]:
                if u not in survivors or v not in self._shared_to_u(u):
                    continue
                pk_u = self.roster.mask_pks[self.index[u]]
                # u added +mask if u < v, else -mask: take it away
                masking.add_mask(total, pair_seed(key, pk_u, u, v, self.context), subtract=u < v, buffer=buffer)
        self.result = self.codec.decode_sum(total, len(self.survivors))
        check_transition(self.stage, Stage.DONE)
        self.stage = Stage.DONE
        return {}

    def _shared_to_u(self, u: str) -> list[str]:
        """Whose pairwise masks `u` added: its neighbours that shared keys (what it was forwarded)."""
        return [v for v in self.nbrs[u] if v in self.shared]

    def _rebuild(self, owner: str, raw: list[bytes], t: int, what: str) -> bytes:
        if len(raw) < t:
            raise RoundFailed(f"{len(raw)} shares of {owner}'s {what}, fewer than the threshold {t}")
        # consistency: t shares fix the polynomial; one more checks it (more would cost O(t^2) each)
        return shamir.combine([shamir.Share.from_bytes(r) for r in raw[:t + 1]], t)


class _Anyone(set):
    """Before the roster exists, any signed client may advertise keys."""
    def __contains__(self, item: object) -> bool:
        return True

    def __sub__(self, other):          # waiting_for() in SETUP without an expected set: nobody in particular
        return set()
