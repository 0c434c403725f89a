"""Block stores: verified reads, corrupted blocks dropped, pins kept through LRU garbage collection."""

import logging
import os

import pytest

from swarmlm.errors import IntegrityError
from swarmlm.store.blockstore import BlockStore, MemoryBlockStore, MissingBlock
from swarmlm.store.cid import DAG_PB, Cid
from swarmlm.store.dag import add_bytes, iter_file, list_blocks
from swarmlm.store.retention import Entry, choose_evictions


@pytest.fixture(params=["disk", "memory"])
def store(request, tmp_path):
    return BlockStore(tmp_path / "blocks") if request.param == "disk" else MemoryBlockStore()


def test_put_get_has_delete(store):
    cid = store.put(b"hello world")
    assert str(cid) == "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"
    assert store.has(cid) and store.get(cid) == b"hello world"
    assert list(store) == [cid] and store.size_bytes() == 11
    assert store.delete(cid) and not store.has(cid) and not store.delete(cid)
    with pytest.raises(MissingBlock):
        store.get(cid)


def test_put_rejects_bytes_that_do_not_match_the_cid(store):
    with pytest.raises(IntegrityError):
        store.put(b"evil", Cid.of(b"good"))
    assert not store.has(Cid.of(b"good"))


def test_v0_and_v1_name_the_same_block(store):
    block = b"\x0a\x04\x08\x02\x18\x00"
    v0 = store.put(block, Cid.of(block, DAG_PB, 0))
    assert str(v0) == "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
    assert store.has(v0.to_v1()) and store.get(v0.to_v1()) == block
    assert list(store) == [v0.to_v1()]


def test_blocks_are_sharded_by_the_next_to_last_characters(tmp_path):
    store = BlockStore(tmp_path)
    cid = store.put(b"x")
    text = str(cid)
    assert (tmp_path / text[-3:-1] / text).is_file()
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_corrupted_block_on_disk_is_detected_deleted_and_refetchable(tmp_path, caplog):
    store = BlockStore(tmp_path)
    cid = store.put(b"precious bytes")
    path = store.path_of(cid)
    path.write_bytes(b"precious bytez")                     # bit rot
    with caplog.at_level(logging.ERROR, logger="swarmlm"), pytest.raises(IntegrityError):
        store.get(cid)
    assert not path.exists() and not store.has(cid)
    assert any("corrupted" in r.message for r in caplog.records)
    store.put(b"precious bytes", cid)                        # fetched again from a peer
    assert store.get(cid) == b"precious bytes"


def _overwrite(store, cid, data):
    """Replace a stored block's bytes in place, loose or packed (bit rot)."""
    path, offset, length = store.locate(cid)
    assert len(data) == length
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupted_leaf_stops_a_file_read_before_its_bytes(tmp_path):
    store = BlockStore(tmp_path)
    root = add_bytes(store, b"aaaabbbbcccc", chunk_bytes=4)
    leaf = list(list_blocks(store, root))[2]
    _overwrite(store, leaf, b"BBBB")
    out = []
    with pytest.raises(IntegrityError):
        for piece in iter_file(store, root):
            out.append(piece)
    assert out == [b"aaaa"] and not store.has(leaf)


def test_same_size_put_over_an_existing_block_is_skipped(tmp_path):
    store = BlockStore(tmp_path)
    cid = store.put(b"abc")
    before = store.path_of(cid).stat().st_ino
    store.put(b"abc")
    assert store.path_of(cid).stat().st_ino == before


def test_pins_persist_across_instances(tmp_path):
    cid = Cid.parse("QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH")
    BlockStore(tmp_path).pin(cid)
    again = BlockStore(tmp_path)
    assert again.pinned() == [cid] and again.is_pinned(cid.to_v1())
    again.pin(cid.to_v1())                                   # the same root: no duplicate
    assert again.pinned() == [cid]
    assert again.unpin(cid) and again.pinned() == []


def test_a_damaged_pin_file_is_a_clear_error(tmp_path):
    store = BlockStore(tmp_path)
    (tmp_path / "pins.json").write_text("{not json")
    with pytest.raises(IntegrityError):
        store.pinned()


def _age(store, cids):
    """Make `cids` used in this order (oldest first)."""
    if isinstance(store, BlockStore):
        for i, cid in enumerate(cids):
            os.utime(store.locate(cid)[0], (1000 + i, 1000 + i))     # a pack ages as a whole
    else:
        for cid in cids:
            store.get(cid)


def test_gc_keeps_every_block_of_a_pinned_root_and_drops_unpinned_lru_first(store):
    pinned_root = add_bytes(store, bytes(range(40)), chunk_bytes=10)      # 4 leaves and a root
    pinned_blocks = set(list_blocks(store, pinned_root))
    store.pin(pinned_root)
    old, mid, new = store.put(b"o" * 100), store.put(b"m" * 100), store.put(b"n" * 100)
    _age(store, [old, mid, new] + sorted(pinned_blocks, key=str))
    limit = store.size_bytes() - 150                                # must free at least 150 bytes
    freed = store.gc(limit)
    assert freed == 200 and store.size_bytes() <= limit
    assert not store.has(old) and not store.has(mid) and store.has(new)
    assert all(store.has(c) for c in pinned_blocks)


def test_gc_never_deletes_pinned_blocks_even_over_the_limit(store):
    root = add_bytes(store, bytes(range(100)), chunk_bytes=10)
    store.pin(root)
    loose = store.put(b"loose")
    store.gc(0)
    assert not store.has(loose)
    assert b"".join(iter_file(store, root)) == bytes(range(100))


def test_gc_spares_recently_used_blocks_when_asked(tmp_path):
    store = BlockStore(tmp_path)
    fresh = store.put(b"being fetched")
    assert store.gc(0, min_idle_s=60) == 0 and store.has(fresh)
    assert store.gc(0) == len(b"being fetched") and not store.has(fresh)


def test_choose_evictions_is_pure_lru():
    a, b, c = Cid.of(b"a"), Cid.of(b"b"), Cid.of(b"c")
    entries = [Entry(a, 10, 3.0), Entry(b, 10, 1.0), Entry(c, 10, 2.0)]
    assert choose_evictions(entries, set(), 30) == []
    assert choose_evictions(entries, set(), 15) == [b, c]
    assert choose_evictions(entries, {b}, 15) == [c, a]
