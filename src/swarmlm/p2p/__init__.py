"""p2p: one peer of the swarm — the only package that imports hivemind.

Reading order:
    identity.py   Identity: the Ed25519 key in <data_dir>/identity.key; peer IDs; signatures
    keys.py       DHT key formats for every layer (providers_key, peer_subkey)
    records.py    record_type, SignedRecord: typed DHT records in signed envelopes
    rpc.py        framing: status byte for unary replies, stream frames, channels, typed message calls
    peer.py       Peer: hivemind DHT node + libp2p daemon; store/get, add_handler/call, streams
    channel/      SideChannel: the one encrypted TCP listener per peer (AES-256-GCM records under one-use
                  keys offered over libp2p), dialed only where a peer announced itself; blocks,
                  inference steps and averaging parts are its purposes
    memory.py     MemoryPeer, MemoryNetwork: the same interface in one process, for tests
    process.py    PeerProcess, start_child: a peer as a child process (any command line); reads the
                  multiaddrs it prints, stops or kills it

Import `Peer` from `swarmlm.p2p.peer` (it pulls in hivemind, which is slow to import);
everything else here is light.
"""
