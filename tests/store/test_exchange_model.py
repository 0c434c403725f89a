"""A model published on one real peer, found through the DHT and fetched by manifest CID on others."""

import json

import pytest
import torch
from safetensors.torch import save_file

from swarmlm.model.config import PRESETS
from swarmlm.model.generate import generate
from swarmlm.model.hf import config_to_hf, load_model, to_hf_state_dict
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.model.transformer import Transformer
from swarmlm.store import dag
from swarmlm.store.manifest import fetch_model, publish_model, read_manifest
from swarmlm.store.node import NodeOptions, StoreNode
from tests.helpers.swarm import LoopThread

pytestmark = pytest.mark.slow

TINY = PRESETS["tiny"].replace(n_layers=4, max_seq_len=32)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from swarmlm.p2p.peer import Peer
    tmp = tmp_path_factory.mktemp("model-swarm")
    tok = Tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog"] * 10, vocab_size=280)
    cfg = TINY.replace(vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    save_file(to_hf_state_dict(cfg, Transformer(cfg).state_dict()), str(ckpt / "model.safetensors"),
              metadata={"format": "pt"})
    (ckpt / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    tok.save(ckpt)
    store_a = dag.open_store(tmp / "a")
    cid = publish_model(store_a, ckpt)                      # pinned on A
    loop = LoopThread()

    async def up():
        a = await Peer.create()
        node = StoreNode(a, store_a, NodeOptions(announce_interval_s=3600, replication_interval_s=3600))
        await node.start()
        await node.announce_all()
        b = await Peer.create(initial_peers=a.maddrs, client_mode=True)
        return a, node, b
    a, node, b = loop.run(up(), timeout_s=180)
    yield loop, b, cid, ckpt, tmp
    loop.run(node.close())
    loop.run(b.shutdown())
    loop.run(a.shutdown())
    loop.close()


def test_whole_model_fetched_by_manifest_cid_generates_the_same_tokens(swarm):
    loop, b, cid, ckpt, tmp = swarm
    out = loop.run(fetch_model(b, str(cid), tmp / "full", data_dir=tmp / "b-full"))
    original, _ = load_model(ckpt)
    copy, _ = load_model(out)
    prompt = Tokenizer.load(out).encode("the quick brown")
    assert generate(copy, prompt, max_new_tokens=8) == generate(original, prompt, max_new_tokens=8)


def test_fetching_blocks_1_to_2_transfers_only_their_files(swarm):
    loop, b, cid, ckpt, tmp = swarm
    loop.run(fetch_model(b, str(cid), tmp / "span", blocks=range(1, 3), with_embed_head=False,
                         data_dir=tmp / "b-span"))
    source = dag.open_store(tmp / "a")
    m = read_manifest(source, cid)
    needed = {cid} | {c for ref in (m.blocks[1], m.blocks[2], m.tokenizer, *m.extra_files.values())
                      for c in dag.list_blocks(source, ref.cid)}
    assert set(dag.open_store(tmp / "b-span")) == {c.to_v1() for c in needed}
    span, _ = load_model(tmp / "span", layers=range(1, 3), with_embed=False, with_head=False)
    full, _ = load_model(ckpt)
    h = torch.randn(1, 5, TINY.dim)
    with torch.no_grad():
        assert torch.allclose(span.run_blocks(h), full.run_blocks(h, start=1, end=3))
