"""How one party runs a protocol: rounds of messages, and the in-process three-party runtime.

A protocol is a generator run by every party on its own shares. Each `yield Round(...)` is
one communication round: the messages this party sends (to party j: a list of tensors) and
the ones it expects (from party j: a list of (shape, dtype)); the generator receives what
arrived. Every party yields the same number of rounds in the same order (a party with
nothing to say yields an empty part), so independent protocols can run side by side in
the same rounds: `parallel(a, b)` merges their rounds into one. `led(p, lead, make)` runs a
protocol with the parties relabeled (real party `lead` plays party 0), to spread the roles'
work. `run` drives a generator over a `Comm`, checking each received tensor's size and dtype
before the protocol sees it; a message is its tensors' bytes copied once into one buffer, which
a receiver in this process works on in place (bytes from the network are copied).

`LocalComm` joins three parties in one process (one thread each, queues between them): the
protocols' numbers, rounds and bytes are those of the networked parties, fast to test. The
threads share one machine's cores (and the interpreter's lock), so the wall time of a run is
about the three parties' work added up; `LocalParties.cpu_s` keeps each party's own CPU time,
what one party would spend on its own machine (without the network); `run_in_turn` steps the
three in one thread instead, which measures each one's work exactly.
Knows nothing of models or of the network.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Sequence

import numpy as np
import torch

from swarmlm.errors import PeerTimeout, WireError
from swarmlm.privacy.mpc.ring import Prg

N_PARTIES = 3
Spec = tuple[tuple[int, ...], torch.dtype]
Protocol = Generator["Round", dict[int, list[torch.Tensor]], Any]


@dataclass
class Round:
    send: dict[int, list[torch.Tensor]] = field(default_factory=dict)   # to party -> tensors
    recv: dict[int, list[Spec]] = field(default_factory=dict)           # from party -> expected (shape, dtype)


def parallel(*protocols: Protocol) -> Protocol:
    """Run protocols in lockstep: round k of each goes out in one round; returns their results in order."""
    results: list[Any] = [None] * len(protocols)
    active: dict[int, Round] = {}
    for k, p in enumerate(protocols):
        try:
            active[k] = next(p)
        except StopIteration as stop:
            results[k] = stop.value
    while active:
        merged = Round()
        for rnd in active.values():
            for to, ts in rnd.send.items():
                merged.send.setdefault(to, []).extend(ts)
            for fr, specs in rnd.recv.items():
                merged.recv.setdefault(fr, []).extend(specs)
        got = yield merged
        offsets = {fr: 0 for fr in got}
        nxt: dict[int, Round] = {}
        for k, rnd in active.items():
            mine = {}
            for fr, specs in rnd.recv.items():
                mine[fr] = got[fr][offsets[fr]:offsets[fr] + len(specs)]
                offsets[fr] += len(specs)
            try:
                nxt[k] = protocols[k].send(mine)
            except StopIteration as stop:
                results[k] = stop.value
        active = nxt
    return results


class _Relabeled:
    """A party seen under relabeled indices: real party i plays party (i - lead) mod 3 (see `led`)."""

    def __init__(self, p: "Party", lead: int):
        self._p, self._lead = p, lead
        self.index = (p.index - lead) % N_PARTIES
        self.next = (self.index + 1) % N_PARTIES
        self.prev = (self.index - 1) % N_PARTIES
        self.by_tag = p.by_tag

    def real(self, role: int) -> int:
        return (role + self._lead) % N_PARTIES

    def prg(self, other: int, label: str) -> Prg:
        return self._p.prg(self.real(other), label)


def led(p: "Party", lead: int, make: Callable[[Any], Protocol]) -> Protocol:
    """make(party) with the parties relabeled so that real party `lead` plays party 0 (and lead + 1
    party 1). The protocols give party 0 (the comparisons' tables, the bits' senders) and the
    truncations' openers more work than party 1, so a caller spreads that work over the three
    machines by running its steps under different leads. Real party i's replicated share
    (x_i, x_{i+1}) is role r = i - lead's share (y_r, y_{r+1}) with y_j = x_{j + lead}: a valid sharing
    of the same value, so inputs and results need no conversion, and the messages, rounds, bytes
    and security are the unrelabeled protocol's (the roles are symmetric). Every protocol inside
    `make` must be built on the party it is given."""
    if lead % N_PARTIES == 0:
        return (yield from make(p))
    q = _Relabeled(p, lead)
    protocol = make(q)
    got: dict[int, list[torch.Tensor]] | None = None
    while True:
        try:
            rnd = next(protocol) if got is None else protocol.send(got)
        except StopIteration as stop:
            return stop.value
        real = yield Round(send={q.real(r): ts for r, ts in rnd.send.items()},
                           recv={q.real(r): specs for r, specs in rnd.recv.items()})
        got = {(fr - lead) % N_PARTIES: ts for fr, ts in real.items()}


def tagged(p: "Party", name: str, protocol: Protocol) -> Protocol:
    """`protocol`, with the rounds it takes part in and the bytes it sends counted under `name`
    in `p.by_tag` (for the bench's breakdown; rounds shared with a parallel protocol count for both)."""
    try:
        rnd = next(protocol)
    except StopIteration as stop:
        return stop.value
    while True:
        row = p.by_tag.setdefault(name, [0, 0])
        row[0] += 1
        row[1] += sum(spec_bytes((tuple(t.shape), t.dtype)) for ts in rnd.send.values() for t in ts)
        got = yield rnd
        try:
            rnd = protocol.send(got)
        except StopIteration as stop:
            return stop.value


# ---- encoding of one message: the tensors' raw bytes; shapes and dtypes are the receiver's to know --

_WIDTHS = {torch.int64: (np.int64, 8), torch.int32: (np.int32, 4), torch.int16: (np.int16, 2), torch.int8: (np.int8, 1)}


def encode_message(tensors: Sequence[torch.Tensor]) -> bytearray:
    """The tensors' raw bytes, in C order (strided views too), copied once into one buffer."""
    arrays = []
    for t in tensors:
        if t.dtype == torch.bool:
            arrays.append(np.packbits(t.contiguous().numpy().reshape(-1)))
        elif t.dtype in _WIDTHS:
            arrays.append(t.numpy())
        else:
            raise WireError(f"shares travel as int64, int32, int16, int8 or bool, not {t.dtype}")
    out = bytearray(sum(a.nbytes for a in arrays))
    pos = 0
    for a in arrays:
        np.frombuffer(out, dtype=a.dtype, count=a.size, offset=pos).reshape(a.shape)[...] = a
        pos += a.nbytes
    return out


def encode_round(send: dict[int, list[torch.Tensor]]) -> dict[int, bytearray]:
    """Each destination's message; the same tensors to two parties (a truncation's opening) are
    encoded once and copied (a receiver may work on its buffer in place)."""
    out: dict[int, bytearray] = {}
    done: dict[tuple[int, ...], bytearray] = {}
    for to, tensors in send.items():
        key = tuple(id(t) for t in tensors)
        out[to] = bytearray(done[key]) if key in done else encode_message(tensors)
        done.setdefault(key, out[to])
    return out


def spec_bytes(spec: Spec) -> int:
    shape, dtype = spec
    n = math.prod(shape)
    return (n + 7) // 8 if dtype == torch.bool else _WIDTHS[dtype][1] * n


def decode_message(data: bytes, specs: Sequence[Spec]) -> list[torch.Tensor]:
    """Bytes -> tensors of exactly the expected shapes and dtypes, or WireError."""
    want = sum(spec_bytes(s) for s in specs)
    if len(data) != want:
        raise WireError(f"a share message of {len(data)} bytes where {want} were expected")
    out, pos = [], 0
    for shape, dtype in specs:
        size = spec_bytes((shape, dtype))
        chunk = np.frombuffer(data, dtype=np.uint8, count=size, offset=pos)
        pos += size
        n = math.prod(shape)
        if dtype == torch.bool:
            arr = np.unpackbits(chunk, count=n).astype(np.bool_)
        else:                   # a writable buffer (this process's own messages) is used in place
            arr = chunk.view(_WIDTHS[dtype][0])
            arr = arr if arr.flags.writeable else arr.copy()
        out.append(torch.from_numpy(arr).view(*shape))
    return out


class Comm:
    """One party's links to the two others: whole messages, in order, per peer."""

    def send(self, to: int, data: bytes) -> None:
        raise NotImplementedError

    def recv(self, fr: int) -> bytes:
        raise NotImplementedError


class Party:
    """What a protocol knows of the party running it: its index, its links and its seeds.

    seeds[j] is the 32-byte seed shared with party j (j != index); the PRG streams drawn from
    it are the same on both sides as long as both run the same protocol.
    """

    def __init__(self, index: int, comm: Comm, seeds: dict[int, bytes]):
        self.index = index
        self.next = (index + 1) % N_PARTIES
        self.prev = (index - 1) % N_PARTIES
        self.comm = comm
        self._seeds = seeds
        self._prgs: dict[tuple[int, str], Prg] = {}
        self.rounds = 0
        self.bytes_sent = 0
        self.by_tag: dict[str, list[int]] = {}     # name -> [rounds, bytes sent] (runtime.tagged)

    def prg(self, other: int, label: str) -> Prg:
        """The stream shared with party `other` for `label`."""
        key = (other, label)
        if key not in self._prgs:
            self._prgs[key] = Prg(self._seeds[other], label)
        return self._prgs[key]

    def run(self, protocol: Protocol) -> Any:
        """Drive `protocol` to its end over this party's links; return its result."""
        try:
            rnd = next(protocol)
        except StopIteration as stop:
            return stop.value
        while True:
            for to, data in encode_round(rnd.send).items():
                self.bytes_sent += len(data)
                self.comm.send(to, data)
            got = {fr: decode_message(self.comm.recv(fr), specs) for fr, specs in rnd.recv.items()}
            self.rounds += 1
            try:
                rnd = protocol.send(got)
            except StopIteration as stop:
                return stop.value


# ---- three parties in one process --------------------------------------------------------

class LocalComm(Comm):
    def __init__(self, index: int, boxes: dict[tuple[int, int], "queue.Queue[bytes]"], timeout_s: float):
        self.index = index
        self.boxes = boxes
        self.timeout_s = timeout_s
        self.received: list[bytes] = []        # everything this party received, for tests of what it learns

    def send(self, to: int, data: bytes) -> None:
        self.boxes[(self.index, to)].put(data)

    def recv(self, fr: int) -> bytes:
        try:
            data = self.boxes[(fr, self.index)].get(timeout=self.timeout_s)
        except queue.Empty:
            raise PeerTimeout(f"party {fr} sent nothing for {self.timeout_s:.0f} s") from None
        self.received.append(bytes(data))          # a copy: the protocol may work on `data` in place
        return data


def make_seeds(rng: Callable[[int], bytes]) -> list[dict[int, bytes]]:
    """Pairwise seeds for three parties: seeds[i][j] == seeds[j][i]."""
    pair = {(i, j): rng(32) for i in range(N_PARTIES) for j in range(i + 1, N_PARTIES)}
    return [{j: pair[(min(i, j), max(i, j))] for j in range(N_PARTIES) if j != i} for i in range(N_PARTIES)]


class LocalParties:
    """Three parties in threads of this process; `run(make)` runs `make(party) -> protocol` on each."""

    def __init__(self, *, timeout_s: float = 30.0, seed_rng: Callable[[int], bytes] | None = None):
        import os
        boxes = {(i, j): queue.Queue() for i in range(N_PARTIES) for j in range(N_PARTIES) if i != j}
        seeds = make_seeds(seed_rng or os.urandom)
        self.comms = [LocalComm(i, boxes, timeout_s) for i in range(N_PARTIES)]
        self.parties = [Party(i, self.comms[i], seeds[i]) for i in range(N_PARTIES)]
        self.cpu_s = [0.0] * N_PARTIES         # each party's CPU time (its thread's) in the last run

    def run(self, make: Callable[[Party], Protocol]) -> list[Any]:
        results: list[Any] = [None] * N_PARTIES
        errors: list[BaseException] = []

        def work(i: int) -> None:
            start = time.thread_time()
            try:
                results[i] = self.parties[i].run(make(self.parties[i]))
            except BaseException as exc:   # handed to the caller below
                errors.append(exc)
            finally:
                self.cpu_s[i] = time.thread_time() - start

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(1, N_PARTIES)]
        for t in threads:
            t.start()
        work(0)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def run_in_turn(self, make: Callable[[Party], Protocol]) -> list[Any]:
        """`run`, with the three parties stepped in turn in this thread (no threads, no queues): the
        same messages, rounds, bytes and results; `cpu_s` gets each party's own work exactly (the
        CPU time of its steps, its messages' encoding and decoding included), free of the other
        two parties' competition for the cores."""
        gens = [make(p) for p in self.parties]
        cpu = [0.0] * N_PARTIES
        results: list[Any] = [None] * N_PARTIES
        rounds: list[Round | None] = [None] * N_PARTIES

        def step(i: int, got: dict[int, list[torch.Tensor]] | None) -> None:
            try:
                rounds[i] = next(gens[i]) if got is None else gens[i].send(got)
            except StopIteration as stop:
                rounds[i], results[i] = None, stop.value

        for i in range(N_PARTIES):
            start = time.thread_time()
            step(i, None)
            cpu[i] += time.thread_time() - start
        while any(r is not None for r in rounds):
            if not all(r is not None for r in rounds):
                raise WireError("the parties' protocols ended after different numbers of rounds")
            box: dict[tuple[int, int], bytes] = {}
            for i, rnd in enumerate(rounds):
                start = time.thread_time()
                for to, data in encode_round(rnd.send).items():
                    box[(i, to)] = data
                    self.parties[i].bytes_sent += len(data)
                cpu[i] += time.thread_time() - start
            for i, rnd in enumerate(list(rounds)):
                start = time.thread_time()
                got = {fr: decode_message(box.pop((fr, i), b""), specs) for fr, specs in rnd.recv.items()}
                self.parties[i].rounds += 1
                step(i, got)
                cpu[i] += time.thread_time() - start
        self.cpu_s = cpu
        return results

    @property
    def rounds(self) -> int:
        return max(p.rounds for p in self.parties)

    @property
    def bytes_sent(self) -> int:
        return sum(p.bytes_sent for p in self.parties)
