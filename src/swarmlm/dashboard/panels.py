"""One `Panel` per service: what it reads from the DHT through a `Peer`, turned into plain JSON data.

A panel has a `name` (its key in the snapshot, and the name of the page's renderer for it) and
`async collect(peer, now) -> dict` returning the snapshot keys it owns. It finds what to read in
the swarm's directory (p2p/directory.py): servers list their model, training peers their run,
storage nodes their pinned roots. Panels keep what must outlive one look (staleness, loss
history) in themselves; the rules they apply are view.py's pure functions.

A service added later (federated rounds, the ledger) publishes directory entries under its own
service name and adds a panel class here (or in a module of its own) to `default_panels()`;
the page shows its data as a table until static/dash.js has a renderer of that name.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Protocol

from swarmlm.collab.progress import RUNS_SERVICE, ProgressRecord
from swarmlm.dashboard.view import Freshness, LossHistory, bottleneck, coverage, holes
from swarmlm.log import get_logger
from swarmlm.p2p import keys
from swarmlm.p2p.directory import list_entries
from swarmlm.store.providers import ROOTS_SERVICE, find_providers, replication_target
from swarmlm.swarm.dht import MODELS_SERVICE, read_server_records
from swarmlm.swarm.server.selection import block_throughputs

logger = get_logger(__name__)

MAX_LAYERS = 1024            # a model listed with more blocks than this is ignored (the size is a peer's claim)
MAX_LISTED = 200             # models, runs or roots shown per panel
RUN_PEER_MAX_AGE_S = 30.0    # a training peer whose progress is older than this is not counted live


class Panel(Protocol):
    name: str

    async def collect(self, peer: Any, now: float) -> dict[str, Any]: ...


class ModelsPanel:
    """Each model's blocks, the servers holding them (state, throughput, cache, sessions), the holes."""
    name = "models"

    def __init__(self) -> None:
        self.fresh = Freshness()

    async def collect(self, peer: Any, now: float) -> dict[str, Any]:
        listed = await list_entries(peer, MODELS_SERVICE)
        models, servers, seen = [], [], []
        for model_id in sorted(listed)[:MAX_LISTED]:
            n_layers = max(e.size for e in listed[model_id].values())
            if not 0 < n_layers <= MAX_LAYERS:
                continue
            records = await read_server_records(peer, model_id, n_layers)
            rows = []
            for peer_id, rec in records.items():
                key = (model_id, peer_id)
                seen.append(key)
                self.fresh.observe(key, rec.expires_at, now)
                rows.append(server_row(model_id, peer_id, rec.value, stale=self.fresh.is_stale(key, now),
                                       age_s=self.fresh.age(key, now), expires_in_s=rec.expires_at - now))
            live = [r for r in rows if r["state"] == "online"]
            counts = coverage([tuple(r["blocks"]) for r in live], n_layers)
            rates = block_throughputs([(*r["blocks"], r["throughput"]) for r in live], n_layers)
            models.append({"model": model_id, "n_layers": n_layers, "servers": [r["peer_id"] for r in rows],
                           "coverage": counts, "holes": holes(counts), "block_throughput": rates,
                           "throughput": bottleneck(rates), "sessions": sum(r["sessions"] for r in rows)})
            servers.extend(rows)
        self.fresh.forget_except(seen)
        return {"models": models, "servers": servers}


def server_row(model_id: str, peer_id: str, rec: Any, *, stale: bool, age_s: float, expires_in_s: float) -> dict:
    """One server as the page shows it: a stale record (missed re-announcements) is offline."""
    return {"peer_id": peer_id, "model": model_id, "blocks": [rec.start, rec.end],
            "state": "offline" if stale else rec.state, "announced_state": rec.state, "stale": stale,
            "throughput": rec.block_tokens_per_s, "sessions": rec.sessions, "free_cache_tokens": rec.free_cache_tokens,
            "dtype": rec.dtype, "refreshed_s_ago": round(age_s, 1), "expires_in_s": round(expires_in_s, 1)}


class RunsPanel:
    """Collaborative training runs: live peers, global step, samples/s, loss and its history."""
    name = "runs"

    def __init__(self) -> None:
        self.history: dict[str, LossHistory] = {}

    async def collect(self, peer: Any, now: float) -> dict[str, Any]:
        listed = await list_entries(peer, RUNS_SERVICE)
        runs = []
        for run_id in sorted(listed)[:MAX_LISTED]:
            records = await peer.get(keys.collab_progress_key(run_id), latest=True)
            run = run_row(run_id, records, now)
            history = self.history.setdefault(run_id, LossHistory())
            if run["peers"]:
                history.add(run["global_step"], run["loss"])
            run["history"] = [[s, loss] for s, loss in history.points]
            run["loss"] = run["loss"] if math.isfinite(run["loss"]) else None
            runs.append(run)
        return {"runs": runs}


def run_row(run_id: str, records: Any, now: float) -> dict[str, Any]:
    """A run from its progress records: the peers whose own signed record is active and recent."""
    peers = []
    for rec in records:
        value = rec.value
        if not isinstance(value, ProgressRecord) or rec.subkey != rec.signer:
            continue
        if not value.active or abs(now - value.time) > RUN_PEER_MAX_AGE_S:
            continue
        peers.append({"peer_id": rec.signer, "step": value.step, "samples_per_s": value.samples_per_s,
                      "loss": value.loss if math.isfinite(value.loss) else None})
    peers.sort(key=lambda p: p["peer_id"])
    losses = [p["loss"] for p in peers if p["loss"] is not None]
    return {"run_id": run_id, "peers": peers, "global_step": max((p["step"] for p in peers), default=0),
            "samples_per_s": sum(p["samples_per_s"] for p in peers),
            "loss": sum(losses) / len(losses) if losses else math.nan}


class StorePanel:
    """Storage peers with the roots they pin; each root's holders, replica count and target."""
    name = "store"

    async def collect(self, peer: Any, now: float) -> dict[str, Any]:
        listed = await list_entries(peer, ROOTS_SERVICE)
        names = sorted(listed)[:MAX_LISTED]
        found = await asyncio.gather(*(find_providers(peer, root) for root in names), return_exceptions=True)
        roots, by_peer = [], {}
        for root, providers in zip(names, found):
            if isinstance(providers, BaseException):
                logger.info("reading the providers of %s: %s", root, providers)
                providers = []
            holders = sorted({p.peer_id for p in providers} | set(listed[root]))
            for holder in holders:
                by_peer.setdefault(holder, []).append(root)
            roots.append({"cid": root, "size_bytes": max(e.size for e in listed[root].values()),
                          "holders": holders, "replicas": len(holders), "target": replication_target(providers)})
        return {"store": {"roots": roots, "peers": [{"peer_id": p, "roots": r} for p, r in sorted(by_peer.items())]}}


def default_panels() -> list[Panel]:
    """The panels of the services that exist; a new service appends its own."""
    return [ModelsPanel(), RunsPanel(), StorePanel()]
