"""One `Panel` per service: what it reads from the DHT through a `Peer`, turned into plain JSON data.

A panel has a `name` (its key in the snapshot, and the name of the page's renderer for it) and
`async collect(peer, now) -> dict` returning the snapshot keys it owns. It finds what to read in
the swarm's directory (p2p/directory.py): servers list their model, training peers their run,
storage nodes their pinned roots. Panels keep what must outlive one look (staleness, loss
history) in themselves; the rules they apply are view.py's pure functions.

A service publishes directory entries under its own service name and has a panel class here (or
in a module of its own, as the ledger's, which reads a chain rather than the DHT) in
`default_panels()`; the page shows a panel's data as a table until static/dash.js has a renderer
of that name.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Protocol

from swarmlm.collab.progress import RUNS_SERVICE, ProgressRecord
from swarmlm.dashboard.view import Freshness, LossHistory, ServedRate, bottleneck, coverage, holes
from swarmlm.log import get_logger
from swarmlm.p2p import keys
from swarmlm.p2p.directory import list_entries
from swarmlm.privacy.coordinator import RUNS_SERVICE as FL_RUNS_SERVICE
from swarmlm.privacy.coordinator import RunRecord as FlRunRecord
from swarmlm.privacy.mpc.wire import PARTIES_SERVICE as MPC_SERVICE
from swarmlm.privacy.mpc.wire import MpcPartyRecord
from swarmlm.store.providers import ROOTS_SERVICE, find_providers, replication_target
from swarmlm.swarm.dht import MODELS_SERVICE, read_server_records
from swarmlm.swarm.server.selection import block_throughputs

logger = get_logger(__name__)

MAX_LAYERS = 1024            # a model listed with more blocks than this is ignored (the size is a peer's claim)
MAX_LISTED = 200             # models, runs or roots shown per panel
RUN_PEER_MAX_AGE_S = 30.0    # a training peer whose progress is older than this is not counted live
MPC_PARTIES = 3              # parties a private inference session needs (privacy/mpc: three-party replicated shares)


class Panel(Protocol):
    name: str

    async def collect(self, peer: Any, now: float) -> dict[str, Any]: ...


class ModelsPanel:
    """Each model's blocks, the servers holding them (state, throughput, cache, sessions), the holes."""
    name = "models"

    def __init__(self) -> None:
        self.fresh = Freshness()
        self.served = ServedRate()

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
                                       age_s=self.fresh.age(key, now), expires_in_s=rec.expires_at - now,
                                       served=self.served.observe(key, rec.value.tokens_served, rec.expires_at)))
            live = [r for r in rows if r["state"] == "online"]
            counts = coverage([tuple(r["blocks"]) for r in live], n_layers)
            rates = block_throughputs([(*r["blocks"], r["throughput"]) for r in live], n_layers)
            models.append({"model": model_id, "n_layers": n_layers, "servers": [r["peer_id"] for r in rows],
                           "coverage": counts, "holes": holes(counts), "block_throughput": rates,
                           "throughput": bottleneck(rates), "sessions": sum(r["sessions"] for r in rows),
                           "served_tokens_per_s": served_rate(live, n_layers)})
            servers.extend(rows)
        self.fresh.forget_except(seen)
        self.served.forget_except(seen)
        return {"models": models, "servers": servers}


def server_row(model_id: str, peer_id: str, rec: Any, *, stale: bool, age_s: float, expires_in_s: float,
               served: float | None = None) -> dict:
    """One server as the page shows it: a stale record (missed re-announcements) is offline. `served`: the
    token positions per second its inference steps ran through its span lately (None until known)."""
    return {"peer_id": peer_id, "model": model_id, "blocks": [rec.start, rec.end],
            "state": "offline" if stale else rec.state, "announced_state": rec.state, "stale": stale,
            "throughput": rec.block_tokens_per_s, "sessions": rec.sessions, "free_cache_tokens": rec.free_cache_tokens,
            "dtype": rec.dtype, "quantization": rec.quantization, "version": rec.version or None,
            "tokens_served": rec.tokens_served,
            "served_tokens_per_s": None if served is None or stale else round(served, 3),
            "refreshed_s_ago": round(age_s, 1), "expires_in_s": round(expires_in_s, 1)}


