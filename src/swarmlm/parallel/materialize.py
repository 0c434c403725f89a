"""Build the model without storage, then fill in only this rank's pieces of it.

No rank ever holds the whole model. `build_shell` makes it on the meta device (shapes, no
storage); the plan is applied to that shell (pipeline cut, tensor parallel, FSDP); then
`materialize` allocates the local pieces (`to_empty`) and writes into them exactly the values
that `torch.manual_seed(seed); Transformer(cfg)` gives in a single process, so every layout
starts from the single-process weights and reproduces its losses.

The values come from replaying the single-process build's random draws, in order, on the same
CPU generator:

1. while the shell is built, every seeded random op the model makes (nn.Linear's uniform
   reset, ...) runs once more on a CPU scratch tensor of the same shape, so the generator
   advances as if the model had been built for real;
2. the model's own `init_weights` then runs over a stand-in that hands it a fresh full-size
   CPU copy of one module at a time; when it moves on to the next module, the finished copy's
   tensors are cut into this rank's pieces (the DTensor placements of TP and FSDP, or nothing
   for a plain replica) and dropped.

So beyond its own shards a rank holds at most one full module (the token embedding) at a
time. Knows of the model only that `init_weights` walks `named_modules()` and initializes each
module's own parameters, and that a tied head (`output.weight`) takes the embedding's values.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from swarmlm.errors import SwarmlmError
from swarmlm.model.config import ModelConfig
from swarmlm.model.layers import Rotary
from swarmlm.model.transformer import Transformer

_META = torch.device("meta")
_TIED = {"output.weight": "tok_embeddings.weight"}   # tied head -> the parameter it shares


class _DrawOnCPU(TorchDispatchMode):
    """Runs every seeded random op made on meta tensors once more on CPU scratch tensors, so
    the default CPU generator advances exactly as it would in a real CPU build."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            def to_cpu(x):
                if isinstance(x, torch.Tensor) and x.is_meta:
                    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cpu")
                return torch.device("cpu") if x == _META else x
            func(*tree_map(to_cpu, args), **tree_map(to_cpu, kwargs))
        return func(*args, **kwargs)


def build_shell(cfg: ModelConfig) -> Transformer:
    """The whole model on the meta device; the CPU generator has advanced as in a real build."""
    with torch.device("meta"), _DrawOnCPU():
        shell = Transformer(cfg)
    if shell.rotary is not None:
        shell.rotary = Rotary(cfg)   # plain tables computed from cfg (not parameters): build them for real
    return shell


def materialize(parts: list[nn.Module], shell: Transformer, device: torch.device) -> None:
    """Allocate `parts` (cut and sharded from `shell`, still on meta) on `device` and fill them
    with the single-process initial weights. Call right after `build_shell`, with no random
    draws in between (the generator must be where the real build would have left it)."""
    if any(True for _ in shell.buffers()):
        raise SwarmlmError("materialize: the model has buffers, which init_weights would not fill")
    tied = shell.cfg.tie_embeddings
    targets: dict[str, list[torch.Tensor]] = defaultdict(list)   # full-model name -> local tensors
    for part in parts:
        part.to_empty(device=device)
        _retie(part)
        for name, p in part.named_parameters(remove_duplicate=False):
            targets[_TIED.get(name, name) if tied else name].append(p)

    def fill(name: str, full: torch.Tensor) -> None:
        if tied and name in _TIED:
            return   # the single-process build ties this to the embedding after init: its values are dropped
        for t in targets.get(name, ()):
            _copy_piece(t, full)

    Transformer.init_weights(_OneModuleAtATime(shell, fill))


def _retie(part: nn.Module) -> None:
    # to_empty gives a plain module's tied head its own tensor (FSDP2 keeps the tie itself)
    if getattr(part, "output", None) is not None and getattr(part, "tok_embeddings", None) is not None \
            and part.output.weight is not part.tok_embeddings.weight:
        part.tie_weights()


@torch.no_grad()
def _copy_piece(local: torch.Tensor, full: torch.Tensor) -> None:
    """Write into `local` its piece of `full` (the whole tensor, on CPU)."""
    full = full.to(local.device)
    if isinstance(local, DTensor):
        # src_data_rank=None: every rank cuts its own piece from its own copy, no communication
        piece = distribute_tensor(full, local.device_mesh, local.placements, src_data_rank=None)
        local.to_local().copy_(piece.to_local())
    else:
        local.copy_(full)


class _OneModuleAtATime:
    """Stands in for the model in `Transformer.init_weights`: the same config and module names,
    but each module a fresh CPU copy of only its own tensors, handed out one at a time; when the
    next is asked for, the finished one goes to `fill` (name, full tensor) and is dropped."""

    def __init__(self, shell: Transformer, fill):
        self.cfg, self._shell, self._fill = shell.cfg, shell, fill

    def parameters(self):
        return iter(())   # nothing here is meta: init_weights must run

    def named_modules(self):
        for name, module in self._shell.named_modules():
            copy = _own_tensors_on_cpu(module)
            yield name, copy
            prefix = f"{name}." if name else ""
            for key, p in copy._parameters.items():
                if p is not None:
                    self._fill(prefix + key, p)


def _own_tensors_on_cpu(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` without children or buffers, its own parameters new
    (uninitialized) CPU tensors of the same shapes."""
    copy = object.__new__(type(module))
    copy.__dict__.update(module.__dict__)
    copy._modules = {}
    copy._parameters = {k: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
                        for k, p in module._parameters.items()}
    copy._buffers = {}
    return copy
