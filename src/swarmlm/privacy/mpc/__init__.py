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
- linear layers with public weights: local products, then one truncation (1 round);
- secret x secret products (q k^T, attention x v): the product and its truncation in one round
  (ops.trunc_sum); the gated MLP's SiLU(gate) * up, with 12 and 14 fractional bits, is not
  truncated but goes through W_down first (local) and is truncated once on the D outputs (model.py);
- truncation (ops.py): the mask r = r_0 + r_1 + r_2 is replicated like a share (each component
  uniform in [0, 2^61) from the PRG of the two parties holding it); parties 0 and 2 open
  z + r, each missing one component of r, as words without their 16-bit halves below the shift
  (the opening reads c >> shift: 6 bytes of 8 from shift 16, in calls of 2048 words or more). One
  round; error -2..+3 units in the last place (-1..+2 with whole words), never a wrap-around error
  (|z| < 2^61); statistical hiding 2^-(61 - log2|z|), the same with fewer bytes sent: 19 bits for
  products of values below 2^10 (2f = 32 fractional bits), less for larger outliers (the gated
  MLP's output, at 42 fractional bits before its truncation: 19 bits below 1, one less per doubling);
- a 3-out-of-3 sum whose party 0 part is zero (bits.bit_times') becomes replicated in one round of
  two ring elements (ops.reshare_pair; a reshare takes three): SiLU's and GELU's clamp;
- comparison (compare.py): the sign bit of x mod 2^w. x = S + X with S = x_0 + x_1 (party 0)
  and X = x_2 (parties 1, 2); the generate/propagate bits of blocks of up to 5 bits come by
  one three-party OT (2^b candidates a block), then a carry tree over the blocks (2 levels at
  w = 16), then bit-to-arithmetic (one round, four ring elements: party 0 sends t + pad to each
  of parties 1 and 2, who both know the sign s = 1 - 2 b_2 and send each other s pad + component
  under pads of party 0's they lack): 4 rounds at w = 16, 5 at w = 32..40. Coarse
  comparisons drop low bits first (`drop`: the clamps of GELU to 1/16 for |x| < 2040, of SiLU
  to 1/2 for |x| < 1020 (12 bits: tables of 16-bit words),
  softmax's max to 1/2 for differences of scores below 16384 (scores within about +-6000,
  the mask's fill is -10000), inverse_power to 2^-6 relative).
  A bit times a value in one round (bits.inject: b2a's way, six ring elements) picks the
  max's winner; a bit times
  values (and the bit) as 3-out-of-3 sums that are truncated or reshared next (bits.bit_times:
  party 0 sends t and each t Y, under pads of parties 0 and 2, to party 1) is one round of one
  ring element per value and one more;
- nonlinearities (funcs.py): softmax with the row max subtracted (a tournament of groups of 8
  whose last level also gives [x >= max - 16], so exp needs no comparison; each query compares
  only the prefix of keys the public causal mask lets it see), exp by a clamped
  series and one squaring, 1/x and 1/sqrt(x) by range normalization and a series (the norms'
  1/sqrt with a degree-2 series whose terms come in two rounds), GELU and
  SiLU as Chebyshev series of an even function (A + T4 B + T8 C: 4 product rounds for degree
  12) with relu outside a power-of-two bound;
- embedding: one-hot shares times the public table; the KV cache stays in shares.

Modules, in reading order:
    ring.py      fixed-point encoding, the PRG, public_matmul (exact ring products by float64 limbs)
    shares.py    AShare / BShare (one party's replicated shares), the client's split / combine
    runtime.py   Round, parallel (protocols as generators), led (roles moved), Party, LocalParties (three in one process)
    ops.py       mul, trunc, trunc_sum, mul_trunc, reshare_pair, linear, band_bits (AND of shared bits)
    bits.py      b2a, inject, bit_times (shared bits times values)
    compare.py   msb, ge0, coarse, select, maximum
    inverse.py   inverse_power (1/v, 1/sqrt(v))
    funcs.py     exp_neg, gelu, silu, norm_then, softmax_av
    model.py     PublicWeights (folded, encoded weights), KVShares, block, forward
    client.py    share_tokens, open_logits, generate_in_process, MpcStats
    wire.py      the client / party / party records on the side channel, MpcPartyRecord (DHT)
    source.py    MODEL (directory or CID) and its id
    party.py     PartyServer, `swarmlm mpc-party`
    remote.py    find_parties, PrivateSession, generate_private, `swarmlm generate --private`
"""
