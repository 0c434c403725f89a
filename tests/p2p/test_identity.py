"""Identity: Ed25519 keys, libp2p peer IDs, signatures, and the key file that survives restarts."""

import pytest

from swarmlm.errors import IntegrityError, UserError
from swarmlm.p2p.identity import Identity, public_key_of, verify


def test_peer_id_is_a_libp2p_ed25519_id():
    ident = Identity.generate()
    assert ident.peer_id.startswith("12D3KooW")
    assert len(public_key_of(ident.peer_id)) == 32


def test_key_file_gives_the_same_peer_id_after_reload(tmp_path):
    first = Identity.load_or_create(tmp_path / "identity.key")
    again = Identity.load_or_create(tmp_path / "identity.key")
    assert first.peer_id == again.peer_id
    assert (tmp_path / "identity.key").stat().st_mode & 0o077 == 0


def test_signature_verifies_only_for_its_signer_and_data():
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"data")
    assert verify(a.peer_id, b"data", sig)
    assert not verify(b.peer_id, b"data", sig)
    assert not verify(a.peer_id, b"datA", sig)
    assert not verify("not-a-peer-id", b"data", sig)


def test_rsa_style_peer_id_is_rejected():
    with pytest.raises(IntegrityError):
        public_key_of("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")


def test_garbage_key_file_is_a_user_error(tmp_path):
    path = tmp_path / "identity.key"
    path.write_bytes(b"not a key")
    with pytest.raises(UserError):
        Identity.load(path)
