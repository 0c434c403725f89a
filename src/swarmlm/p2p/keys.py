"""DHT key formats, defined once for every layer.

A key is a plain string; hivemind hashes it into the DHT's key space. Per-peer entries go
under a subkey that starts with the publishing peer's ID (see records.py), so one key can
hold one entry per peer and no peer can overwrite another's. Layers above add their key
functions here rather than formatting keys themselves.
"""

from __future__ import annotations

PREFIX = "swarmlm/v1"


def providers_key(root_cid: str) -> str:
    """Who holds the whole DAG under `root_cid`: one `ProviderRecord` per holder (subkey = its peer ID)."""
    return f"{PREFIX}/providers/{root_cid}"


def peer_subkey(peer_id: str, name: str = "") -> str:
    """A subkey owned by `peer_id`: the peer ID itself, or `peer_id/name` for several entries under one key."""
    return f"{peer_id}/{name}" if name else peer_id


def subkey_owner(subkey: str) -> str:
    """The peer ID a subkey belongs to (its part before the first '/')."""
    return subkey.split("/", 1)[0]


def block_key(model_id: str, index: int) -> str:
    """Who serves block `index` of model `model_id`: one swarm `ServerRecord` per server (subkey = its peer ID)."""
    return f"{PREFIX}/blocks/{model_id}/{index}"


def collab_progress_key(run_id: str) -> str:
    """Training progress of run `run_id`: one `collab.progress` record per peer (subkey = its peer ID)."""
    return f"{PREFIX}/collab/{run_id}/progress"


def collab_model_key(run_id: str) -> str:
    """The latest model of run `run_id` published into the store: one `collab.model` record per publisher."""
    return f"{PREFIX}/collab/{run_id}/model"


def collab_round_key(run_id: str, group_hex: str) -> str:
    """One averaging round of run `run_id` (its group ID in hex): each member's `collab.round_claim`
    (subkey `peer_id/claim`) and `collab.round_signature` (subkey `peer_id/sig`), see collab/witness.py."""
    return f"{PREFIX}/collab/{run_id}/round/{group_hex}"


def endpoint_key(peer_id: str) -> str:
    """Where `peer_id`'s side channel listens: one `p2p.endpoint` record, under its own subkey."""
    return f"{PREFIX}/endpoint/{peer_id}"


def fl_run_key(run_id: str) -> str:
    """Federated run `run_id`: its coordinator's `privacy.fl` record (the round, the global model's CID)."""
    return f"{PREFIX}/fl/{run_id}"


def directory_key(service: str) -> str:
    """What one service has running in the swarm ("swarm.models", "collab.runs", "store.roots", ...):
    one `p2p.directory` entry per (peer, name), subkey `peer_id/name`; the dashboard lists the swarm from these."""
    return f"{PREFIX}/directory/{service}"


def mpc_parties_key(model_id: str) -> str:
    """Who computes private (MPC) inference of `model_id`: one `privacy.mpc_party` record per party."""
    return f"{PREFIX}/mpc/{model_id}/parties"
