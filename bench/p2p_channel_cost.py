"""What encryption costs each of the side channel's three transfers: its AES-256-GCM records
against the same bytes sent in the clear, on the same kind of connection, between two processes
on loopback.

    python bench/p2p_channel_cost.py [--record-bytes 1048576 262144] [--total-mib 64] [--trials 9]
                                     [--step-bytes 2070] [--steps 2000]

- Decoding steps (swarm/): `--steps` round trips of a `--step-bytes` request answered by a reply of
  the same size (a one-token step of the `small` preset: 1 x 1 x 512 float32 plus its header),
  one at a time, as a client and a server trade them; the median round trip each way, and the
  ratio. This is latency, not bandwidth: per message, a record costs a seal and an open.
- Blocks (store/, 256 KiB records) and averaging parts (collab/, 1 MiB: a float32 part of
  MAX_PART_ELEMS values) in bulk: a receiver process listens; the sender connects and, per
  trial, sends `--total-mib` MiB as records of `--record-bytes`, two ways over the same
  p2p/channel `Connection` class:
`aead` with `write` / `read_record_into` (encrypted and authenticated, decrypted into the
receiver's buffer, as collab/side.py does) and `clear` with `write_raw` / `read_raw` into the
same buffer (no encryption, no tag). The receiver answers each trial with one byte; a trial's
time is from the first write to that answer. Trials of the two ways alternate. Also times the
cipher alone on one core (`encrypt_into` + `decrypt_into` of one record). Prints one JSON line
per result with the median, and the ratio aead / clear.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

KEY = bytes(range(32))
PEERS = ("sender", "receiver")


def _ciphers(*, sender: bool):
    from swarmlm.p2p.channel.conn import direction_keys
    to_receiver, to_sender = direction_keys(KEY, dialer=PEERS[0], listener=PEERS[1], purpose="bench")
    return (to_receiver, to_sender) if sender else (to_sender, to_receiver)


def _serve_one(port_q, serve, max_record_bytes: int) -> None:
    """Listen on 127.0.0.1 (the port goes to `port_q`), hand the first connection to `serve(conn)`,
    and return once it is done: the receiving process of either measurement."""
    from swarmlm.p2p.channel.conn import Connection

    async def main():
        loop = asyncio.get_running_loop()
        served = loop.create_future()

        async def run(conn: Connection) -> None:
            await serve(conn)
            served.set_result(None)

        def accepted() -> Connection:
            conn = Connection()
            send, recv = _ciphers(sender=False)
            conn.start(send, recv, peer_id=PEERS[0], purpose="bench", max_record_bytes=max_record_bytes)
            asyncio.ensure_future(run(conn))
            return conn
        server = await loop.create_server(accepted, "127.0.0.1", 0)
        port_q.put(server.sockets[0].getsockname()[1])
        await served
        server.close()
    asyncio.run(main())


def _receiver(port_q, record_bytes: int, n_records: int, n_trials: int) -> None:
    """Takes the bulk records, both ways, and answers each trial with one byte."""
    async def serve(conn) -> None:
        buf = bytearray(record_bytes)
        for _ in range(n_trials):
            for way in ("aead", "clear"):
                for _ in range(n_records):
                    if way == "aead":
                        await conn.read_record_into(buf)
                    else:
                        await conn.read_raw(record_bytes, memoryview(buf))
                conn.write_raw(b"!")
    _serve_one(port_q, serve, record_bytes)


async def _send(port: int, record_bytes: int, n_records: int, n_trials: int) -> dict[str, list[float]]:
    from swarmlm.p2p.channel.conn import Connection
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Connection, "127.0.0.1", port)
    send, recv = _ciphers(sender=True)
    conn.start(send, recv, peer_id=PEERS[1], purpose="bench", max_record_bytes=record_bytes)
    payload = memoryview(os.urandom(record_bytes))
    times: dict[str, list[float]] = {"aead": [], "clear": []}
    for _ in range(n_trials):
        for way in ("aead", "clear"):
            t0 = time.perf_counter()
            for _ in range(n_records):
                if way == "aead":
                    conn.write(payload)
                else:
                    conn.write_raw(payload)
                await conn.drain()
            await conn.read_raw(1)
            times[way].append(time.perf_counter() - t0)
    conn.close()
    return times


def _echo(port_q, step_bytes: int, n_steps: int, n_rounds: int) -> None:
    """The server of the step round trips: answers each request with a reply of the same size."""
    async def serve(conn) -> None:
        buf = bytearray(step_bytes)
        for way in ("aead", "clear") * n_rounds:
            for _ in range(n_steps):
                if way == "aead":
                    await conn.read_record_into(buf)
                    conn.write(buf)
                else:
                    await conn.read_raw(step_bytes, memoryview(buf))
                    conn.write_raw(buf)
    _serve_one(port_q, serve, step_bytes)


async def _steps(port: int, step_bytes: int, n_steps: int, n_rounds: int) -> dict[str, list[float]]:
    """Round-trip times, each way's median per round (rounds alternate the two ways)."""
    from swarmlm.p2p.channel.conn import Connection
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Connection, "127.0.0.1", port)
    send, recv = _ciphers(sender=True)
    conn.start(send, recv, peer_id=PEERS[1], purpose="bench", max_record_bytes=step_bytes)
    payload, buf = os.urandom(step_bytes), bytearray(step_bytes)
    medians: dict[str, list[float]] = {"aead": [], "clear": []}
    for _ in range(n_rounds):
        for way in ("aead", "clear"):
            times = []
            for _ in range(n_steps):
                t0 = time.perf_counter()
                if way == "aead":
                    conn.write(payload)
                    await conn.read_record_into(buf)
                else:
                    conn.write_raw(payload)
                    await conn.read_raw(step_bytes, memoryview(buf))
                times.append(time.perf_counter() - t0)
            medians[way].append(statistics.median(times))
    conn.close()
    return medians


