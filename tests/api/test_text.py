"""Incremental decoding and stop strings: the streamed pieces concatenate to the whole text, cut as OpenAI cuts."""

import random

import pytest

from swarmlm.api.text import TextStream, cut_at_stop, held_tail
from swarmlm.model.tokenizer import Tokenizer
from tests.helpers.swarm_servers import TEXT


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe([TEXT + " héllo wörld ✓ 日本語 🙂"], vocab_size=300)


def stream_all(tokenizer, ids, stops=()):
    s = TextStream(tokenizer.decode, stops)
    pieces = [s.push(t) for t in ids] + [s.finish()]
    return pieces, s


def test_pieces_concatenate_to_the_whole_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        pieces, _ = stream_all(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids)


def test_multibyte_characters_are_never_split_across_pieces(tokenizer):
    ids = tokenizer.encode("a 🙂 and 日本語 ✓")
    pieces, _ = stream_all(tokenizer, ids)
    assert "".join(pieces) == "a 🙂 and 日本語 ✓"
    assert not any("\ufffd" in p for p in pieces)


def test_cut_ends_before_the_earliest_stop_string():
    assert cut_at_stop("hello world, bye", ["bye", "o w"]) == ("hell", True)
    assert cut_at_stop("hello", ["xyz"]) == ("hello", False)
    assert cut_at_stop("stop at start", ["stop"]) == ("", True)


def test_held_tail_is_the_longest_suffix_that_begins_a_stop():
    assert held_tail("abc ##", ["###"]) == 2
    assert held_tail("abc", ["###"]) == 0
    assert held_tail("xab", ["abc", "bz"]) == 2


@pytest.mark.parametrize("stops", [["fox"], ["dog.", "quick"], [" the lazy"], ["zzz"], ["e", "q"]])
def test_streamed_cut_equals_the_cut_of_the_whole_text(tokenizer, stops):
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog. the end")
    pieces, stream = stream_all(tokenizer, ids, stops)
    expected, stopped = cut_at_stop(tokenizer.decode(ids), stops)
    assert "".join(pieces) == expected
    assert stream.stopped == stopped


def test_a_stop_string_split_across_tokens_is_still_cut(tokenizer):
    ids = [tokenizer.encode(c)[0] for c in "abc##def"]    # one token per character
    pieces, stream = stream_all(tokenizer, ids, ["##d"])
    assert pieces[:3] == ["a", "b", "c"] and "".join(pieces) == "abc"
    assert stream.stopped
