"""collab: decentralized training across the swarm — peers that come and go train one model.

Reading order:
    robust.py        mean, trimmed-mean, centered-clip; dropping malformed updates with a reason
    compression.py   what is averaged, as bytes: none, fp16, int8 with per-chunk scales
    progress.py      ProgressRecord in the DHT, SwarmView; pure "is it time to average" decisions
    matchmaking.py   Matchmaker, Group: the peers of one step agree on a member list (a leader decides)
    parts.py         PartPlan, OwnedPart, combine, Assembly: who owns which part, when a part is
                     complete, the robust aggregate, the result as it comes together (pure)
    transport.py     PartTransport (the interface), Round, RoundTable: the round state transports share
    side.py          SideTransport: parts over the peer's encrypted side channel (p2p/channel/)
    streams.py       StreamTransport: parts over libp2p streams, the fallback and `--collab-transport libp2p`
    allreduce.py     AllReduce: drives a butterfly all-reduce over parts; completes over the group or RoundFailed
    state.py         snapshots of model + optimizer state, served to and downloaded by late joiners
    witness.py       Witness, Cosigner, RoundRecord: members co-sign each successful round's record (credit)
    optimizer.py     CollaborativeOptimizer, CollabOptions: synchronous averaging or DiLoCo
    run.py           run_swarm_training: `swarmlm train --swarm`, progress bar, publishing to the store

Talks to the swarm only through a `Peer` (or `MemoryPeer`) and its side channel, and opens no
socket of its own; imports nothing from swarm/, privacy/ or ledger/.
"""
