"""Serving and using a model by its manifest CID: each server fetches only its blocks, verified."""

import json

from safetensors import safe_open

from swarmlm.model.generate import generate
from swarmlm.p2p.memory import MemoryPeer
from swarmlm.store.dag import open_store
from swarmlm.store.exchange import BlockService
from swarmlm.store.manifest import publish_model
from swarmlm.store.providers import announce
from swarmlm.swarm.source import directory_model_id, open_model_source
from tests.helpers.swarm_servers import local_model

PROMPT = [5, 17, 42, 99, 3, 250]


def publish(swarm, ckpt, tmp_path) -> str:
    async def go():
        peer = await MemoryPeer.create(swarm.net)
        store = open_store(tmp_path / "origin")
        cid = str(publish_model(store, ckpt))
        await BlockService(peer, store).start()
        await announce(peer, cid, size_bytes=1, replicas=1, ttl_s=60)
        return cid
    return swarm.run(go())


def test_servers_and_client_by_manifest_cid_generate_like_local(swarm, checkpoints, tmp_path):
    ckpt = checkpoints["llama"]
    cid = publish(swarm, ckpt, tmp_path)
    swarm.add_server(cid, (0, 2), data_dir=str(tmp_path / "s1"))
    swarm.add_server(cid, (2, 4), data_dir=str(tmp_path / "s2"))
    model = swarm.remote_model(cid, data_dir=str(tmp_path / "client"))

    out = model.generate(PROMPT, max_new_tokens=10)

    assert out == generate(local_model(ckpt), PROMPT, max_new_tokens=10)
    fetched = tmp_path / "s2" / "models" / cid / "blocks-2-4" / "model.safetensors"
    with safe_open(str(fetched), framework="pt") as f:
        layers = {int(k.split(".")[2]) for k in f.keys()}
    assert layers == {2, 3}


def test_directory_id_follows_the_weights(checkpoints, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(checkpoints["gpt2"], copy)
    same = directory_model_id(copy) == directory_model_id(checkpoints["gpt2"])
    config = json.loads((copy / "config.json").read_text())
    config["layer_norm_epsilon"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))

    assert same and directory_model_id(copy) != directory_model_id(checkpoints["gpt2"])


def test_a_bad_model_argument_is_a_user_error(tmp_path):
    import asyncio

    import pytest

    from swarmlm.errors import UserError
    with pytest.raises(UserError, match="neither"):
        asyncio.run(open_model_source(str(tmp_path / "nothing")))
