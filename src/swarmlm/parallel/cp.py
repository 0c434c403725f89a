"""Context parallel: ring attention across the ranks of a sequence split.

Each of the n ranks of the "cp" group holds one contiguous slice of every sequence (rank r:
positions [r*Tl, (r+1)*Tl)). Attention needs every key, so the K/V blocks travel around the
ring: at step i rank r holds the block of rank (r - i) mod n, computes its partial attention
and merges it into a running output with the online-softmax (log-sum-exp) rule, while the next
block is already in flight (isend/irecv on torch.distributed). Under causal masking blocks
from later ranks are skipped and the rank's own block gets the triangular mask. The backward
sends dK/dV accumulators around the ring with the K/V they belong to, so after n hops each
rank holds the gradient of its own K/V.

`apply_cp` installs this from outside: it wraps each attention module's forward so that the
module's own `F.scaled_dot_product_attention` call is answered by the ring (a
TorchFunctionMode), which leaves the model code unchanged. On CUDA, torch's own context
parallel (`torch.distributed.tensor.experimental.context_parallel`) is used instead.
Knows nothing of the rest of the model: positions of the local slice are the caller's job.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from swarmlm.errors import PlanError

# ---- the ring -----------------------------------------------------------------------------


def _ring_shift(tensors: list[torch.Tensor], group) -> tuple[list[torch.Tensor], list]:
    """Start sending `tensors` to the next rank and receiving the previous rank's; returns the
    receive buffers and the requests to wait on."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % n)
    prv = dist.get_global_rank(group, (rank - 1) % n)
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prv, group) for r in recv]
    return recv, dist.batch_isend_irecv(ops)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, diagonal: bool) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk) float32
    if diagonal:
        Tq, Tk = s.shape[-2:]
        keep = torch.ones(Tq, Tk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale: float, causal: bool):
        # q, k, v: (B, H, Tl, Dh), the same head count (GQA is expanded by the caller)
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = torch.promote_types(q.dtype, torch.float32)  # accumulate in at least float32
        qf = q.to(acc)
        out = torch.zeros_like(qf)                                         # (B, H, Tl, Dh)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)  # (B, H, Tl)
        kv = [k.to(acc), v.to(acc)]
        for step in range(n):
            src = (rank - step) % n
            reqs = None
            if step < n - 1:
                nxt_kv, reqs = _ring_shift(kv, group)
            if not causal or src <= rank:
                s = _scores(qf, kv[0], scale, diagonal=causal and src == rank)
                blk_lse = torch.logsumexp(s, dim=-1)                       # (B, H, Tl)
                blk_out = torch.matmul(torch.exp(s - blk_lse[..., None]), kv[1])  # (B, H, Tl, Dh)
                new_lse = torch.logaddexp(lse, blk_lse)
                out = out * torch.exp(lse - new_lse)[..., None] + blk_out * torch.exp(blk_lse - new_lse)[..., None]
                lse = new_lse
            if reqs is not None:
                for r in reqs:
                    r.wait()
                kv = nxt_kv
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.causal = group, scale, causal
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, causal = ctx.group, ctx.scale, ctx.causal
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = out.dtype
        qf, do = q.to(acc), dout.to(acc)
        delta = (do * out).sum(-1)                                        # (B, H, Tl)
        dq = torch.zeros_like(qf)
        # (k, v, dk, dv) of one block travel together; after n hops dk/dv are back home
        zeros = functools.partial(torch.zeros, dtype=acc, device=q.device)
        blk = [k.to(acc), v.to(acc), zeros(k.shape), zeros(v.shape)]
        for step in range(n):
            src = (rank - step) % n
            kb, vb, dk, dv = blk
            if not causal or src <= rank:
                s = _scores(qf, kb, scale, diagonal=causal and src == rank)
                p = torch.exp(s - lse[..., None])                          # (B, H, Tl, Tl)
                dv = dv + torch.matmul(p.transpose(-1, -2), do)            # (B, H, Tl, Dh)
                dp = torch.matmul(do, vb.transpose(-1, -2))                # (B, H, Tl, Tl)
                ds = p * (dp - delta[..., None]) * scale
                dq = dq + torch.matmul(ds, kb)
                dk = dk + torch.matmul(ds.transpose(-1, -2), qf)
            send = [kb, vb, dk, dv] if step < n - 1 else [dk, dv]
            recv, reqs = _ring_shift(send, group)
            for r in reqs:
                r.wait()
            blk = recv if step < n - 1 else [None, None, *recv]
        dk, dv = blk[2], blk[3]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, *, causal: bool = True,
                   scale: float | None = None) -> torch.Tensor:
    """Attention of this rank's queries over the whole ring's keys.

    q (B, H, Tl, Dh); k, v (B, Hkv, Tl, Dh) with Hkv dividing H (grouped-query heads are
    expanded here, so autograd sums their gradients back). Returns (B, H, Tl, Dh).
    """
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)  # (B, H, Tl, Dh)
        v = v.repeat_interleave(rep, dim=1)  # (B, H, Tl, Dh)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, group, scale, causal)


