"""What one party receives is, on its own, independent of the prompt: over two different private
generations its transcript has the same length and the same bit statistics, no further apart
than two runs of one prompt are (masks hide values statistically, so some messages are not
uniform, e.g. z + r with r uniform in [0, 2^62): the comparison is between prompts, not against
uniform bytes)."""

from __future__ import annotations

import numpy as np
import torch

from swarmlm.model.config import ModelConfig
from swarmlm.model.transformer import Transformer
from swarmlm.privacy.mpc.client import generate_in_process
from swarmlm.privacy.mpc.runtime import LocalParties

PROMPTS = ([0, 0, 0, 0, 0, 0], [5, 61, 17, 33, 2, 48])


def _bit_profile(model: Transformer, prompt: list[int], party: int) -> tuple[int, np.ndarray]:
    """(bytes received, the frequency of ones at each of the 64 bit positions of its 8-byte words)."""
    parties = LocalParties()
    generate_in_process(model, prompt, max_new_tokens=2, parties=parties)
    msgs = [np.frombuffer(m, dtype=np.uint8) for m in parties.comms[party].received]
    words = np.concatenate([m.view(np.uint64) for m in msgs if len(m) % 8 == 0])
    return sum(len(m) for m in msgs), np.unpackbits(words.view(np.uint8)).reshape(-1, 64).mean(0)


def test_a_partys_received_bytes_do_not_depend_on_the_prompt():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=64, dim=32,
                                    n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)).eval()
    for party in range(3):
        n_a, a = _bit_profile(model, PROMPTS[0], party)
        n_a2, a2 = _bit_profile(model, PROMPTS[0], party)
        n_b, b = _bit_profile(model, PROMPTS[1], party)
        assert n_a == n_a2 == n_b > 100_000
        assert np.abs(a - 0.5).max() < 0.05 and np.abs(b - 0.5).max() < 0.05     # close to fair coins
        assert np.abs(a - b).max() <= 2 * max(np.abs(a - a2).max(), 0.02) + 0.02


def test_masks_are_never_reused_between_protocols():
    """Two truncations of the same zeros: with fresh masks and zero shares, what party 0 receives the
    second time is unrelated to the first (a PRG stream restarted per draw made the second message
    the first shifted by one AES block, so an opener could subtract openings and learn differences
    of secrets)."""
    from swarmlm.privacy.mpc.ops import trunc_sum

    parties = LocalParties()
    zero = torch.zeros(64, dtype=torch.int64)
    for _ in range(2):
        parties.run(lambda p: trunc_sum(p, zero.clone()))
    first, second = (np.frombuffer(m, dtype=np.int64) for m in parties.comms[0].received[-2 * 2::2])
    assert len(first) == len(second) == 64
    for shift in range(0, 8):
        assert not np.array_equal(second[:64 - shift], first[shift:])


def test_cut_words_and_paired_reshares_do_not_depend_on_the_input():
    """SiLU on a block's worth of values (calls of CUT_FROM words or more: truncation words cut to their
    top bytes, bit_times' cut values, reshare_pair): what each party receives has the same length and
    byte statistics for zeros as for large values."""
    from swarmlm.privacy.mpc import funcs
    from swarmlm.privacy.mpc.ops import CUT_FROM
    from swarmlm.privacy.mpc.ring import encode
    from swarmlm.privacy.mpc.shares import split

    def profile(x: torch.Tensor) -> list[tuple[int, np.ndarray]]:
        parties = LocalParties()
        shares = split(encode(x))
        parties.run(lambda p: funcs.silu(p, shares[p.index], out_frac=12, horner=True))
        out = []
        for party in range(3):
            raw = np.frombuffer(b"".join(parties.comms[party].received), dtype=np.uint8)
            out.append((len(raw), np.unpackbits(raw).reshape(-1, 8).mean(0)))
        return out

    n = 2 * CUT_FROM
    quiet, loud = profile(torch.zeros(n)), profile(torch.randn(n, generator=torch.Generator().manual_seed(0)) * 300)
    for (n_q, q), (n_l, lo) in zip(quiet, loud):
        assert n_q == n_l > 0
        assert np.abs(q - 0.5).max() < 0.01 and np.abs(lo - 0.5).max() < 0.01 and np.abs(q - lo).max() < 0.01
