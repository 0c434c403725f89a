"""The Transformer's forward pass on shares, mirroring model/ (block.py, layers.py, transformer.py).

`PublicWeights.from_model(model)` encodes a plaintext `Transformer`'s weights once, folding
everything public and linear into the linear layers so the protocol has fewer steps:
- a norm's weight (and LayerNorm's bias) and the sqrt(D) that funcs.norm_then leaves out go into
  the next linear layer (W diag(g sqrt D), W b + bias);
- the attention scale 1/sqrt(Dh) goes into q's weights;
- RoPE is x cos + roll(x) sin per position, a public linear map: it is folded into per-position
  q/k weights (W cos_t + W_rolled sin_t), so q, k, v come from one local product and one truncation.
Then a step is: embedding (one-hot shares times the public table: local), per block norm ->
q/k/v (a norm only scales rows, so the projection of the centered input runs in the same
rounds as the norm's inverse square root, and the scale comes after) -> scores q k^T (secret x secret,
truncated only where the causal mask lets the query see the key) -> softmax -> @ v -> o_proj
-> residual -> norm -> MLP (GELU, or SiLU(gate) * up) -> residual; the final norm and the
head run on the last position only. The gated MLP keeps SiLU(gate) with GATE_FRAC = 12 and up
with UP_FRAC = 14 fractional bits, so SiLU(gate) * up @ W_down (12 + 14 + 16 bits, a 3-out-of-3
sum: the product and the public map are local) is truncated once, on the D outputs, instead of
the product on the FF ones and then the map: one round and most of the bytes fewer. That
truncation's mask hides z = out 2^42 by 19 - log2|out| bits: as the usual one hides products of
values below 2^10 (19 bits) while |out| < 1, a bit less per doubling above (the two truncations
it replaces hid gate up and out, at 32 bits, by 29 - log2 of them). 12 + 12 bits: 2 bits more
hiding, but the tiny test models' logits move by twice as much. `KVShares` keeps each block's rotated k and v in shares
between steps. The protocols give the party playing party 0 (the comparisons' tables, the bits'
senders) and the truncations' openers (parties 0 and 2) more work than party 1, which only sends
in a truncation (so a linear layer's product is one matmul at party 1, two at the others): each
step runs with the party LEADS names in party 0's role (runtime.led), so that the three
machines' compute is about even (the busiest party's 9% less than with party 0 leading all).
Everything here is a protocol run by every party on its own shares.
Knows nothing of messages or of the client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from swarmlm.model.config import ModelConfig
from swarmlm.model.transformer import Transformer
from swarmlm.privacy.mpc import funcs
from swarmlm.privacy.mpc.ops import cross_sum, linear, mul_trunc, trunc, trunc_sum
from swarmlm.privacy.mpc.ring import FRAC_BITS, encode, limb_bits, public_matmul
from swarmlm.privacy.mpc.runtime import Party, Protocol, led, tagged
from swarmlm.privacy.mpc.shares import AShare, cat

F = FRAC_BITS
LEADS = {"norm+qkv": 0, "softmax": 2, "norm+up": 1, "activation": 2}   # who plays party 0 in each step (runtime.led)
GATE_FRAC = 12               # fractional bits of SiLU(gate) in a gated MLP (see block)
UP_FRAC = 14                 # and of up


@dataclass
class Linear:
    weight: torch.Tensor            # (K, N) float64, already folded
    bias: torch.Tensor | None       # (N,) float64

    def encoded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode(self.weight), None if self.bias is None else encode(self.bias, 2 * F)


def _fold(lin: torch.nn.Linear | list[torch.nn.Linear], norm: torch.nn.Module | None, D: int,
          scale: torch.Tensor | None = None) -> Linear:
    """nn.Linear(s) applied to norm(x) -> one Linear on funcs.norm_then's normalized rows (see module doc)."""
    lins = lin if isinstance(lin, list) else [lin]
    w = torch.cat([m.weight.detach().double() for m in lins], 0)                  # (N, K)
    b = torch.cat([m.bias.detach().double() if m.bias is not None else torch.zeros(m.out_features, dtype=torch.float64)
                   for m in lins])
    has_bias = any(m.bias is not None for m in lins)
    if norm is not None:
        g = norm.weight.detach().double()
        nb = getattr(norm, "bias", None)
        if nb is not None:
            b = b + w @ nb.detach().double()
            has_bias = True
        w = w * (g * math.sqrt(D))[None, :]
    if scale is not None:
        w, b = w * scale[:, None], b * scale
    return Linear(w.t().contiguous(), b if has_bias else None)


