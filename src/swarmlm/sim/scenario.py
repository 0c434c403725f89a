"""A simulated swarm, as a TOML file: the model, the network, the servers, the clients, training.

    scenario = load_scenario("scenarios/loopback-2-servers.toml")   # UserError naming the bad field

Every quantity that varies between peers is a `Dist`: a plain number (the same for all), or a
table `{dist = "uniform", low = 1, high = 2}` / `"lognormal"` (median, sigma) / `"normal"` (mean,
sd, clipped at min) / `"exponential"` (mean) / `"choice"` (values, weights). Frozen dataclasses,
one comment a field; see scenarios/*.toml for complete files.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmlm.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:                   # Python 3.10
    import tomli as tomllib

DISTS = ("constant", "uniform", "lognormal", "normal", "exponential", "choice")
PLACEMENTS = ("fixed", "choose", "random")     # fixed spans; swarmlm's choose_span; uniformly random starts


@dataclass(frozen=True)
class Dist:
    kind: str = "constant"
    a: float = 0.0                 # constant: value; uniform: low; lognormal: median; normal: mean; exponential: mean
    b: float = 0.0                 # uniform: high; lognormal: sigma; normal: sd
    minimum: float = 0.0           # samples below this are raised to it
    values: tuple[float, ...] = ()     # choice
    weights: tuple[float, ...] = ()

    def sample(self, rng: random.Random) -> float:
        if self.kind == "constant":
            x = self.a
        elif self.kind == "uniform":
            x = rng.uniform(self.a, self.b)
        elif self.kind == "lognormal":
            x = self.a * math.exp(rng.gauss(0.0, self.b))
        elif self.kind == "normal":
            x = rng.gauss(self.a, self.b)
        elif self.kind == "exponential":
            x = rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        else:
            x = rng.choices(self.values, weights=self.weights or None)[0]
        return max(x, self.minimum)

    @property
    def typical(self) -> float:
        """A representative value (the median or mean), for reports."""
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        if self.kind == "choice":
            w = self.weights or (1.0,) * len(self.values)
            return sum(v * x for v, x in zip(self.values, w)) / sum(w)
        return self.a


def const(x: float) -> Dist:
    return Dist("constant", float(x))


@dataclass(frozen=True)
class ModelSpec:
    n_layers: int = 4                  # Transformer blocks
    hidden_bytes: int = 256            # bytes of one token's hidden state on the wire (dim x dtype size)
    prompt_tokens: int = 8             # prompt of each generation
    new_tokens: int = 32               # tokens generated per generation


@dataclass(frozen=True)
class NetworkSpec:
    rtt_s: Dist = field(default_factory=lambda: const(0.001))          # each peer's round trip to the backbone;
                                                                       # a pair's RTT is the mean of both
    bandwidth_bytes_per_s: Dist = field(default_factory=lambda: const(1e9))   # each peer's link
    step_overhead_s: float = 0.0       # per request a server handles (decoding, encoding, the event loop)
    shared_host: bool = False          # every peer on one machine (loopback): each message a process handles is
                                       # on the token's critical path (half a round trip each: a chained step of n
                                       # hops handles 3n - 1 messages); else peers work in parallel


@dataclass(frozen=True)
class ChurnSpec:
    mean_uptime_s: float = 0.0         # exponential time a server stays; 0: never leaves on its own
    mean_downtime_s: float = 60.0      # exponential time before it comes back
    kills: tuple[tuple[float, int], ...] = ()   # scripted: (time s, server index) killed then, never back
    chain_kills: tuple[tuple[int, int], ...] = ()   # scripted: (tokens, block): once the first client's first
                                                    # generation has that many tokens, the server its chain uses
                                                    # for that block is killed (as the real checks kill one)


@dataclass(frozen=True)
class ServerSpec:
    count: int = 2
    placement: str = "fixed"           # one of PLACEMENTS
    spans: tuple[tuple[int, int], ...] = ()    # placement "fixed": server i holds spans[i % len(spans)]
    num_blocks: int = 2                # placement "choose"/"random": blocks per server
    block_tokens_per_s: Dist = field(default_factory=lambda: const(1000.0))   # decode speed of one block
    prefill_speedup: float = 1.0       # prompt tokens/s over decode tokens/s (batched matmuls)
    load_s_per_block: float = 1.0      # joining or moving: seconds to load one block
    cold_open_s: float = 0.0           # the first session opened on a server (its first channel); 0: as open_s
    served_before: bool = False        # every server has opened sessions and computed before the start: none
                                       # pays cold_open_s, warmup_s or cold_replay_factor
    warmup_s: float = 0.0              # extra seconds of a server's first computation (kernels, allocations)
    replay_factor: float = 1.0         # a replayed step's compute over a decoding step's (per token, prefill counted
                                       # as the prompt's): a replay runs each recorded step as its own chunk
    cold_replay_factor: float = 0.0    # the same into a server that has not computed yet (0: as replay_factor)
    join_over_s: float = 0.0           # servers join at uniform times in [0, join_over_s]
    rebalance_period_s: float = 0.0    # placement "choose": reconsider the span this often (0: never)
    churn: ChurnSpec = field(default_factory=ChurnSpec)


@dataclass(frozen=True)
class ClientSpec:
    count: int = 1
    token_overhead_s: float = 0.0      # the client's own work per token (embedding, head, sampling)
    think_s: Dist = field(default_factory=lambda: const(0.0))    # pause between generations
    start_over_s: float = 0.0          # clients start at uniform times in [0, start_over_s]
    routing_candidates: int = 3        # servers per block the client's routing considers (a DHT read's sample)
    control_rtt_s: float = 0.0         # extra round trip of a control RPC (link: over libp2p) beyond rtt_s
    open_s: float = 0.0                # opening a session on a server, if measured (0: two round trips + control)
    failure_detect_s: float = 0.0      # time to notice a dead server (a reset on loopback; a timeout elsewhere)
    recovery_timeout_s: float = 25.0   # as SessionOptions: a failover longer than this fails the generation
    max_replay_bytes: int = 12 << 20   # as SessionOptions: a replay is cut into requests of at most this


@dataclass(frozen=True)
class TrainingSpec:
    peers: int = 0                     # collaborative training peers (0: none)
    samples_per_s: Dist = field(default_factory=lambda: const(8.0))   # each peer's compute throughput
    micro_batch: int = 4
    target_batch: int = 0              # samples per global step (0: one micro-batch per peer)
    model_bytes: float = 1e8           # bytes averaged per round
    rtt_s: Dist = field(default_factory=lambda: const(0.001))
    bandwidth_bytes_per_s: Dist = field(default_factory=lambda: const(1e9))


@dataclass(frozen=True)
class Scenario:
    name: str = "scenario"
    description: str = ""
    duration_s: float = 60.0           # simulated time
    seed: int = 0
    sample_every_s: float = 1.0        # coverage timeline resolution
    model: ModelSpec = field(default_factory=ModelSpec)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    servers: ServerSpec = field(default_factory=ServerSpec)
    clients: ClientSpec = field(default_factory=ClientSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)

    def check(self) -> None:
        m, s, c = self.model, self.servers, self.clients
        _require(self.duration_s > 0, "duration_s must be positive")
        _require(self.sample_every_s > 0, "sample_every_s must be positive")
        _require(m.n_layers > 0 and m.hidden_bytes > 0, "model.n_layers and model.hidden_bytes must be positive")
        _require(m.prompt_tokens > 0 and m.new_tokens > 0, "model.prompt_tokens and model.new_tokens must be positive")
        _require(s.count >= 0 and c.count >= 0 and self.training.peers >= 0, "counts must not be negative")
        _require(s.placement in PLACEMENTS, f"servers.placement must be one of {', '.join(PLACEMENTS)}")
        if s.placement == "fixed":
            _require(bool(s.spans), "servers.placement = \"fixed\" needs servers.spans = [[start, end], ...]")
            for a, b in s.spans:
                _require(0 <= a < b <= m.n_layers, f"servers.spans: {a}:{b} is not inside 0:{m.n_layers}")
        else:
            _require(0 < s.num_blocks <= m.n_layers, f"servers.num_blocks must be in 1..{m.n_layers}")
        _require(s.prefill_speedup > 0, "servers.prefill_speedup must be positive")
        _require(c.routing_candidates > 0, "clients.routing_candidates must be positive")
        for t, i in s.churn.kills:
            _require(0 <= i < max(s.count, 1) and t >= 0, f"servers.churn.kills: no server {i} at {t} s")
        for n, b in s.churn.chain_kills:
            _require(0 <= b < m.n_layers and 0 < n < m.new_tokens and c.count > 0,
                     f"servers.churn.chain_kills: [{n}, {b}] needs a client, 0 < tokens < new_tokens, a block")
        for a, b in s.spans:
            _require(isinstance(a, int) and isinstance(b, int), "servers.spans must be whole numbers")
        t = self.training
        _require(t.micro_batch > 0 and t.model_bytes > 0, "training.micro_batch and model_bytes must be positive")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"scenario: {message}")


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the scenario {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    scenario = parse_scenario(doc, where=str(path))
    scenario.check()
    return scenario


def parse_scenario(doc: dict, *, where: str = "scenario") -> Scenario:
    return _build(Scenario, doc, where)


def _build(cls: type, doc: Any, where: str) -> Any:
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(doc) - set(fields)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    kwargs = {}
    hints = {ModelSpec, NetworkSpec, ServerSpec, ClientSpec, TrainingSpec, ChurnSpec}
    for name, value in doc.items():
        default = _default(fields[name])
        here = f"{where}: {name}"
        if type(default) in hints:
            kwargs[name] = _build(type(default), value, here)
        elif isinstance(default, Dist):
            kwargs[name] = parse_dist(value, here)
        elif isinstance(default, tuple):
            kwargs[name] = _tuples(value, here)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise UserError(f"{here}: expected true or false")
            kwargs[name] = value
        elif not isinstance(default, (int, float, str)):
            raise UserError(f"{here}: unsupported field")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise UserError(f"{here}: expected a string")
            kwargs[name] = value
        elif isinstance(default, int) and not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{here}: expected an integer")
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{here}: expected a number")
        else:
            kwargs[name] = type(default)(value)
    return cls(**kwargs)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _tuples(value: Any, where: str) -> tuple:
    if not isinstance(value, list) or not all(isinstance(v, list) and len(v) == 2 for v in value):
        raise UserError(f"{where}: expected a list of pairs like [[0, 2], [2, 4]]")
    out = []
    for a, b in value:
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            raise UserError(f"{where}: expected numbers")
        out.append((a, int(b)) if isinstance(a, float) else (int(a), int(b)))
    return tuple(out)


def parse_dist(value: Any, where: str) -> Dist:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{where}: expected a number >= 0")
        return const(value)
    if not isinstance(value, dict) or value.get("dist") not in DISTS:
        raise UserError(f"{where}: expected a number or {{dist = \"{'|'.join(DISTS)}\", ...}}")
    kind = value["dist"]
    allowed = {"constant": {"value"}, "uniform": {"low", "high"}, "lognormal": {"median", "sigma"},
               "normal": {"mean", "sd"}, "exponential": {"mean"}, "choice": {"values", "weights"}}[kind]
    extra = set(value) - allowed - {"dist", "min"}
    if extra:
        raise UserError(f"{where}: {kind} takes {', '.join(sorted(allowed))} (and min), not {', '.join(sorted(extra))}")
    try:
        minimum = float(value.get("min", 0.0))
        if kind == "choice":
            values = tuple(float(v) for v in value["values"])
            weights = tuple(float(w) for w in value.get("weights", ()))
            if not values or (weights and len(weights) != len(values)) or any(v < 0 for v in values):
                raise ValueError("values must be a non-empty list of numbers >= 0, weights as many")
            return Dist("choice", values=values, weights=weights, minimum=minimum)
        names = sorted(allowed)
        args = {n: float(value[n]) for n in names}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: {kind}: {e}") from None
    if kind == "constant":
        return Dist("constant", args["value"], minimum=minimum)
    if kind == "uniform":
        if not args["low"] <= args["high"]:
            raise UserError(f"{where}: uniform needs low <= high")
        return Dist("uniform", args["low"], args["high"], minimum=minimum)
    if kind == "lognormal":
        return Dist("lognormal", args["median"], args["sigma"], minimum=minimum)
    if kind == "normal":
        return Dist("normal", args["mean"], args["sd"], minimum=minimum)
    return Dist("exponential", args["mean"], minimum=minimum)
