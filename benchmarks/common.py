"""What every implementation shares: the step list, the Group shape, sockets and joins.

A script is a tuple of steps: an ``int`` n reads until the step has at least n bytes (1 is
selectserver's ``RECEIVE``), ``bytes`` are sent whole; after the last step the connection closes.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

__all__ = [
    "HELLO",
    "HOST",
    "RECV_SIZE",
    "WAIT_SECONDS",
    "Address",
    "CountingGroup",
    "Group",
    "Impl",
    "Script",
    "bounded_join",
    "listening_socket",
    "play_blocking",
]

Step = Union[int, bytes]
Script = tuple[Step, ...]
Address = tuple[str, int]

HOST = "127.0.0.1"
#: the script most scenarios serve: read a request, answer ``hello``, close
HELLO: Script = (1, b"hello")
#: bytes asked of one recv() by the baselines (selectserver uses its own size)
RECV_SIZE = 256 * 1024
#: the longest any close, start or settle waits before the benchmark fails loudly
WAIT_SECONDS = 30.0


class Group(Protocol):
    """``n`` servers made by one implementation."""

    addresses: list[Address]

    def settle(self) -> None:
        """Return once every server is being served (accepts without a queueing delay)."""

    def close(self) -> None:
        """Close every server and stop every thread the group started."""


@runtime_checkable
class CountingGroup(Group, Protocol):
    """A group that can say how many connections its servers hold open."""

    def connections(self) -> int:
        """Connections accepted and being served now (not yet closed)."""


@dataclass(frozen=True)
class Impl:
    """A way to make fake servers: ``open(script, n)`` makes ``n``, one after another."""

    name: str
    open: Callable[[Script, int], Group]


def listening_socket() -> socket.socket:
    """A non-blocking TCP socket listening on an OS-chosen loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def play_blocking(sock: socket.socket, script: Script) -> None:
    """Play ``script`` on a blocking socket (the thread-per-connection way)."""
    buffer = bytearray(RECV_SIZE)
    for step in script:
        if isinstance(step, int):
            got = 0
            while got < step:
                count = sock.recv_into(buffer)
                if not count:
                    return
                got += count
        else:
            sock.sendall(step)


def bounded_join(thread: threading.Thread) -> None:
    """Join ``thread`` or fail loudly after ``WAIT_SECONDS``."""
    thread.join(WAIT_SECONDS)
    if thread.is_alive():
        raise RuntimeError(f"{thread.name} did not stop within {WAIT_SECONDS} s")
