"""Distributed checkpoints (torch.distributed.checkpoint) that any layout can resume, and HF export.

Every rank writes only what it holds, under the parameter names of the full model: blocks keep
their absolute index in every pipeline stage, DTensor shards (TP, FSDP) are saved as pieces of
the full tensor, and the optimizer state is flattened to one entry per parameter name
("state.layers.0.attention.q_proj.weight.exp_avg"). A later run under another layout asks for
the names and pieces it holds and DCP reads them from whichever files have them. The step is
saved as a tensor, so nothing is pickled. Export to the HF format gathers the full model on
rank 0 from the saved checkpoint. Knows nothing of data.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from swarmlm.model.hf import save_model
from swarmlm.model.transformer import Transformer

_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)
_TIED = ("tok_embeddings.weight", "output.weight")


def _parts_state(trainer) -> tuple[list[dict], list[dict]]:
    models = [get_model_state_dict(m) for m in trainer.modules]
    optims = [get_optimizer_state_dict(m, o, options=_OPTIM) for m, o in zip(trainer.modules, trainer.optimizers)]
    return models, optims


def _merged(trainer, models: list[dict], optims: list[dict]) -> dict:
    model, optim = {}, {}
    for d in models:
        model.update(d)
    for d in optims:
        optim.update(d)
    if trainer.cfg.tie_embeddings:
        # one matrix under two names: a pipeline's last stage knows it only as output.weight
        for d in (model, optim):
            for key in list(d):
                for a, b in (_TIED, _TIED[::-1]):
                    if a in key and key.replace(a, b) not in d:
                        d[key.replace(a, b)] = d[key]
    return {"model": model, "optim": optim}


def save_checkpoint(trainer, path: str | Path, step: int) -> None:
    """Write the trainer's model and optimizer state after `step` optimizer steps (collective)."""
    state = _merged(trainer, *_parts_state(trainer))
    state["step"] = torch.tensor(step)
    dcp.save(state, checkpoint_id=str(path))


def load_checkpoint(trainer, path: str | Path) -> int:
    """Load a checkpoint saved under any layout into `trainer`; returns the step to continue from."""
    models, optims = _parts_state(trainer)
    state = _merged(trainer, models, optims)
    state["step"] = torch.tensor(0)
    dcp.load(state, checkpoint_id=str(path))
    for m, o, msd, osd in zip(trainer.modules, trainer.optimizers, models, optims):
        set_model_state_dict(m, {k: state["model"][k] for k in msd})
        set_optimizer_state_dict(m, o, {k: state["optim"][k] for k in osd}, options=_OPTIM)
    return int(state["step"])


def export_hf(cfg, checkpoint: str | Path, out: str | Path, *, tokenizer=None) -> None:
    """Rank 0 (or the only process) reads the full model from `checkpoint` and writes it in
    the HF format to `out` (config.json + safetensors); other ranks wait."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        with torch.device("cpu"):
            model = Transformer(cfg)
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
        model.load_state_dict(state["model"])
        save_model(model, cfg, out, tokenizer=tokenizer)
    if dist.is_initialized():
        dist.barrier()
