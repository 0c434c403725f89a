"""Credit for training: round records co-signed by the members of a `train --swarm --ledger` round.

Pure parts (the record every member builds, the claims a member refuses to vouch for), the ledger's
side (`RoundBook` on an in-process chain: sign, check, submit once), the exchange among members
(collab's `Witness` over in-process peers, with the ledger's callables), and end to end: two
`swarmlm train --swarm --ledger` processes on the embedded chain earn credit, hence quota the next
epoch (`ledger status --json`).
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from swarmlm.collab.witness import Cosigner, RoundClaim, RoundRecord, Witness, build_record, check_claims
from swarmlm.errors import LedgerError
from swarmlm.ledger import chain as chainlib
from swarmlm.ledger import keys, receipts
from swarmlm.ledger.rounds import RoundBook, digest_of
from tests.helpers.collab import TrainPeer, stop_all

A, B = "0x" + "ab" * 20, "0x" + "0c" * 20


def test_every_member_builds_the_same_record_from_the_same_claims():
    claims = {"peerA": RoundClaim(A, 8, 5), "peerB": RoundClaim(B, 4, 4)}
    record = build_record("run", 7, claims)
    assert record == RoundRecord("run", 7, 4, (B, A), (4, 8))           # ascending accounts, smallest epoch
    assert build_record("run", 7, dict(reversed(list(claims.items())))) == record


def test_a_member_refuses_claims_it_cannot_vouch_for():
    ok = lambda peer, account: True
    claims = {"peerA": RoundClaim(A, 8, 5), "peerB": RoundClaim(B, 4, 5)}
    members = ("peerA", "peerB")
    assert check_claims(claims, members, {"peerA": 8.0, "peerB": 4.0}, ok) is None
    assert "carried 4" in check_claims({**claims, "peerB": RoundClaim(B, 40, 5)}, members, {"peerB": 4.0}, ok)
    assert "do not match" in check_claims({"peerA": claims["peerA"]}, members, {}, ok)
    assert "do not match" in check_claims({**claims, "peerC": RoundClaim("0x1", 1, 5)}, members, {}, ok)
    assert "same account" in check_claims({**claims, "peerB": RoundClaim(A.upper(), 4, 5)}, members, {}, ok)
    assert "not bound" in check_claims(claims, members, {}, lambda peer, account: peer == "peerA")
    with pytest.raises(ValueError):
        RoundClaim("", 1, 1).check()
    with pytest.raises(ValueError):
        RoundClaim(A, -1, 1).check()


def _book(ledger, client, data_dir) -> RoundBook:
    """`client`'s RoundBook, registered and bound to the peer identity in `data_dir`."""
    identity = keys.identity_of(data_dir)
    peer_key, sig = keys.sign_binding(identity, client.chain_id, client.address, client.account)
    client.transact("register", peer_key, sig, False)
    book = RoundBook(client)
    assert book.member_ok(identity.peer_id, client.account)
    return book


def test_a_record_signed_by_every_member_is_credited_once(ledger, tmp_path):
    books = [_book(ledger, c, tmp_path / n) for c, n in ((ledger.a, "a"), (ledger.b, "b"))]
    peer_a = keys.identity_of(tmp_path / "a").peer_id
    assert not books[0].member_ok(peer_a, ledger.b.account)                 # b is bound to its own peer
    assert not books[0].member_ok(peer_a, "not an address")
    members = sorted((ledger.a.account, ledger.b.account), key=lambda m: int(m, 16))
    record = RoundRecord("a-run-whose-name-is-longer-than-32-bytes", 3, 0, tuple(members), (5, 6))
    sigs = {b.account: b.sign(record) for b in books}
    assert all(books[0].signed_by(record, acc, s) for acc, s in sigs.items())
    assert not books[0].signed_by(record, members[0], sigs[members[1]])
    assert not books[0].signed_by(RoundRecord(record.run_id, 4, 0, record.members, (5, 6)), members[0],
                                  sigs[members[0]])                          # another round
    assert not books[0].signed_by(record, members[0], b"\x00" * 65)
    with pytest.raises(ValueError, match="ascending"):
        digest_of(ledger.a.domain, RoundRecord("r", 3, 0, tuple(reversed(members)), (6, 5)))
    ordered = tuple(sigs[m] for m in members)
    with pytest.raises(LedgerError, match="not signed by every member"):
        books[0].submit(record, tuple(reversed(ordered)))
    assert books[0].submit(record, ordered) and books[0].recorded(record)
    assert not books[1].submit(record, ordered)                              # a second submitter: no error
    credit = {m: ledger.owner.call("credit_of", m, 0) for m in members}
    assert credit == {members[0]: 5 * 2, members[1]: 6 * 2}                  # sample_credit 2, credited once


