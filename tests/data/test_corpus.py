import logging

import pytest

from swarmlm.data.corpus import is_validation, open_corpus
from swarmlm.errors import DataError


def test_stdlib_corpus_is_found_and_split_by_file():
    corpus = open_corpus()
    names = {p.name for p in corpus.files}
    assert "os.py" in names and len(corpus.files) > 300
    val = [d.name for d in corpus.documents("val")][:5]
    assert val and all(is_validation(n, corpus.val_percent) for n in val)


def test_split_is_deterministic_and_disjoint(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i}.txt").write_text(f"text {i}\n")
    corpus = open_corpus(tmp_path, val_percent=20)
    train = {d.name for d in corpus.documents("train")}
    val = {d.name for d in corpus.documents("val")}
    assert train.isdisjoint(val) and len(train | val) == 60 and 3 <= len(val) <= 25
    assert val == {d.name for d in open_corpus(tmp_path, val_percent=20).documents("val")}


def test_single_file_is_split_by_lines(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    corpus = open_corpus(f, val_percent=10)
    (train,), (val,) = list(corpus.documents("train")), list(corpus.documents("val"))
    assert train.text + val.text == f.read_text() and val.text.startswith("line ")


def test_non_utf8_and_binary_files_are_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("hello\n")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    corpus = open_corpus(tmp_path, val_percent=0)
    with caplog.at_level(logging.WARNING, logger="swarmlm"):
        docs = [d.name for d in corpus.documents("train")]
    assert docs == ["good.txt"]
    assert "not UTF-8" in caplog.text and "binary" in caplog.text


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_corpus(tmp_path / "nope")


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no text files"):
        open_corpus(tmp_path)
