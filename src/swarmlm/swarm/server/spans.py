"""Stateless forward and backward over a server's span, for fine-tuning and evaluation.

`StatelessSpans` answers wire.py's `forward` and `backward` for a `BlockHost` (host.py), which
builds one for the model it serves and hands it everything it uses: the model, the request
checks, the store of kept forwards, the runner that puts tensor work on the host's worker
thread, and the clock. No session, no cache; the client sends the whole sequence each time.
A forward may be kept (`keep_id`, in the host's `SavedForwards`) so that its backward
differentiates the kept graph instead of recomputing it; a backward whose kept forward was
evicted, or whose inputs differ from it, recomputes, with the same result. Gradients are those of the inputs and the
deep prompts: the blocks stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import torch

from swarmlm.errors import WireError
from swarmlm.swarm import wire
from swarmlm.swarm.blocks import run_span
from swarmlm.swarm.server.checks import RequestChecks
from swarmlm.swarm.server.saved import SavedForwards


@dataclass
class _KeptForward:
    """A forward kept for its backward: its inputs (leaves of the graph) and output."""
    x: torch.Tensor                     # (B, T, D), requires grad
    p: torch.Tensor | None              # (n_span_blocks, B or 1, P, D), requires grad
    key_mask: torch.Tensor | None       # (B, T)
    out: torch.Tensor                   # (B, T, D), carries the graph
    size_bytes: int                     # activations autograd saved, beyond the weights

    def matches(self, hidden: torch.Tensor, key_mask: torch.Tensor | None, prompts: torch.Tensor | None) -> bool:
        """Whether a backward's inputs are the ones this forward ran on (else it recomputes)."""
        def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            return (a is None) == (b is None) and (a is None or (a.shape == b.shape and torch.equal(a, b)))
        return same(self.x.detach(), hidden) and same(self.key_mask, key_mask) and same(
            None if self.p is None else self.p.detach(), prompts)


class StatelessSpans:
    """The stateless handlers over `model`'s span: forwards are kept in `kept`, tensor work goes
    through `run` (a callable's result, computed off the event loop)."""

    def __init__(self, model: Any, *, checks: RequestChecks, kept: SavedForwards,
                 run: Callable[[Callable[[], Any]], Awaitable[Any]], clock: Callable[[], float]):
        self.model = model
        self.checks = checks
        self.kept = kept
        self._run = run
        self.clock = clock
        # storage that is the model's own: not counted as what a kept forward costs
        self._weight_ptrs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    async def rpc_forward(self, peer_id: str, req: wire.SpanForwardRequest) -> wire.SpanForwardReply:
        self.checks.span(req.start, req.end)
        hidden = self.checks.hidden(req.hidden)
        B, T, _ = hidden.shape
        key_mask = self.checks.mask(req.key_mask, B, T)
        prompts = self.checks.prompts(req.prompts, req.start, req.end, B, T)
        self.checks.keep_id(req.keep_id)
        if req.keep_id is not None and self.kept.max_bytes > 0:
            kept = await self._run(lambda: self._forward_kept(hidden, req.start, req.end, key_mask, prompts))
            self.kept.put((peer_id, req.keep_id), kept, size_bytes=kept.size_bytes, now=self.clock())
            return wire.SpanForwardReply(hidden=kept.out.detach())

        def compute() -> torch.Tensor:
            with torch.inference_mode():
                return run_span(self.model, hidden, req.start, req.end, key_mask=key_mask, prompts=prompts)

        return wire.SpanForwardReply(hidden=await self._run(compute))

    def _forward_kept(self, hidden: torch.Tensor, start: int, end: int, key_mask: torch.Tensor | None,
                      prompts: torch.Tensor | None) -> _KeptForward:
        """The forward with autograd recording; its size is the storage autograd saved beyond the weights."""
        x = hidden.detach().requires_grad_(True)
        p = prompts.detach().requires_grad_(True) if prompts is not None else None
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._weight_ptrs:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run_span(self.model, x, start, end, key_mask=key_mask, prompts=p)   # (B, T, D)
        return _KeptForward(x, p, key_mask, out, sum(storages.values()) + out.nelement() * out.element_size())

    async def rpc_backward(self, peer_id: str, req: wire.SpanBackwardRequest) -> wire.SpanBackwardReply:
        self.checks.span(req.start, req.end)
        hidden = self.checks.hidden(req.hidden)
        B, T, D = hidden.shape
        grad_output = self.checks.hidden(req.grad_output, name="grad_output")
        if grad_output.shape != hidden.shape:
            raise WireError(f"grad_output has shape {tuple(grad_output.shape)}, hidden {tuple(hidden.shape)}")
        key_mask = self.checks.mask(req.key_mask, B, T)
        prompts = self.checks.prompts(req.prompts, req.start, req.end, B, T)
        self.checks.keep_id(req.keep_id)
        kept = None if req.keep_id is None else self.kept.take((peer_id, req.keep_id), now=self.clock())

        def compute() -> tuple[torch.Tensor, torch.Tensor | None]:
            if kept is not None and kept.matches(hidden, key_mask, prompts):
                inputs = (kept.x,) if kept.p is None else (kept.x, kept.p)
                grads = torch.autograd.grad(kept.out, inputs, grad_outputs=grad_output)
                return grads[0], (grads[1] if kept.p is not None else None)
            x = hidden.detach().requires_grad_(True)
            p = prompts.detach().requires_grad_(True) if prompts is not None else None
            with torch.enable_grad():
                out = run_span(self.model, x, req.start, req.end, key_mask=key_mask, prompts=p)  # (B, T, D)
                inputs = (x,) if p is None else (x, p)
                grads = torch.autograd.grad(out, inputs, grad_outputs=grad_output)
            return grads[0], (grads[1] if p is not None else None)

        grad_hidden, grad_prompts = await self._run(compute)
        return wire.SpanBackwardReply(grad_hidden=grad_hidden, grad_prompts=grad_prompts)
