"""Where a decoding step's time goes: the swarm's critical path through two servers, segment by
segment, against the ideal two-server pipeline's (ideal_pipeline.py).

    python bench/swarm_step_trace.py [--preset small] [--prompt-len 32] [--new-tokens 64] [--rounds 6] [--detail]

swarm_inference.py's tokens/s ratio moves by 3-4% from run to run on a shared 2-core machine,
more than most single changes to the protocol are worth. This script times each step instead.
It copies `src/swarmlm` and `bench/ideal_pipeline.py` into a temporary directory and inserts a
clock reading at a few places of the hot path (`time.perf_counter_ns`, CLOCK_MONOTONIC, so the
processes' readings compare; one line per reading to a file per process). Then it runs the same
greedy generations through two servers (the fast lane, swarm/fast.py) and through the ideal
pipeline, rounds alternating, in a child process that imports the copy, as do the servers and
the pipeline's stages. The places, per one-token step:

    send        the client hands the new position to its session (swarm/client/model.py)
    c0, c1      a server starts and ends the span's compute (swarm/server/fast.py)
    got         the client has the last server's output back
    pc0, pc1    an ideal stage starts and ends the same compute; isend, igot: its client

Prints one JSON line per segment with the median over every step of every round, in µs, swarm
and ideal side by side (and the swarm's quartiles): the client to the first compute, the first
compute, the first compute's end to the second's start, the second compute, its end to the
client, the client's own work between steps (head, sampling, embedding), the whole step; then the
protocol's total (the step less the two computes and the client's work) for each. A place that
moved in the source stops the script with the file and the text it looked for.

`--detail` reads the clock inside each hop as well: where a record arrives (`rx`), is
decrypted (`opened`) and handled (`handled`), where one is sealed (`seal`) and written to the
socket (`tx0`, `tx1`), a server's push and reply leaving (`pushed`, `replied`) and a push
delivered (`deliver`), the client's replies taken (`reply0`, `reply1`) and its step done
(`stepped`), and an ideal stage's pipe write and read (`ptx0`, `ptx1`, `prx`). It prints, per
side, the median time from each reading to the next (whichever process took them) for the
transitions seen at least half as often as there are steps, in the order they occur (`times`:
how often it was seen, twice a step for a server's two writes). Each reading is a write of a
few µs, so the segments above grow a little. Its medians move by a few µs from run to run, the
whole step's by a few hundred: it is the way to tell whether a change to one hop's code saves
anything where it runs (a cold-cache microbenchmark's saving need not survive there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRACE_MODULE = '''"""Clock readings for bench/swarm_step_trace.py (in its temporary copy only)."""
import os
import time

_DIR = os.environ.get("SWARMLM_STEP_TRACE")
_fd = None


def mark(event):
    global _fd
    if _DIR is None:
        return
    if _fd is None:
        _fd = os.open(os.path.join(_DIR, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(_fd, f"{time.perf_counter_ns()} {event}\\n".encode())
'''

_IMPORT = "from swarmlm import _steptrace as _st\n"
# (file in the copy, text to find, line before it or None, line after it or None)
PLACES = [
    ("swarmlm/swarm/client/model.py", "h = await session.step(h, new_mask, more=not loop.last)\n",
     '_st.mark(f"send {h.shape[1]}")', '_st.mark("got")'),
    ("swarmlm/swarm/server/fast.py", "with _inference_mode(True):\n                out = run_span(",
     '_st.mark("c0")', None),
    ("swarmlm/swarm/server/fast.py", "if out is None:                     # run_span checked", '_st.mark("c1")', None),
    ("ideal_pipeline.py", "out = run_span(model, h, start, end, cache=cache)", '_st.mark(f"pc0 {T}")',
     '_st.mark(f"pc1 {T}")'),
    ("ideal_pipeline.py", "self._send.send_bytes(_HEADER.pack(T) + h.contiguous().numpy().tobytes())",
     '_st.mark(f"isend {T}")', None),
    ("ideal_pipeline.py", "msg = self._recv.recv_bytes()\n        return torch.frombuffer", None, '_st.mark("igot")'),
]
# --detail: readings inside the hops as well (each is a write of a few us, so the segments above grow a little)
DETAIL_PLACES = [
    ("swarmlm/p2p/channel/conn.py", "def buffer_updated(self, nbytes: int) -> None:\n", None, '    _st.mark("rx")'),
    ("swarmlm/p2p/channel/conn.py", "consumed = self._on_record is not None and self._on_record(plain)",
     '_st.mark("opened")', '_st.mark("handled")'),
    ("swarmlm/p2p/channel/conn.py", "self.write_raw(header + self._send.encrypt(", '_st.mark("seal")', None),
    ("swarmlm/p2p/channel/conn.py", "self._transport.write(data)\n        self.bytes_sent", '_st.mark("tx0")',
     '_st.mark("tx1")'),
    ("swarmlm/swarm/server/fast.py", "_write(conn, fast.record(fast.REPLY", '_st.mark("pushed")', None),
    ("swarmlm/swarm/server/fast.py", "metrics.count_step(B)\n", '_st.mark("replied")', None),
    ("swarmlm/swarm/server/fast.py", "session.inbox.deliver(position, hidden)", '_st.mark("deliver")', None),
    ("swarmlm/swarm/client/fast.py", "kind, flags, payload = await replies[i]\n", None, '_st.mark(f"reply{i}")'),
    ("swarmlm/swarm/client/fast.py", "self.steps += 1\n", '_st.mark("stepped")', None),
    ("ideal_pipeline.py", "outbox.send_bytes(_HEADER.pack(T) + out.numpy().tobytes())", '_st.mark("ptx0")',
     '_st.mark("ptx1")'),
    ("ideal_pipeline.py", "while not (msg := inbox.recv_bytes()).startswith(_STOP):", None, '    _st.mark("prx")'),
]


def _insert(path: Path, anchor: str, before: str | None, after: str | None) -> None:
    text = path.read_text()
    at = text.find(anchor)
    if at < 0 or text.find(anchor, at + 1) >= 0:
        sys.exit(f"swarm_step_trace: {path.name}: the text {anchor.splitlines()[0]!r} is "
                 f"{'missing' if at < 0 else 'there more than once'}; update PLACES")
    line_start = text.rfind("\n", 0, at) + 1
    indent = text[line_start:at]
    first_line_end = text.find("\n", at)
    if after is not None:
        text = text[:first_line_end + 1] + indent + after + "\n" + text[first_line_end + 1:]
    if before is not None:
        text = text[:line_start] + indent + before + "\n" + text[line_start:]
    if _IMPORT not in text:
        anchor_import = "from __future__ import annotations\n"
        if anchor_import not in text:
            sys.exit(f"swarm_step_trace: {path.name} has no {anchor_import.strip()!r} to import after")
        text = text.replace(anchor_import, anchor_import + _IMPORT, 1)
    path.write_text(text)


def make_copy(tmp: Path, detail: bool = False) -> tuple[Path, Path]:
    """The traced copies: (src directory, bench directory); `detail`: with DETAIL_PLACES too."""
    src, bench = tmp / "src", tmp / "bench"
    shutil.copytree(ROOT / "src" / "swarmlm", src / "swarmlm", ignore=shutil.ignore_patterns("__pycache__"))
    bench.mkdir()
    shutil.copy(ROOT / "bench" / "ideal_pipeline.py", bench / "ideal_pipeline.py")
    (src / "swarmlm" / "_steptrace.py").write_text(TRACE_MODULE)
    for name, anchor, before, after in PLACES + (DETAIL_PLACES if detail else []):
        _insert((bench if name == "ideal_pipeline.py" else src) / name, anchor, before, after)
    return src, bench


# ---- the runs (in the child process, on the copy) ------------------------------------------------

def drive(args: argparse.Namespace, log: Path) -> dict:
    import torch
    from ideal_pipeline import IdealPipeline, random_model, timed_stream

    from swarmlm.swarm.client.model import RemoteModel
    from swarmlm.swarm.server.serve import start_server_process

    torch.set_num_threads(1)
    env = {"OMP_NUM_THREADS": "1", "SWARMLM_STEP_TRACE": str(log), "PYTHONPATH": os.environ["PYTHONPATH"]}
    with tempfile.TemporaryDirectory() as tmp:
        cfg, ckpt, local, prompt = random_model(args.preset, Path(tmp), args.prompt_len)
        n = cfg.n_layers
        a = start_server_process(str(ckpt), blocks=(0, n // 2), data_dir=Path(tmp) / "a", env=env)
        servers = [a]
        try:
            b = start_server_process(str(ckpt), blocks=(n // 2, n), initial_peers=a.maddrs, data_dir=Path(tmp) / "b",
                                     env=env)
            servers.append(b)
            with RemoteModel.connect(str(ckpt), initial_peers=a.maddrs) as model, \
                    IdealPipeline(str(ckpt), n, threads=1) as ideal:
                new = args.new_tokens
                runs = {"swarm": lambda: timed_stream(model.stream_generate([prompt], max_new_tokens=new)),
                        "ideal": lambda: timed_stream(ideal.stream_generate(local, prompt, max_new_tokens=new))}
                for i in range(args.rounds + 1):              # the first round warms up
                    for name in (("swarm", "ideal") if i % 2 else ("ideal", "swarm")):
                        runs[name]()
                pids = {"client": os.getpid(), "a": a.proc.pid, "b": b.proc.pid,
                        "s0": ideal._procs[0].pid, "s1": ideal._procs[1].pid}
        finally:
            for s in servers:
                s.stop()
    return pids


# ---- the analysis --------------------------------------------------------------------------------

SEGMENTS = ["to_first_compute", "first_compute", "between_computes", "second_compute", "to_client",
            "client_between_steps", "step"]


def steps(events: list[tuple[int, str, str]], send: str, first: str, second: str, c0: str, c1: str,
          got: str) -> list[list[int]]:
    """Per one-token step, the times of (send, first c0, first c1, second c0, second c1, got, next send),
    from the merged (time, process, event) readings; steps that do not read so in order are skipped."""
    chain = [("client", send), (first, c0), (first, c1), (second, c0), (second, c1), ("client", got)]
    out, i = [], 0
    while i < len(events):
        if events[i][1:] != chain[0]:
            i += 1
            continue
        times, j = [events[i][0]], i + 1
        for want in chain[1:]:
            while j < len(events) and events[j][1:] != want and events[j][1:] != chain[0]:
                j += 1
            if j == len(events) or events[j][1:] != want:
                break
            times.append(events[j][0])
            j += 1
        if len(times) == len(chain):
            nxt = next((k for k in range(j, len(events)) if events[k][1:] == chain[0]), None)
            if nxt is not None:
                out.append(times + [events[nxt][0]])
        i = j if len(times) == len(chain) else i + 1
    return out


def segments(rows: list[list[int]]) -> dict[str, list[float]]:
    keys = SEGMENTS
    cols = {k: [] for k in keys}
    for r in rows:
        gaps = [(b - a) / 1000 for a, b in zip(r, r[1:])] + [(r[-1] - r[0]) / 1000]
        for k, v in zip(keys, gaps):
            cols[k].append(v)
    return cols


def read_events(log: Path, pids: dict[str, int]) -> list[tuple[int, str, str]]:
    who = {pid: name for name, pid in pids.items()}
    events = []
    for f in log.glob("*.log"):
        name = who.get(int(f.stem))
        if name is None:
            continue
        for line in f.read_text().splitlines():
            t, _, ev = line.partition(" ")
            parts = ev.split()
            if len(parts) == 2 and parts[1] != "1":       # a prompt's step (several positions)
                continue
            events.append((int(t), name, parts[0]))
    events.sort()
    return events


def report(events: list[tuple[int, str, str]]) -> None:
    swarm = segments(steps(events, "send", "a", "b", "c0", "c1", "got"))
    ideal = segments(steps(events, "isend", "s0", "s1", "pc0", "pc1", "igot"))
    if not swarm["step"] or not ideal["step"]:
        sys.exit("swarm_step_trace: no complete step was read (did the fast lane run?)")
    med = lambda xs: statistics.median(xs)                                    # noqa: E731
    for k in SEGMENTS:
        s = sorted(swarm[k])
        print(json.dumps({"name": f"step_trace.{k}", "swarm_us": round(med(s), 1),
                          "ideal_us": round(med(ideal[k]), 1),
                          "swarm_minus_ideal_us": round(med(s) - med(ideal[k]), 1),
                          "swarm_quartiles_us": [round(s[len(s) // 4], 1), round(s[3 * len(s) // 4], 1)],
                          "steps": [len(s), len(ideal[k])]}), flush=True)
    for name, cols in (("swarm", swarm), ("ideal", ideal)):
        proto = [st - c1 - c2 - cl for st, c1, c2, cl in zip(cols["step"], cols["first_compute"], cols["second_compute"],
                                                              cols["client_between_steps"])]
        print(json.dumps({"name": f"step_trace.{name}_protocol", "value": round(med(proto), 1), "unit": "us",
                          "of": "median of step - computes - client's work"}), flush=True)


def report_detail(events: list[tuple[int, str, str]]) -> None:
    """--detail: per one-token step (the client's send to its `got`), the median time from each reading
    to the next one in time order, whichever process took it, for the transitions at least half the
    steps have: swarm (client, a, b) and ideal (client, s0, s1) apart, in the order they occur."""
    for side, procs, send, got in (("swarm", {"client", "a", "b"}, "send", "got"),
                                   ("ideal", {"client", "s0", "s1"}, "isend", "igot")):
        runs, run = [], None
        for t, who, ev in events:
            if who not in procs:
                continue
            if who == "client" and ev == send:
                run = [(t, f"{who}:{ev}")]
            elif run is not None:
                run.append((t, f"{who}:{ev}"))
                if who == "client" and ev == got:
                    runs.append(run)
                    run = None
        gaps: dict[tuple[str, str], list[float]] = {}
        place: dict[tuple[str, str], list[int]] = {}
        for run in runs:
            for i, ((t0, a), (t1, b)) in enumerate(zip(run, run[1:])):
                gaps.setdefault((a, b), []).append((t1 - t0) / 1000)
                place.setdefault((a, b), []).append(i)
        common = [k for k, v in gaps.items() if len(v) >= len(runs) / 2]
        for a, b in sorted(common, key=lambda k: statistics.median(place[k])):
            v = sorted(gaps[(a, b)])
            print(json.dumps({"name": f"step_trace.detail.{side}", "from": a, "to": b,
                              "median_us": round(statistics.median(v), 1),
                              "quartiles_us": [round(v[len(v) // 4], 1), round(v[3 * len(v) // 4], 1)],
                              "times": len(v), "steps": len(runs)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--detail", action="store_true",
                        help="also read the clock inside each hop (record layer, handlers) and print every transition")
    parser.add_argument("--drive", metavar="LOG_DIR", help=argparse.SUPPRESS)    # the child's part
    args = parser.parse_args()
    if args.drive:
        print(json.dumps(drive(args, Path(args.drive))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, bench = make_copy(Path(tmp), detail=args.detail)
        log = Path(tmp) / "log"
        log.mkdir()
        env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{bench}", SWARMLM_STEP_TRACE=str(log),
                   OMP_NUM_THREADS="1")
        # run by path from `-c`, so the script's own folder (bench/, the real ideal_pipeline.py) is not first on sys.path
        run_me = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
        child = subprocess.run([sys.executable, "-c", run_me, __file__, *sys.argv[1:], "--drive", str(log)],
                               env=env, capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"swarm_step_trace: the runs failed:\n{child.stderr[-4000:]}")
        pids = json.loads(child.stdout.strip().splitlines()[-1])
        events = read_events(log, pids)
        report(events)
        if args.detail:
            report_detail(events)


if __name__ == "__main__":
    main()
