"""Run one secure-aggregation round with every party in this process: for tests, benchmarks and
the in-process SecAgg+ scale measurement. Moves the same signed bytes a networked round moves.

    total, survivors = run_round(identities, updates, config=SecAggConfig(...), drop={Stage.SHARE_KEYS: {id}})

`drop[stage]` names clients that vanish instead of sending their message of that stage; a client
that refuses a step (its checks failed) drops out the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from swarmlm.errors import SwarmlmError
from swarmlm.p2p.identity import Identity
from swarmlm.privacy.secagg.client import SecAggClient
from swarmlm.privacy.secagg.server import SecAggConfig, SecAggServer
from swarmlm.privacy.secagg.stages import Stage


@dataclass
class RoundTimes:
    client_s: dict[str, float] = field(default_factory=dict)     # per client, all its stages (wall clock)
    client_cpu_s: dict[str, float] = field(default_factory=dict)  # the same in this thread's CPU time
    server_s: float = 0.0


def run_round(identities: Sequence[Identity], updates: Sequence[np.ndarray], *, config: SecAggConfig,
              coordinator: Identity | None = None, drop: dict[Stage, set[str]] | None = None,
              run_id: str = "local", round: int = 0, times: RoundTimes | None = None,
              server_box: dict | None = None, keep_inputs: bool = False,
              early_masks: bool = False) -> tuple[np.ndarray, list[str]]:
    """The float sum of the survivors' updates and who they are; `RoundFailed` below the threshold.
    `server_box["server"]` receives the coordinator's state (what it saw), for tests. `early_masks`:
    clients expand their masks right after sharing keys (`expand_masks`), as `swarmlm fl join` does."""
    coordinator = coordinator or Identity.generate()
    drop = drop or {}
    times = times if times is not None else RoundTimes()
    length = int(np.asarray(updates[0]).size)
    server = SecAggServer(coordinator, run_id=run_id, round=round, config=config, length=length,
                          expected=[i.peer_id for i in identities], keep_inputs=keep_inputs)
    if server_box is not None:
        server_box["server"] = server
    clients = {i.peer_id: SecAggClient(i, run_id=run_id, round=round, coordinator=coordinator.peer_id, update=u)
               for i, u in zip(identities, updates)}
    def share_keys(c: SecAggClient, m: bytes) -> bytes:
        out = c.share_keys(m)
        if early_masks:
            c.expand_masks()
        return out

    steps = {Stage.SETUP: lambda c, m: c.advertise(), Stage.SHARE_KEYS: share_keys,
             Stage.COLLECT_MASKED: SecAggClient.masked_input, Stage.UNMASK: SecAggClient.unmask}
    inbox: dict[str, bytes] = {cid: b"" for cid in clients}
    for stage in (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED, Stage.UNMASK):
        for cid, msg in inbox.items():
            if cid in drop.get(stage, ()):
                continue
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                out = steps[stage](clients[cid], msg)
            except SwarmlmError:             # a client that refuses to go on is one more dropout
                continue
            finally:
                times.client_s[cid] = times.client_s.get(cid, 0.0) + time.perf_counter() - t0
                times.client_cpu_s[cid] = times.client_cpu_s.get(cid, 0.0) + time.thread_time() - c0
            t0 = time.perf_counter()
            server.receive(out)
            times.server_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        inbox = server.advance()
        times.server_s += time.perf_counter() - t0
    return server.result, server.survivors
