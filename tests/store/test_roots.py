"""The list of files `store add` added: kept across adds, refreshed by CID, robust to damage."""

import json
import threading

from swarmlm.store.roots import ROOTS_FILE, Root, load_roots, record_root

A = Root("QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN", "hello.txt", 6)
B = Root("bafkreicysg23kiwv34eg2d7qweipxwosdo2py4ldv42nbauguluen5v6am", "hello.txt", 6)


def test_roots_are_kept_oldest_first_and_refreshed_by_cid(tmp_path):
    record_root(tmp_path, A)
    record_root(tmp_path, B)
    record_root(tmp_path, Root(A.cid, "renamed.txt", 6))
    assert load_roots(tmp_path) == [B, Root(A.cid, "renamed.txt", 6)]


def test_no_file_is_an_empty_list(tmp_path):
    assert load_roots(tmp_path) == []


def test_damaged_entries_are_skipped(tmp_path):
    (tmp_path / ROOTS_FILE).write_text(json.dumps([
        {"cid": A.cid, "name": A.name, "size_bytes": 6}, {"cid": 5}, "x",
        {"cid": B.cid, "name": B.name, "size_bytes": -1}, {"cid": B.cid, "name": B.name, "size_bytes": True}]))
    assert load_roots(tmp_path) == [A]


def test_concurrent_adds_keep_every_entry(tmp_path):
    roots = [Root(f"bafk{i}", f"f{i}", i) for i in range(16)]
    threads = [threading.Thread(target=record_root, args=(tmp_path, r)) for r in roots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(load_roots(tmp_path), key=lambda r: r.size_bytes) == roots
