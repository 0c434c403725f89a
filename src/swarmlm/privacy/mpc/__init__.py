"""Private inference by secure multi-party computation: three parties run the forward pass on
secret shares, so no single one learns the prompt, the hidden states, the logits or the tokens.

Threat model. Three parties (swarm peers running `swarmlm mpc-party`), semi-honest (they follow
the protocol but may look at everything they receive) and non-colluding with an honest
majority: any one party's view is independent of the client's tokens (up to the statistical
masking of truncation, below); two colluding parties can rebuild everything. The model's
weights are public. The client is trusted with its own data and sees only the logits it opens.
A party that deviates from the protocol can make the output wrong (no MAC checks); a party that
stops or sends malformed messages ends the session with an error.

Protocol (ABY3 / Araki et al., PUMA's setting, no dealer):
- ring Z_2^64 on torch.int64 (wrapping arithmetic), fixed point with 16 fractional bits;
- replicated sharing x = x0 + x1 + x2, party i holds (x_i, x_{i+1}); correlated randomness
  (zero shares, masks) from AES-CTR PRGs on pairwise seeds the parties agree on when they link;
- linear layers with public weights: local products, then one truncation (2 rounds);
- secret x secret products (q k^T, attention x v, gating): one round of re-sharing, fused with the
  truncation into 2 rounds;
- truncation: party 0 sees z + r with r uniform in [0, 2^62) known to parties 1 and 2; exact up
  to one unit in the last place, never a wrap-around error; statistical hiding 2^-(62-log2|z|);
- comparison: the sign bit of x mod 2^32 by a boolean full adder and a Kogge-Stone carry prefix
  over bit-packed words, then bit-to-arithmetic (10 rounds, about 200 bytes an element);
- nonlinearities (funcs.py): softmax with the row max subtracted, exp by clamping and squaring,
  1/x and 1/sqrt(x) by range normalization and a series, GELU and SiLU as Chebyshev series of an
  even function with relu outside a power-of-two bound;
- embedding: one-hot shares times the public table; the KV cache stays in shares.

Modules, in reading order:
    ring.py      fixed-point encoding, the PRG
    shares.py    AShare / BShare (one party's replicated shares), the client's split / combine
    runtime.py   Round, parallel (protocols as generators), Party, LocalParties (three in one process)
    ops.py       mul, trunc, trunc_sum, mul_trunc, linear, band (AND of shared bits)
    compare.py   msb, b2a, ge0, select, maximum
    funcs.py     inverse_power, exp_neg, gelu, silu, norm, softmax_av
    model.py     PublicWeights (folded, encoded weights), KVShares, block, forward
    client.py    share_tokens, open_logits, generate_in_process, MpcStats
    wire.py      the client / party / party records on the side channel, MpcPartyRecord (DHT)
    source.py    MODEL (directory or CID) and its id
    party.py     PartyServer, `swarmlm mpc-party`
    remote.py    find_parties, PrivateSession, generate_private, `swarmlm generate --private`
"""
