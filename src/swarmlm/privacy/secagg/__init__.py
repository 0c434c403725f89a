"""privacy.secagg: secure aggregation (Bonawitz et al. 2017; the sparse graph of SecAgg+, Bell et al. 2020).

Reading order:
    stages.py     Stage, NEXT, check_transition: the named stages of a round and their checked order
    shamir.py     split, combine, Share: t-of-n Shamir sharing over GF(2^521 - 1), consistency checks
    masking.py    FixedPoint (clip, scale into Z/2^32), expand / add_mask (AES-CTR PRG), ring vectors on the wire
    graph.py      neighbours, default_degree, default_threshold: who masks with whom (complete or k-regular)
    keys.py       RoundKeys (per-round X25519 pairs, self-mask seed), pair_seed, pair_cipher
    messages.py   the stage bodies and Signed: every message bound to run, round, stage, recipient, signed
    client.py     SecAggClient: one method per stage
    server.py     SecAggServer, SecAggConfig: receive / advance, dropout recovery, RoundFailed
    local.py      run_round: every party in one process (tests, benchmarks)

Pure protocol: nothing here opens a connection; privacy/federated.py moves the bytes.
"""