@dataclass
class BlockWeights:
    qkv: Linear                    # norm folded in; q rows scaled by 1/sqrt(Dh)
    o: Linear
    up: Linear                     # gpt2: up; llama: gate and up side by side (N = 2F)
    down: Linear
    eps: float


@dataclass
class PublicWeights:
    cfg: ModelConfig
    tok: torch.Tensor                       # (V, D) encoded
    pos: torch.Tensor | None                # (max_seq_len, D) encoded (gpt2)
    blocks: dict[int, BlockWeights]
    head: Linear                            # final norm folded in
    inv_freq_model: Transformer | None = None   # for RoPE tables (llama)
    _enc: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: Transformer) -> "PublicWeights":
        cfg = model.cfg
        D, Dh = cfg.dim, cfg.dh
        blocks = {}
        for key, blk in model.layers.items():
            att = blk.attention
            q_scale = torch.cat([torch.full((cfg.n_heads * Dh,), 1 / math.sqrt(Dh), dtype=torch.float64),
                                 torch.ones(2 * cfg.n_kv_heads * Dh, dtype=torch.float64)])
            mlp = blk.feed_forward
            ups = [mlp.gate_proj, mlp.up_proj] if mlp.gated else [mlp.up_proj]
            blocks[int(key)] = BlockWeights(
                qkv=_fold([att.q_proj, att.k_proj, att.v_proj], blk.attention_norm, D, q_scale),
                o=_fold(att.o_proj, None, D), up=_fold(ups, blk.ffn_norm, D), down=_fold(mlp.down_proj, None, D),
                eps=float(getattr(blk.attention_norm, "eps", cfg.norm_eps)))
        tok = encode(model.tok_embeddings.weight.detach().double())
        pos = encode(model.pos_embeddings.weight.detach().double()) if model.pos_embeddings is not None else None
        head = _fold(model.output, model.norm, D)
        return cls(cfg, tok, pos, blocks, head, model if cfg.family == "llama" else None)

    def enc(self, name: str, lin: Linear, how=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`lin` encoded once (weight with f bits; bias with 2f bits, or as `how` says)."""
        if name not in self._enc:
            self._enc[name] = lin.encoded() if how is None else how(lin)
        return self._enc[name]


@dataclass
class KVShares:
    """Each block's k and v (B, Hkv, S, Dh) in shares, grown by each step."""
    k: dict[int, AShare] = field(default_factory=dict)
    v: dict[int, AShare] = field(default_factory=dict)
    length: int = 0


def _rotated_weights(w: PublicWeights, i: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """q/k weights per position (T, K, N_qk), encoded (and as float64, and its limb size), RoPE folded in: a rotated column is
    W[:, c] cos_t + W_rolled[:, c] sin_t, W_rolled having each q and k head's columns rolled by
    Dh/2 (RoPE's x cos + roll(x) sin, a public linear map per position). The v columns, the same
    at every position, are not here (one product of all positions with them)."""
    key = ("qkv-rot", i, int(positions[0]), len(positions))
    if key in w._enc:
        return w._enc[key]
    if len(w._enc) > 256:                                       # positions move on: keep the cache small
        for k in [k for k in w._enc if isinstance(k, tuple)]:
            del w._enc[k]
    cfg, lin = w.cfg, w.blocks[i].qkv
    Dh, n_rot = cfg.dh, (cfg.n_heads + cfg.n_kv_heads) * cfg.dh
    K = lin.weight.shape[0]
    rows = lin.weight[:, :n_rot].reshape(K, -1, Dh)                                   # (K, heads, Dh)
    rolled = torch.roll(rows, Dh // 2, -1)
    cos, sin = _rope_tables(w, positions)                                             # (T, Dh)
    rot = rows[None] * cos[:, None, None] + rolled[None] * sin[:, None, None]        # (T, K, heads, Dh)
    T = len(positions)
    enc = encode(rot.reshape(T, K, n_rot))
    w._enc[key] = (enc, enc.to(torch.float64), limb_bits(enc))
    return w._enc[key]


def _rope_tables(w: PublicWeights, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = w.inv_freq_model.rotary.tables(positions[None], torch.float64)   # (1, 1, T, Dh) each
    return cos[0, 0], sin[0, 0]                                                 # (T, Dh)


def _project_qkv(p: Party, w: PublicWeights, i: int, x: AShare, positions: torch.Tensor) -> Protocol:
    """W_qkv x (B, T, N), no bias; for llama, q and k rotated by RoPE, folded into per-position
    weights (_rotated_weights): one local product and one truncation either way."""
    if w.inv_freq_model is None:
        return (yield from linear(p, x, w.enc(f"qkv{i}", w.blocks[i].qkv)[0]))
    wt, wf, L = _rotated_weights(w, i, positions)                                   # (T, K, N_qk)
    n_rot = wt.shape[-1]
    wv = w.enc(f"qkv-v{i}", w.blocks[i].qkv, lambda lin: (encode(lin.weight[:, n_rot:]), None))[0]   # (K, N_v)
    if p.index == 1:                  # the truncation reads only its second component (ops.linear)
        zb = torch.cat([public_matmul(x.b.transpose(0, 1), wt, wf, L).transpose(0, 1), x.b @ wv], -1)
        return (yield from trunc(p, AShare(zb, zb)))
    B = x.shape[0]
    both = public_matmul(torch.cat([x.a, x.b], 0).transpose(0, 1), wt, wf, L).transpose(0, 1)   # both components at once
    z = AShare(torch.cat([both[:B], x.a @ wv], -1), torch.cat([both[B:], x.b @ wv], -1))    # (B, T, N), 2f bits
    return (yield from trunc(p, z))


def _qkv_bias(w: PublicWeights, i: int, positions: torch.Tensor) -> torch.Tensor | None:
    """The q/k/v bias with f fractional bits, (N,) or, rotated per position for llama, (T, N)."""
    b = w.blocks[i].qkv.bias
    if b is None:
        return None
    if w.inv_freq_model is None:
        return encode(b)
    Dh, n_rot = w.cfg.dh, (w.cfg.n_heads + w.cfg.n_kv_heads) * w.cfg.dh
    cos, sin = _rope_tables(w, positions)                                       # (T, Dh)
    bh = b[:n_rot].view(-1, Dh)                                                 # (heads, Dh)
    rot = cos[:, None] * bh[None] + sin[:, None] * torch.roll(bh, Dh // 2, -1)[None]   # (T, heads, Dh)
    return encode(torch.cat([rot.reshape(len(positions), n_rot), b[n_rot:][None].expand(len(positions), -1)], 1))


def _normed(p: Party, w: PublicWeights, x: AShare, eps: float, project, bias: torch.Tensor | None,
            out_features: int) -> Protocol:
    """project(norm(x)) + bias (funcs.norm_then)."""
    out = yield from funcs.norm_then(p, x, eps=eps, center=w.cfg.family == "gpt2", project=project,
                                     out_features=out_features)
    return out if bias is None else out.add_public(p.index, bias)


def _plain(lin: Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return encode(lin.weight), None if lin.bias is None else encode(lin.bias)


def _gated(lin: Linear) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The gate and up projections side by side: weights with f bits; the gate's outputs keep f bits, the
    up's UP_FRAC (the truncation shift per column, and the bias with as many bits)."""
    n = lin.weight.shape[1] // 2
    frac = torch.cat([torch.full((n,), F), torch.full((n,), UP_FRAC)])
    bias = None if lin.bias is None else torch.cat([encode(lin.bias[:n]), encode(lin.bias[n:], UP_FRAC)])
    return encode(lin.weight), bias, 2 * F - frac


def _scores(p: Party, q: AShare, k: AShare, allowed: torch.Tensor) -> Protocol:
    """q k^T (B, H, T, S), truncated only where the public mask lets a query see the key (a causal prompt's
    other half is never read: zero there)."""
    kt = k.map(lambda t: t.transpose(-1, -2))
    z = q.a @ kt.a + q.a @ kt.b + q.b @ kt.a                                   # 3-out-of-3, 2f bits
    if bool(allowed.all()):
        return (yield from trunc_sum(p, z))
    seen = allowed.bool()
    part = yield from trunc_sum(p, z[..., seen])
    return part.map(lambda t: _spread(t, seen, z.shape))


def _spread(t: torch.Tensor, seen: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.int64)
    out[..., seen] = t
    return out


def block(p: Party, w: PublicWeights, i: int, h: AShare, cache: KVShares, positions: torch.Tensor) -> Protocol:
    """h (B, T, D) -> (B, T, D) for block i; k/v appended to the cache (the caller advances it)."""
    cfg = w.cfg
    B, T, _ = h.shape
    Dh, H, Hkv = cfg.dh, cfg.n_heads, cfg.n_kv_heads
    bw = w.blocks[i]
    qkv = yield from tagged(p, "norm+qkv", led(p, LEADS["norm+qkv"], lambda q: _normed(
        q, w, h, bw.eps, lambda x: _project_qkv(q, w, i, x, positions), _qkv_bias(w, i, positions), bw.qkv.weight.shape[1])))
    q = qkv.map(lambda t: t[..., :H * Dh].reshape(B, T, H, Dh).transpose(1, 2))                   # (B, H, T, Dh)
    k = qkv.map(lambda t: t[..., H * Dh:(H + Hkv) * Dh].reshape(B, T, Hkv, Dh).transpose(1, 2))  # (B, Hkv, T, Dh)
    v = qkv.map(lambda t: t[..., (H + Hkv) * Dh:].reshape(B, T, Hkv, Dh).transpose(1, 2))       # (B, Hkv, T, Dh)
    if i in cache.k:
        k, v = cat([cache.k[i], k], 2), cat([cache.v[i], v], 2)                                     # (B, Hkv, S, Dh)
    cache.k[i], cache.v[i] = k, v
    rep = H // Hkv
    k = k.map(lambda t: t.repeat_interleave(rep, 1))                                                # (B, H, S, Dh)
    v = v.map(lambda t: t.repeat_interleave(rep, 1))
    S = k.shape[2]
    past = S - T
    allowed = torch.arange(S)[None, :] <= (past + torch.arange(T))[:, None]                        # (T, S)
    scores = yield from tagged(p, "qk", _scores(p, q, k, allowed))                                  # (B, H, T, S)
    att = yield from tagged(p, "softmax_av", led(p, LEADS["softmax"], lambda q: funcs.softmax_av(q, scores, allowed, v)))
    att = att.map(lambda t: t.transpose(1, 2).reshape(B, T, H * Dh))
    h = h + (yield from tagged(p, "o", linear(p, att, *w.enc(f"o{i}", bw.o))))
    if cfg.family == "gpt2":
        up_w, up_b = w.enc(f"up-f{i}", bw.up, _plain)
        up = yield from tagged(p, "norm+up", led(p, LEADS["norm+up"], lambda q: _normed(
            q, w, h, bw.eps, lambda x: linear(q, x, up_w), up_b, up_w.shape[1])))
        act = yield from tagged(p, "gelu", led(p, LEADS["activation"], lambda q: funcs.gelu(q, up)))
        return h + (yield from tagged(p, "down", linear(p, act, *w.enc(f"down{i}", bw.down))))
    # SiLU(gate) and up with GATE_FRAC and UP_FRAC bits: their product times W_down has GATE_FRAC +
    # UP_FRAC + f bits, truncated once (no truncation of the product itself)
    up_w, up_b, shift = w.enc(f"up-g{i}", bw.up, _gated)
    up = yield from tagged(p, "norm+up", led(p, LEADS["norm+up"], lambda q: _normed(
        q, w, h, bw.eps, lambda x: linear(q, x, up_w, shift=shift), up_b, up_w.shape[1])))
    Fd = up.shape[-1] // 2
    gate = yield from tagged(p, "silu", led(p, LEADS["activation"], lambda q: funcs.silu(
        q, up.map(lambda t: t[..., :Fd]), out_frac=GATE_FRAC, horner=True)))
    down_w, down_b = w.enc(f"down-g{i}", bw.down, _plain)
    z = cross_sum([(gate, up.map(lambda t: t[..., Fd:]))]) @ down_w                  # 3-out-of-3, GATE_FRAC + UP_FRAC + f bits
    out = yield from tagged(p, "gate*up+down", trunc_sum(p, z, GATE_FRAC + UP_FRAC))
    return h + (out if down_b is None else out.add_public(p.index, down_b))


def forward(p: Party, w: PublicWeights, onehot: AShare, cache: KVShares) -> Protocol:
    """One-hot token shares (B, T, V) (integers) -> logit shares (B, V) of the last position."""
    T = onehot.shape[1]
    positions = torch.arange(cache.length, cache.length + T)
    h = onehot.map(lambda t: t @ w.tok)                                   # (B, T, D): integer x fixed point
    if w.pos is not None:
        h = h.add_public(p.index, w.pos[positions][None])
    for i in sorted(w.blocks):
        h = yield from block(p, w, i, h, cache, positions)
    cache.length += T
    last = h.map(lambda t: t[:, -1])                                      # (B, D)
    head_w, head_b = w.enc("head-f", w.head, _plain)
    return (yield from _normed(p, w, last, w.cfg.norm_eps, lambda x: linear(p, x, head_w), head_b, head_w.shape[1]))
