"""Models in the store: a manifest block names a checkpoint's files by CID, one file per block.

A manifest is one dag-json block (codec 0x0129, CIDv1), so IPFS tools can read it and its
links (`{"/": "<cid>"}`) lead to every file: pinning or fetching the manifest's DAG takes the
whole model along.

    {"format": "swarmlm-model/1", "name": "tiny", "config": {...config.json...},
     "tokenizer": FILE | null, "extra_files": {"tokenizer_config.json": FILE, ...},
     "embed": FILE, "head": FILE, "blocks": [FILE, ...]}          FILE = {"cid": {"/": "bafy..."},
                                                                           "size": bytes, "tensors": [names]}

Each tensor file is a safetensors file holding the raw HF tensors of one part: block i
(`h.{i}.` in GPT-2, `model.layers.{i}.` in Llama-likes), the embeddings, or the head (final
norm, `lm_head`). `publish_model` splits a checkpoint directory that way with safetensors'
own API; `materialize_model` writes back a directory `model/hf.py` loads, with only the
requested blocks. Knows nothing of the network beyond `fetch_model`, which asks the exchange.
"""

from __future__ import annotations

import io
import json
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from swarmlm.errors import UserError, WireError
from swarmlm.log import get_logger
from swarmlm.store.cid import DAG_JSON, Cid, CidError, verify
from swarmlm.store.dag import add_file, iter_file

logger = get_logger(__name__)

FORMAT = "swarmlm-model/1"
MAX_MANIFEST_BYTES = 16 << 20
MAX_BLOCKS = 4096
EXTRA_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
INDEX_FILE = "model.safetensors.index.json"

_BLOCK_RE = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")
_HEAD_RE = re.compile(r"(?:^|\.)(?:lm_head|ln_f|norm)\.")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class ManifestError(UserError, WireError):
    """Bytes that are not a well-formed model manifest, or a checkpoint that cannot become one."""


@dataclass(frozen=True)
class FileRef:
    cid: Cid                            # root of the file's UnixFS DAG
    size_bytes: int                     # the file's length
    tensors: tuple[str, ...] = ()       # HF tensor names inside (tensor files only)


@dataclass(frozen=True)
class ModelManifest:
    name: str                           # a label; the manifest CID is the model's identity
    config: dict = field(hash=False)    # config.json, as is
    tokenizer: FileRef | None           # tokenizer.json
    extra_files: dict = field(hash=False)   # other small files by name (tokenizer_config.json, ...)
    embed: FileRef                      # token (and position) embeddings
    head: FileRef                       # final norm and lm_head (absent when tied)
    blocks: tuple[FileRef, ...]         # one per transformer block, in order

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def select(self, blocks: range | None = None, *, with_embed: bool = True,
               with_head: bool = True) -> list[FileRef]:
        """The tensor files needed for `blocks` (all if None) and the ends asked for. A head
        tied to the embeddings brings the embedding file along."""
        span = self.check_span(blocks)
        tied = not any(name.startswith("lm_head.") or ".lm_head." in name for name in self.head.tensors)
        out = [self.blocks[i] for i in span]
        if with_embed or (with_head and tied):
            out.insert(0, self.embed)
        if with_head:
            out.append(self.head)
        return out

    def check_span(self, blocks: range | None) -> range:
        span = range(self.n_blocks) if blocks is None else blocks
        if span.step != 1 or not 0 <= span.start <= span.stop <= self.n_blocks:
            raise UserError(f"blocks {span.start}:{span.stop} are not within the model's 0:{self.n_blocks}")
        return span


# ---- encoding and parsing -----------------------------------------------------------------

def _ref_json(ref: FileRef) -> dict:
    return {"cid": {"/": ref.cid.encode()}, "size": ref.size_bytes, "tensors": list(ref.tensors)}


def build_manifest(m: ModelManifest) -> bytes:
    """The manifest block: dag-json, keys sorted, no whitespace (same model, same bytes)."""
    doc = {"format": FORMAT, "name": m.name, "config": m.config,
           "tokenizer": _ref_json(m.tokenizer) if m.tokenizer else None,
           "extra_files": {k: _ref_json(v) for k, v in sorted(m.extra_files.items())},
           "embed": _ref_json(m.embed), "head": _ref_json(m.head), "blocks": [_ref_json(b) for b in m.blocks]}
    data = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    parse_manifest(data)      # what we write must be what we accept
    return data


