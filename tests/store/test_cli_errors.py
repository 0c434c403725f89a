"""Bad input to the store commands, through the real `swarmlm` command: exit code 2 and one line
on stderr that names the CID or path, never a traceback or an exception's class name."""

import base64

import pytest

from swarmlm.store import dag
from tests.helpers.swarm import run_cli

HELLO_V1 = "bafkreicysg23kiwv34eg2d7qweipxwosdo2py4ldv42nbauguluen5v6am"
SHORT_DIGEST = "b" + base64.b32encode(b"\x01\x55\x12\x20" + bytes(31)).decode().lower().rstrip("=")
QUIET = {"SWARMLM_LOG": "WARNING"}          # what a user sees by default


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in lines[0] and "MissingBlock" not in lines[0] and "Error:" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("cid", ["bafkqaaa", SHORT_DIGEST, "not-a-cid"])
def test_a_malformed_cid_is_quoted(cid, tmp_path):
    line = one_error_line(run_cli("store", "cat", cid, "--data-dir", str(tmp_path / "d"), env=QUIET))
    assert line.startswith("swarmlm store cat: error: ") and f"malformed CID {cid!r}" in line


def test_a_cid_not_in_the_store_is_named_with_the_store(tmp_path):
    line = one_error_line(run_cli("store", "cat", HELLO_V1, "--data-dir", str(tmp_path / "d"), env=QUIET))
    assert HELLO_V1 in line and str(tmp_path / "d" / "blocks") in line and "not in the local store" in line


def test_a_file_missing_one_of_its_blocks_is_named(tmp_path):
    src = tmp_path / "two-chunks.bin"
    src.write_bytes(bytes(range(256)) * 1200)                     # 300 KiB: two leaves under a root
    root = run_cli("store", "add", str(src), "--data-dir", str(tmp_path / "d")).stdout.decode().split()[-1]
    store = dag.open_store(tmp_path / "d")
    leaf = list(dag.list_blocks(store, dag.parse_cid(root)))[-1]
    assert store.delete(leaf)

    line = one_error_line(run_cli("store", "cat", root, "--data-dir", str(tmp_path / "d"), env=QUIET))
    assert root in line and str(leaf) in line and "incomplete" in line


def test_an_output_in_a_missing_folder_is_named(tmp_path):
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello\n")
    run_cli("store", "add", str(src), "--data-dir", str(tmp_path / "d"))
    out = tmp_path / "no-such-folder" / "out.txt"
    line = one_error_line(run_cli("store", "cat", HELLO_V1, "-o", str(out), "--data-dir", str(tmp_path / "d"),
                                  env=QUIET))
    assert str(out) in line and not out.parent.exists()


def test_a_data_dir_that_is_a_file_is_named(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    line = one_error_line(run_cli("store", "ls", "--data-dir", str(not_a_dir), env=QUIET))
    assert str(not_a_dir) in line


def test_adding_a_directory_names_it(tmp_path):
    line = one_error_line(run_cli("store", "add", str(tmp_path), "--data-dir", str(tmp_path / "d"), env=QUIET))
    assert f"{tmp_path} is a directory" in line
