"""`swarmlm store add | ls | cat | publish-model`: the local commands, through cli.main."""

import os

import pytest

from swarmlm.cli import main
from swarmlm.store import dag
from swarmlm.store.blockstore import BlockStore
from swarmlm.store.cid import Cid

HELLO_V1 = "bafkreicysg23kiwv34eg2d7qweipxwosdo2py4ldv42nbauguluen5v6am"
HELLO_V0 = "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN"


@pytest.fixture
def hello(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello\n")
    return path


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def rows_of(out: str, section: str) -> list[list[str]]:
    """The tab-separated rows of one section of `store ls` (its header starts with `section`)."""
    rows, inside = [], False
    for line in out.splitlines():
        if line.startswith("#"):
            inside = line.startswith(section)
        elif inside:
            rows.append(line.split("\t"))
    return rows


@pytest.mark.parametrize("version,expected", [("1", HELLO_V1), ("0", HELLO_V0)])
def test_add_prints_the_ipfs_cid_last_and_pins_it(hello, tmp_path, capsys, version, expected):
    rc = main(["store", "add", str(hello), "--data-dir", str(tmp_path / "d"), "--cid-version", version])
    assert rc == 0 and last_line(capsys) == expected
    store = BlockStore(tmp_path / "d" / "blocks")
    assert store.is_pinned(Cid.parse(expected)) and store.get(Cid.parse(expected))


def test_add_uses_swarmlm_home_without_data_dir(hello, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SWARMLM_HOME", str(tmp_path / "home"))
    assert main(["store", "add", str(hello)]) == 0
    assert last_line(capsys) == HELLO_V1
    assert BlockStore(tmp_path / "home" / "blocks").has(Cid.parse(HELLO_V1))


def test_ls_lists_blocks_with_sizes_and_pins(hello, tmp_path, capsys):
    data_dir = str(tmp_path / "d")
    main(["store", "add", str(hello), "--data-dir", data_dir])
    capsys.readouterr()
    assert main(["store", "ls", "--data-dir", data_dir]) == 0
    out = capsys.readouterr().out
    assert rows_of(out, "# files") == [[HELLO_V1, "6", "pinned", "hello.txt"]]
    assert rows_of(out, "# other blocks") == []                          # a one-chunk file is its only block
    assert main(["store", "ls", "--pins", "--data-dir", data_dir]) == 0
    assert capsys.readouterr().out.split() == [HELLO_V1, "6", "pinned"]


def test_ls_lists_added_files_as_add_printed_them_apart_from_their_inner_blocks(tmp_path, capsys):
    data_dir = str(tmp_path / "d")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(512 * 1024))                          # two leaves under a root
    small = tmp_path / "hello.txt"
    small.write_bytes(b"hello\n")
    main(["store", "add", str(small), "--data-dir", data_dir, "--cid-version", "0"])
    main(["store", "add", str(big), "--data-dir", data_dir])
    big_cid = last_line(capsys)

    assert main(["store", "ls", "--data-dir", data_dir]) == 0
    out = capsys.readouterr().out
    files = rows_of(out, "# files")
    blocks = rows_of(out, "# other blocks")
    assert files == [[HELLO_V0, "6", "pinned", "hello.txt"], [big_cid, str(512 * 1024), "pinned", "big.bin"]]
    store = BlockStore(tmp_path / "d" / "blocks")
    leaves = [str(c) for c in dag.children(store, Cid.parse(big_cid))]
    assert sorted(b[0] for b in blocks) == sorted(leaves) and all(b[1:] == [str(256 * 1024), "pinned"] for b in blocks)


def test_ls_survives_a_damaged_list_of_files_and_add_starts_a_new_one(hello, tmp_path, capsys):
    data_dir = str(tmp_path / "d")
    main(["store", "add", str(hello), "--data-dir", data_dir, "--cid-version", "0"])
    (tmp_path / "d" / "blocks" / "roots.json").write_text("{not json")
    capsys.readouterr()

    assert main(["store", "ls", "--data-dir", data_dir]) == 0
    assert rows_of(capsys.readouterr().out, "# files")[0][:3] == [HELLO_V0, "6", "pinned"]   # still a pinned root
    assert main(["store", "add", str(hello), "--data-dir", data_dir, "--cid-version", "0"]) == 0
    capsys.readouterr()
    assert main(["store", "ls", "--data-dir", data_dir]) == 0
    assert rows_of(capsys.readouterr().out, "# files") == [[HELLO_V0, "6", "pinned", "hello.txt"]]
    assert (tmp_path / "d" / "blocks" / "roots.json.damaged").read_text() == "{not json"


def test_cat_writes_the_file_back(hello, tmp_path, capsys):
    data_dir = str(tmp_path / "d")
    main(["store", "add", str(hello), "--data-dir", data_dir, "--cid-version", "0"])
    out = tmp_path / "out.txt"
    assert main(["store", "cat", HELLO_V0, "-o", str(out), "--data-dir", data_dir]) == 0
    assert out.read_bytes() == b"hello\n"


@pytest.mark.parametrize("argv", [
    ["store", "add", "/nonexistent/file"],
    ["store", "cat", "not-a-cid"],
    ["store", "cat", HELLO_V1],                          # not in this store
    ["store", "publish-model", "/nonexistent/dir"],
])
def test_bad_input_is_one_line_and_no_traceback(argv, tmp_path, capsys):
    rc = main(argv + ["--data-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]


def test_publish_model_prints_the_manifest_cid(tmp_path, capsys):
    import json

    from safetensors.torch import save_file
    import torch
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tensors = {"model.embed_tokens.weight": torch.zeros(4, 2), "model.layers.0.mlp.up_proj.weight": torch.ones(2, 2),
               "model.norm.weight": torch.ones(2)}
    save_file(tensors, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    assert main(["store", "publish-model", str(ckpt), "--data-dir", str(tmp_path / "d")]) == 0
    cid = Cid.parse(last_line(capsys))
    assert BlockStore(tmp_path / "d" / "blocks").is_pinned(cid)


def test_pin_accepts_data_dir_like_the_other_store_commands(tmp_path):
    from swarmlm.cli import build_parser
    args = build_parser().parse_args(["store", "pin", HELLO_V1, "--data-dir", str(tmp_path), "--initial-peers",
                                      "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWL8FbVjKbKAo8SzKQSMRucU8qeJCXsJnWrWhw3K3SAFHg"])
    assert args.store_command == "pin" and args.data_dir == str(tmp_path)
