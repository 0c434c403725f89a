"""Model manifests: publish a checkpoint per block, materialize all or some of it, load and generate."""

import json

import pytest
import torch
from safetensors.torch import save_file

from swarmlm.errors import UserError, WireError
from swarmlm.model.config import PRESETS
from swarmlm.model.generate import generate
from swarmlm.model.hf import config_to_hf, load_model, to_hf_state_dict
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.model.transformer import Transformer
from swarmlm.store.blockstore import MemoryBlockStore
from swarmlm.store.cid import DAG_JSON, Cid
from swarmlm.store.dag import list_blocks
from swarmlm.store.manifest import (ManifestError, build_manifest, materialize_model, parse_manifest, part_of,
                                    publish_model, read_manifest)

TINY = PRESETS["tiny"].replace(n_layers=4, max_seq_len=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = Tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog"] * 10, vocab_size=280)
    cfg = TINY.replace(vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt")
    # what hf.save_model writes, minus its meta-device parameter check (slow on a first call)
    save_file(to_hf_state_dict(cfg, Transformer(cfg).state_dict()), str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    tok.save(directory)
    return directory


@pytest.fixture(scope="module")
def published(checkpoint):
    store = MemoryBlockStore()
    return store, publish_model(store, checkpoint, name="tiny")


@pytest.mark.parametrize("name,part", [
    ("transformer.h.3.attn.c_attn.weight", 3), ("h.0.ln_1.weight", 0), ("model.layers.10.mlp.up_proj.weight", 10),
    ("lm_head.weight", "head"), ("transformer.ln_f.bias", "head"), ("model.norm.weight", "head"),
    ("transformer.wte.weight", "embed"), ("transformer.wpe.weight", "embed"), ("model.embed_tokens.weight", "embed"),
])
def test_tensors_go_to_their_block_or_end(name, part):
    assert part_of(name) == part


def test_publish_gives_a_pinned_dag_json_manifest_with_one_file_per_block(published, checkpoint):
    store, cid = published
    assert cid.codec == DAG_JSON and cid.version == 1 and store.is_pinned(cid)
    m = read_manifest(store, cid)
    assert m.name == "tiny" and m.n_blocks == 4
    assert m.config == json.loads((checkpoint / "config.json").read_text())
    assert all(t.startswith("model.layers.2.") for t in m.blocks[2].tensors)
    assert m.embed.tensors == ("model.embed_tokens.weight",) and m.head.tensors == ("model.norm.weight",)
    assert m.tokenizer is not None and "tokenizer_config.json" in m.extra_files
    assert set(list_blocks(store, cid)) == set(store)           # the manifest's links reach every file


def test_publishing_twice_gives_the_same_cid(published, checkpoint):
    _, cid = published
    assert publish_model(MemoryBlockStore(), checkpoint, name="tiny") == cid


def test_full_materialized_model_generates_the_same_tokens(published, checkpoint, tmp_path):
    store, cid = published
    out = materialize_model(cid, store.get, tmp_path / "m")
    original, _ = load_model(checkpoint)
    copy, _ = load_model(out)
    prompt = Tokenizer.load(out).encode("the quick brown")
    assert prompt == Tokenizer.load(checkpoint).encode("the quick brown")
    assert generate(copy, prompt, max_new_tokens=8) == generate(original, prompt, max_new_tokens=8)


def test_blocks_1_to_2_read_only_their_files(published, checkpoint, tmp_path):
    store, cid = published
    m = read_manifest(store, cid)
    asked = set()

    def get_block(c):
        asked.add(c)
        return store.get(c)

    out = materialize_model(cid, get_block, tmp_path / "span", blocks=range(1, 3), with_embed=False, with_head=False)
    wanted = {cid} | {c for ref in (m.blocks[1], m.blocks[2], m.tokenizer, *m.extra_files.values())
                      for c in list_blocks(store, ref.cid)}
    assert asked == wanted
    span, _ = load_model(out, layers=range(1, 3), with_embed=False, with_head=False)
    full, _ = load_model(checkpoint)
    h = torch.randn(1, 5, TINY.dim)
    with torch.no_grad():
        assert torch.allclose(span.run_blocks(h), full.run_blocks(h, start=1, end=3))


def test_a_tied_head_brings_the_embeddings_along(published):
    store, cid = published
    m = read_manifest(store, cid)
    assert m.select(range(3, 4), with_embed=False, with_head=True) == [m.embed, m.blocks[3], m.head]
    with pytest.raises(UserError):
        m.select(range(2, 9))


def test_a_block_that_fails_its_cid_stops_materializing(published, tmp_path):
    store, cid = published
    m = read_manifest(store, cid)
    bad = m.blocks[0].cid

    def get_block(c):
        return b"garbage" if c == bad else store.get(c)

    with pytest.raises(Exception) as info:
        materialize_model(cid, get_block, tmp_path / "x", blocks=range(0, 1), with_embed=False, with_head=False)
    assert "does not match" in str(info.value)
    assert not (tmp_path / "x" / "config.json").exists()


def _doc(published):
    store, cid = published
    return json.loads(store.get(cid))


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(format="other/1"),
    lambda d: d.pop("blocks"),
    lambda d: d.update(blocks={}),
    lambda d: d.update(name=3),
    lambda d: d.update(extra=1),
    lambda d: d["blocks"][0].update(cid={"/": "bafynotacid"}),
    lambda d: d["blocks"][0].update(cid="bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"),
    lambda d: d["blocks"][0].update(size=-1),
    lambda d: d["blocks"][0].update(size=True),
    lambda d: d["embed"].update(tensors="x"),
    lambda d: d["extra_files"].update({"../../etc/passwd": d["embed"]}),
    lambda d: d["extra_files"].update({"config.json": d["embed"]}),
])
def test_malformed_manifests_raise_a_clear_error(published, mutate):
    doc = _doc(published)
    mutate(doc)
    with pytest.raises(ManifestError) as info:
        parse_manifest(json.dumps(doc).encode())
    assert isinstance(info.value, UserError) and isinstance(info.value, WireError)


@pytest.mark.parametrize("data", [b"", b"\xff", b"[]", b"{", b'{"format": "swarmlm-model/1"}'])
def test_non_manifests_raise(data):
    with pytest.raises(ManifestError):
        parse_manifest(data)


def test_a_file_cid_is_not_a_manifest(published):
    store, _ = published
    with pytest.raises(ManifestError):
        read_manifest(store, store.put(b"plain"))


def test_build_and_parse_round_trip(published):
    store, cid = published
    m = read_manifest(store, cid)
    assert parse_manifest(build_manifest(m)) == m
    assert Cid.of(build_manifest(m), DAG_JSON) == cid


def test_publish_rejects_a_directory_without_a_checkpoint(tmp_path):
    with pytest.raises(ManifestError):
        publish_model(MemoryBlockStore(), tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ManifestError):
        publish_model(MemoryBlockStore(), tmp_path)


def test_fetch_model_over_the_exchange_transfers_only_the_requested_blocks(checkpoint, tmp_path):
    import asyncio

    from swarmlm.p2p.memory import MemoryNetwork, MemoryPeer
    from swarmlm.store.dag import open_store
    from swarmlm.store.exchange import BlockService
    from swarmlm.store.manifest import fetch_model

    async def go():
        net = MemoryNetwork()
        a, b = await MemoryPeer.create(net), await MemoryPeer.create(net)
        store_a = open_store(tmp_path / "a")
        cid = publish_model(store_a, checkpoint)
        await BlockService(a, store_a).start()
        out = await fetch_model(b, str(cid), tmp_path / "out", blocks=range(1, 3), with_embed_head=False,
                                data_dir=tmp_path / "b", providers=[a.peer_id])
        return cid, out

    cid, out = asyncio.run(go())
    m = read_manifest(open_store(tmp_path / "a"), cid)
    got = set(open_store(tmp_path / "b"))
    needed = {cid} | {c for ref in (m.blocks[1], m.blocks[2], m.tokenizer, *m.extra_files.values())
                      for c in list_blocks(open_store(tmp_path / "a"), ref.cid)}
    assert got == {c.to_v1() for c in needed}
    span, _ = load_model(out, layers=range(1, 3), with_embed=False, with_head=False)
    assert sorted(span.state_dict())[0].startswith("layers.1.")
