"""What the federated roles and MPC parties count, for Prometheus (`fl coordinate`, `fl join`,
`mpc-party` with `--metrics-port`), in prometheus_client's process-wide registry.

The coordinator, the participant and the party count where things happen (rounds, round times,
dropped clients, bytes of the records they write and read; MPC sessions, steps, tokens, rounds of
communication and bytes); exposing the registry over HTTP is the command's business (cli.py), so
nothing here opens a socket. Counters are process-wide: roles in one process add up.
"""

from __future__ import annotations

import math

from prometheus_client import Counter, Gauge, Histogram

ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# ---- the coordinator ------------------------------------------------------------------------------
FL_ROUNDS = Counter("swarmlm_fl_rounds", "federated rounds completed by this coordinator")
FL_ROUND_FAILURES = Counter("swarmlm_fl_round_failures", "round attempts that failed (too few clients left)")
FL_ROUND_SECONDS = Histogram("swarmlm_fl_round_seconds", "completed rounds, by duration", buckets=ROUND_BUCKETS)
FL_CLIENTS = Gauge("swarmlm_fl_clients_connected", "clients connected to this coordinator now")
FL_ROUND_CLIENTS = Gauge("swarmlm_fl_round_clients", "clients whose update counted in the last round")
FL_DROPPED = Counter("swarmlm_fl_dropped_clients", "sampled clients that dropped out of a round")
FL_SENT = Counter("swarmlm_fl_sent_bytes", "bytes of the records the coordinator wrote to clients")
FL_RECEIVED = Counter("swarmlm_fl_received_bytes", "bytes of the records the coordinator read from clients")
FL_LOSS = Gauge("swarmlm_fl_train_loss", "the last round's mean training loss (NaN until known)")
FL_EPSILON = Gauge("swarmlm_fl_epsilon", "the run's DP guarantee so far (NaN without DP)")

# ---- a client (fl join) ---------------------------------------------------------------------------
FL_CLIENT_ROUNDS = Counter("swarmlm_fl_client_rounds", "rounds this client contributed to")
FL_CLIENT_ROUND_SECONDS = Histogram("swarmlm_fl_client_round_seconds", "this client's rounds, by duration",
                                    buckets=ROUND_BUCKETS)
FL_CLIENT_SENT = Counter("swarmlm_fl_client_sent_bytes", "bytes of the records this client wrote")
FL_CLIENT_RECEIVED = Counter("swarmlm_fl_client_received_bytes", "bytes of the records this client read")
FL_CLIENT_LOSS = Gauge("swarmlm_fl_client_train_loss", "this client's last local training loss")

# ---- an MPC party ---------------------------------------------------------------------------------
MPC_SESSIONS = Counter("swarmlm_mpc_sessions", "private inference sessions this party took part in")
MPC_SESSIONS_OPEN = Gauge("swarmlm_mpc_sessions_open", "private inference sessions open now")
MPC_SESSION_FAILURES = Counter("swarmlm_mpc_session_failures", "sessions that ended with an error")
MPC_STEPS = Counter("swarmlm_mpc_steps", "forward steps computed on shares")
MPC_TOKENS = Counter("swarmlm_mpc_tokens", "token positions of those steps")
MPC_ROUNDS = Counter("swarmlm_mpc_rounds", "rounds of communication with the other parties")
MPC_SENT = Counter("swarmlm_mpc_sent_bytes", "bytes sent to the other parties")
MPC_RECEIVED = Counter("swarmlm_mpc_received_bytes", "bytes received from the other parties")
MPC_STEP_SECONDS = Histogram("swarmlm_mpc_step_seconds", "forward steps on shares, by duration",
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


def round_done(record: dict) -> None:
    """A completed round as the coordinator writes it to rounds.jsonl."""
    FL_ROUNDS.inc()
    FL_ROUND_SECONDS.observe(record["seconds"])
    FL_ROUND_CLIENTS.set(record["clients"])
    FL_DROPPED.inc(record["dropped"])
    loss = record.get("train_loss", math.nan)
    FL_LOSS.set(loss if isinstance(loss, float) and math.isfinite(loss) else math.nan)
    eps = record.get("epsilon")
    FL_EPSILON.set(eps if isinstance(eps, float) and math.isfinite(eps) else math.nan)
