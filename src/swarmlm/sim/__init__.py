"""sim: a discrete-event simulator of swarms of 1,000-10,000 peers, making swarmlm's own decisions.

    swarmlm simulate SCENARIO.toml [--measure MODEL_DIR] [--json]

scenario.py  the scenario file (TOML): model, network, servers, clients, training; distributions
engine.py    the simulation (heapq): span choice and rebalancing, routing, failover and replay,
             averaging rounds, each the service's own pure function
report.py    its results as one JSON object (`tokens_per_s`, `ttft_s`, `recovery_s`, coverage, training)
measure.py   `--measure MODEL_DIR`: this machine's compute per block, client work per token, loopback RTT
run.py       the command
Nothing here but measure.py touches a socket or a clock.
"""
