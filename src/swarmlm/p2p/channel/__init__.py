"""The side channel: one encrypted TCP listener per peer process, for every direct connection.

Reading order:
    conn.py      Connection: AEAD records (AES-256-GCM, sequence-number nonces, lengths bounded
                 before any read, decryption into the caller's buffer) and a byte stream over them
    policy.py    parse_addr, dialable, DialLimiter: which announced addresses may be dialed, how often;
                 maddr_hosts: the IPs of this peer's own multiaddrs (where its listeners bind)
    service.py   SideChannel: the listener, one-use keys offered over libp2p, the signed `Endpoint`
                 record in the DHT, `open(peer_id, purpose)`

Blocks (store/), inference steps and pushes (swarm/) and averaging parts (collab/) are its
purposes; none of them opens a socket of its own.
"""
