"""`swarmlm demo`: the main job, end to end on one machine.

- swarm.py: `run_demo` — a loopback swarm trains the tiny model on the Python standard
  library, publishes it by CID, serves it as a pipeline over three server processes and
  generates through them while one server is killed; then a summary.
- summary.py: `Training` (from metrics.jsonl), `Generation`, `problems`, `report` — the summary
  and the verdict (exit code 1 when the swarm's tokens differ from local greedy decoding), also
  written to summary.json.
- children.py: `start_peer_process` — the `swarmlm node` and `swarmlm train --swarm` children
  it starts (the command line is known here, not in p2p/).
"""

from swarmlm.demo.swarm import run_demo

__all__ = ["run_demo"]
