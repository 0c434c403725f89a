"""p2p: one peer of the swarm — the only package that imports hivemind.

Reading order:
    identity.py   Identity: the Ed25519 key in <data_dir>/identity.key; peer IDs; signatures
    keys.py       DHT key formats for every layer (providers_key, peer_subkey)
    records.py    record_type, SignedRecord: typed DHT records in signed envelopes
    rpc.py        framing: status byte for unary replies, stream frames, channels, typed message calls
    peer.py       Peer: hivemind DHT node + libp2p daemon; store/get, add_handler/call, streams
    channel/      the side channel: one encrypted TCP listener per peer on its host, for every
                  direct connection (blocks, inference steps, averaging parts); peer.side_channel()
    secure.py     SecureListener / connect_secure: TCP with AES-GCM records under a key sent over
                  libp2p, for small frequent messages that must stay private (inference steps)
    memory.py     MemoryPeer, MemoryNetwork: the same interface in one process, for tests

Import `Peer` from `swarmlm.p2p.peer` (it pulls in hivemind, which is slow to import);
everything else here is light.
"""
