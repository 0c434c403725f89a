"""`SecAggClient`: one client's side of a secure-aggregation round (Bonawitz et al. 2017, §4;
the sparse graph of Bell et al. 2020), one method per stage, every step checked first.

    client = SecAggClient(identity, run_id="r", round=3, coordinator=cid, update=x)
    to_send = client.advertise()                 # SETUP
    to_send = client.share_keys(roster_msg)      # SHARE_KEYS
    client.expand_masks()                        # optional, early: while the stage (and training) go on
    to_send = client.masked_input(forwarded_msg) # COLLECT_MASKED
    to_send = client.unmask(survivors_msg)       # UNMASK -> DONE

The masked input is  y_u = encode(x_u) + PRG(b_u) + sum over neighbours v that shared keys of
+-PRG(s_uv) (plus if u < v, minus otherwise), all mod 2^32. The client holds one share of its
own secrets besides its neighbours' (so k + 1 holders per secret), and reveals, for each
neighbour, either its self-mask seed share (the neighbour survived) or its mask-key share (it
dropped), never both: it answers UNMASK once, then the round is over for it. Pure: no I/O;
the caller moves the bytes.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from swarmlm.errors import IntegrityError, WireError
from swarmlm.p2p.identity import Identity
from swarmlm.privacy.secagg import masking, shamir
from swarmlm.privacy.secagg.keys import RoundKeys, pair_cipher, pair_seed
from swarmlm.privacy.secagg.masking import FixedPoint
from swarmlm.privacy.secagg.messages import (Forwarded, KeyAdvert, MaskedInput, Roster, SharedKeys, Survivors,
                                             Unmask, check_keys, open_signed, seal)
from swarmlm.privacy.secagg.stages import Stage, StageError, check_stage, check_transition

_SHARE = 4 + shamir.SHARE_BYTES


def context_of(run_id: str, round: int) -> bytes:
    return f"{run_id}/{round}".encode()


def check_roster(r: Roster) -> None:
    """`WireError` for a roster that cannot describe a round (a client and its `degree` neighbours)."""
    n = len(r.clients)
    if not (len(r.enc_pks) == len(r.mask_pks) == len(r.points) == n and len(set(r.clients)) == n
            and list(r.clients) == sorted(r.clients) and len(set(r.points)) == n):
        raise WireError("a roster lists distinct sorted clients, each with its own point and pair of keys")
    check_keys(*r.enc_pks, *r.mask_pks)
    if any(not 0 < x <= r.n_clients for x in r.points):
        raise WireError(f"a roster's points must lie in 1..{r.n_clients}")
    if not (1 <= r.degree < r.n_clients and n == r.degree + 1 and 1 <= r.threshold <= r.degree + 1
            and 0 < r.length <= 1 << 30):
        raise WireError(f"a roster's degree {r.degree}, threshold {r.threshold}, size {n} or length {r.length} "
                        "is impossible")
    FixedPoint(r.clip, r.max_clients)        # ValueError -> the caller's WireError


class SecAggClient:
    def __init__(self, identity: Identity, *, run_id: str, round: int, coordinator: str,
                 update: np.ndarray | None = None, length: int | None = None):
        self.identity = identity
        self.run_id, self.round, self.coordinator = run_id, round, coordinator
        self.update = None if update is None else np.asarray(update).reshape(-1)   # may come later: mask_input
        self.length = self.update.size if self.update is not None else length
        if self.length is None:
            raise ValueError("a SecAgg client needs its update or the update's length")
        self.mask: np.ndarray | None = None            # the sum of its masks, once the neighbours are known
        self.masked_with: list[str] = []               # neighbours whose pairwise masks are in self.mask
        self.prepared = False                          # self.mask holds exactly the masks of shared_with
        self.stage = Stage.SETUP
        self.keys = RoundKeys.generate()
        self.context = context_of(run_id, round)
        self.roster: Roster | None = None
        self.my_neighbours: list[str] = []
        self.shared_with: list[str] = []               # neighbours that shared keys (U2 ∩ N(u))
        self.held: dict[str, tuple[shamir.Share, shamir.Share]] = {}   # owner -> (mask key share, seed share)

    # ---- SETUP ---------------------------------------------------------------------------------

    def advertise(self) -> bytes:
        check_stage(self.stage, Stage.SETUP, "advertising keys")
        return self._seal(Stage.SETUP, KeyAdvert(self.keys.enc_pk, self.keys.mask_pk))

    # ---- SHARE_KEYS ----------------------------------------------------------------------------

    def share_keys(self, data: bytes) -> bytes:
        check_transition(self.stage, Stage.SHARE_KEYS)
        _, roster = self._open(data, Roster, Stage.SETUP, recipient=self.identity.peer_id)
        try:
            check_roster(roster)
        except ValueError as e:
            raise WireError(f"roster: {e}") from None
        me = self.identity.peer_id
        if me not in roster.clients:
            raise IntegrityError("the roster does not list this client")
        i = roster.clients.index(me)
        if (roster.enc_pks[i], roster.mask_pks[i]) != (self.keys.enc_pk, self.keys.mask_pk):
            raise IntegrityError("the roster carries other keys than this client advertised")
        if roster.length != self.length:
            raise WireError(f"the round aggregates {roster.length} coordinates; this update has {self.length}")
        self.roster = roster
        self.index = {c: i for i, c in enumerate(roster.clients)}
        self.my_neighbours = [c for c in roster.clients if c != me]      # chosen by the coordinator (graph.py)
        holders = self.my_neighbours + [me]            # Bonawitz §4: a client holds a share of its own secrets
        points = [self._point(v) for v in holders]
        key_shares = shamir.split(self.keys.mask_sk, points, roster.threshold)
        seed_shares = shamir.split(self.keys.self_seed, points, roster.threshold)
        self.held[me] = (key_shares[-1], seed_shares[-1])
        ciphertexts = []
        for v, ks, ss in zip(self.my_neighbours, key_shares, seed_shares):
            aead = pair_cipher(self.keys.enc, self._enc_pk(v), me, v, self.context)
            ciphertexts.append(aead.encrypt(b"\0" * 12, ks.to_bytes() + ss.to_bytes(), self._ad(me, v)))
        self.stage = Stage.SHARE_KEYS
        body = SharedKeys(list(self.my_neighbours), ciphertexts, hashlib.sha256(self.keys.self_seed).digest())
        return self._seal(Stage.SHARE_KEYS, body)

    # ---- COLLECT_MASKED ------------------------------------------------------------------------

    def masked_input(self, data: bytes) -> bytes:
        """Take the forwarded shares and answer with the masked input (the update given at construction)."""
        self.prepare_mask(data)
        return self.mask_input(self.update)

    def expand_masks(self) -> None:
        """Expand the self-mask and the pairwise masks with every neighbour of the roster, as soon as the
        roster is known: no update, no forwarded shares needed, so a client runs it (in a thread) while
        the SHARE_KEYS stage and its training go on. `prepare_mask` then removes the masks of neighbours
        that did not share keys, so the masks sent are exactly Bonawitz's (U2 ∩ N(u))."""
        if self.mask is not None:
            raise StageError("the masks are already expanded")
        if self.roster is None or self.stage is not Stage.SHARE_KEYS:
            raise StageError("masks are expanded once the roster is known (after sharing keys)")
        self.mask = self._expand(self.my_neighbours)
        self.masked_with = list(self.my_neighbours)

    def prepare_mask(self, data: bytes) -> None:
        """Take the forwarded shares and make the masks (expanding them here unless `expand_masks` ran).
        Needs no update, so a client can run it while it still trains (Bonawitz et al. §4: masks do
        not depend on the input)."""
        if self.prepared:
            raise StageError("the masks are already prepared")
        check_stage(self.stage, Stage.SHARE_KEYS, "forwarded shares")
        _, fwd = self._open(data, Forwarded, Stage.SHARE_KEYS, recipient=self.identity.peer_id)
        if len(fwd.senders) != len(fwd.ciphertexts) or len(set(fwd.senders)) != len(fwd.senders):
            raise WireError("forwarded shares: one ciphertext per distinct sender")
        unknown = set(fwd.senders) - set(self.my_neighbours)
        if unknown:
            raise IntegrityError(f"shares forwarded from clients that are not neighbours: {sorted(unknown)[:3]}")
        if len(fwd.senders) + 1 < self.roster.threshold:
            raise IntegrityError(f"{len(fwd.senders)} neighbours shared keys, fewer than the threshold "
                                 f"{self.roster.threshold}")
        held = {v: self._decrypt_bundle(v, ct) for v, ct in zip(fwd.senders, fwd.ciphertexts)}   # all, or none
        self.held.update(held)
        self.shared_with = sorted(fwd.senders)
        if self.mask is None:
            self.mask = self._expand(self.shared_with)
        else:                                          # take away the masks of neighbours that did not share keys
            me = self.identity.peer_id
            buffer = masking.scratch(self.length)
            for v in sorted(set(self.masked_with) - set(self.shared_with)):
                masking.add_mask(self.mask, pair_seed(self.keys.mask, self._mask_pk(v), me, v, self.context),
                                 subtract=not v < me, buffer=buffer)
        self.masked_with = list(self.shared_with)
        self.prepared = True

    def _expand(self, pairs: list[str]) -> np.ndarray:
        """PRG(b_u) + sum over `pairs` of +-PRG(s_uv) (plus if u < v), mod 2^32."""
        me = self.identity.peer_id
        total = masking.expand(self.keys.self_seed, self.length, context=self.context)
        buffer = masking.scratch(self.length)          # one keystream buffer for every pairwise mask
        for v in pairs:
            masking.add_mask(total, pair_seed(self.keys.mask, self._mask_pk(v), me, v, self.context), subtract=v < me,
                             buffer=buffer)
        return total

    def mask_input(self, update: np.ndarray) -> bytes:
        """The masked input message: encode(update) + the prepared masks, mod 2^32."""
        check_transition(self.stage, Stage.COLLECT_MASKED)
        if not self.prepared:
            raise StageError("the forwarded shares have not arrived: no masks to add")
        update = np.asarray(update).reshape(-1)
        if update.size != self.length:
            raise WireError(f"the round aggregates {self.length} coordinates; this update has {update.size}")
        y = self.mask                                  # the input goes onto the masks in place: no new vector
        FixedPoint(self.roster.clip, self.roster.max_clients).add_encoded(y, update)   # ValueError: y untouched
        self.mask, self.masked_with = None, []
        self.stage = Stage.COLLECT_MASKED
        return self._seal(Stage.COLLECT_MASKED, MaskedInput(masking.ring_view(y)))

    def _decrypt_bundle(self, v: str, ct: bytes) -> tuple[shamir.Share, shamir.Share]:
        me = self.identity.peer_id
        try:
            plain = pair_cipher(self.keys.enc, self._enc_pk(v), v, me, self.context).decrypt(
                b"\0" * 12, ct, self._ad(v, me))
        except Exception:
            raise IntegrityError(f"the shares from {v} do not decrypt (forged or corrupted)") from None
        if len(plain) != 2 * _SHARE:
            raise IntegrityError(f"the shares from {v} are malformed")
        ks, ss = shamir.Share.from_bytes(plain[:_SHARE]), shamir.Share.from_bytes(plain[_SHARE:])
        if ks.x != self._point(me) or ss.x != self._point(me):
            raise IntegrityError(f"the shares from {v} are for another holder's point")
        return ks, ss

    # ---- UNMASK --------------------------------------------------------------------------------

    def unmask(self, data: bytes) -> bytes:
        check_transition(self.stage, Stage.UNMASK)
        _, surv = self._open(data, Survivors, Stage.COLLECT_MASKED, recipient=self.identity.peer_id)
        survivors = set(surv.clients)
        if len(survivors) != len(surv.clients) or not survivors <= set(self.roster.clients):
            raise WireError("the survivors must be distinct clients of the roster")
        if self.identity.peer_id not in survivors:
            raise IntegrityError("the coordinator did not count this client's masked input")
        alive = [v for v in self.shared_with + [self.identity.peer_id] if v in survivors]
        if len(alive) < self.roster.threshold:
            raise IntegrityError(f"only {len(alive)} neighbours survived, below the threshold: refusing to unmask")
        dropped = [v for v in self.shared_with if v not in survivors]
        self.stage = Stage.UNMASK
        body = Unmask(alive, [self.held[v][1].to_bytes() for v in alive],
                      dropped, [self.held[v][0].to_bytes() for v in dropped])
        out = self._seal(Stage.UNMASK, body)
        self.stage = Stage.DONE
        return out

    # ---- helpers -------------------------------------------------------------------------------

    def _seal(self, stage: Stage, body: object) -> bytes:
        return seal(self.identity, run_id=self.run_id, round=self.round, stage=stage, body=body)

    def _open(self, data: bytes, body_type: type, stage: Stage, recipient: str = "") -> tuple[str, object]:
        return open_signed(data, body_type, run_id=self.run_id, round=self.round, stage=stage,
                           recipient=recipient, sender=self.coordinator)

    def _ad(self, sender: str, recipient: str) -> bytes:
        return self.context + b"/" + sender.encode() + b"->" + recipient.encode()

    def _point(self, peer_id: str) -> int:
        return self.roster.points[self.index[peer_id]]

    def _enc_pk(self, peer_id: str) -> bytes:
        return self.roster.enc_pks[self.index[peer_id]]

    def _mask_pk(self, peer_id: str) -> bytes:
        return self.roster.mask_pks[self.index[peer_id]]


def shares_of(data: Sequence[bytes]) -> list[shamir.Share]:
    return [shamir.Share.from_bytes(d) for d in data]
