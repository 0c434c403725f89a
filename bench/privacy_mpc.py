"""Private inference (privacy/mpc/) against plaintext: one Llama block, prefill and one decoding step.

    python bench/privacy_mpc.py [--family llama] [--dim 256] [--heads 4] [--kv-heads 4] [--ffn 1024] [--seq 32]
                                [--trials 9] [--rtt-ms 20] [--mbit 100]

One block of the `llama` family (RMSNorm, RoPE, SiLU-gated MLP; public weights), hidden 256,
4 heads, sequence 32, FF 1024 (CrypTen's block in the issue), on random weights with
activations of order one; `--family gpt2` runs CrypTen's own block instead (LayerNorm, learned
positions, tanh-GELU MLP of width FF: the block anchors.md measured CrypTen on):
- plaintext: `Block.forward` in float32, the median of 15 runs timed next to each trial's per-party
  run (below), so that the two sides of a ratio see the same state of this noisy machine;
- private: the same block on shares, three parties in threads of this process (runtime.LocalParties):
  the arithmetic of three machines and their messages serialized, but one machine's cores
  (the three threads share them and the interpreter's lock: the wall time is about the three
  parties' work added up) and no network; median of trials. `ratio` is that wall time over
  plaintext (what this machine does for all three parties);
- per party: the same steps with the three parties stepped in turn in one thread
  (LocalParties.run_in_turn), each party's CPU time counted apart; the busiest party's (median
  of trials) is what each of three machines computes, the network aside; `ratio_per_party` is
  that over plaintext, the median over trials of each trial's adjacent pair (the compute of a
  deployment, where each party runs on its own machine);
- the communication rounds and the bytes all parties sent, and a projection to a WAN:
  rounds x RTT + bytes / bandwidth (20 ms, 100 Mbit/s by default) added to the per-party compute;
- the same for one decoding step (one new token after the sequence, KV cache in shares);
- the relative error of the private output against plaintext;
- per op class (runtime.tagged in model.block / funcs.softmax_av): the rounds it takes part in
  and the bytes all parties sent for it (a round shared by two classes counts for both).
Prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from swarmlm.model.config import ModelConfig  # noqa: E402
from swarmlm.model.transformer import Transformer  # noqa: E402
from swarmlm.privacy.mpc.model import KVShares, PublicWeights, block  # noqa: E402
from swarmlm.privacy.mpc.ring import decode, encode  # noqa: E402
from swarmlm.privacy.mpc.runtime import LocalParties  # noqa: E402
from swarmlm.privacy.mpc.shares import combine, split  # noqa: E402


def emit(name: str, value, unit: str, **extra) -> None:
    print(json.dumps({"name": name, "value": value, "unit": unit, **extra}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["llama", "gpt2"], default="llama")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--trials", type=int, default=9)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--mbit", type=float, default=100.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = ModelConfig(family=args.family, architecture="LlamaForCausalLM" if args.family == "llama" else "GPT2LMHeadModel",
                      vocab_size=64, dim=args.dim, n_layers=1, n_heads=args.heads,
                      n_kv_heads=args.kv_heads if args.family == "llama" else args.heads, ffn_dim=args.ffn,
                      max_seq_len=4 * args.seq)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(5.0)
    blk = model.layers["0"]
    w = PublicWeights.from_model(model)
    h = torch.randn(1, args.seq + 1, args.dim)
    T = args.seq

    def plain(x: torch.Tensor, past: int, kv=None) -> torch.Tensor:
        n = x.shape[1]
        rope = model.rotary.tables(torch.arange(past, past + n)[None], x.dtype) if model.rotary is not None else None
        with torch.inference_mode():
            return blk(x, rope=rope, mask=None, is_causal=n > 1, kv=kv, start=past)

    ref = plain(h[:, :T], 0)
    k_buf = torch.zeros(1, cfg.n_kv_heads, T + 1, cfg.dh)
    v_buf = torch.zeros_like(k_buf)
    plain(h[:, :T], 0, (k_buf, v_buf))
    ref_step = plain(h[:, T:], T, (k_buf, v_buf))

    def plain_median(x: torch.Tensor, past: int, kv=None, reps: int = 15) -> float:
        """Median wall time (ms) of `reps` plaintext runs: timed next to each private run, so each ratio's
        two sides see the same state of the machine."""
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            plain(x, past, kv)
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    for _ in range(20):                                                       # warm-up
        plain(h[:, :T], 0)
        plain(h[:, T:], T, (k_buf, v_buf))
    plain_ms, step_ms = [], []
    parties = LocalParties(timeout_s=120)
    pre, dec, pre_cost, dec_cost, errs = [], [], None, None, []
    pre_cpu, dec_cpu = [], []
    breakdown = {}

    def tags() -> dict[str, list[int]]:
        """Per op class: [rounds, bytes all parties sent], then reset."""
        out = {}
        for party in parties.parties:
            for name, (r, b) in party.by_tag.items():
                row = out.setdefault(name, [0, 0])
                row[0], row[1] = max(row[0], r), row[1] + b
            party.by_tag.clear()
        return out

    for _ in range(args.trials):
        tags()
        caches = [KVShares() for _ in range(3)]
        shares = split(encode(h[:, :T]))
        r0, b0, t = parties.rounds, parties.bytes_sent, time.perf_counter()
        out = parties.run(lambda p: block(p, w, 0, shares[p.index], caches[p.index], torch.arange(T)))
        pre.append((time.perf_counter() - t) * 1e3)
        pre_cost = (parties.rounds - r0, parties.bytes_sent - b0)
        breakdown["block_prefill"] = tags()
        got = decode(combine([o.a for o in out])).float()
        errs.append(float((got - ref).abs().max() / ref.abs().max()))
        for c in caches:
            c.length = T
        shares = split(encode(h[:, T:]))
        r0, b0, t = parties.rounds, parties.bytes_sent, time.perf_counter()
        out = parties.run(lambda p: block(p, w, 0, shares[p.index], caches[p.index], torch.arange(T, T + 1)))
        dec.append((time.perf_counter() - t) * 1e3)
        dec_cost = (parties.rounds - r0, parties.bytes_sent - b0)
        breakdown["decode_step"] = tags()
        got = decode(combine([o.a for o in out])).float()
        errs.append(float((got - ref_step).abs().max() / ref_step.abs().max()))
        # each party's own compute: the same two steps with the parties stepped in turn in one thread,
        # each next to its plaintext timing
        caches = [KVShares() for _ in range(3)]
        shares = split(encode(h[:, :T]))
        plain_ms.append(plain_median(h[:, :T], 0))
        parties.run_in_turn(lambda p: block(p, w, 0, shares[p.index], caches[p.index], torch.arange(T)))
        pre_cpu.append(max(parties.cpu_s) * 1e3)
        for c in caches:
            c.length = T
        shares = split(encode(h[:, T:]))
        step_ms.append(plain_median(h[:, T:], T, (k_buf, v_buf)))
        out = parties.run_in_turn(lambda p: block(p, w, 0, shares[p.index], caches[p.index], torch.arange(T, T + 1)))
        dec_cpu.append(max(parties.cpu_s) * 1e3)
        tags()
        got = decode(combine([o.a for o in out])).float()
        errs.append(float((got - ref_step).abs().max() / ref_step.abs().max()))

    shape = {"family": args.family, "dim": args.dim, "heads": args.heads, "kv_heads": cfg.n_kv_heads, "ffn": args.ffn,
             "seq": T}
    targeted = lambda label: label == "block_prefill" and args.family == "llama"      # noqa: E731  (the issue's block)
    for label, plain_t, mpc_t, cpu_t, (rounds, nbytes) in (("block_prefill", plain_ms, pre, pre_cpu, pre_cost),
                                                            ("decode_step", step_ms, dec, dec_cpu, dec_cost)):
        p_med, m_med, c_med = statistics.median(plain_t), statistics.median(mpc_t), statistics.median(cpu_t)
        emit(f"privacy_mpc.{label}.plaintext_ms", round(p_med, 3), "ms", **shape)
        emit(f"privacy_mpc.{label}.private_ms", round(m_med, 1), "ms", parties="3 threads, one machine", **shape)
        emit(f"privacy_mpc.{label}.ratio", round(m_med / p_med, 1), "x", parties="3 threads, one machine")
        emit(f"privacy_mpc.{label}.per_party_cpu_ms", round(c_med, 1), "ms", parties="busiest party's CPU, stepped in turn")
        pair_ratio = statistics.median(c / q for c, q in zip(cpu_t, plain_t))     # adjacent pairs
        emit(f"privacy_mpc.{label}.ratio_per_party", round(pair_ratio, 1), "x",
             target=60 if targeted(label) else None)
        emit(f"privacy_mpc.{label}.rounds", rounds, "rounds", target=60 if targeted(label) else None)
        emit(f"privacy_mpc.{label}.bytes", nbytes, "bytes", mb=round(nbytes / 1e6, 2),
             target_mb=8 if targeted(label) else None)
        wan_ms = c_med + rounds * args.rtt_ms + nbytes * 8 / (args.mbit * 1e6) * 1e3
        emit(f"privacy_mpc.{label}.wan_projection_ms", round(wan_ms, 1), "ms", rtt_ms=args.rtt_ms, mbit_s=args.mbit,
             rounds_ms=round(rounds * args.rtt_ms, 1), transfer_ms=round(nbytes * 8 / (args.mbit * 1e3), 1))
    for label, rows in breakdown.items():
        for name, (rounds, nbytes) in rows.items():
            emit(f"privacy_mpc.{label}.op.{name}", rounds, "rounds", bytes=nbytes, mb=round(nbytes / 1e6, 3))
    emit("privacy_mpc.max_relative_error", round(max(errs), 6), "ratio", target=1e-2)


if __name__ == "__main__":
    main()
