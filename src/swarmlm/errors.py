"""One error tree for all of swarmlm.

User mistakes (a bad path, a bad flag) are `UserError`s. Everything a remote peer can do wrong
is a `PeerError`. Content that fails a check against its CID, signature or share is an
`IntegrityError`. The CLI prints any error of this tree that reaches it as one line naming the
object (the CID, the path), and exits 2; so messages name what they are about. Imports nothing
from swarmlm.
"""


class SwarmlmError(Exception):
    """Root of every error swarmlm raises on purpose."""


class UserError(SwarmlmError, ValueError):
    """Bad input from the user: a missing file, a malformed config, an impossible option."""


class CheckpointError(UserError):
    """A model directory that is missing, truncated, or disagrees with its config."""


class DataError(UserError):
    """A corpus path that does not exist or holds no usable text."""


class PlanError(UserError):
    """A parallel plan that cannot run (degrees that do not divide, a wrong world size)."""


class WireError(SwarmlmError):
    """Bytes that do not decode into the message or tensor they claim to be."""


class SwarmError(SwarmlmError):
    """Something in the swarm went wrong."""


class PeerError(SwarmError):
    """A remote peer vanished, refused or misbehaved."""


class PeerTimeout(PeerError):
    """A remote peer did not answer in time."""


class RemoteError(PeerError):
    """A remote peer answered with an error message."""


class IntegrityError(SwarmError):
    """Content failed its CID, signature or share check."""


class NotFoundError(SwarmError):
    """Nobody in the swarm provides what was asked for."""


class CapacityError(SwarmError):
    """A server is full: too many sessions or cached tokens."""


class AccessRefused(SwarmError):
    """A server's admission policy (the ledger: quota, deposit, priority) refused a session."""


class LedgerError(SwarmlmError):
    """A ledger transaction was reverted, or the chain could not be reached or read."""


class RoundFailed(SwarmError):
    """A collaborative averaging round did not complete over a known set of peers."""
