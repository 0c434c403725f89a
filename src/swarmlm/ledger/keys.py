"""A peer's ledger key, kept in its data dir, and the binding between that key and its swarm peer.

The key is a secp256k1 private key in `<data_dir>/ledger.key` (hex, mode 0600, written
atomically), so the same data dir (or `$SWARMLM_HOME` for a client) is the same account across
runs. Binding: the peer's Ed25519 identity key (the one behind its peer ID) signs
`BIND_DOMAIN || chain id || ledger || account`; the account's own key signs the registering
transaction. The EVM cannot check Ed25519 (no precompile), so the contract records the peer key
and its signature, and every reader checks them here (`verify_binding`) before trusting that a
peer ID belongs to an account. Knows nothing of sessions.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from swarmlm.errors import UserError
from swarmlm.p2p.identity import IDENTITY_FILE, Identity, public_key_of, verify
from swarmlm.store import paths

KEY_FILE = "ledger.key"
BIND_DOMAIN = b"swarmlm-ledger-bind/1"


def data_dir_of(data_dir: str | os.PathLike | None) -> Path:
    """`data_dir`, else $SWARMLM_HOME, else ~/.swarmlm (store/paths.py: every command agrees)."""
    return paths.data_dir(data_dir)


def load_or_create_key(data_dir: str | os.PathLike | None) -> bytes:
    path = data_dir_of(data_dir) / KEY_FILE
    if path.exists():
        text = path.read_text().strip()
        try:
            key = bytes.fromhex(text.removeprefix("0x"))
        except ValueError:
            raise UserError(f"{path} is not a hex secp256k1 key") from None
        if len(key) != 32:
            raise UserError(f"{path} is not a 32-byte secp256k1 key")
        return key
    key = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.replace(tmp, path)
    return key


def identity_of(data_dir: str | os.PathLike | None) -> Identity:
    return Identity.load_or_create(data_dir_of(data_dir) / IDENTITY_FILE)


def binding_message(chain_id: int, ledger: str, account: str) -> bytes:
    return BIND_DOMAIN + chain_id.to_bytes(32, "big") + bytes.fromhex(ledger[2:]) + bytes.fromhex(account[2:])


def sign_binding(identity: Identity, chain_id: int, ledger: str, account: str) -> tuple[bytes, bytes]:
    """(peer key, Ed25519 signature) to register `account` as `identity`'s peer."""
    return public_key_of(identity.peer_id), identity.sign(binding_message(chain_id, ledger, account))


def verify_binding(peer_id: str, peer_key: bytes, signature: bytes, chain_id: int, ledger: str, account: str) -> bool:
    """True if the registry's record binds `account` to `peer_id` with the peer key's own signature."""
    try:
        if public_key_of(peer_id) != peer_key:
            return False
    except Exception:
        return False
    return verify(peer_id, binding_message(chain_id, ledger, account), signature)
