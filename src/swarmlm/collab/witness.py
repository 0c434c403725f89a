"""Round records: the members of an averaging round co-sign what each of them contributed.

    witness = Witness(peer, run_id, cosigner)        # cosigner: plain callables, handed in by cli.py
    witness.round_done(result, weight=n_samples)     # after each successful round; runs in the background
    await witness.close()                            # waits (bounded) for the records still being signed

What a member signs is a `RoundRecord`: the run, the round (the global step it averaged), an epoch,
the members' accounts in ascending order and the samples each contributed. The exchange goes over
the DHT, under the round's own key (`keys.collab_round_key`), in per-peer subkeys that only their
peer can write (every record is signed by its peer's identity key):

1. each member publishes a `RoundClaim`: its account, its samples, the epoch it proposes;
2. once every member's claim is there, each builds the same record (`build_record`, pure: the
   smallest proposed epoch) and signs it — only if every other claim passes `check_claims`: the
   claimed samples equal the weight that member's contribution carried to the parts this member
   owned in the all-reduce, and the cosigner says the account is bound to the claiming peer;
3. each publishes its `RoundSignature`; every member gathers them all and checks each against its
   account; the member with the smallest peer ID submits the record at once, the k-th smallest
   after k * `fallback_s` only if it is not recorded by then (the ledger credits a record once), so
   a submitter that died or failed costs a delay, not the round's credit.

A member that sees a claim it cannot vouch for signs nothing for that round, so the round earns
nothing: credit needs every member's signature. Samples are what the members' own contributions
were weighted by — an inflated weight also skews the average every member applied, which robust
aggregators bound — so a record says "these peers averaged together, each with this weight",
not that the compute was spent. Knows nothing of the chain: accounts and signatures are opaque to
it, and `Cosigner`'s callables (blocking; run in a thread) do the ledger's part.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from swarmlm.errors import PeerError
from swarmlm.log import get_logger
from swarmlm.p2p import keys
from swarmlm.p2p.records import record_type

log = get_logger(__name__)

MAX_ACCOUNT_CHARS = 128
MAX_SIGNATURE_BYTES = 1024


@record_type("collab.round_claim")
@dataclass(frozen=True)
class RoundClaim:
    account: str              # the member's ledger account (opaque here)
    samples: int              # samples behind its contribution to the round
    epoch: int                # the ledger epoch it proposes for the record

    def check(self) -> None:
        if not self.account or len(self.account) > MAX_ACCOUNT_CHARS:
            raise ValueError(f"an account is 1..{MAX_ACCOUNT_CHARS} characters")
        if not 0 <= self.samples < 2 ** 63 or not 0 <= self.epoch < 2 ** 63:
            raise ValueError("samples and epoch are non-negative 63-bit integers")


@record_type("collab.round_signature")
@dataclass(frozen=True)
class RoundSignature:
    signature: bytes          # the member's signature over the record (the cosigner's format)

    def check(self) -> None:
        if not 0 < len(self.signature) <= MAX_SIGNATURE_BYTES:
            raise ValueError(f"a signature is 1..{MAX_SIGNATURE_BYTES} bytes")


@dataclass(frozen=True)
class RoundRecord:
    run_id: str
    round: int                        # the global step the round averaged for
    epoch: int
    members: tuple[str, ...]          # accounts, ascending by their lowercase text
    samples: tuple[int, ...]          # samples of each member, in the same order


@dataclass(frozen=True)
class Cosigner:
    """The ledger's part, as plain (blocking) callables; cli.py builds it from ledger/."""
    account: str                                              # this peer's account
    epoch: Callable[[], int]                                  # the ledger's current epoch
    member_ok: Callable[[str, str], bool]                     # (peer ID, account): bound on the ledger?
    sign: Callable[[RoundRecord], bytes]                      # this account's signature over a record
    signed_by: Callable[[RoundRecord, str, bytes], bool]      # (record, account, signature): valid?
    submit: Callable[[RoundRecord, tuple[bytes, ...]], bool]  # the record with every member's signature;
                                                              # False: another member's submission came first
    recorded: Callable[[RoundRecord], bool]                   # is the record on the ledger already?


def build_record(run_id: str, step: int, claims: Mapping[str, RoundClaim]) -> RoundRecord:
    """The record every member builds from the same claims (peer ID -> claim)."""
    ordered = sorted(claims.values(), key=lambda c: c.account.lower())
    return RoundRecord(run_id, step, min(c.epoch for c in ordered), tuple(c.account for c in ordered),
                       tuple(c.samples for c in ordered))