# ---- installing the ring into a model -----------------------------------------------------


class _RingSDPA(TorchFunctionMode):
    """Answers F.scaled_dot_product_attention with ring attention over `group`."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        if kwargs.get("attn_mask") is not None or len(args) > 3 or kwargs.get("dropout_p", 0.0):
            raise PlanError("context parallel supports causal attention without an explicit mask, "
                            "padding or dropout")
        return ring_attention(q, k, v, self.group, causal=bool(kwargs.get("is_causal", False)),
                              scale=kwargs.get("scale"))


def _attention_modules(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "o_proj"):
            yield module


def uses_torch_cp(device: torch.device) -> bool:
    """Torch's own context parallel runs on CUDA (its SDPA kernels return the log-sum-exp)."""
    return device.type == "cuda"


def apply_cp(model: nn.Module, cp_mesh) -> None:
    """Make every attention module of `model` attend across the cp ranks' sequence slices.

    On CPU/gloo each attention forward runs under a mode that reroutes its SDPA call to
    `ring_attention`; on CUDA nothing is patched, and `cp_context` enters torch's own context
    parallel around each step instead.
    """
    if cp_mesh.size() == 1 or uses_torch_cp(torch.device(cp_mesh.device_type)):
        return
    group = cp_mesh.get_group()
    for module in _attention_modules(model):
        if getattr(module, "_swarmlm_cp", False):
            continue
        module.forward = _under_ring(module.forward, group)
        module._swarmlm_cp = True


def _under_ring(forward, group):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with _RingSDPA(group):
            return forward(*args, **kwargs)
    return wrapped


def shard_sequence(t: torch.Tensor, cp_mesh, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of `t` along `dim`."""
    n, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    return t.chunk(n, dim=dim)[rank]


@contextlib.contextmanager
def cp_context(cp_mesh, tokens: torch.Tensor, targets: torch.Tensor):
    """Yield (tokens, targets, positions) for this rank's share of the sequence.

    tokens, targets: (B, T) of the full sequence; positions (B, Tl) are the global positions of
    the local slice, which RoPE and learned position tables need. On CUDA the body runs inside
    torch's context parallel (which reorders the sequence for load balance; positions follow).
    """
    B, T = tokens.shape
    positions = torch.arange(T, device=tokens.device).expand(B, T).contiguous()  # (B, T)
    if cp_mesh.size() == 1:
        yield tokens, targets, positions
        return
    if uses_torch_cp(tokens.device):
        from torch.distributed.tensor.experimental import context_parallel
        bufs = [tokens.clone(), targets.clone(), positions]
        with context_parallel(cp_mesh, buffers=bufs, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(bufs)):
            yield bufs[0], bufs[1], bufs[2]
        return
    yield tuple(shard_sequence(t, cp_mesh) for t in (tokens, targets, positions))
