"""A lean one-token decode step: the same numbers as `Transformer.run_blocks`, fewer small ops.

Decoding one token per row spends most of its time outside the matmuls on a CPU: the rotary
tables recomputed every step, the attention mask rebuilt, position ids counted, a module call
per piece, seven small matmuls per block. `DecodeStep(model, cache)` does that work once: the
rotary tables for every slot of the cache are computed up front (with the very ops
`Rotary.tables` uses, so the values are bit for bit the same), the mask is the cache's own
padding mask or nothing, and each layer runs as a flat sequence of tensor ops, in the order
Attention and Block use them, on rows as vectors (B, D): Linears as the mm/addmm F.linear
dispatches to (quantized ones as their kernel, `QuantLinear.rows_fn`), norms as torch.rms_norm
/ F.layer_norm (the same ops their modules run), q and k rotated together in one pass, no
module calls (a module with hooks or tensor-subclass weights, e.g. tensor parallel's, is still
called as a module). For one row (B = 1) q/k/v and gate/up run as one matmul each
(`fused_projections`: the parts' weights become views of the fused ones, so no memory is
added). Each output row is the same dot product either way, and the tests check that the
output equals `run_blocks`' exactly, for float and quantized (model/quant.py) weights alike,
so the swarm's exactness promise holds (with more rows a float GEMM may block its sums
differently, so those steps use the parts). Servers take the same step for their span
(`span_step`, from swarm/blocks.py's run_span).

Where model/qkernels.py's extension is built (CPU), a step of one row runs as one C++ call
(csrc/decode.cpp, a `DecodePlan` built with the step): the loop below with the very same ATen
ops in the same order, and quantized Linears straight to the VNNI kernels, so the numbers are
the same and only the interpreter between the ops is gone (a quarter to a third of a quantized
token's time on the small preset). It takes the layers whose pieces are plain (RMSNorms, fused q/k/v and
gate/up, float or kernel-bound quantized Linears: `_Layer.compiled`) and the cache buffers it
was built with; anything else (several rows, LayerNorms, padded quantized widths, hooks, a
cache whose buffers were replaced) takes the Python loop, which is also the whole path
without the extension (SWARMLM_NO_KERNELS=1, no compiler). The tests run both.

It applies to a step of one new token per row with a cache, for models whose rotary scaling
does not depend on the sequence length (not "dynamic") and that attend to the whole context (no
sliding window); `DecodeStep.supports` says which.
Knows nothing of sampling or networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swarmlm.model import qkernels
from swarmlm.model.cache import KVCache
from swarmlm.model.layers import RMSNorm
from swarmlm.model.quant import QuantLinear


def _concat_linears(parts: list[nn.Linear]) -> nn.Linear | None:
    """One float Linear over the parts' rows. Each part keeps its Parameter objects (an optimizer
    holding them still updates the model), whose data become views of the fused tensors."""
    first = parts[0]
    if not all(type(p) is nn.Linear and _plain(p) and p.in_features == first.in_features
               and (p.bias is None) == (first.bias is None)
               and p.weight.dtype == first.weight.dtype and p.weight.device == first.weight.device for p in parts):
        return None
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                      device="meta")
    fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    row = 0
    for p in parts:
        rows = slice(row, row + p.out_features)
        p.weight.data = fused.weight.data[rows]
        if p.bias is not None:
            p.bias.data = fused.bias.data[rows]
        row += p.out_features
    return fused


def fuse(parts: list[nn.Module]) -> tuple[nn.Module, list[int]] | None:
    """(one module computing the parts' outputs side by side, their widths), or None if they cannot be fused.

    Each output row is the same dot product over the same input either way, so the fused
    result equals the parts' (checked by the tests against the unfused path)."""
    fused = QuantLinear.concat(parts) if isinstance(parts[0], QuantLinear) else _concat_linears(parts)
    return None if fused is None else (fused, [p.out_features for p in parts])


def _storage(module: nn.Module) -> int:
    t = module.qweight if isinstance(module, QuantLinear) else module.weight
    return t.untyped_storage().data_ptr()


def _still_shared(entry: tuple, block) -> bool:
    """Whether the parts still read the fused weights (not moved, reloaded or replaced since)."""
    qkv, gate_up = entry
    pairs = [(qkv, block.attention.q_proj)] + ([(gate_up, block.feed_forward.gate_proj)] if gate_up else [])
    return all(f is None or _storage(f[0]) == _storage(part) for f, part in pairs)


def fused_projections(model) -> dict[int, tuple]:
    """Block index -> (fused q/k/v or None, fused gate/up or None), built once per model and kept on it."""
    cached = getattr(model, "_fused_projections", None)
    if cached is None or set(cached) != {int(k) for k in model.layers} or not all(
            _still_shared(cached[int(k)], b) for k, b in model.layers.items()):
        cached = {}
        # the parts' parameters become views of the fused tensors: those must be ordinary tensors even
        # when the first step runs under inference mode (a server's), or a later backward through the
        # same model (fine-tuning through a server) could not use the parameters
        with torch.inference_mode(False), torch.no_grad():
            for key, block in model.layers.items():
                attn, mlp = block.attention, block.feed_forward
                qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
                gate_up = fuse([mlp.gate_proj, mlp.up_proj]) if mlp.gated else None
                cached[int(key)] = (qkv, gate_up)
        object.__setattr__(model, "_fused_projections", cached)   # not a submodule: no state_dict entries
    return cached


def _plain(module: nn.Module) -> bool:
    """Whether calling the module runs nothing but its forward on plain tensors (no hooks, e.g.
    tensor parallel's redistributions, and no tensor-subclass weights such as DTensors)."""
    return (not module._forward_hooks and not module._forward_pre_hooks
            and all(type(p) is nn.Parameter for p in module.parameters(recurse=False)))


def _linear_fn(module: nn.Module):
    """x (B, K) -> (B, N) in x's dtype, as `module(x)` computes it, without the module call (bound
    to the weights as they are now: a step lives for one generation or one server session)."""
    if type(module) is nn.Linear and _plain(module):
        wt = module.weight.t()            # F.linear on rows is mm / addmm with the weight transposed
        if module.bias is None:
            return lambda x: torch.mm(x, wt)
        bias = module.bias
        return lambda x: torch.addmm(bias, x, wt)
    if isinstance(module, QuantLinear):
        return module.rows_fn()       # what its forward runs when no gradient is wanted
    return module                     # anything else (LoRA, a parallel shard): its own forward


def _linear_args(module: nn.Module | None) -> tuple[int, list[torch.Tensor], int] | None:
    """(kind, tensors, group) of a Linear as the compiled step runs it (csrc/decode.cpp: 0 mm, 1
    addmm, 2 int8 kernel, 3 int4 kernel), bound as `_linear_fn` binds it; None if it cannot."""
    if type(module) is nn.Linear and _plain(module) and module.weight.device.type == "cpu":
        wt = module.weight.t()
        return (0, [wt], 0) if module.bias is None else (1, [wt, module.bias], 0)
    bound = module.kernel_args() if isinstance(module, QuantLinear) else None
    if bound is None:
        return None
    args, group = bound
    return (2 if module.scheme.bits == 8 else 3), list(args), group


def _rms_args(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a norm `_norm_fn` runs as torch.rms_norm, else None."""
    if type(module) is RMSNorm and module.weight.dtype == torch.float32 and _plain(module):
        return module.weight, module.eps
    return None


def _norm_fn(module: nn.Module):
    """x (B, D) -> normalized, as `module(x)` computes it: RMSNorm's float32 steps are the very ops
    `torch.rms_norm` composes (the tests check equality), LayerNorm is `F.layer_norm`."""
    if type(module) is RMSNorm and module.weight.dtype == torch.float32 and _plain(module):
        shape = (module.weight.shape[0],)
        return lambda x: torch.rms_norm(x, shape, module.weight, module.eps)
    if type(module) is nn.LayerNorm and _plain(module):
        return lambda x: F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    return module


class _Layer:
    """One block's pieces, flattened for the decode step."""

    def __init__(self, index: int, block, fused: tuple):
        attn, mlp = block.attention, block.feed_forward
        qkv, gate_up = fused
        self.index, self.Dh = index, attn.head_dim
        self.norm1, self.norm2 = _norm_fn(block.attention_norm), _norm_fn(block.ffn_norm)
        self.qkv = None if qkv is None else (_linear_fn(qkv[0]), qkv[1])
        self.q, self.k, self.v = (_linear_fn(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.o = _linear_fn(attn.o_proj)
        self.gated = mlp.gated
        self.gate_up = None if gate_up is None else (_linear_fn(gate_up[0]), gate_up[1][0])
        self.gate = _linear_fn(mlp.gate_proj) if mlp.gated else None
        self.up, self.down = _linear_fn(mlp.up_proj), _linear_fn(mlp.down_proj)
        # the compiled step's arguments (one row, fused projections, RMSNorms, gated MLP), or None
        self.compiled = None
        norms = (_rms_args(block.attention_norm), _rms_args(block.ffn_norm))
        if qkv is not None and gate_up is not None and None not in norms:
            lins = [_linear_args(m) for m in (qkv[0], attn.o_proj, gate_up[0], mlp.down_proj)]
            if None not in lins:
                self.compiled = (norms, lins, [self.Dh, *qkv[1], gate_up[1][0]])


class DecodeStep:
    """`step(ids (B, 1)) -> logits (B, V)` of the last position, advancing `cache` by one slot."""

    def __init__(self, model, cache: KVCache, *, with_head: bool = True, blocks: range | None = None):
        """`blocks`: run only the held blocks with an index in it (a server's session span); default all."""
        if not self.supports(model):
            raise ValueError("DecodeStep needs a model without dynamic rotary scaling")
        self.model = model
        self.cache = cache
        self.with_head = with_head
        fused = fused_projections(model)
        self.layers = [_Layer(int(key), block, fused[int(key)]) for key, block in model.layers.items()
                       if blocks is None or int(key) in blocks]
        self.final_norm = None if model.norm is None else _norm_fn(model.norm)
        self.output = None if model.output is None else _linear_fn(model.output)
        self.tables = None
        if model.rotary is not None:
            # every slot's (cos, signed sin), as Rotary.tables computes them: (max_len, Dh) each
            dtype = next(iter(cache.k.values())).dtype if cache.k else torch.float32
            positions = torch.arange(cache.max_len, device=cache.mask.device)[None]
            cos, sin = model.rotary.tables(positions, dtype)          # (1, 1, max_len, Dh)
            self.tables = (cos[0, 0], sin[0, 0])
        self.plan_head, self._plan_buffers = False, None
        self.plan = self._compile()

    def _compile(self):
        """The compiled step (csrc/decode.cpp) over these layers and this cache, for one row; None
        where it does not apply (no extension, several rows, a piece it does not run)."""
        ext = qkernels.extension()
        cache = self.cache
        if ext is None or not hasattr(ext, "DecodePlan") or cache.batch != 1 or cache.mask.device.type != "cpu":
            return None
        if any(t.dtype != torch.float32 for t in cache.k.values()):      # float32 hidden states only
            return None
        if any(layer.compiled is None for layer in self.layers):
            return None
        plan = ext.DecodePlan()
        for layer in self.layers:
            norms, lins, dims = layer.compiled
            plan.add_layer([n[0] for n in norms], [float(n[1]) for n in norms], [lin[0] for lin in lins],
                           [lin[2] for lin in lins], [lin[1] for lin in lins],
                           cache.k[layer.index], cache.v[layer.index], dims)
        head = _linear_args(self.model.output) if self.with_head and self.model.output is not None else None
        norm = None if self.model.norm is None else _rms_args(self.model.norm)
        if head is not None and (self.model.norm is None or norm is not None):
            plan.set_head(None if norm is None else norm[0], 0.0 if norm is None else float(norm[1]),
                          head[0], head[1], head[2])
            self.plan_head = True
        self._plan_buffers = [(cache.k[layer.index], cache.v[layer.index]) for layer in self.layers]
        return plan

    def _planned(self, B: int) -> bool:
        """Whether this step of B rows runs the compiled plan (its cache buffers still the cache's; no
        gradient wanted: the plan records none)."""
        if self.plan is None or B != 1 or torch.is_grad_enabled():
            return False
        k, v = self.cache.k, self.cache.v
        return all(k[layer.index] is kb and v[layer.index] is vb
                   for layer, (kb, vb) in zip(self.layers, self._plan_buffers))

    @staticmethod
    def supports(model) -> bool:
        # a sliding window (Mistral, Qwen2) reads a window of the cache per layer: run_blocks' path
        return (model.rotary is None or model.cfg.rope_type != "dynamic") and model.cfg.sliding_window is None

    def _rope(self, B: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, signed sin) of each row's next position, (1, Dh) for one row or (B, 1, Dh)."""
        if self.tables is None:
            return None
        cos, sin = self.tables
        pos = self.cache.next_pos                                      # (B,)
        if B == 1:
            p = int(pos[0])
            return cos[p:p + 1], sin[p:p + 1]                          # (1, Dh)
        return cos[pos][:, None], sin[pos][:, None]                    # (B, 1, Dh)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        model, cache = self.model, self.cache
        cache.check_room(1)
        positions = cache.next_pos[:, None]                            # (B, 1)
        embed = model.tok_embeddings
        if type(embed) is nn.Embedding and _plain(embed) and model.pos_embeddings is None:
            h = F.embedding(ids, embed.weight)                         # what nn.Embedding runs
        else:
            h = model.embed(ids, positions) if model.tok_embeddings is not None else ids
        if self.plan_head and self._planned(h.shape[0]):
            return self.run(h, head=True)                             # the whole step in one call
        h = self.run(h)
        if not self.with_head:
            return h
        h = h[:, 0]                                                    # (B, D)
        if self.final_norm is not None:
            h = self.final_norm(h)
        return self.output(h)                                          # (B, V)

    def run(self, h: torch.Tensor, head: bool = False, into: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, 1, D) of the next slot through every held block; advances the cache.
        (`head`: the logits (1, V) instead, for one row with a compiled plan that has the head.)
        `into`: a contiguous (B, 1, D) tensor of h's dtype, a caller's buffer, that the outputs are
        written into and returned as (no new tensor, no torch call after the compiled plan's), once
        checked finite; None where one is NaN or infinite, and the cache is not advanced then.

        Each row is a vector here: (B, D) through the Linears, (B, heads, Dh) through rope, and for
        one token a (B, H, 1, Dh) query is the same memory as run_blocks' transposed one."""
        cache = self.cache
        B = h.shape[0]
        past = cache.length
        mask = cache.key_mask(None, 1)                                 # (B, S) when some slot is padding
        if mask is not None:
            mask = mask[:, None, None, :]                              # (B, 1, 1, S)
        rope = self._rope(B)
        end = past + 1
        h = h.reshape(B, -1)                                           # (B, D)
        if self._planned(B):                      # the same ops as below, in one C++ call
            cos, sin = (None, None) if rope is None else rope
            out = self.plan.run(h, past, cos, sin, mask, head, into)
            if out is None:                       # `into`'s check: NaN or infinity
                return None
            cache.advance(1)
            return out if head or into is not None else out[:, None]
        for layer in self.layers:
            Dh = layer.Dh
            x = layer.norm1(h)
            if layer.qkv is not None and B == 1:
                fn, (nq, nk, nv) = layer.qkv
                # q and k (B, H + Hkv, Dh), rotated together; v (B, Hkv, Dh)
                qk, v = fn(x).view(B, -1, Dh).split(((nq + nk) // Dh, nv // Dh), 1)
            else:
                q, k, v = layer.q(x), layer.k(x), layer.v(x)
                nq = q.shape[1]
                qk = torch.cat([q, k], 1).view(B, -1, Dh)
                v = v.view(B, -1, Dh)
            if rope is not None:
                qk = torch.addcmul(qk * rope[0], torch.roll(qk, Dh // 2, -1), rope[1])
            H = nq // Dh
            k_buf, v_buf = cache.k[layer.index], cache.v[layer.index]
            k_buf.select(2, past).copy_(qk[:, H:])
            v_buf.select(2, past).copy_(v)
            q = qk[:, :H].unsqueeze(2)                                 # (B, H, 1, Dh)
            k, v = k_buf.narrow(2, 0, end), v_buf.narrow(2, 0, end)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != k.shape[1])
            h = h + layer.o(out.view(B, -1))
            x = layer.norm2(h)
            if layer.gate_up is not None and B == 1:
                fn, n = layer.gate_up
                gu = fn(x)
                a = F.silu(gu[:, :n]) * gu[:, n:]
            elif layer.gated:
                a = F.silu(layer.gate(x)) * layer.up(x)
            else:
                a = F.gelu(layer.up(x), approximate="tanh")
            h = h + layer.down(a)
        if into is not None and not bool(torch.isfinite(h).all()):
            return None
        cache.advance(1)
        if into is not None:
            return into.copy_(h.view(into.shape))
        return h[:, None]                                              # (B, 1, D)


def span_step(model, cache: KVCache, start: int, end: int) -> DecodeStep | None:
    """The decode step of blocks [start, end) of `model` over `cache` (built on first use and kept on
    the cache, which it serves for its whole life), or None where the lean path does not apply."""
    steps = cache.__dict__.setdefault("_decode_steps", {})      # (model id, start, end) -> DecodeStep
    key = (id(model), start, end)
    step = steps.get(key)
    if step is None or step.model is not model:
        if not DecodeStep.supports(model) or not all(i in cache.k for i in range(start, end)):
            return None
        step = steps[key] = DecodeStep(model, cache, with_head=False, blocks=range(start, end))
    return step