def served_rate(live: list[dict], n_layers: int) -> float:
    """A model's served tokens/s: each token runs through every block once, so any block's servers together
    served them all; the busiest block's sum (a block whose servers have no rate yet counts less)."""
    per_block = [0.0] * n_layers
    for r in live:
        for b in range(max(r["blocks"][0], 0), min(r["blocks"][1], n_layers)):
            per_block[b] += r["served_tokens_per_s"] or 0.0
    return round(max(per_block, default=0.0), 3)


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


class FederatedPanel:
    """Federated runs (privacy/coordinator.py): the coordinator's round, clients, losses and their history,
    and ε where DP is on. Only the record the coordinator listed in the directory signed is believed."""
    name = "fl_runs"

    def __init__(self) -> None:
        self.history: dict[str, LossHistory] = {}

    async def collect(self, peer: Any, now: float) -> dict[str, Any]:
        listed = await list_entries(peer, FL_RUNS_SERVICE)
        runs = []
        for run_id in sorted(listed)[:MAX_LISTED]:
            records = await peer.get(keys.fl_run_key(run_id), latest=True)
            row = fl_run_row(run_id, records, coordinators=set(listed[run_id]))
            if row is None:
                continue
            history = self.history.setdefault(run_id, LossHistory())
            if row["train_loss"] is not None:
                history.add(row["done"], row["train_loss"])
            row["history"] = [[r, loss] for r, loss in history.points]
            runs.append(row)
        return {"fl_runs": runs}


def fl_run_row(run_id: str, records: Any, *, coordinators: set[str]) -> dict[str, Any] | None:
    """A federated run from its coordinator's newest record (the highest round of a listed coordinator)."""
    found = [r for r in records if isinstance(r.value, FlRunRecord) and r.signer in coordinators
             and r.subkey == keys.peer_subkey(r.signer)]
    if not found:
        return None
    rec = max(found, key=lambda r: (r.value.done, r.value.round))
    v = rec.value
    return {"run_id": run_id, "coordinator": rec.signer, "round": v.round, "rounds": v.rounds, "done": v.done,
            "clients": v.clients, "dropped": v.dropped, "secure": v.secure, "model": v.manifest_cid,
            "train_loss": v.train_loss if v.has_loss else None, "val_loss": v.val_loss if v.has_loss else None,
            "dp": v.epsilon >= 0, "epsilon": v.epsilon if v.epsilon >= 0 else None,
            "delta": v.delta if v.epsilon >= 0 else None,
            "sample_epsilon": v.sample_epsilon if v.sample_epsilon >= 0 else None}


class MpcPanel:
    """Private (MPC) inference: per model, the parties that announce themselves (three make a session)."""
    name = "mpc"

    async def collect(self, peer: Any, now: float) -> dict[str, Any]:
        listed = await list_entries(peer, MPC_SERVICE)
        models = []
        for model_id in sorted(listed)[:MAX_LISTED]:
            records = await peer.get(keys.mpc_parties_key(model_id), latest=True)
            parties = sorted(({"peer_id": r.signer, "max_tokens": r.value.max_tokens} for r in records
                              if isinstance(r.value, MpcPartyRecord) and r.value.model == model_id
                              and r.subkey == keys.peer_subkey(r.signer)), key=lambda p: p["peer_id"])
            if parties:
                models.append({"model": model_id, "parties": parties, "ready": len(parties) >= MPC_PARTIES})
        return {"mpc": models}


def default_panels() -> list[Panel]:
    """The panels of the services that exist; a new service appends its own (the ledger's: ledger_panel.py,
    added by `swarmlm dashboard --ledger`)."""
    return [ModelsPanel(), RunsPanel(), StorePanel(), FederatedPanel(), MpcPanel()]
