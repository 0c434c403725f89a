"""Who may be dialed, and how often: the side channel's pure decisions.

A peer dials only addresses its target announced itself, in the signed `Endpoint` record it
keeps in the DHT (or handed on inside a message, still under its signature): never an address
another peer merely names, never a host name (no DNS look-up on a remote peer's word), and a
loopback address only when this peer itself listens on loopback (a remote peer must not steer
us into our own machine's services). Dials made because a remote peer asked (a next hop its
session names) are counted per asking peer in a sliding window, so closing and reopening
sessions does not reset the count. Reads no clock of its own and opens no socket.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Callable

MAX_ADDRS = 8                 # addresses one endpoint record may list


def parse_addr(maddr: str) -> tuple[str, int]:
    """(ip, port) of `/ip4/A.B.C.D/tcp/P` or `/ip6/X::Y/tcp/P`; `ValueError` for anything else
    (`/dns4/...`, a host name where an IP literal belongs, a port out of range, extra parts)."""
    parts = str(maddr).split("/")
    if len(parts) != 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        raise ValueError(f"{maddr!r} is not /ip4|ip6/<address>/tcp/<port>")
    try:
        ip = ipaddress.ip_address(parts[2])
    except ValueError:
        raise ValueError(f"{parts[2]!r} in {maddr!r} is not an IP address") from None
    if (ip.version == 4) != (parts[1] == "ip4"):
        raise ValueError(f"{maddr!r}: {parts[1]} with a v{ip.version} address")
    if not parts[4].isdigit() or not 0 < int(parts[4]) < 65536:
        raise ValueError(f"{maddr!r}: bad port")
    return str(ip), int(parts[4])


def format_addr(host: str, port: int) -> str:
    ip = ipaddress.ip_address(host)
    return f"/ip{ip.version}/{ip}/tcp/{port}"


def dialable(addrs: list[str], *, local_host: str) -> list[tuple[str, int]]:
    """The addresses of an announced endpoint this peer may dial, in order, once each.

    Refused: anything `parse_addr` refuses, unspecified and multicast addresses, and loopback
    addresses unless `local_host` (where this peer listens) is itself loopback."""
    local_loopback = _is_loopback(local_host)
    out: list[tuple[str, int]] = []
    for maddr in addrs[:MAX_ADDRS]:
        try:
            host, port = parse_addr(maddr)
        except ValueError:
            continue
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified or ip.is_multicast or (ip.is_loopback and not local_loopback):
            continue
        if (host, port) not in out:
            out.append((host, port))
    return out


def maddr_hosts(maddrs: list[str]) -> list[str]:
    """The IP addresses in multiaddrs like /ip4/10.0.0.5/tcp/4001/p2p/Qm..., in order, once each:
    where a peer's own listeners may bind (never used to choose whom to dial)."""
    hosts: list[str] = []
    for m in maddrs:
        parts = str(m).split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] not in hosts:
            try:
                ipaddress.ip_address(parts[2])
            except ValueError:
                continue
            hosts.append(parts[2])
    return hosts


def is_unspecified(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DialLimiter:
    """At most `max_dials` dials per asking peer in any `window_s` seconds."""

    def __init__(self, *, max_dials: int, window_s: float, clock: Callable[[], float], max_peers: int = 4096):
        self.max_dials = max_dials
        self.window_s = window_s
        self.clock = clock
        self.max_peers = max_peers
        self._dials: dict[str, deque[float]] = {}

    def allow(self, peer_id: str) -> bool:
        """Count one dial for `peer_id` if it is within its allowance; whether it was."""
        now = self.clock()
        times = self._dials.get(peer_id)
        if times is None:
            if len(self._dials) >= self.max_peers:
                self._forget_idle(now)
            times = self._dials[peer_id] = deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) >= self.max_dials:
            return False
        times.append(now)
        return True

    def _forget_idle(self, now: float) -> None:
        for peer_id in [p for p, t in self._dials.items() if not t or t[-1] <= now - self.window_s]:
            del self._dials[peer_id]
        while len(self._dials) >= self.max_peers:        # every peer busy: drop the oldest entry
            del self._dials[next(iter(self._dials))]
