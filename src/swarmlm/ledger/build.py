"""Compiling the ledger contract: Vyper (pinned) in process, cached by the source's hash.

The build is reproducible: the same source and compiler version give the same bytecode (Vyper's
output carries no timestamps or paths; its CBOR metadata holds only the compiler version and
the code's lengths), so the cache key is (compiler version, sha256 of the source) and a cache
entry is checked against the source hash it was built from. The cache lives beside the user's
other swarmlm files (`$SWARMLM_HOME/ledger-build/`) and is written atomically. Knows nothing of
chains or keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from swarmlm.store import paths

VYPER_VERSION = "0.4.3"          # pinned in pyproject.toml; a different one is refused
CONTRACT = "Ledger.vy"
EVM_VERSION = "shanghai"         # anvil and py-evm both run it; no PUSH0-less nodes targeted


@dataclass(frozen=True)
class Artifact:
    abi: list                    # the contract's ABI, as web3 takes it
    bytecode: bytes              # deploy (init) code
    source_sha256: str           # of the .vy source it was built from


def contract_source(name: str = CONTRACT) -> str:
    return resources.files("swarmlm.ledger.contracts").joinpath(name).read_text()


def compile_source(source: str) -> Artifact:
    """Compile `source` now (about 0.5-1 s of CPU)."""
    import vyper
    if vyper.__version__.split("+")[0] != VYPER_VERSION:
        raise RuntimeError(f"the ledger contract is built with vyper {VYPER_VERSION}, found {vyper.__version__}")
    from vyper.compiler.settings import Settings
    out = vyper.compile_code(source, output_formats=["abi", "bytecode"],
                             settings=Settings(evm_version=EVM_VERSION))
    return Artifact(abi=out["abi"], bytecode=bytes.fromhex(out["bytecode"][2:]),
                    source_sha256=hashlib.sha256(source.encode()).hexdigest())


def _cache_dir() -> Path:
    return paths.data_dir() / "ledger-build"


@lru_cache(maxsize=4)
def load_artifact(name: str = CONTRACT) -> Artifact:
    """The compiled contract, from the cache when its source is unchanged, else compiled and cached."""
    source = contract_source(name)
    digest = hashlib.sha256(source.encode()).hexdigest()
    path = _cache_dir() / f"{Path(name).stem}-{VYPER_VERSION}-{digest[:16]}.json"
    try:
        cached = json.loads(path.read_text())
        if cached["source_sha256"] == digest:
            return Artifact(abi=cached["abi"], bytecode=bytes.fromhex(cached["bytecode"]), source_sha256=digest)
    except (OSError, ValueError, KeyError):
        pass
    art = compile_source(source)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump({"abi": art.abi, "bytecode": art.bytecode.hex(), "source_sha256": digest}, f)
        os.replace(tmp, path)
    except OSError:
        pass                     # a read-only home: compile each time
    return art
