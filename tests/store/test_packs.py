"""Pack files: bulk writes land in packs that other store instances see, and stay verified,
deletable and collectable like loose blocks."""

import json
import logging
import os
import random
import threading

import pytest

from swarmlm.errors import IntegrityError
from swarmlm.store import dag, packs
from swarmlm.store.blockstore import BlockStore, MissingBlock
from swarmlm.store.cid import RAW, Cid
from swarmlm.store.dag import add_bytes, add_file, iter_file, list_blocks


def _data(n, seed=0):
    return random.Random(seed).randbytes(n)


def _loose_files(root):
    return [p for p in root.iterdir() if p.is_dir() and len(p.name) == 2 for _ in p.iterdir()]


def test_add_file_writes_one_pack_that_a_fresh_store_reads_back(tmp_path):
    data = _data(5 * 1024 + 7)
    store = BlockStore(tmp_path)
    root = add_bytes(store, data, chunk_bytes=1024)
    assert not _loose_files(tmp_path)
    assert [p.suffix for p in sorted((tmp_path / "packs").iterdir())] == [".idx", ".pack"]
    again = BlockStore(tmp_path)
    assert b"".join(iter_file(again, root)) == data
    assert set(again) == set(store) and again.size_bytes() == store.size_bytes()


def test_a_store_opened_earlier_sees_a_pack_sealed_by_another(tmp_path):
    reader, writer = BlockStore(tmp_path), BlockStore(tmp_path)
    root = add_bytes(writer, _data(3000), chunk_bytes=1000)
    assert reader.has(root) and b"".join(iter_file(reader, root)) == _data(3000)


def test_the_threaded_add_on_disk_matches_the_serial_one(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(_data(3 * 262144 + 5))
    serial = add_file(BlockStore(tmp_path / "a"), path, workers=1)
    threaded_store = BlockStore(tmp_path / "b")
    assert add_file(threaded_store, path, workers=4) == serial
    assert b"".join(iter_file(threaded_store, serial)) == path.read_bytes()


def test_a_writer_seals_a_new_pack_past_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(packs, "PACK_BYTES", 2500)
    monkeypatch.setattr(dag, "RUN_BYTES", 2000)            # two chunks per write
    store = BlockStore(tmp_path)
    root = add_bytes(store, _data(10_000), chunk_bytes=1000, workers=1)
    assert len(list((tmp_path / "packs").glob("*.idx"))) >= 3
    assert b"".join(iter_file(BlockStore(tmp_path), root)) == _data(10_000)


def test_a_corrupted_packed_block_is_deleted_and_can_be_stored_again(tmp_path, caplog):
    store = BlockStore(tmp_path)
    root = add_bytes(store, _data(4000), chunk_bytes=1000)
    leaf = list(list_blocks(store, root))[2]
    path, offset, length = store.locate(leaf)
    good = store.get(leaf)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * length)
    with caplog.at_level(logging.ERROR, logger="swarmlm"), pytest.raises(IntegrityError):
        store.get(leaf)
    assert "corrupted" in caplog.text and not store.has(leaf)
    assert not BlockStore(tmp_path).has(leaf)            # the deletion is on disk, not only in memory
    store.put(good, leaf)                                 # fetched again: now a loose block
    assert store.get(leaf) == good and store.locate(leaf)[0] == store.path_of(leaf)


def test_deleting_every_block_of_a_pack_removes_its_files(tmp_path):
    store = BlockStore(tmp_path)
    root = add_bytes(store, _data(3000), chunk_bytes=1000)
    for cid in list(list_blocks(store, root)):
        assert store.delete(cid)
    assert list((tmp_path / "packs").iterdir()) == [] and list(store) == []
    with pytest.raises(MissingBlock):
        store.get(root)


def test_gc_rewrites_a_pack_without_its_collected_blocks(tmp_path):
    store = BlockStore(tmp_path)
    with store.writer() as w:                             # two files in one pack
        kept = add_bytes(w, _data(3000, seed=1), chunk_bytes=1000)
        dropped = add_bytes(w, _data(5000, seed=2), chunk_bytes=1000)
    store.pin(kept)
    kept_bytes = sum(len(store.get(c)) for c in list_blocks(store, kept))
    assert store.gc(0) > 0
    (pack,) = (tmp_path / "packs").glob("*.pack")
    assert pack.stat().st_size == kept_bytes and not list((tmp_path / "packs").glob("*.dead"))
    again = BlockStore(tmp_path)
    assert b"".join(iter_file(again, kept)) == _data(3000, seed=1) and not again.has(dropped)


def test_a_pack_left_without_an_index_is_invisible_and_collected_when_old(tmp_path):
    store = BlockStore(tmp_path)
    (tmp_path / "packs").mkdir()
    orphan = tmp_path / "packs" / "dead-beef.pack"
    orphan.write_bytes(b"half a pack")
    assert list(store) == []
    store.gc(10**9)
    assert orphan.exists()                                # it may still be being written
    os.utime(orphan, (1000, 1000))
    store.gc(10**9)
    assert not orphan.exists()


