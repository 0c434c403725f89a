"""dag-pb and UnixFS bytes: built by hand here from the spec, compared with the encoder; decoding checks."""

import pytest

from swarmlm.errors import WireError
from swarmlm.store.cid import DAG_JSON, DAG_PB, RAW, Cid
from swarmlm.store.unixfs import (FILE, PBLink, decode_node, decode_unixfs, encode_node, file_leaf, file_node,
                                  links_of)


def test_empty_leaf_has_filesize_zero_and_no_data_field():
    # 0x0a len=4 { 0x08 Type=2, 0x18 filesize=0 }  (rust-ipfs and kubo agree on these bytes)
    assert file_leaf(b"") == bytes.fromhex("0a 04 08 02 18 00")


def test_leaf_wraps_the_chunk_as_data():
    assert file_leaf(b"foobar\n") == bytes.fromhex("0a 0d 08 02 12 07") + b"foobar\n" + bytes.fromhex("18 07")


def test_inner_node_writes_links_first_with_an_empty_name_then_data():
    a, b = Cid.of(b"ab"), Cid.of(b"c")
    got = file_node([(a, 2, 2), (b, 1, 1)])
    link_a = b"\x0a\x24" + a.to_bytes() + b"\x12\x00" + b"\x18\x02"
    link_b = b"\x0a\x24" + b.to_bytes() + b"\x12\x00" + b"\x18\x01"
    data = bytes([0x08, 0x02, 0x18, 0x03, 0x20, 0x02, 0x20, 0x01])
    want = (b"\x12" + bytes([len(link_a)]) + link_a + b"\x12" + bytes([len(link_b)]) + link_b
            + b"\x0a" + bytes([len(data)]) + data)
    assert got == want


def test_decode_round_trips_an_inner_node():
    a = Cid.of(b"x" * 300)
    node = decode_node(file_node([(a, 300, 300), (a, 300, 300)]))
    assert [link.cid for link in node.links] == [a, a]
    assert node.links[0] == PBLink(a, "", 300)
    fs = decode_unixfs(node.data)
    assert (fs.type, fs.filesize, fs.blocksizes, fs.data) == (FILE, 600, (300, 300), b"")


def test_decode_accepts_packed_blocksizes():
    fs = decode_unixfs(bytes([0x08, 0x02, 0x18, 0x03, 0x22, 0x02, 0x02, 0x01]))
    assert fs.blocksizes == (2, 1)


def test_decode_skips_mode_and_mtime():
    fs = decode_unixfs(bytes([0x08, 0x02, 0x18, 0x00, 0x38, 0xa4, 0x03, 0x42, 0x02, 0x08, 0x01]))
    assert fs.type == FILE and fs.filesize == 0


@pytest.mark.parametrize("block", [
    b"\x0a\x05\x08",                 # Data longer than the block
    b"\x08\x01",                     # a varint field in a PBNode
    b"\x1a\x00",                     # unknown field 3
    b"\x12\x02\x12\x00",             # a link without a Hash
    b"\x12\x04\x0a\x02\x12\x20",     # a link whose Hash is not a CID
    b"\x0a\x00\x0a\x00",             # Data twice
    b"\x12",                         # truncated
    b"\x0f",                         # wire type 7
])
def test_malformed_nodes_raise_wire_error(block):
    with pytest.raises(WireError):
        decode_node(block)


def test_unixfs_without_type_is_rejected():
    with pytest.raises(WireError):
        decode_unixfs(b"\x18\x00")


def test_links_of_each_codec():
    a, b = Cid.of(b"a"), Cid.of(b"b")
    assert links_of(Cid.of(b"zz"), b"zz") == []
    pb = encode_node([PBLink(a, "", 1), PBLink(b, "", 1)], None)
    assert links_of(Cid.of(pb, DAG_PB), pb) == [a, b]
    js = ('{"x":[{"/":"%s"},{"y":{"/":"%s"}}],"n":1}' % (a, b)).encode()
    assert links_of(Cid.of(js, DAG_JSON), js) == [a, b]
    with pytest.raises(WireError):
        links_of(Cid.of(b"{", DAG_JSON), b"{")
    with pytest.raises(WireError):
        links_of(Cid.of(b'{"/":"nope"}', DAG_JSON), b'{"/":"nope"}')
    assert RAW == 0x55