def check_claims(claims: Mapping[str, RoundClaim], members: tuple[str, ...], seen: Mapping[str, float],
                 member_ok: Callable[[str, str], bool]) -> str | None:
    """Why this member must not sign the round's record (None: it may). `seen`: the weight each
    member's contribution carried to the parts this member owns."""
    if set(claims) != set(members):
        return f"claims from {sorted(set(claims) ^ set(members))} do not match the members"
    accounts = [c.account.lower() for c in claims.values()]
    if len(set(accounts)) != len(accounts):
        return "two members claim the same account"
    for peer_id, claim in claims.items():
        if peer_id in seen and round(seen[peer_id]) != claim.samples:
            return f"{peer_id} claims {claim.samples} samples but its contribution carried {seen[peer_id]:g}"
        if not member_ok(peer_id, claim.account):
            return f"{peer_id}'s account {claim.account} is not bound to it on the ledger"
    return None


class Witness:
    """Co-signs this peer's successful rounds in the background."""

    def __init__(self, peer: Any, run_id: str, cosigner: Cosigner, *, timeout_s: float = 20.0,
                 poll_s: float = 0.2, ttl_s: float = 120.0, fallback_s: float = 3.0):
        self.peer, self.run_id, self.cosigner = peer, run_id, cosigner
        self.timeout_s, self.poll_s, self.ttl_s, self.fallback_s = timeout_s, poll_s, ttl_s, fallback_s
        self.signed = 0                   # records this peer signed
        self.submitted = 0                # records this peer's submission put on the ledger
        self.refused: list[str] = []      # why rounds went unsigned or unsubmitted
        self._tasks: set[asyncio.Task] = set()

    def round_done(self, group: Any, seen: Mapping[str, float], weight: float) -> None:
        """Start co-signing a round that succeeded (`group`: its members and step)."""
        if len(group.members) < 2:
            return
        task = asyncio.ensure_future(self._cosign(group, dict(seen), weight))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, timeout_s: float | None = None) -> None:
        """Wait for the records still being signed (they need this peer to stay up), then stop."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s or self.timeout_s + 16 * self.fallback_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _cosign(self, group: Any, seen: dict[str, float], weight: float) -> None:
        try:
            await self._run(group, seen, weight)
        except asyncio.CancelledError:
            raise
        except Exception as e:            # a record lost is credit lost, never a crash of the training
            self._refuse(group.step, f"{type(e).__name__}: {e}")

    def _refuse(self, step: int, why: str) -> None:
        log.warning("round record of step %d: %s", step, why)
        self.refused.append(why)

    async def _run(self, group: Any, seen: dict[str, float], weight: float) -> None:
        me, c = self.peer.peer_id, self.cosigner
        key = keys.collab_round_key(self.run_id, group.group_id.hex())
        deadline = time.monotonic() + self.timeout_s
        epoch = await asyncio.to_thread(c.epoch)
        await self.peer.store(key, RoundClaim(c.account, int(round(weight)), epoch), ttl_s=self.ttl_s,
                              subkey=keys.peer_subkey(me, "claim"))
        claims = await self._gather(key, "claim", RoundClaim, group.members, deadline)
        if claims is None:
            return self._refuse(group.step, "not every member published its claim in time")
        why = await asyncio.to_thread(check_claims, claims, group.members, seen, c.member_ok)
        if why is not None:
            return self._refuse(group.step, why)
        record = build_record(self.run_id, group.step, claims)
        sig = await asyncio.to_thread(c.sign, record)
        await self.peer.store(key, RoundSignature(sig), ttl_s=self.ttl_s, subkey=keys.peer_subkey(me, "sig"))
        self.signed += 1
        sigs = await self._gather(key, "sig", RoundSignature, group.members, deadline)
        if sigs is None:
            return self._refuse(group.step, "not every member signed the record in time")
        ordered = []
        for account in record.members:
            peer_id = next(p for p, claim in claims.items() if claim.account == account)
            s = sigs[peer_id].signature
            if not await asyncio.to_thread(c.signed_by, record, account, s):
                return self._refuse(group.step, f"{peer_id} signed something else than the record")
            ordered.append(s)
        rank = sorted(group.members).index(me)
        if rank:
            await asyncio.sleep(rank * self.fallback_s)
            if await asyncio.to_thread(c.recorded, record):
                return
            log.info("round record of step %d: not recorded by the members before this one; submitting", group.step)
        if not await asyncio.to_thread(c.submit, record, tuple(ordered)):
            return
        self.submitted += 1
        log.info("round record of step %d submitted: %s", group.step, dict(zip(record.members, record.samples)))

    async def _gather(self, key: str, name: str, kind: type, members: tuple[str, ...], deadline: float
                      ) -> dict[str, Any] | None:
        """Each member's `kind` record under `key` (subkey `peer/name`), or None at the deadline."""
        while True:
            try:
                found = {r.signer: r.value for r in await self.peer.get(key, latest=True)
                         if isinstance(r.value, kind) and r.subkey == keys.peer_subkey(r.signer, name)}
            except PeerError as e:
                log.info("reading %s: %s", key, e)
                found = {}
            if set(members) <= set(found):
                return {m: found[m] for m in members}
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(self.poll_s)
