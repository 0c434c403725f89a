"""Training state as bytes: what a late joiner downloads from a peer already in the run.

    await serve_state(peer, lambda: snapshot)               # the donor: a callable returning a dict
    state = await download_state(peer, donor_id, timeout_s=60)

A snapshot is a plain dict with string keys — the step, samples seen, the model's named
tensors, optimizer state as {param index: {name: tensor}} — packed with
`swarmlm.serialize` when asked for and streamed in chunks (`Peer.call_stream`), so the model
may be far larger than one message. The donor builds the dict in one synchronous call
between optimizer steps, so parameters, optimizer state and step always belong together.
`load_params` / `load_optimizer_state` check names, shapes and dtypes against the local
model before copying anything. Knows nothing of rounds or matchmaking.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from torch import nn

from swarmlm import serialize
from swarmlm.errors import PeerError, WireError

STATE_HANDLER = "swarmlm/collab/state/1"
CHUNK_BYTES = 4 * 1024 * 1024
MAX_STATE_BYTES = 8 * 1024 ** 3


def params_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """Per-parameter optimizer state with string keys (msgpack maps need them)."""
    return {str(i): {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            for i, st in opt.state_dict()["state"].items()}


def load_params(model: nn.Module, params: Any) -> None:
    """Copy `params` (name -> tensor) into `model`; `WireError` unless they match exactly."""
    mine = dict(model.named_parameters())
    if not isinstance(params, dict) or set(params) != set(mine):
        raise WireError("downloaded parameters do not match this model's parameter names")
    for name, p in mine.items():
        serialize.check_tensor(params[name], name=name, dtype=p.dtype, shape=tuple(p.shape), finite=True)
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(params[name])


def load_optimizer_state(opt: torch.optim.Optimizer, state: Any) -> None:
    """Load per-parameter state saved by `optimizer_state`; `WireError` if it does not fit `opt`."""
    params = [p for group in opt.param_groups for p in group["params"]]
    if not isinstance(state, dict):
        raise WireError("optimizer state must be a map")
    loaded: dict[int, dict[str, Any]] = {}
    for key, st in state.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < len(params) and isinstance(st, dict)):
            raise WireError(f"bad optimizer state entry {key!r}")
        p = params[int(key)]
        for name, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                serialize.check_tensor(v, name=f"{name} of parameter {key}", dtype=p.dtype, shape=tuple(p.shape),
                                       finite=True)
        loaded[int(key)] = st
    sd = opt.state_dict()
    sd["state"] = loaded
    opt.load_state_dict(sd)


async def serve_state(peer: Any, snapshot: Callable[[], dict[str, Any]]) -> None:
    """Serve `snapshot()` to whoever asks, packed and streamed in chunks."""
    async def handle(peer_id: str, request: bytes) -> AsyncIterator[bytes]:
        data = serialize.pack(snapshot())
        for i in range(0, len(data), CHUNK_BYTES):
            yield data[i:i + CHUNK_BYTES]

    await peer.add_stream_handler(STATE_HANDLER, handle, max_request_bytes=1024)


async def download_state(peer: Any, donor: str, *, timeout_s: float, max_bytes: int = MAX_STATE_BYTES
                         ) -> dict[str, Any]:
    """The donor's snapshot; `PeerError` if it is unreachable or sends something malformed."""
    parts, total = [], 0
    async for chunk in peer.call_stream(donor, STATE_HANDLER, b"", timeout_s=timeout_s,
                                        max_chunk_bytes=CHUNK_BYTES):
        total += len(chunk)
        if total > max_bytes:
            raise PeerError(f"{donor} sent a state larger than {max_bytes} bytes")
        parts.append(chunk)
    try:
        state = serialize.unpack(b"".join(parts), max_bytes=max_bytes)
    except WireError as e:
        raise PeerError(f"{donor} sent a malformed state: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise PeerError(f"{donor} sent a state without a step")
    return state
