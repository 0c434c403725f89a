"""Memory limits of one block server: how many sessions and cached tokens it may hold.

`Budget` is plain bookkeeping: `reserve` admits a session's (batch x max_length) cache or
raises `CapacityError` with the reason, `release` gives it back, `touch` records use and
`expired` lists the sessions idle for longer than the idle timeout at a time the caller
passes in (no clock is read here). Request-size checks live here too, so every handler
applies the same limits. Knows nothing of tensors, peers or models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmlm.errors import CapacityError, WireError


@dataclass(frozen=True)
class BudgetLimits:
    max_sessions: int = 64                 # open inference sessions at once
    max_cache_tokens: int = 65536          # sum over sessions of batch * max_length
    max_session_tokens: int = 8192         # batch * max_length of one session
    max_request_tokens: int = 16384        # B * T of one step / forward / backward request
    max_batch: int = 256                   # rows of one request
    idle_timeout_s: float = 300.0          # a session unused for this long is closed
    max_kept_bytes: int = 1 << 30          # autograd state of forwards kept for their backward (0: keep none)
    kept_timeout_s: float = 60.0           # a kept forward whose backward has not come by then is dropped

    def __post_init__(self):
        for name in ("max_sessions", "max_cache_tokens", "max_session_tokens", "max_request_tokens", "max_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.idle_timeout_s <= 0 or self.kept_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s and kept_timeout_s must be positive, got {self.idle_timeout_s} "
                             f"and {self.kept_timeout_s}")
        if self.max_kept_bytes < 0:
            raise ValueError(f"max_kept_bytes must not be negative, got {self.max_kept_bytes}")


@dataclass
class _Entry:
    tokens: int                  # batch * max_length reserved
    last_used: float             # caller's clock


@dataclass
class Budget:
    limits: BudgetLimits = field(default_factory=BudgetLimits)
    entries: dict[object, _Entry] = field(default_factory=dict)   # session key -> reservation

    @property
    def used_tokens(self) -> int:
        return sum(e.tokens for e in self.entries.values())

    @property
    def free_tokens(self) -> int:
        return max(0, self.limits.max_cache_tokens - self.used_tokens)

    @property
    def n_sessions(self) -> int:
        return len(self.entries)

    def reserve(self, key: object, *, batch: int, max_length: int, now: float) -> None:
        """Admit a session of `batch` rows and `max_length` positions, or raise `CapacityError`."""
        if key in self.entries:
            raise WireError("a session with this id is already open")
        if batch <= 0 or max_length <= 0:
            raise WireError(f"batch and max_length must be positive, got {batch} and {max_length}")
        if batch > self.limits.max_batch:
            raise CapacityError(f"batch of {batch} rows exceeds this server's limit of {self.limits.max_batch}")
        tokens = batch * max_length
        if tokens > self.limits.max_session_tokens:
            raise CapacityError(f"a session of {batch} x {max_length} = {tokens} tokens exceeds this server's "
                                f"limit of {self.limits.max_session_tokens} per session")
        if len(self.entries) >= self.limits.max_sessions:
            raise CapacityError(f"server full: {len(self.entries)} sessions open, limit {self.limits.max_sessions}")
        if tokens > self.free_tokens:
            raise CapacityError(f"server full: {tokens} cache tokens asked, {self.free_tokens} free "
                                f"of {self.limits.max_cache_tokens}")
        self.entries[key] = _Entry(tokens, now)

    def release(self, key: object) -> bool:
        """Forget a session; False if it was not open."""
        return self.entries.pop(key, None) is not None

    def touch(self, key: object, now: float) -> None:
        if key in self.entries:
            self.entries[key].last_used = now

    def expired(self, now: float) -> list[object]:
        """Sessions idle for longer than the idle timeout at time `now`."""
        return [k for k, e in self.entries.items() if now - e.last_used > self.limits.idle_timeout_s]

    def check_request(self, batch: int, n_tokens: int) -> None:
        """Raise `CapacityError` for a request of `batch` rows and `n_tokens` = B * T over the limits."""
        if batch > self.limits.max_batch:
            raise CapacityError(f"request of {batch} rows exceeds this server's limit of {self.limits.max_batch}")
        if n_tokens > self.limits.max_request_tokens:
            raise CapacityError(f"request of {n_tokens} tokens exceeds this server's limit of "
                                f"{self.limits.max_request_tokens}")
