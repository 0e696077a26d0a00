"""Small helpers shared by the real-socket tests: raw clients that always close, fd counts."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "CLIENT_TIMEOUT",
    "HAS_IPV6",
    "HTTP_OK",
    "assert_refused",
    "connect",
    "exchange",
    "open_fds",
    "read_exactly",
    "read_to_eof",
]

#: A complete HTTP/1.0 response: the server closes after it, so every client reads to EOF.
HTTP_OK = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"

#: Seconds a test's raw client waits on one socket operation before failing the test.
CLIENT_TIMEOUT = 5.0


def _has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


#: Whether this machine can listen on the IPv6 loopback ``::1``.
HAS_IPV6 = _has_ipv6()


@contextmanager
def connect(address: tuple[str, int], timeout: float = CLIENT_TIMEOUT) -> Iterator[socket.socket]:
    """A TCP client connected to ``address``, closed on exit however the test ends."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def read_to_eof(sock: socket.socket, limit: int = 16 * 1024 * 1024) -> bytes:
    """Everything ``sock`` receives until the peer closes (at most ``limit`` bytes)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; raises ``EOFError`` if the peer closes first."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"peer closed after {len(data)} of {n} bytes: {bytes(data)!r}")
        data += chunk
    return bytes(data)


def exchange(address: tuple[str, int], request: bytes) -> bytes:
    """Connect, send ``request``, half-close, and return the whole reply (read to EOF)."""
    with connect(address) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock)


def open_fds() -> int:
    """How many file descriptors this process has open (Linux ``/proc/self/fd``)."""
    return len(os.listdir("/proc/self/fd"))


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes of every TCP listener on ``port`` in this network namespace."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                rows = [line.split() for line in lines][1:]
        except FileNotFoundError:
            continue
        inodes.update(row[9] for row in rows if row[3] == "0A" and int(row[1][-4:], 16) == port)
    return inodes


def _fd_targets() -> set[str]:
    """What this process's file descriptors point at (``socket:[inode]`` for sockets)."""
    targets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            pass  # closed meanwhile (the listdir's own descriptor, or another thread's)
    return targets


def assert_refused(address: tuple[str, int]) -> None:
    """Nothing of this process listens on ``address``, and a connect to it is refused.

    A freed port can be taken at once by another process (``pytest -n``), and a connect to a
    free ephemeral port can, rarely, connect to itself (TCP simultaneous open); neither is a
    failure of the server under test.
    """

    def others_listen() -> bool:
        listeners = {f"socket:[{inode}]" for inode in _listening_inodes(address[1])}
        assert not listeners & _fd_targets(), f"still listening: {address}"
        return bool(listeners)

    if others_listen():
        return  # another process listens on the freed port now
    for _ in range(3):
        with socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET) as sock:
            sock.settimeout(CLIENT_TIMEOUT)
            try:
                sock.connect(address)
            except ConnectionRefusedError:
                return
            if sock.getsockname() != sock.getpeername() and others_listen():
                return  # taken by another process between the look and the connect
            assert sock.getsockname() == sock.getpeername(), f"{address} accepted a connect"
    raise AssertionError(f"connects to {address} kept connecting to themselves")
