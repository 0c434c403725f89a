"""store: content-addressed blocks, IPFS-compatible files, model manifests, and their exchange.

Reading order:
    cid.py         Cid (v0/v1, raw, dag-pb, dag-json; sha2-256), verify, CidError
    unixfs.py      dag-pb PBNode/PBLink and UnixFS Data: encode/decode; links_of any block
    packs.py       pack files: many blocks in one file, for bulk writes; their index
    retention.py   pins and LRU gc, shared by both stores: choose_evictions (the pure decision),
                   PinsAndGc
    blockstore.py  BlockStore (on disk: loose files and packs, verified reads, pins in pins.json),
                   MemoryBlockStore (its twin), MissingBlock
    paths.py       data_dir / blocks_dir: --data-dir, else $SWARMLM_HOME, else ~/.swarmlm
    dag.py         add_file (the CID `ipfs add` prints), iter_file, list_blocks, children, file_size,
                   and the functional store helpers the exchange uses (open_store, read_block, ...)
    manifest.py    ModelManifest: publish_model, materialize_model, fetch_model
    roots.py       Root, record_root / load_roots: the files `store add` added, as it printed them
    local.py       the local commands: store add | ls | cat | publish-model
    providers.py   provider records in the DHT, replication planning
    exchange.py    the block exchange's wire messages; BlockService: serve blocks over libp2p streams
                   and the side channel (purpose "store/blocks")
    fetch.py       Fetcher / fetch_dag / get_file: fetch DAGs verified, over providers' side
                   channels where they open, else libp2p streams
    node.py        StoreNode: announce, pin RPC, re-replication, gc; run_node (`swarmlm node`)
    commands.py    the network commands: node, store get, store pin

Everything above dag.py is local and synchronous; only providers/exchange/fetch/node talk to peers.
"""