@pytest.mark.parametrize("text", ["{not json", json.dumps({"version": 9, "entries": []}),
                                  json.dumps({"version": 1, "entries": [["x", "0", 1]]}),
                                  json.dumps({"version": 1, "entries": "all"})])
def test_a_malformed_pack_index_is_ignored_with_a_warning(tmp_path, caplog, text):
    good = BlockStore(tmp_path)
    root = add_bytes(good, b"fine", chunk_bytes=1000)
    (tmp_path / "packs" / "bad.pack").write_bytes(b"xxxx")
    (tmp_path / "packs" / "bad.idx").write_text(text)
    with caplog.at_level(logging.WARNING, logger="swarmlm"):
        store = BlockStore(tmp_path)
    assert "ignoring pack index" in caplog.text
    assert store.get(root) == b"fine" and list(store) == [root]


def test_adding_a_file_again_writes_only_the_blocks_that_are_missing(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(_data(6 * 262144 + 11, seed=3))
    store = BlockStore(tmp_path / "blocks")
    root = add_file(store, path)
    leaves = [c for c in list_blocks(store, root) if c != root]
    packed = sum(p.stat().st_size for p in (tmp_path / "blocks" / "packs").glob("*.pack"))
    assert store.delete(leaves[2])
    assert add_file(store, path) == root                  # a run with some blocks present: one by one
    again = sum(p.stat().st_size for p in (tmp_path / "blocks" / "packs").glob("*.pack"))
    assert again - packed == 262144                       # only the missing leaf was written
    assert b"".join(iter_file(BlockStore(tmp_path / "blocks"), root)) == path.read_bytes()


def test_more_packs_than_open_descriptors_all_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(packs, "_OPEN_FDS", 4)
    store = BlockStore(tmp_path)
    roots = {add_bytes(store, _data(300, seed=i), chunk_bytes=1000): i for i in range(10)}
    for _ in range(2):
        for root, i in roots.items():
            assert store.get(root) == _data(300, seed=i)


class _WatchedLock:
    """The pack index's lock, telling when a thread starts waiting for it while another holds it."""

    def __init__(self, contended: threading.Event):
        self._lock = threading.RLock()
        self.contended = contended

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        self.contended.set()
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pinned_file_and_four_collectable_ones_in_one_pack(path):
    store = BlockStore(path)
    with store.writer() as w:
        kept = add_bytes(w, _data(40_000, seed=1), chunk_bytes=1000)
        for seed in range(2, 6):
            add_bytes(w, _data(20_000, seed=seed), chunk_bytes=1000)
    store.pin(kept)
    (pack,) = store.packs.dir.glob("*.pack")
    return store, kept, pack


def test_a_read_while_gc_moves_its_block_to_a_new_pack_waits_and_gets_it(tmp_path, monkeypatch):
    store, kept, old_pack = _pinned_file_and_four_collectable_ones_in_one_pack(tmp_path)
    first_chunk = _data(40_000, seed=1)[:1000]
    leaf = Cid.of(first_chunk, RAW)
    assert leaf in list_blocks(store, kept)
    reader_stuck_or_done = threading.Event()
    store.packs._lock = _WatchedLock(reader_stuck_or_done)
    got = []

    def read_leaf():
        try:
            got.append(store.get(leaf))
        except Exception as e:                          # noqa: BLE001 - any failure is the finding
            got.append(e)
        reader_stuck_or_done.set()

    moving, readers = packs.PackWriter.put_run, []

    def put_run(self, keys, data, lengths):          # compaction: keys[0] has left the old pack's index
        if keys == [leaf.to_v1().encode()]:
            reader = threading.Thread(target=read_leaf)
            reader.start()
            assert reader_stuck_or_done.wait(30)     # the read has looked (and now waits, or has failed)
            readers.append(reader)
        return moving(self, keys, data, lengths)

    monkeypatch.setattr(packs.PackWriter, "put_run", put_run)
    store.gc(0)
    monkeypatch.undo()
    assert len(readers) == 1 and not old_pack.exists()
    readers[0].join(30)
    assert got == [first_chunk]


def test_a_read_holding_a_place_in_a_pack_gc_removed_looks_again(tmp_path, monkeypatch):
    store, kept, old_pack = _pinned_file_and_four_collectable_ones_in_one_pack(tmp_path)
    located, gc_done = threading.Event(), threading.Event()
    read_pack = store.packs.read

    def read(loc):                                    # the reader pauses between `find` and the read
        if threading.current_thread() is not threading.main_thread():
            located.set()
            assert gc_done.wait(30)
        return read_pack(loc)

    monkeypatch.setattr(store.packs, "read", read)
    got = []

    def read_file():
        try:
            got.append(b"".join(iter_file(store, kept)))
        except Exception as e:                          # noqa: BLE001 - any failure is the finding
            got.append(e)

    reader = threading.Thread(target=read_file)
    reader.start()
    assert located.wait(30)
    store.gc(0)                                       # compacts the pack the reader is about to read
    assert not old_pack.exists()
    gc_done.set()
    reader.join(30)
    assert got == [_data(40_000, seed=1)]
