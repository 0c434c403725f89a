"""Servers choosing their blocks: --num-blocks servers joining one by one cover the model, and move when needed."""

import time

from swarmlm.swarm.dht import read_servers
from swarmlm.swarm.source import directory_model_id


def covered(swarm, ckpt):
    async def read():
        from swarmlm.p2p.memory import MemoryPeer
        peer = await MemoryPeer.create(swarm.net, client_mode=True)
        records = await read_servers(peer, directory_model_id(ckpt), 4)
        await peer.shutdown()
        return {i for r in records.values() if r.state == "online" for i in range(r.start, r.end)}
    return swarm.run(read())


def test_num_blocks_servers_joining_one_by_one_cover_every_block(swarm, checkpoints):
    ckpt = checkpoints["llama"]
    for seed in range(4):
        swarm.add_server(ckpt, num_blocks=1, seed=seed)

    assert covered(swarm, ckpt) == {0, 1, 2, 3}


def test_a_num_blocks_server_moves_to_blocks_left_uncovered(swarm, checkpoints):
    ckpt = checkpoints["llama"]
    swarm.add_server(ckpt, (0, 2))
    b = swarm.add_server(ckpt, (2, 4))
    swarm.add_server(ckpt, num_blocks=2, rebalance_period_s=0.2)   # joins where throughput is least
    swarm.stop_server(b)
    deadline = time.monotonic() + 20
    while covered(swarm, ckpt) != {0, 1, 2, 3} and time.monotonic() < deadline:
        time.sleep(0.2)

    assert covered(swarm, ckpt) == {0, 1, 2, 3}
    model = swarm.remote_model(ckpt)
    assert len(model.generate([1, 2, 3], max_new_tokens=3)) == 3


def test_a_server_imports_the_kernel_tooling_before_it_starts_loading_on_a_thread(tmp_path, monkeypatch):
    # the loading thread may build the kernels (setuptools changes sys.meta_path as it imports),
    # while this thread imports hivemind: that import must already have happened (qkernels.prepare)
    import asyncio
    import threading

    import pytest

    from swarmlm.swarm.server import serve
    events, on_worker = [], []
    monkeypatch.setattr(serve.qkernels, "prepare", lambda: events.append("prepare"))

    def load(opts):
        events.append("load")
        on_worker.append(threading.current_thread() is not threading.main_thread())
        raise RuntimeError("stop here")
    monkeypatch.setattr(serve, "_load_local_span", load)
    opts = serve.ServeOptions(model=str(tmp_path), blocks=(0, 1))
    with pytest.raises(RuntimeError, match="stop here"):
        asyncio.run(serve.run_server(opts, stop=asyncio.Event(), peer=object()))
    assert events == ["prepare", "load"]
    assert on_worker == [True]      # the load ran on a worker thread, after prepare
