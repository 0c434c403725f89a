"""The demo's verdict and summary: what the run's records say, checked, printed and written down.

    Training.from_metrics(records)      steps, training loss first → last, validation loss
    Generation(...)                     the swarm's tokens beside local greedy decoding's
    problems(generation) -> [str]       what went wrong ([] when the tokens match and a failover happened)
    Part(name, lines, problems, record) one more part of the demo (ledger, federated round, private generation)
    report(swarm, model, training, generation, path, parts) -> exit code   prints the summary, writes summary.json

Pure apart from `report`'s printing and one file; knows nothing of processes, peers or models.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class Training:
    steps: int                    # optimizer steps trained (the last step record's step)
    first_loss: float             # training loss of the first step (mean over the trainer's micro-batches)
    last_loss: float              # training loss of the last step
    val_loss: float | None        # validation loss after the last step (None if not recorded)

    @classmethod
    def from_metrics(cls, records: list[dict]) -> Training:
        """From a swarm trainer's metrics.jsonl: one record per step, then one `"final": true`
        record holding the validation loss, which is not a step of its own."""
        steps = [r for r in records if not r.get("final")]
        if not steps:
            raise ValueError("metrics.jsonl holds no step records")
        final = next((r for r in reversed(records) if r.get("final")), {})
        return cls(int(steps[-1]["step"]), float(steps[0]["loss"]), float(steps[-1]["loss"]), final.get("val_loss"))


@dataclass(frozen=True)
class Generation:
    prompt_ids: list[int]
    swarm_tokens: list[int]       # generated through the servers, one of them killed on the way
    local_tokens: list[int]       # greedy decoding of the same weights in this process
    seconds: float                # generation time through the swarm
    recoveries: int               # failovers the client made
    killed: str                   # peer ID of the server killed mid-generation
    chained_steps: int            # steps the servers pushed straight to the next
    relinked: bool                # whether the chain was re-linked around the replacement


@dataclass(frozen=True)
class Part:
    """One more part of the demo beside training and generation (the ledger, a federated round,
    private generation): its summary lines, what it set out to show and did not, its record."""
    name: str                     # its key in summary.json
    lines: list[str]              # printed in the summary, as given
    problems: list[str]           # one line each; any fails the demo
    record: dict                  # written to summary.json under `name`


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where `a` and `b` differ (one ending counts), None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def problems(gen: Generation) -> list[str]:
    """What the demo set out to show and did not, one line each."""
    found = []
    i = first_difference(gen.swarm_tokens, gen.local_tokens)
    if i is not None:
        swarm = gen.swarm_tokens[i] if i < len(gen.swarm_tokens) else "nothing (ended)"
        local = gen.local_tokens[i] if i < len(gen.local_tokens) else "nothing (ended)"
        found.append(f"the swarm's tokens differ from local greedy decoding at token {i}: the swarm gave {swarm}, "
                     f"local decoding {local}")
    if gen.recoveries < 1:
        found.append("the client made no failover after the server was killed")
    return found


def report(*, swarm: str, model: str, n_params: int, training: Training, gen: Generation,
           path: Path | None, parts: list[Part] = (), out: TextIO | None = None) -> int:
    """Print the summary (and any problem); write it to `path` as JSON; the exit code: 0 if none."""
    found = problems(gen) + [p for part in parts for p in part.problems]
    val = f"{training.val_loss:.3f}" if training.val_loss is not None else "not recorded"
    same = "yes" if first_difference(gen.swarm_tokens, gen.local_tokens) is None else "NO"
    n = len(gen.swarm_tokens)
    lines = [
        "summary:",
        f"  peers       {swarm}",
        f"  model       {model}",
        f"  training    {training.steps} steps; training loss {training.first_loss:.3f} → {training.last_loss:.3f} "
        f"(first → last step); validation loss {val} (after the last step)",
        f"  generation  {n} tokens, {n / max(gen.seconds, 1e-9):.1f} tokens/s through the swarm",
        f"  the text    is from a tiny model ({n_params / 1e6:.2f}M parameters) trained for {training.steps} steps: "
        f"expect gibberish",
        f"  recoveries  {gen.recoveries} (killed {gen.killed[:16]}…); output identical to local greedy: {same}",
        f"  chained     {gen.chained_steps} of {n} steps (servers pushing straight to the next); "
        f"re-linked after the failover: {'yes' if gen.relinked else 'no'}",
        *(line for part in parts for line in part.lines),
        *(f"FAILED: {p}" for p in found),
    ]
    print("\n".join(lines), file=out or sys.stdout, flush=True)
    if path is not None:
        write_json(path, {"training": asdict(training), "generation": asdict(gen), "problems": found,
                          "n_params": n_params, **{part.name: part.record for part in parts}})
    return 1 if found else 0


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)
