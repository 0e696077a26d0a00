"""Small helpers shared by the real-socket tests: raw clients that always close (or reset),
fd counts, the canary that hostile tests check, and the real upstreams the proxy tests share
as fixtures (``web``: a stdlib http.server; ``redis_address``: a throwaway redis-server,
skipped when it is not installed).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from selectserver import RECEIVE, CommandServer, Reactor

__all__ = [
    "CANARY_SECONDS",
    "CLIENT_TIMEOUT",
    "HAS_IPV6",
    "HTTP_OK",
    "LINGER_ZERO",
    "MiB",
    "assert_refused",
    "canary_answers",
    "connect",
    "exchange",
    "open_fds",
    "read_exactly",
    "read_to_eof",
    "reset_close",
    # the upstreams the proxy tests share
    "WebServer",
    "pattern",
    "redis_address",
    "web",
]

#: A complete HTTP/1.0 response: the server closes after it, so every client reads to EOF.
HTTP_OK = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"

#: Seconds a test's raw client waits on one socket operation before failing the test.
CLIENT_TIMEOUT = 5.0

#: How long the canary may take, from its constructor to the EOF of its reply.
CANARY_SECONDS = 1.0

#: ``SO_LINGER`` on with a zero timeout: ``close()`` sends an RST and discards what is unsent.
LINGER_ZERO = struct.pack("ii", 1, 0)

MiB = 1024 * 1024


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


def reset_close(sock: socket.socket) -> None:
    """Close ``sock`` with RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
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


def canary_answers(on: Reactor | None = None) -> None:
    """An unrelated server on the default reactor answers a real round trip promptly.

    With ``on``, the canary must run on that reactor: the default reactor the hostile server
    uses is still the one serving (a dead one would be replaced by a fresh one unnoticed).
    """
    start = time.monotonic()
    with CommandServer([RECEIVE, "pong"], verbose=False) as canary:
        if on is not None:
            assert canary._reactor is on, "the hostile server's reactor was replaced"
        with connect(canary.address) as sock:
            sock.sendall(b"ping")
            reply = read_to_eof(sock)
        elapsed = time.monotonic() - start
    assert reply == b"pong"
    assert elapsed < CANARY_SECONDS, f"the canary took {elapsed:.3f} s"
    if on is not None:
        assert on.error is None, on.error


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


# ---- upstreams as fixtures: a stdlib http.server and a throwaway redis-server ------------------


def pattern(size: int) -> bytes:
    """``size`` bytes counting up modulo 251 (a prime): a lost, doubled or moved piece shows."""
    return bytes(i % 251 for i in range(size))


class WebServer(http.server.ThreadingHTTPServer):
    """A stdlib ThreadingHTTPServer on a free loopback port: ``GET /bytes/N`` answers
    ``pattern(N)``, any other path ``hello <path>``, each with a Content-Length (keep-alive).

    ``hits`` lists the paths asked for; ``answered`` those whose answer was written in full.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _WebHandler)
        self.hits: list[str] = []
        self.answered: list[str] = []
        self.changed = threading.Condition()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server_address[:2]
        return (str(host), int(port))

    def wait_answered(self, path: str, timeout: float = 5.0) -> None:
        """Block until a request for ``path`` has been answered (its bytes are sent)."""
        with self.changed:
            if not self.changed.wait_for(lambda: path in self.answered, timeout):
                raise AssertionError(f"{path} was not answered within {timeout} s")

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a reset from a fault is expected here: no traceback on stderr


class _WebHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: WebServer

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        size = int(self.path.rsplit("/", 1)[1]) if self.path.startswith("/bytes/") else 0
        body = pattern(size) if size else b"hello " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with self.server.changed:
            self.server.answered.append(self.path)
            self.server.changed.notify_all()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def web() -> Iterator[WebServer]:
    """A ``WebServer`` serving in a thread, shut down after the module's tests."""
    server = WebServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


#: redis-server's options besides its address: nothing saved to disk, in the foreground.
_REDIS_OPTIONS = ["--save", "", "--appendonly", "no", "--daemonize", "no"]


@pytest.fixture(scope="module")
def redis_address() -> Iterator[tuple[str, int]]:
    """A throwaway redis-server on a free loopback port, stopped after the module's tests.

    Skipped when redis-server (or the ``redis`` client package) is not installed.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found: install it (apt-get install redis-server)")
    pytest.importorskip("redis", reason="the redis client is missing: pip install -e '.[test]'")
    for _ in range(5):  # another process may take the free port first
        port = _free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", *_REDIS_OPTIONS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if _answers_ping(("127.0.0.1", port), process):
                yield ("127.0.0.1", port)
                return
        finally:
            process.terminate()
            process.wait(5)
    pytest.fail("redis-server did not start")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(address: tuple[str, int], process: subprocess.Popen[bytes]) -> bool:
    """Whether redis-server answers PING within 10 s; False as soon as it exits.

    Bounded in count and in time (each try takes at most 2 s).
    """
    deadline = time.monotonic() + 10
    for _ in range(1000):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(64) == b"+PONG\r\n":
                return True
        # The one sleep the tests synchronise with: a subprocess's readiness has no event to
        # wait on, so its start-up is polled (refused, or still loading).
        time.sleep(0.01)
    return False