def _step_round_trips(step_bytes: int, n_steps: int, n_rounds: int) -> None:
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    server = ctx.Process(target=_echo, args=(port_q, step_bytes, n_steps, n_rounds))
    server.start()
    try:
        medians = asyncio.run(_steps(port_q.get(timeout=60), step_bytes, n_steps, n_rounds))
    finally:
        server.join(60)
        if server.is_alive():
            server.kill()
    rtt = {way: statistics.median(ts[1:]) for way, ts in medians.items()}       # the first round warms up
    for way, t in rtt.items():
        print(json.dumps({"name": f"channel_{way}_step_round_trip", "value": round(t * 1e6, 1), "unit": "us",
                          "step_bytes": step_bytes}), flush=True)
    print(json.dumps({"name": "channel_aead_vs_clear_step_round_trip", "value": round(rtt["aead"] / rtt["clear"], 3),
                      "unit": "x (time encrypted / time in the clear)",
                      "extra_us": round((rtt["aead"] - rtt["clear"]) * 1e6, 1)}), flush=True)


def _cipher_alone(record_bytes: int, repeats: int = 50) -> float:
    """Seconds to encrypt and decrypt one record, median."""
    from swarmlm.p2p.channel.conn import TAG_BYTES
    send, _ = _ciphers(sender=True)
    data = os.urandom(record_bytes)
    sealed = bytearray(record_bytes + TAG_BYTES)
    plain = bytearray(record_bytes)
    nonce = bytes(12)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        send.encrypt_into(nonce, data, b"aad!", sealed)
        send.decrypt_into(nonce, sealed, b"aad!", plain)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record-bytes", type=int, nargs="+", default=[1 << 20, 1 << 18])
    ap.add_argument("--total-mib", type=int, default=64)
    ap.add_argument("--trials", type=int, default=9)
    ap.add_argument("--step-bytes", type=int, default=2070)
    ap.add_argument("--steps", type=int, default=2000, help="round trips per round (5 rounds, each way)")
    args = ap.parse_args()
    _step_round_trips(args.step_bytes, args.steps, 5)
    ctx = mp.get_context("spawn")
    for record_bytes in args.record_bytes:
        n_records = max(1, (args.total_mib << 20) // record_bytes)
        port_q = ctx.Queue()
        receiver = ctx.Process(target=_receiver, args=(port_q, record_bytes, n_records, args.trials + 1))
        receiver.start()
        try:
            times = asyncio.run(_send(port_q.get(timeout=60), record_bytes, n_records, args.trials + 1))
        finally:
            receiver.join(60)
            if receiver.is_alive():
                receiver.kill()
        size = f"{record_bytes >> 10}KiB"
        moved = n_records * record_bytes
        medians = {way: statistics.median(ts[1:]) for way, ts in times.items()}    # the first trial warms up
        for way, t in medians.items():
            print(json.dumps({"name": f"channel_{way}_{size}_records_GBps", "value": round(moved / t / 1e9, 3),
                              "unit": "GB/s"}), flush=True)
        print(json.dumps({"name": f"channel_aead_vs_clear_{size}_records", "value": round(medians["aead"] /
                          medians["clear"], 2), "unit": "x (time encrypted / time in the clear)"}), flush=True)
        cipher = _cipher_alone(record_bytes)
        print(json.dumps({"name": f"aesgcm_encrypt_decrypt_{size}_GBps", "value": round(record_bytes / cipher / 1e9, 3),
                          "unit": "GB/s (one core, both directions' work)"}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
