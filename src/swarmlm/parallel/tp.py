"""Tensor parallel, Megatron-style, on DTensor's `parallelize_module`.

Inside a block: q/k/v and gate/up are split by output columns (each rank computes a subset
of heads and hidden units, no communication), o_proj and down_proj by input rows (one
reduction per sub-layer). The token embedding is split by vocabulary rows and the lm head by
vocabulary columns, gathered to full logits. With sequence parallel the norms and residual
stream between sub-layers are split along the sequence (Shard(1)): the reductions become
reduce-scatters and all-gathers of the same cost, and the activations between them take 1/tp
of the memory. The attention module reads its head count from tensor shapes, so it runs on
the local heads unchanged. Knows the model's module names, nothing else.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)


def apply_tp(model: nn.Module, tp_mesh, *, sequence_parallel: bool = True) -> nn.Module:
    """Split `model` (a whole Transformer or a pipeline stage of one) over `tp_mesh`, in place."""
    seq = Shard(1) if sequence_parallel else Replicate()   # layout of the residual stream (B, T, D)
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
    if top:
        parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block, seq, sequence_parallel))
    if model.tok_embeddings is None and sequence_parallel:
        # a later pipeline stage receives the residual stream as this rank's sequence shard
        # (B, T/tp, D); its positions (for RoPE) must still count the whole sequence
        n = tp_mesh.size()
        model.register_forward_pre_hook(functools.partial(_full_positions, n), with_kwargs=True)
    _retie(model)
    return model


def _full_positions(n: int, module, args, kwargs):
    if kwargs.get("positions") is None:
        T = args[0].shape[1] * n
        kwargs["positions"] = torch.arange(T, device=args[0].device)[None]  # (1, T)
    return args, kwargs


def _block_plan(block: nn.Module, seq, sequence_parallel: bool) -> dict:
    plan = {
        "attention.q_proj": ColwiseParallel(),
        "attention.k_proj": ColwiseParallel(),
        "attention.v_proj": ColwiseParallel(),
        "attention.o_proj": RowwiseParallel(output_layouts=seq),
        "feed_forward.up_proj": ColwiseParallel(),
        "feed_forward.down_proj": RowwiseParallel(output_layouts=seq),
    }
    if getattr(block.feed_forward, "gate_proj", None) is not None:
        plan["feed_forward.gate_proj"] = ColwiseParallel()
    if sequence_parallel:
        gather = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
        plan.update({"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel(),
                     "attention": gather, "feed_forward": gather})
    return plan


def _retie(model: nn.Module) -> None:
    # parallelize_module gives each module its own DTensor parameter; a tied head must share the
    # embedding's again. Both are split by vocabulary rows (Shard(0)), so the shards agree.
    if getattr(model.cfg, "tie_embeddings", False) and model.output is not None and model.tok_embeddings is not None:
        model.output.weight = model.tok_embeddings.weight
