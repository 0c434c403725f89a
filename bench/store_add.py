"""`store add` of a large file against raw hashlib.sha256 over the same bytes.

    python bench/store_add.py [--mib 256] [--repeats 3] [--dir DIR]

Writes a file of random bytes in a temporary directory (or --dir, to pick the disk), then
measures, in one run and over the same bytes:
  - sha256_memory: hashlib.sha256 over the bytes already in memory (the ceiling);
  - sha256_file:   reading the file and hashing it;
  - add_hash_only: add_file with a store that keeps nothing (chunking, CIDs, tree);
  - write_only:    the same 256 KiB pieces written to as many files in 1024 shard directories
                   (temp file + rename), no hashing: what a file per block would cost;
  - add:           add_file into a fresh on-disk BlockStore (blocks appended to a pack file
                   by the hashing threads, its index renamed into place at the end).
Prints one JSON line per result (medians, MB/s), then add / sha256_memory (target >= 0.6)
and add / write_only. On a machine whose two cores are both busy, the hashing threads cannot
overlap the reading and writing, and the ratio falls with the free CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from swarmlm.store.blockstore import BlockStore  # noqa: E402
from swarmlm.store.dag import add_file  # noqa: E402

PIECE = 16 << 20
CHUNK = 256 << 10


class HashOnly:
    def put(self, block, cid=None, *, check=True):
        return cid


def emit(name: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit, **extra}), flush=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to put the file and the store (default: a temp dir)")
    args = ap.parse_args()
    n_bytes = args.mib << 20
    work = Path(tempfile.mkdtemp(prefix="bench-store-add-", dir=args.dir))
    try:
        src = work / "input.bin"
        data = os.urandom(n_bytes)
        src.write_bytes(data)
        view = memoryview(data)

        def sha_memory():
            h = hashlib.sha256()
            for i in range(0, n_bytes, PIECE):
                h.update(view[i:i + PIECE])

        def sha_file():
            h = hashlib.sha256()
            with open(src, "rb", buffering=0) as f:
                while piece := f.read(PIECE):
                    h.update(piece)

        def write_only():
            out = work / "plain"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            start = time.perf_counter()
            made = set()
            for n, i in enumerate(range(0, n_bytes, CHUNK)):
                shard = f"{out}/{n % 1024:04d}"
                if shard not in made:
                    os.mkdir(shard)
                    made.add(shard)
                fd = os.open(f"{shard}/{n}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, view[i:i + CHUNK])
                os.close(fd)
                os.replace(f"{shard}/{n}.tmp", f"{shard}/{n}")
            results["write_only"].append(time.perf_counter() - start)

        def add_disk():
            shutil.rmtree(work / "blocks", ignore_errors=True)
            t = timed(lambda: add_file(BlockStore(work / "blocks"), src))
            results["add"].append(t)

        results: dict[str, list[float]] = {"sha256_memory": [], "sha256_file": [], "add_hash_only": [], "write_only": [],
                                        "add": []}
        for _ in range(args.repeats):                 # interleaved, so load changes hit every side alike
            results["sha256_memory"].append(timed(sha_memory))
            results["sha256_file"].append(timed(sha_file))
            results["add_hash_only"].append(timed(lambda: add_file(HashOnly(), src)))
            write_only()
            add_disk()
        speeds = {k: n_bytes / statistics.median(v) / 1e6 for k, v in results.items()}
        for name, mb_s in speeds.items():
            emit(f"store_add.{name}", mb_s, "MB/s", mib=args.mib, repeats=args.repeats)
        emit("store_add.ratio_add_vs_sha256", speeds["add"] / speeds["sha256_memory"], "ratio", target=0.6)
        emit("store_add.ratio_add_vs_sha256_file", speeds["add"] / speeds["sha256_file"], "ratio")
        emit("store_add.ratio_add_vs_write_only", speeds["add"] / speeds["write_only"], "ratio")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