def _need(doc: dict, key: str, kind: type | tuple, where: str = "manifest") -> Any:
    if key not in doc:
        raise ManifestError(f"{where} lacks {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ManifestError(f"{where}.{key} has the wrong type ({type(value).__name__})")
    return value


def _parse_ref(value: Any, where: str) -> FileRef:
    if not isinstance(value, dict):
        raise ManifestError(f"{where} must be an object")
    unknown = set(value) - {"cid", "size", "tensors"}
    if unknown:
        raise ManifestError(f"{where} has unknown keys {sorted(unknown)}")
    link = _need(value, "cid", dict, where)
    if set(link) != {"/"} or not isinstance(link["/"], str):
        raise ManifestError(f"{where}.cid must be a link {{\"/\": \"<cid>\"}}")
    try:
        cid = Cid.parse(link["/"])
    except CidError as e:
        raise ManifestError(f"{where}.cid: {e}") from None
    size = _need(value, "size", int, where)
    if size < 0:
        raise ManifestError(f"{where}.size is negative")
    tensors = value.get("tensors", [])
    if not isinstance(tensors, list) or not all(isinstance(t, str) and t for t in tensors):
        raise ManifestError(f"{where}.tensors must be a list of names")
    return FileRef(cid, size, tuple(tensors))


def parse_manifest(data: bytes) -> ModelManifest:
    """Check and parse a manifest block; `ManifestError` (a UserError and a WireError) if malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError("a manifest is a dag-json block of at most 16 MiB")
    try:
        doc = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"manifest is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest must be a JSON object")
    if doc.get("format") != FORMAT:
        raise ManifestError(f"not a model manifest (format {doc.get('format')!r}, expected {FORMAT!r})")
    unknown = set(doc) - {"format", "name", "config", "tokenizer", "extra_files", "embed", "head", "blocks"}
    if unknown:
        raise ManifestError(f"manifest has unknown keys {sorted(unknown)}")
    name = _need(doc, "name", str)
    config = _need(doc, "config", dict)
    tokenizer = None if doc.get("tokenizer") is None else _parse_ref(doc["tokenizer"], "manifest.tokenizer")
    extra = _need(doc, "extra_files", dict)
    for fname in extra:
        if not _FILE_NAME_RE.match(fname) or fname in ("config.json", "tokenizer.json", "model.safetensors"):
            raise ManifestError(f"manifest.extra_files has a forbidden file name {fname!r}")
    extra_files = {k: _parse_ref(v, f"manifest.extra_files[{k!r}]") for k, v in extra.items()}
    blocks = _need(doc, "blocks", list)
    if len(blocks) > MAX_BLOCKS:
        raise ManifestError(f"manifest lists {len(blocks)} blocks, more than {MAX_BLOCKS}")
    return ModelManifest(name=name, config=config, tokenizer=tokenizer, extra_files=extra_files,
                         embed=_parse_ref(doc.get("embed"), "manifest.embed"),
                         head=_parse_ref(doc.get("head"), "manifest.head"),
                         blocks=tuple(_parse_ref(b, f"manifest.blocks[{i}]") for i, b in enumerate(blocks)))


def read_manifest(source: Any, cid: Cid) -> ModelManifest:
    """Get a manifest block by CID from a store or a get_block function, verified and parsed."""
    if cid.codec != DAG_JSON:
        raise ManifestError(f"{cid} is not a manifest (codec 0x{cid.codec:x}, expected dag-json)")
    get = source.get if callable(getattr(source, "get", None)) else source
    data = get(cid)
    verify(cid, data)
    return parse_manifest(data)


# ---- publishing a checkpoint directory ----------------------------------------------------

def part_of(tensor_name: str) -> str | int:
    """Which file a raw HF tensor goes to: its block index, "head" or "embed"."""
    m = _BLOCK_RE.search(tensor_name)
    if m:
        return int(m.group(1))
    return "head" if _HEAD_RE.search(tensor_name) else "embed"


def _weight_files(directory: Path) -> dict[str, str]:
    """HF tensor name -> safetensors file name, from the index or the single file."""
    from safetensors import safe_open
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, AssertionError):
            raise ManifestError(f"{index} has no usable weight_map") from None
        return dict(weight_map)
    single = directory / "model.safetensors"
    if not single.is_file():
        raise ManifestError(f"{directory} has no model.safetensors or {INDEX_FILE}")
    with safe_open(str(single), framework="pt") as handle:
        return {name: single.name for name in handle.keys()}


def publish_model(store: Any, model_dir: str | os.PathLike, *, name: str | None = None,
                  pin: bool = True) -> Cid:
    """Add a HF checkpoint directory to `store` as per-block safetensors files plus a manifest;
    returns the manifest's CID (pinned unless pin=False). Holds one block's tensors at a time."""
    from safetensors import safe_open
    from safetensors.torch import save as save_tensors

    directory = Path(model_dir)
    if not (directory / "config.json").is_file():
        raise ManifestError(f"{directory} is not a checkpoint directory (no config.json)")
    try:
        config = json.loads((directory / "config.json").read_text())
    except ValueError as e:
        raise ManifestError(f"{directory / 'config.json'} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise ManifestError(f"{directory / 'config.json'} must hold a JSON object")
    weight_files = _weight_files(directory)
    parts: dict[str | int, list[str]] = {}
    for tensor in sorted(weight_files):
        parts.setdefault(part_of(tensor), []).append(tensor)
    n_blocks = 1 + max((p for p in parts if isinstance(p, int)), default=-1)
    missing = [i for i in range(n_blocks) if i not in parts]
    declared = config.get("n_layer", config.get("num_hidden_layers"))
    if missing or (isinstance(declared, int) and declared != n_blocks):
        raise ManifestError(f"{directory}: tensors for blocks {missing or list(range(n_blocks, declared or 0))} "
                            f"are missing (config.json declares {declared} blocks)")

    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(directory / f), framework="pt"))
                   for f in sorted(set(weight_files.values()))}

        def add_part(key: str | int) -> FileRef:
            names = parts.get(key, [])
            tensors = {n: handles[weight_files[n]].get_tensor(n) for n in names}
            data = save_tensors(tensors, metadata={"format": "pt"})
            return FileRef(add_file(store, io.BytesIO(data)), len(data), tuple(names))

        blocks = tuple(add_part(i) for i in range(n_blocks))
        embed, head = add_part("embed"), add_part("head")

    def add_plain(path: Path) -> FileRef:
        return FileRef(add_file(store, path), path.stat().st_size)

    tokenizer = directory / "tokenizer.json"
    extra = {f: add_plain(directory / f) for f in EXTRA_FILES if (directory / f).is_file()}
    manifest = ModelManifest(name=name or directory.resolve().name, config=config,
                             tokenizer=add_plain(tokenizer) if tokenizer.is_file() else None,
                             extra_files=extra, embed=embed, head=head, blocks=blocks)
    data = build_manifest(manifest)
    cid = store.put(data, Cid.of(data, DAG_JSON), check=False)
    if pin:
        store.pin(cid)
    logger.info("published %s: %d blocks, manifest %s", manifest.name, n_blocks, cid)
    return cid


# ---- writing a loadable directory ---------------------------------------------------------

def _read_whole(get_block: Any, ref: FileRef, what: str) -> bytes:
    data = b"".join(iter_file(get_block, ref.cid))
    if len(data) != ref.size_bytes:
        raise WireError(f"{what} ({ref.cid}) holds {len(data)} bytes, the manifest says {ref.size_bytes}")
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def materialize_model(manifest_cid: Cid, get_block: Callable[[Cid], bytes] | Any, out_dir: str | os.PathLike, *,
                      blocks: range | None = None, with_embed: bool = True, with_head: bool = True) -> Path:
    """Write a HF-format directory (config.json, tokenizer files, model.safetensors holding only
    the requested parts) from a manifest; every block is verified as it is read. `get_block` is
    a store or a function. Returns `out_dir`, which `model.hf.load_model(out_dir, layers=blocks,
    with_embed=..., with_head=...)` loads."""
    from safetensors.torch import load as load_tensors
    from safetensors.torch import save_file

    manifest = read_manifest(get_block, manifest_cid)
    refs = manifest.select(blocks, with_embed=with_embed, with_head=with_head)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    for ref in refs:
        part = load_tensors(_read_whole(get_block, ref, "a tensor file"))
        if set(part) != set(ref.tensors):
            raise WireError(f"tensor file {ref.cid} holds {sorted(part)[:3]}..., the manifest lists other tensors")
        tensors.update(part)
    tmp = out / f".model.safetensors.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    (out / INDEX_FILE).unlink(missing_ok=True)           # a stale index would win over our file
    if manifest.tokenizer is not None:
        _write_atomic(out / "tokenizer.json", _read_whole(get_block, manifest.tokenizer, "tokenizer.json"))
    for fname, ref in manifest.extra_files.items():
        _write_atomic(out / fname, _read_whole(get_block, ref, fname))
    _write_atomic(out / "config.json", json.dumps(manifest.config, indent=2).encode())   # last: marks it complete
    return out


async def fetch_model(peer: Any, manifest_cid: str | Cid, out_dir: str | os.PathLike, *,
                      blocks: range | None = None, with_embed_head: bool = True,
                      data_dir: str | os.PathLike | None = None, providers: list[str] | None = None) -> Path:
    """Fetch a model's manifest and only the files for `blocks` (and the ends, if asked) from
    the swarm into the local store, verified, then materialize them into `out_dir`."""
    import asyncio

    from swarmlm.store.dag import open_store
    from swarmlm.store.fetch import Fetcher, fetch_dag
    from swarmlm.store.providers import find_providers, rank_providers

    root = Cid.parse(str(manifest_cid))
    store = open_store(data_dir)
    if providers is None:
        found = await find_providers(peer, str(root))
        providers = rank_providers(str(root), [p.peer_id for p in found], me=peer.peer_id)
    if not store.has(root):
        await Fetcher(peer, store, providers).fetch([root])       # the manifest block alone
    manifest = read_manifest(store, root)
    refs = manifest.select(blocks, with_embed=with_embed_head, with_head=with_embed_head)
    extra = [r for r in [manifest.tokenizer, *manifest.extra_files.values()] if r is not None]
    for ref in refs + extra:
        await fetch_dag(peer, ref.cid, store, providers=providers)
    return await asyncio.to_thread(materialize_model, root, store, out_dir, blocks=blocks,
                                   with_embed=with_embed_head, with_head=with_embed_head)
