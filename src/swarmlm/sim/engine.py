"""A discrete-event simulation of a swarm (one `heapq` of timed events), making swarmlm's own decisions.

    report = Simulation(scenario).run()       # plain data; report.py summarises it

What is simulated, and whose decision each step is (imported from the services, never copied):
- servers join (at once, or spread over `join_over_s`) with a span that is fixed, random, or
  `swarm.server.selection.choose_span` over the blocks' announced throughputs (joining and online
  servers, as `serve --num-blocks` reads them); while online they reconsider it every
  `rebalance_period_s` (jittered x0.5-1.5 as the real loop) with `selection.should_move`, and a
  move costs the load time of the new span; churn takes them away and brings them back;
- clients generate: `swarm.client.routing.choose_chain` picks the chain over a sample of the
  servers of each block (`routing_candidates` per block, as read from the DHT), sessions are
  opened back to front (a round trip each), the prompt goes through as one step, then one token
  per step, chained (each server pushes to the next). Each server runs one request at a time in
  arrival order (a FIFO reserved when the token is sent: exact for a lightly loaded swarm);
- a token that reaches a server that left fails over as the client's session does: the hop's
  span is re-routed with `choose_chain`, the dead server banned; sessions open on the
  replacement; the recorded steps are replayed in the requests `swarm.client.hops.replay_groups`
  cuts them into; the server before it is re-linked; the step goes on. No replacement within
  `recovery_timeout_s` fails the generation;
- training peers accumulate micro-batches and ask `collab.progress.is_time_to_average` (over a
  `SwarmView` of their `ProgressRecord`s) when to average; a round waits for
  `collab.progress.round_candidates` and costs an all-reduce of `model_bytes`.

Latency between two peers is the mean of their RTTs, halved one way, plus the bytes over the
slower link. Nothing here opens a socket or reads a clock: the only time is the event heap's.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from swarmlm.collab.progress import ProgressRecord, SwarmView, is_time_to_average, round_candidates
from swarmlm.errors import NotFoundError
from swarmlm.sim.scenario import Scenario
from swarmlm.swarm.client.hops import replay_groups
from swarmlm.swarm.client.routing import ServerInfo, choose_chain
from swarmlm.swarm.server.selection import choose_span, should_move

RETRY_ROUTE_S = 1.0          # a client that finds no chain looks again after this (SessionOptions.replacement_wait_s-like)
MAX_TIMELINE = 240           # coverage samples kept in a report (evenly thinned)


@dataclass
class Server:
    index: int
    peer_id: str
    speed: float                  # block tokens/s
    rtt: float
    bw: float
    start: int = 0
    end: int = 0
    state: str = "off"            # off, joining, online
    epoch: int = 0                # bumped when it leaves or moves: sessions opened before are gone
    free_at: float = 0.0          # FIFO: when its worker is next free
    sessions: int = 0
    killed: bool = False
    opened: bool = False          # a session was opened on it (its first costs cold_open_s)
    warm: bool = False            # it has computed once (its first computation costs warmup_s more)


@dataclass
class Hop:
    server: Server
    start: int
    end: int
    epoch: int


@dataclass
class Client:
    index: int
    rtt: float
    bw: float
    chain: list[Hop] = field(default_factory=list)
    banned: set[str] = field(default_factory=set)
    generated: int = 0            # tokens of the current generation
    requested_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    decode_tokens: int = 0        # over all generations: tokens after each first one ...
    decode_s: float = 0.0         # ... and the time they took (recoveries included)
    costs: list | None = None     # the chain's per-hop costs (Simulation._costs), for `costs_of`
    costs_of: list | None = None
    back: float = 0.0
    recovering: dict | None = None  # a failover under way: its start and phases, closed when the step's token is out


@dataclass
class TrainPeer:
    peer_id: str
    speed: float                  # samples/s
    rtt: float
    bw: float
    samples: int = 0
    ready: bool = False


@dataclass
class Results:
    ttft_s: list[float] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)       # noticing a lost server -> the step's token
    recovery_phases: list[dict[str, float]] = field(default_factory=list)   # per failover: open, replay, relink, step
    generations: int = 0
    failed_generations: int = 0
    route_failures: int = 0
    moves: int = 0
    joins: int = 0
    leaves: int = 0
    timeline: list[tuple[float, float, int, float]] = field(default_factory=list)   # t, covered, min servers, bottleneck
    rounds: list[float] = field(default_factory=list)
    global_steps: int = 0
    trained_samples: int = 0
    events: int = 0


class Simulation:
    def __init__(self, scenario: Scenario):
        scenario.check()
        self.sc = scenario
        self.rng = random.Random(scenario.seed)
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable, tuple]] = []
        self._seq = 0
        n = scenario.model.n_layers
        self.n_layers = n
        self.cover = [0] * n                      # online servers per block
        self.online_tps = [0.0] * n               # their summed throughput per block (routing's view)
        self.announced_tps = [0.0] * n            # joining + online (what a joining server reads)
        self.by_block: list[list[Server]] = [[] for _ in range(n)]
        net, srv = scenario.network, scenario.servers
        self.servers = [Server(i, f"s{i:05d}", srv.block_tokens_per_s.sample(self.rng), net.rtt_s.sample(self.rng),
                               net.bandwidth_bytes_per_s.sample(self.rng)) for i in range(srv.count)]
        for s in self.servers if srv.served_before else ():
            s.opened = s.warm = True
        self.clients = [Client(i, net.rtt_s.sample(self.rng), net.bandwidth_bytes_per_s.sample(self.rng))
                        for i in range(scenario.clients.count)]
        tr = scenario.training
        self.trainers = [TrainPeer(f"t{i:05d}", tr.samples_per_s.sample(self.rng), tr.rtt_s.sample(self.rng),
                                   tr.bandwidth_bytes_per_s.sample(self.rng)) for i in range(tr.peers)]
        self.train_step = 0
        self.round_running = False
        self.out = Results()

    # ---- the event loop -------------------------------------------------------------------------

    def at(self, t: float, fn: Callable, *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def run(self) -> Results:
        sc = self.sc
        for s in self.servers:
            self.at(self.rng.uniform(0, sc.servers.join_over_s) if sc.servers.join_over_s else 0.0, self.join, s)
        for t, i in sc.servers.churn.kills:
            self.at(t, self.kill, self.servers[i])
        self.chain_kills = dict(sc.servers.churn.chain_kills)     # tokens of client 0's first generation -> block
        for c in self.clients:
            self.at(self.rng.uniform(0, sc.clients.start_over_s) if sc.clients.start_over_s else 0.0, self.generate, c)
        for p in self.trainers:
            self.at(sc.training.micro_batch / p.speed, self.micro_batch_done, p)
        self.at(0.0, self.sample)
        end = sc.duration_s
        while self._heap and self._heap[0][0] <= end:
            self.now, _, fn, args = heapq.heappop(self._heap)
            self.out.events += 1
            fn(*args)
        self.now = end
        return self.out

    # ---- servers ----------------------------------------------------------------------------------

    def join(self, s: Server) -> None:
        if s.killed:
            return
        srv = self.sc.servers
        if srv.placement == "fixed":
            s.start, s.end = srv.spans[s.index % len(srv.spans)]
        elif srv.placement == "choose":
            span = choose_span(self.announced_tps, srv.num_blocks)          # swarm/server/selection.py
            s.start, s.end = span.start, span.stop
        else:
            s.start = self.rng.randrange(self.n_layers - srv.num_blocks + 1)
            s.end = s.start + srv.num_blocks
        self._announce(s, +1)
        s.state = "joining"
        self.out.joins += 1
        self.at(self.now + srv.load_s_per_block * (s.end - s.start), self.go_online, s, s.epoch)

    def go_online(self, s: Server, epoch: int) -> None:
        if s.state != "joining" or s.epoch != epoch:
            return
        s.state = "online"
        for b in range(s.start, s.end):
            self.cover[b] += 1
            self.online_tps[b] += s.speed
            self.by_block[b].append(s)
        churn = self.sc.servers.churn
        if churn.mean_uptime_s > 0:
            self.at(self.now + self.rng.expovariate(1 / churn.mean_uptime_s), self.leave, s, s.epoch, True)
        if self.sc.servers.rebalance_period_s > 0 and self.sc.servers.placement == "choose":
            self.at(self.now + self.sc.servers.rebalance_period_s * (0.5 + self.rng.random()), self.rebalance, s,
                    s.epoch)

    def _announce(self, s: Server, sign: int) -> None:
        for b in range(s.start, s.end):
            self.announced_tps[b] += sign * s.speed

    def _go_offline(self, s: Server) -> None:
        if s.state == "online":
            for b in range(s.start, s.end):
                self.cover[b] -= 1
                self.online_tps[b] -= s.speed
                self.by_block[b].remove(s)
        if s.state in ("online", "joining"):
            self._announce(s, -1)
        s.state = "off"
        s.epoch += 1
        s.sessions = 0

    def leave(self, s: Server, epoch: int, comes_back: bool) -> None:
        if s.epoch != epoch or s.state == "off":
            return
        self._go_offline(s)
        self.out.leaves += 1
        if comes_back and not s.killed:
            self.at(self.now + self.rng.expovariate(1 / self.sc.servers.churn.mean_downtime_s), self.join, s)

    def kill(self, s: Server) -> None:
        s.killed = True
        if s.state != "off":
            self._go_offline(s)
            self.out.leaves += 1

    def kill_in_chain(self, block: int) -> None:
        """Kill the server the first client's chain uses for `block` (none if it has no chain now)."""
        hop = next((h for h in self.clients[0].chain if h.start <= block < h.end), None)
        if hop is not None:
            self.kill(hop.server)

    def rebalance(self, s: Server, epoch: int) -> None:
        if s.state != "online" or s.epoch != epoch:
            return
        current = range(s.start, s.end)
        target = should_move(list(self.announced_tps), current, s.speed)      # swarm/server/selection.py
        if target is not None:
            self._go_offline(s)
            s.start, s.end = target.start, target.stop
            self._announce(s, +1)
            s.state = "joining"
            self.out.moves += 1
            self.at(self.now + self.sc.servers.load_s_per_block * len(target), self.go_online, s, s.epoch)
            return
        self.at(self.now + self.sc.servers.rebalance_period_s * (0.5 + self.rng.random()), self.rebalance, s, s.epoch)

    def sample(self) -> None:
        covered = sum(1 for n in self.cover if n) / self.n_layers
        self.out.timeline.append((self.now, covered, min(self.cover), min(self.online_tps)))
        self.at(self.now + self.sc.sample_every_s, self.sample)

    # ---- clients ----------------------------------------------------------------------------------

    def latency(self, rtt_a: float, bw_a: float, rtt_b: float, bw_b: float, n_bytes: float) -> float:
        return (rtt_a + rtt_b) / 4 + n_bytes / min(bw_a, bw_b)

    def route(self, c: Client, start: int, end: int) -> list[Hop]:
        """The client's chain for [start, end), by swarmlm's own routing over a sample of each block's servers."""
        k = self.sc.clients.routing_candidates
        seen: dict[str, Server] = {}
        for b in range(start, end):
            here = self.by_block[b]
            for s in (here if len(here) <= k else self.rng.sample(here, k)):
                seen[s.peer_id] = s
        for hop in c.chain:                       # the servers it already uses stay known
            if hop.server.state == "online" and hop.server.start < end and hop.server.end > start:
                seen.setdefault(hop.server.peer_id, hop.server)
        infos = [ServerInfo(s.peer_id, s.start, s.end, s.speed, sessions=s.sessions) for s in seen.values()]
        rtts = {s.peer_id: (s.rtt + c.rtt) / 2 for s in seen.values()}
        hops = choose_chain(infos, start, end, rtt_s=rtts, rng=self.rng, banned=c.banned)   # swarm/client/routing.py
        return [Hop(seen[h.peer_id], h.start, h.end, seen[h.peer_id].epoch) for h in hops]

    def open_cost(self, c: Client, hops: list[Hop]) -> float:
        """Sessions opened back to front, one control RPC each, then a steps channel to each (another
        round trip); each server counts the session."""
        control, measured, cold = self.sc.clients.control_rtt_s, self.sc.clients.open_s, self.sc.servers.cold_open_s
        total = 0.0
        for h in hops:
            s = h.server
            s.sessions += 1
            warm_cost = measured if measured > 0 else (s.rtt + c.rtt) + control
            total += cold if cold > 0 and not s.opened else warm_cost
            s.opened = True
        return total

    def close(self, c: Client) -> None:
        for h in c.chain:
            if h.epoch == h.server.epoch:
                h.server.sessions = max(0, h.server.sessions - 1)
        c.chain = []

    def generate(self, c: Client) -> None:
        """A new generation: route, open, the prompt's step; then tokens."""
        c.requested_at = self.now
        c.banned = set()
        c.generated = 0
        self._start(c)

    def _start(self, c: Client) -> None:
        try:
            c.chain = self.route(c, 0, self.n_layers)
        except NotFoundError:
            self.out.route_failures += 1
            self.at(self.now + RETRY_ROUTE_S, self._start, c)
            return
        t = self.now + self.open_cost(c, c.chain)
        self.step(c, t, 0, self.sc.model.prompt_tokens, prefill=True)

    def step(self, c: Client, t: float, first_hop: int, n_tokens: int, *, prefill: bool) -> None:
        """One step through the chain from hop `first_hop`, sent at `t`; schedules what follows."""
        if not prefill and first_hop == 0:
            return self._decode(c, t)
        model, srv, net = self.sc.model, self.sc.servers, self.sc.network
        n_bytes = n_tokens * model.hidden_bytes
        prev_rtt, prev_bw = c.rtt, c.bw
        for i in range(first_hop, len(c.chain)):
            hop = c.chain[i]
            s = hop.server
            arrive = t + self.latency(prev_rtt, prev_bw, s.rtt, s.bw, n_bytes)
            if net.shared_host and i > first_hop:
                arrive += (c.rtt + s.rtt) / 4     # on one machine: this hop also handled the client's request
            if s.state != "online" or s.epoch != hop.epoch:
                detected = arrive + self.sc.clients.failure_detect_s
                self.at(detected, self.recover, c, i, n_tokens, prefill, detected, detected)
                return
            speed = s.speed * (srv.prefill_speedup if prefill else 1.0)
            begin = max(arrive, s.free_at) + self._warm_up(s)
            s.free_at = begin + net.step_overhead_s + n_tokens * (hop.end - hop.start) / speed
            t, prev_rtt, prev_bw = s.free_at, s.rtt, s.bw
        done = t + self.latency(prev_rtt, prev_bw, c.rtt, c.bw, n_bytes) + self.sc.clients.token_overhead_s
        if net.shared_host:                       # ... and the client handled every other hop's reply
            done += sum((c.rtt + h.server.rtt) / 4 for h in c.chain[first_hop:-1])
        self.at(done, self.token_done, c, prefill)

    def _warm_up(self, s: Server) -> float:
        if s.warm:
            return 0.0
        s.warm = True
        return self.sc.servers.warmup_s

    def _costs(self, c: Client) -> list[tuple[Server, int, float, float]]:
        """Per hop of the chain for a one-token step: (server, epoch, latency to it, its service time);
        then the way back. Cached on the client until its chain changes."""
        if c.costs is None or c.costs_of is not c.chain:
            n_bytes, overhead = self.sc.model.hidden_bytes, self.sc.network.step_overhead_s
            shared = self.sc.network.shared_host
            costs, prev_rtt, prev_bw = [], c.rtt, c.bw
            for i, hop in enumerate(c.chain):
                s = hop.server
                # (no cost here for the client's request to this hop, unlike `step`'s: a decoding step's requests to
                # the later hops were sent ahead, while the one before computed: client/chained.py's `more`)
                leg = self.latency(prev_rtt, prev_bw, s.rtt, s.bw, n_bytes)
                costs.append((s, hop.epoch, leg, overhead + (hop.end - hop.start) / s.speed))
                prev_rtt, prev_bw = s.rtt, s.bw
            c.back = self.latency(prev_rtt, prev_bw, c.rtt, c.bw, n_bytes) + self.sc.clients.token_overhead_s
            if shared:
                c.back += sum((c.rtt + h.server.rtt) / 4 for h in c.chain[:-1])
            c.costs, c.costs_of = costs, c.chain
        return c.costs

    def _decode(self, c: Client, t: float) -> None:
        """A one-token step through the whole chain (the hot path: costs precomputed)."""
        for i, (s, epoch, leg, service) in enumerate(self._costs(c)):
            arrive = t + leg
            if s.epoch != epoch or s.state != "online":
                detected = arrive + self.sc.clients.failure_detect_s
                self.at(detected, self.recover, c, i, 1, False, detected, detected)
                return
            if not s.warm:
                service += self._warm_up(s)
            t = s.free_at = (arrive if arrive > s.free_at else s.free_at) + service
        self.at(t + c.back, self.token_done, c, False)

    def token_done(self, c: Client, prefill: bool) -> None:
        if c.recovering is not None:                  # the failed-over step is done: as the real check times it
            phases = c.recovering
            c.recovering = None
            phases["step"] = self.now - phases.pop("relinked_at")
            self.out.recovery_s.append(self.now - phases.pop("failed_at"))
            self.out.recovery_phases.append(phases)
        if prefill:
            c.first_token_at = self.now
            self.out.ttft_s.append(self.now - c.requested_at)
        c.generated += 1
        c.last_token_at = self.now
        if c.index == 0 and self.out.generations == 0 and c.generated in self.chain_kills:
            self.kill_in_chain(self.chain_kills.pop(c.generated))
        if c.generated >= self.sc.model.new_tokens:
            c.decode_tokens += c.generated - 1
            c.decode_s += self.now - c.first_token_at
            self.out.generations += 1
            self.close(c)
            self.at(self.now + self.sc.clients.think_s.sample(self.rng), self.generate, c)
            return
        self.step(c, self.now, 0, 1, prefill=False)

    def recover(self, c: Client, i: int, n_tokens: int, prefill: bool, failed_at: float, first_try: float) -> None:
        """Fail over hop i as the session does: ban it, re-route its span, open, replay, re-link, go on."""
        cl, model = self.sc.clients, self.sc.model
        lost = c.chain[i]
        c.banned.add(lost.server.peer_id)
        try:
            new = self.route(c, lost.start, lost.end)
        except NotFoundError:
            if self.now - first_try > cl.recovery_timeout_s:
                self.out.failed_generations += 1
                self.close(c)
                self.at(self.now + RETRY_ROUTE_S, self.generate, c)
            else:
                self.at(self.now + RETRY_ROUTE_S, self.recover, c, i, n_tokens, prefill, failed_at, first_try)
            return
        # opening: the replacement's session (its open RPC, its steps channel); where a server follows, it is
        # first told to take pushes from the replacement (a control RPC: `_expect_pusher`)
        t = self.now + self.open_cost(c, new)
        if i + 1 < len(c.chain):
            t += (c.chain[i + 1].server.rtt + c.rtt) / 2 + cl.control_rtt_s
        opened_at = t
        # the steps the lost hop had run so far: the prompt, then one token each (none during the prompt's own step)
        history = [] if prefill else [model.prompt_tokens] + [1] * (c.generated - 1)
        groups = replay_groups([n * model.hidden_bytes for n in history], cl.max_replay_bytes)   # swarm/client/hops.py
        speedup = self.sc.servers.prefill_speedup
        for hop in new:
            s = hop.server
            # a replay runs each recorded step as its own chunk (`StepRequest.chunks`): a one-token step costs a
            # decoding step's compute, the prompt a prefill's, times what a replayed step costs over one (measured:
            # the chunks' own work); more on a server that has not computed yet (lengths it never ran)
            factor = self.sc.servers.replay_factor
            if not s.warm and self.sc.servers.cold_replay_factor > 0:
                factor = self.sc.servers.cold_replay_factor
                s.warm = True                     # its first-computation cost is in the factor
            for group in groups:
                n = sum(history[j] for j in group)
                compute = sum(history[j] / (speedup if history[j] > 1 else 1.0) for j in group)
                arrive = t + self.latency(c.rtt, c.bw, s.rtt, s.bw, n * model.hidden_bytes)
                begin = max(arrive, s.free_at) + self._warm_up(s)
                s.free_at = begin + self.sc.network.step_overhead_s + factor * compute * (hop.end - hop.start) / s.speed
                t = s.free_at + self.latency(s.rtt, s.bw, c.rtt, c.bw, n * model.hidden_bytes)
        replayed_at = t
        # re-linking: the server before it is told to push into the replacement (a control RPC, in whose handler
        # that server dials the replacement's side channel: about what opening a session costs)
        if i > 0:
            t += (c.chain[i - 1].server.rtt + c.rtt) / 2 + (cl.open_s if cl.open_s > 0 else cl.control_rtt_s)
        c.chain = c.chain[:i] + new + c.chain[i + 1:]
        c.recovering = {"failed_at": failed_at, "open": opened_at - failed_at, "replay": replayed_at - opened_at,
                        "relink": t - replayed_at, "relinked_at": t}
        self.step(c, t, i, n_tokens, prefill=prefill)

    # ---- training ---------------------------------------------------------------------------------

    def micro_batch_done(self, p: TrainPeer) -> None:
        tr = self.sc.training
        p.samples += tr.micro_batch
        view = SwarmView({q.peer_id: ProgressRecord(step=self.train_step, samples=q.samples, samples_per_s=q.speed,
                                                    loss=math.nan, time=self.now) for q in self.trainers})
        if is_time_to_average(view, p.peer_id, step=self.train_step, my_samples=p.samples,        # collab/progress.py
                              target=tr.target_batch or None, micro_batch=tr.micro_batch):
            p.ready = True
            group = round_candidates(view, p.peer_id, self.train_step)                          # collab/progress.py
            if not self.round_running and all(q.ready for q in self.trainers if q.peer_id in group):
                self._start_round(group)
            return
        self.at(self.now + tr.micro_batch / p.speed, self.micro_batch_done, p)

    def _start_round(self, group: list[str]) -> None:
        tr = self.sc.training
        members = [q for q in self.trainers if q.peer_id in set(group)]
        n = len(members)
        slowest_bw = min(q.bw for q in members)
        worst_rtt = max(q.rtt for q in members)
        # each member sends and receives (n-1)/n of the model once for reduce-scatter and once for all-gather
        seconds = 2 * worst_rtt + 2 * tr.model_bytes * (n - 1) / max(n, 1) / slowest_bw
        self.round_running = True
        self.at(self.now + seconds, self._end_round, members, seconds)

    def _end_round(self, members: list[TrainPeer], seconds: float) -> None:
        self.round_running = False
        self.out.rounds.append(seconds)
        self.out.global_steps += 1
        self.out.trained_samples += sum(q.samples for q in members)
        self.train_step += 1
        for q in self.trainers:
            q.samples, q.ready = 0, False
            self.at(self.now + self.sc.training.micro_batch / q.speed, self.micro_batch_done, q)