def test_witnesses_exchange_claims_and_signatures_over_the_dht_and_submit_once(ledger, tmp_path):
    from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer

    async def main():
        net = MemoryNetwork()
        peers = [await MemoryPeer.create(net) for _ in range(2)]
        submitted = []
        books = []
        for p, c in zip(peers, (ledger.a, ledger.b)):
            c.transact("register", *keys.sign_binding(p.identity, c.chain_id, c.address, c.account), False)
            books.append(RoundBook(c))

        members = tuple(sorted(p.peer_id for p in peers))
        first = members[0]

        def cosigner(peer, book):
            def submit(record, sigs):
                if peer.peer_id == first and record.round == 2:
                    raise LedgerError("the first submitter's node is down")
                submitted.append((peer.peer_id, record))
                return book.submit(record, sigs)
            return Cosigner(account=book.account, epoch=book.epoch, member_ok=book.member_ok, sign=book.sign,
                            signed_by=book.signed_by, submit=submit, recorded=book.recorded)

        witnesses = [Witness(p, "run", cosigner(p, b), timeout_s=30.0, poll_s=0.05, fallback_s=1.0)
                     for p, b in zip(peers, books)]
        group = SimpleNamespace(group_id=b"g" * 16, step=2, members=members)
        seen = {peers[0].peer_id: 4.0, peers[1].peer_id: 6.0}
        witnesses[0].round_done(group, seen, 4.0)
        witnesses[1].round_done(group, seen, 6.0)
        for w in witnesses:
            await w.close()
        # a round whose first submitter works: the other sees it recorded and does not submit
        group3 = SimpleNamespace(group_id=b"i" * 16, step=4, members=members)
        witnesses[0].round_done(group3, seen, 4.0)
        witnesses[1].round_done(group3, seen, 6.0)
        for w in witnesses:
            await w.close()
        # a round where one member claims more than its contribution carried: nobody credits it
        group2 = SimpleNamespace(group_id=b"h" * 16, step=3, members=members)
        witnesses[0].round_done(group2, seen, 4.0)
        witnesses[1].round_done(group2, seen, 60.0)
        for w in witnesses:
            await w.close()
        return witnesses, submitted

    witnesses, submitted = asyncio.run(main())
    by_id = {w.peer.peer_id: w for w in witnesses}
    first, second = sorted(by_id)
    # round 2: the first submitter failed, the second stepped in; round 4: the first recorded it (the
    # second, checking after its fallback delay, finds it recorded -- or, on a slow chain, is refused as a repeat)
    assert (second, 2) in [(p, r.round) for p, r in submitted] and (first, 4) in [(p, r.round) for p, r in submitted]
    assert [w.signed for w in witnesses] == [2, 2]
    assert by_id[first].submitted == 1 and by_id[second].submitted == 1
    assert any("node is down" in why for why in by_id[first].refused)
    assert all(any("carried" in why for why in w.refused) for w in witnesses)
    assert ledger.owner.call("credit_of", ledger.a.account, 0) == 2 * 4 * 2       # two rounds, each credited once
    assert ledger.owner.call("credit_of", ledger.b.account, 0) == 2 * 6 * 2


# ---- end to end -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_swarm_trainers_with_a_ledger_earn_credit_and_a_quota_next_epoch(tmp_path):
    from swarmlm.ledger import commands
    from tests.ledger.test_enforce import EPOCH_S, _cli, _run, _start_chain

    chain, url = _start_chain("embedded", tmp_path)
    homes = [tmp_path / "t0", tmp_path / "t1"]
    peers = []
    try:
        for home in homes:
            _run("fund", home, chain_rpc=url)
        w3 = chainlib.connect(url)               # deployed from here: the build is cached in this process
        ledger = chainlib.deploy(w3, keys.load_or_create_key(homes[0]),
                                 chainlib.LedgerParams(epoch_seconds=EPOCH_S, free_tokens=50, sample_credit=3))
        at = ["--chain-rpc", url, "--ledger", ledger]
        common = ["--run-id", "credit", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--round-timeout",
                  "10", "--min-peers", "2", *at]
        first = TrainPeer(homes[0] / "out", [*common, "--data-dir", str(homes[0])])
        peers.append(first)
        peers.append(TrainPeer(homes[1] / "out", [*common, "--data-dir", str(homes[1]), "--initial-peers",
                                                  first.wait_maddr()]))
        codes = [p.wait(180) for p in peers]
        assert codes == [0, 0], peers[0].log_text()[-3000:] + peers[1].log_text()[-3000:]
        lines = [next(x for x in p.lines if x.startswith("round records:")) for p in peers]
        assert all("0 unsigned" in x for x in lines), lines
        submitted = sum(int(x.split(", ")[1].split()[0]) for x in lines)
        assert submitted >= 1, lines
        clients = [chainlib.LedgerClient(w3, ledger, keys.load_or_create_key(h)) for h in homes]
        statuses = [commands.status(c, c.account) for c in clients]
        assert statuses[0]["credit"] == statuses[1]["credit"] == submitted * 2 * 3    # 2 samples a round each
        _run("advance", homes[0], chain_rpc=url, seconds=EPOCH_S)
        after = [json.loads(_cli("ledger", "status", *at, "--json", "--data-dir", str(homes[1]), home=homes[1]).stdout),
                 commands.status(clients[0], clients[0].account)]
        assert all(s["epoch"] == 1 and s["quota"] == 50 + submitted * 2 * 3 for s in after), after
    finally:
        stop_all(peers)
        chain.kill()
        chain.wait(10)


def test_train_ledger_flags_are_checked_in_one_line(tmp_path, capsys):
    from swarmlm.cli import main
    assert main(["train", "--ledger", A, "--steps", "1"]) == 2                     # not --swarm
    assert "add --swarm" in capsys.readouterr().err
    assert main(["train", "--swarm", "--run-id", "r", "--ledger", A, "--chain-rpc", "http://127.0.0.1:9",
                 "--data-dir", str(tmp_path)]) == 2                               # no chain there
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Ethereum JSON-RPC node answers" in err[0]
