"""Which port a server that asks for any port (``port=0``) tries first.

A server usually closes its connections first, so each one leaves a TIME_WAIT entry on the
server's port for a minute. Linux's ``bind(port=0)`` searches the ephemeral range past every
port that holds one: after 8,000 short-lived servers, each closing one connection, it takes
about 1.5 ms instead of 10 us, and the range eventually runs out. Binding a named port is one
hash lookup.

So on Linux servers walk the ephemeral range themselves, from a random start (so processes
running tests side by side seldom meet), on odd ports as the kernel's ``bind(0)`` does (its
``connect()`` prefers even ones), skipping the reserved ports. The walk moves on, so the ports
behind it hold the TIME_WAIT entries and the ones ahead are almost always free. A walked port is
bound without ``SO_REUSEADDR`` (set right after), so a port anyone holds, even only with
TIME_WAIT entries or bound by another socket that is about to listen, refuses the bind and the
server tries the next; after :data:`ATTEMPTS` refusals it lets the kernel choose. Elsewhere the
kernel always chooses.
"""

from __future__ import annotations

import itertools
import random
import sys
from collections.abc import Iterator

__all__ = ["ATTEMPTS", "candidates"]

#: named ports tried before ``bind(0)``
ATTEMPTS = 16
_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_RESERVED_FILE = "/proc/sys/net/ipv4/ip_local_reserved_ports"


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as file:
            return file.read()
    except (OSError, ValueError):
        return ""


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default if it cannot be read)."""
    try:
        low, high = (int(field) for field in _read(_RANGE_FILE).split())
    except ValueError:
        return 32768, 60999
    return (low, high) if 1024 <= low < high <= 65535 else (32768, 60999)


def _reserved() -> frozenset[int]:
    """Ports the kernel keeps out of ``bind(0)``'s reach (``ip_local_reserved_ports``)."""
    reserved: set[int] = set()
    for item in _read(_RESERVED_FILE).replace("\n", ",").split(","):
        low, _, high = item.strip().partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            reserved.update(range(int(low), int(high or low) + 1))
    return frozenset(reserved)


class _Walk:
    """The process's walk over the odd ports of the ephemeral range."""

    def __init__(self) -> None:
        low, high = _ephemeral_range()
        self.first = low | 1
        self.count = (high - self.first) // 2 + 1
        self.reserved = _reserved()
        self.steps = itertools.count(random.randrange(self.count))  # next() is atomic

    def next_port(self) -> int:
        return self.first + 2 * (next(self.steps) % self.count)


_walk: _Walk | None = None


def candidates() -> Iterator[int]:
    """The ports to try binding in turn for ``port=0``; the last is always 0 (the kernel's)."""
    global _walk
    if sys.platform.startswith("linux"):
        walk = _walk
        if walk is None:
            walk = _walk = _Walk()
        for _ in range(ATTEMPTS):
            port = walk.next_port()
            if port not in walk.reserved:
                yield port
    yield 0
