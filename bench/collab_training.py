"""Collaborative training throughput: samples/s of 2 peer processes training `tiny` together
(synchronous, and DiLoCo) against one plain `swarmlm train` process, and bytes sent per
sample for DiLoCo against synchronous averaging.

    python bench/collab_training.py [--steps 40] [--batch-size 8] [--seq-len 64] [--diloco 5]

Every process runs on one torch thread (OMP_NUM_THREADS=1), so two peers may use both cores
and one plain process one. Throughput is measured from each run's metrics.jsonl between its
first and last step (start-up, data preparation and joining excluded). Prints one JSON line
per result and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarmlm", "train", "--no-progress", *args]


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def plain(args, root: Path) -> float:
    out = root / "plain"
    t0 = time.perf_counter()
    subprocess.run(_cmd("--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len",
                        str(args.seq_len), "--out", str(out)), env=ENV, check=True, capture_output=True)
    rows = _rows(out)
    # plain metrics carry tokens_per_s per step; samples/s over the steady part
    rates = [r["tokens_per_s"] / args.seq_len for r in rows[2:]]
    print(f"# plain run took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return sorted(rates)[len(rates) // 2]


def swarm(args, root: Path, name: str, extra: list[str]) -> tuple[float, float]:
    """(samples/s of the swarm, bytes sent per sample summed over peers)."""
    common = ["--swarm", "--run-id", name, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--seq-len", str(args.seq_len), "--min-peers", "2", *extra]
    first = subprocess.Popen(_cmd(*common, "--out", str(root / f"{name}0")), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    maddr = first.stdout.readline().decode().strip()
    second = subprocess.Popen(_cmd(*common, "--out", str(root / f"{name}1"), "--initial-peers", maddr), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    outs = [p.communicate(timeout=1800)[0].decode() for p in (first, second)]
    rows = [r for r in _rows(root / f"{name}0") if not r.get("final")]
    a, b = rows[1], rows[-1]
    rate = (b["samples"] - a["samples"]) / (b["time"] - a["time"])
    sent = sum(float(re.search(r"([\d.]+) MB sent", o).group(1)) * 1e6 for o in outs)
    samples = _rows(root / f"{name}0")[-1]["samples"]
    return rate, sent / samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--diloco", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="swarmlm-bench-collab-") as tmp:
        root = Path(tmp)
        base = plain(args, root)
        sync_rate, sync_bytes = swarm(args, root, "sync", [])
        dl_rate, dl_bytes = swarm(args, root, "diloco", ["--diloco", str(args.diloco)])
    results = [
        ("plain_samples_per_s", base, "samples/s"),
        ("swarm2_sync_samples_per_s", sync_rate, "samples/s"),
        ("swarm2_diloco_samples_per_s", dl_rate, "samples/s"),
        ("swarm2_sync_vs_plain", sync_rate / base, "x"),
        ("swarm2_diloco_vs_plain", dl_rate / base, "x"),
        ("sync_bytes_sent_per_sample", sync_bytes, "B/sample"),
        ("diloco_bytes_sent_per_sample", dl_bytes, "B/sample"),
        ("diloco_bytes_per_sample_vs_sync", dl_bytes / sync_bytes, "x"),
    ]
    for name, value, unit in results:
        print(json.dumps({"name": f"collab_training_{name}", "value": round(value, 4), "unit": unit}), flush=True)


if __name__ == "__main__":
    main()
