"""A whole federated run inside this process: one coordinator and its clients, each on a peer the
caller made (real `Peer`s joined to a swarm, or `MemoryPeer`s), with the same classes that
`swarmlm fl coordinate` and `swarmlm fl join` run. For the demo and for quick checks.

    records = await run_in_process(peers, model_dir, shards, cfg, run_id="demo-fl", work=Path(...))

`peers[0]` coordinates and serves the round's model from its block store; `peers[i + 1]` is the
client holding `shards[i]`. Returns the lines of rounds.jsonl; the final model is in `work/out`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from swarmlm.errors import UserError
from swarmlm.privacy.coordinator import Coordinator
from swarmlm.privacy.federated import FlConfig
from swarmlm.privacy.participant import Participant


async def run_in_process(peers: Sequence[Any], model_dir: Path, shards: Sequence[Path], cfg: FlConfig, *,
                         run_id: str, work: Path, printer: Callable[[str], None] = lambda s: None) -> list[dict]:
    from swarmlm.model.hf import load_model
    from swarmlm.model.tokenizer import Tokenizer
    from swarmlm.store.dag import open_store
    from swarmlm.store.node import StoreNode

    if len(peers) != len(shards) + 1:
        raise UserError(f"{len(shards)} shards need {len(shards) + 1} peers (the coordinator first)")
    model, model_cfg = await asyncio.to_thread(load_model, model_dir)
    node = StoreNode(peers[0], open_store(work / "coordinator"))
    await node.start()
    clients: list[asyncio.Task] = []
    try:
        coord = Coordinator(peers[0], node.store, node, cfg, run_id=run_id, model=model, model_cfg=model_cfg,
                            tokenizer=Tokenizer.load(model_dir), out=work / "out", printer=printer)
        await coord.start()
        await coord.publish(0)
        clients = [asyncio.create_task(Participant(p, run_id=run_id, data=str(shard), data_dir=str(work / f"client{i}"),
                                                   seed=i, printer=printer).run())
                   for i, (p, shard) in enumerate(zip(peers[1:], shards))]
        await coord.run(start_clients=len(shards))
        await asyncio.gather(*clients)
    finally:
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await node.close()
    return [json.loads(line) for line in (work / "out" / "rounds.jsonl").read_text().splitlines() if line.strip()]
