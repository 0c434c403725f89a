"""dag-pb nodes and UnixFS file messages: the few protobuf bytes IPFS puts around a file.

    PBNode  { repeated PBLink Links = 2; optional bytes Data = 1; }   links are written first
    PBLink  { bytes Hash = 1; string Name = 2; uint64 Tsize = 3; }  Name always written, even empty
    Data    { Type = 1; bytes Data = 2; uint64 filesize = 3; repeated uint64 blocksizes = 4 (not packed) }

Encoding follows kubo's field order exactly, since the CID is the hash of these bytes.
Decoding (for walking a DAG fetched from others) checks wire types, lengths and
truncation, raising `WireError`; unknown UnixFS fields (mode, mtime) are skipped.
Hand-written: the formats are tiny. `links_of` gives the children of any block the store
understands (raw, dag-pb, dag-json), for walking and pinning. Knows nothing of chunking or stores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from swarmlm.errors import WireError
from swarmlm.store.cid import DAG_PB, RAW, Cid, CidError, encode_varint, read_varint

# UnixFS Data.Type values
RAW_TYPE, DIRECTORY, FILE, METADATA, SYMLINK, HAMT_SHARD = 0, 1, 2, 3, 4, 5

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class PBLink:
    cid: Cid              # the child
    name: str             # "" for the chunks of a file
    tsize: int | None     # bytes of the child's whole sub-DAG (blocks, not file bytes)


@dataclass(frozen=True)
class PBNode:
    links: tuple[PBLink, ...]
    data: bytes | None    # a UnixFS Data message, for file nodes


@dataclass(frozen=True)
class UnixFSData:
    type: int                       # FILE or RAW_TYPE for file nodes
    data: bytes                     # the chunk itself in a leaf; b"" in inner nodes
    filesize: int | None            # file bytes under this node
    blocksizes: tuple[int, ...]     # file bytes under each link, in link order


# ---- encoding ----------------------------------------------------------------------------

def _field(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


_LINK_HASH, _LINK_NAME, _LINK_TSIZE = _field(1, _LEN), _field(2, _LEN), _field(3, _VARINT)
_NODE_DATA, _NODE_LINK = _field(1, _LEN), _field(2, _LEN)
_FS_TYPE, _FS_DATA, _FS_FILESIZE, _FS_BLOCKSIZE = _field(1, _VARINT), _field(2, _LEN), _field(3, _VARINT), _field(4, _VARINT)


def encode_link(link: PBLink) -> bytes:
    cid = link.cid.to_bytes()
    name = link.name.encode("utf-8")
    out = [_LINK_HASH, encode_varint(len(cid)), cid, _LINK_NAME, encode_varint(len(name)), name]
    if link.tsize is not None:
        out += [_LINK_TSIZE, encode_varint(link.tsize)]
    return b"".join(out)


def encode_node(links: list[PBLink] | tuple[PBLink, ...], data: bytes | None) -> bytes:
    """A PBNode: every link, then Data (left out when None)."""
    out = []
    for link in links:
        body = encode_link(link)
        out += [_NODE_LINK, encode_varint(len(body)), body]
    if data is not None:
        out += [_NODE_DATA, encode_varint(len(data)), data]
    return b"".join(out)


def encode_unixfs(type_: int, data: bytes | memoryview = b"", filesize: int | None = None,
                  blocksizes: list[int] | tuple[int, ...] = ()) -> bytes:
    """A UnixFS Data message; an empty `data` is left out, `filesize` is written whenever given."""
    out = [_FS_TYPE, encode_varint(type_)]
    if len(data):
        out += [_FS_DATA, encode_varint(len(data)), data]
    if filesize is not None:
        out += [_FS_FILESIZE, encode_varint(filesize)]
    for size in blocksizes:
        out += [_FS_BLOCKSIZE, encode_varint(size)]
    return b"".join(out)


def file_leaf(chunk: bytes | memoryview) -> bytes:
    """The dag-pb leaf `ipfs add` (CIDv0) makes of one chunk: a File with the chunk as its Data."""
    return encode_node((), encode_unixfs(FILE, chunk, len(chunk)))


def file_node(children: list[tuple[Cid, int, int]]) -> bytes:
    """An inner file node over `children`, each (cid, tsize, file bytes under it)."""
    links = [PBLink(cid, "", tsize) for cid, tsize, _ in children]
    sizes = [n for _, _, n in children]
    return encode_node(links, encode_unixfs(FILE, b"", sum(sizes), sizes))


# ---- decoding ----------------------------------------------------------------------------

def _fields(data: bytes | memoryview, what: str):
    """Yield (field number, wire type, value) where value is an int or a memoryview."""
    view = memoryview(data)
    pos, end = 0, len(view)
    while pos < end:
        key, pos = read_varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError(f"{what}: field number 0")
        if wire_type == _VARINT:
            value, pos = read_varint(view, pos)
        elif wire_type == _LEN:
            size, pos = read_varint(view, pos)
            if size > end - pos:
                raise WireError(f"{what}: field {number} runs past the end")
            value, pos = view[pos:pos + size], pos + size
        elif wire_type in (_I64, _I32):
            size = 8 if wire_type == _I64 else 4
            if size > end - pos:
                raise WireError(f"{what}: field {number} runs past the end")
            value, pos = int.from_bytes(view[pos:pos + size], "little"), pos + size
        else:
            raise WireError(f"{what}: unsupported wire type {wire_type}")
        yield number, wire_type, value


def _expect(number: int, wire_type: int, want: int, what: str) -> None:
    if wire_type != want:
        raise WireError(f"{what}: field {number} has wire type {wire_type}, expected {want}")


def decode_link(data: bytes | memoryview) -> PBLink:
    cid = tsize = None
    name = ""
    for number, wire_type, value in _fields(data, "PBLink"):
        if number == 1:
            _expect(number, wire_type, _LEN, "PBLink")
            try:
                cid = Cid.from_bytes(bytes(value))
            except CidError as e:
                raise WireError(f"PBLink: {e}") from None
        elif number == 2:
            _expect(number, wire_type, _LEN, "PBLink")
            try:
                name = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise WireError("PBLink: Name is not UTF-8") from None
        elif number == 3:
            _expect(number, wire_type, _VARINT, "PBLink")
            tsize = value
        else:
            raise WireError(f"PBLink: unknown field {number}")
    if cid is None:
        raise WireError("PBLink: no Hash")
    return PBLink(cid, name, tsize)


def decode_node(block: bytes | memoryview) -> PBNode:
    """Parse a dag-pb block; `WireError` if it is not one."""
    links, data = [], None
    for number, wire_type, value in _fields(block, "PBNode"):
        _expect(number, wire_type, _LEN, "PBNode")
        if number == 2:
            links.append(decode_link(value))
        elif number == 1:
            if data is not None:
                raise WireError("PBNode: Data appears twice")
            data = bytes(value)
        else:
            raise WireError(f"PBNode: unknown field {number}")
    return PBNode(tuple(links), data)


def decode_unixfs(data: bytes | memoryview) -> UnixFSData:
    """Parse a UnixFS Data message; `WireError` if malformed. mode, mtime and the like are skipped."""
    type_, payload, filesize, sizes = None, b"", None, []
    for number, wire_type, value in _fields(data, "UnixFS"):
        if number == 1:
            _expect(number, wire_type, _VARINT, "UnixFS")
            type_ = value
        elif number == 2:
            _expect(number, wire_type, _LEN, "UnixFS")
            payload = bytes(value)
        elif number == 3:
            _expect(number, wire_type, _VARINT, "UnixFS")
            filesize = value
        elif number == 4:
            if wire_type == _VARINT:
                sizes.append(value)
            else:                      # a packed encoding, which other writers may use
                _expect(number, wire_type, _LEN, "UnixFS")
                pos = 0
                while pos < len(value):
                    size, pos = read_varint(value, pos)
                    sizes.append(size)
    if type_ is None:
        raise WireError("UnixFS: no Type")
    return UnixFSData(type_, payload, filesize, tuple(sizes))


# ---- links of any block -------------------------------------------------------------------

def links_of(cid: Cid, block: bytes | memoryview) -> list[Cid]:
    """The CIDs a block points to, in order: none for raw, PBNode links for dag-pb, every
    `{"/": "<cid>"}` for dag-json (model manifests). `WireError` if the block does not decode."""
    if cid.codec == RAW:
        return []
    if cid.codec == DAG_PB:
        return [link.cid for link in decode_node(block).links]
    try:
        value = json.loads(bytes(block).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"dag-json block {cid} does not decode: {e}") from None
    out: list[Cid] = []
    _json_links(value, out)
    return out


def _json_links(value: Any, out: list[Cid]) -> None:
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("/"), str):
            try:
                out.append(Cid.parse(value["/"]))
            except CidError as e:
                raise WireError(f"dag-json link: {e}") from None
            return
        for v in value.values():
            _json_links(v, out)
    elif isinstance(value, list):
        for v in value:
            _json_links(v, out)
