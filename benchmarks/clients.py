"""Benchmark clients, run in a second process so they never compete with a server for its GIL.

:class:`ClientProcess` starts one worker process (``spawn``) and sends it jobs over a pipe; each
job runs one of the ``run_*`` functions below and answers with a :class:`Result` whose
``elapsed`` the worker measured itself. Every socket has a timeout and every loop a count and a
deadline, so a broken server fails the benchmark instead of hanging it.
"""

from __future__ import annotations

import errno
import multiprocessing
import selectors
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .system import raise_fd_limit

__all__ = ["ClientProcess", "Result", "abortive", "exchange"]

Address = tuple[str, int]

#: seconds one client socket operation may take before the job fails
SOCKET_TIMEOUT = 30.0
#: seconds any one job may take in all
JOB_SECONDS = 120.0
_CHUNK = 1024 * 1024
_LINGER_ZERO = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class Result:
    """What a job measured: wall time in the client, and how many clients got the right reply."""

    elapsed: float
    ok: int
    failed: int = 0
    detail: str = ""
    #: failed clients whose socket raised ``OSError`` (refused, address in use, reset, ...)
    errors: int = 0

    def require(self, ok: int) -> Result:
        """This result, or ``RuntimeError`` if fewer than ``ok`` clients succeeded."""
        if self.ok < ok or self.failed:
            raise RuntimeError(
                f"{self.ok}/{ok} clients succeeded, {self.failed} failed: {self.detail}"
            )
        return self


def abortive(sock: socket.socket) -> socket.socket:
    """Make ``sock`` close with RST (``SO_LINGER`` 0); returns it.

    Clients close only after reading the server's EOF, so this changes nothing the server sees
    of the script, but it leaves no TIME_WAIT behind. Tens of thousands of TIME_WAIT sockets
    from earlier repetitions would make every later ``bind(port=0)`` and ``connect`` search
    the port range, slowing whichever implementation runs next.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    return sock


def _connect(address: Address, linger_zero: bool = True) -> socket.socket:
    sock = socket.create_connection(address, timeout=SOCKET_TIMEOUT)
    if linger_zero:
        abortive(sock)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_to_eof(sock: socket.socket, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def exchange(address: Address, request: bytes, expect: bytes) -> None:
    """One client: send ``request`` and read to EOF; ``RuntimeError`` unless it got ``expect``."""
    with _connect(address) as sock:
        sock.sendall(request)
        reply = _read_to_eof(sock, len(expect))
    if reply != expect:
        raise RuntimeError(f"{address}: expected {expect!r}, got {reply[:80]!r}")


def run_sequential(
    address: Address, count: int, request: bytes, expect: bytes, linger_zero: bool = True
) -> Result:
    """``count`` clients one after another: connect, send ``request``, read to EOF, close.

    A client whose socket raises ``OSError`` fails (counted in ``errors``) and the next one
    goes on; clients not started by the deadline fail too. ``linger_zero=False`` closes
    normally, so each connection leaves a TIME_WAIT entry on the server's side (it closed
    first), as a test suite does.
    """
    ok = errors = 0
    bad = ""
    deadline = time.monotonic() + JOB_SECONDS
    start = time.perf_counter()
    for _ in range(count):
        if time.monotonic() > deadline:
            bad = "timed out"
            break
        try:
            with _connect(address, linger_zero) as sock:
                sock.sendall(request)
                reply = _read_to_eof(sock, len(expect))
        except OSError as exc:
            errors += 1
            bad = repr(exc)
            continue
        if reply == expect:
            ok += 1
        else:
            bad = repr(reply[:80])
    return Result(time.perf_counter() - start, ok, count - ok, bad, errors)


class _Client:
    __slots__ = ("reply", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reply = bytearray()
        self.writing = True


def run_concurrent(
    targets: Sequence[Address], concurrency: int, request: bytes, expect: bytes
) -> Result:
    """One client per target, at most ``concurrency`` at a time, all in one selector."""
    selector = selectors.DefaultSelector()
    pending = deque(targets)
    live: set[_Client] = set()
    ok = failed = 0
    detail = ""
    start = time.perf_counter()
    deadline = time.monotonic() + JOB_SECONDS

    def finish(client: _Client, good: bool, why: str) -> None:
        nonlocal ok, failed, detail
        selector.unregister(client.sock)
        client.sock.close()
        live.discard(client)
        if good:
            ok += 1
        else:
            failed += 1
            detail = why

    try:
        while (pending or live) and time.monotonic() < deadline:
            while pending and len(live) < concurrency:
                sock = abortive(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.setblocking(False)
                code = sock.connect_ex(pending.popleft())
                client = _Client(sock)
                live.add(client)
                selector.register(sock, selectors.EVENT_WRITE, client)
                if code not in (0, errno.EINPROGRESS):
                    finish(client, False, f"connect: {errno.errorcode.get(code, code)}")
            for key, _ in selector.select(1.0):
                client = key.data
                if client.writing:
                    code = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        finish(client, False, f"connect: {errno.errorcode.get(code, code)}")
                        continue
                    client.sock.send(request)  # a few bytes into an empty buffer: all go
                    client.writing = False
                    selector.modify(client.sock, selectors.EVENT_READ, client)
                    continue
                try:
                    data = client.sock.recv(65536)
                except OSError as exc:
                    finish(client, False, f"recv: {exc}")
                    continue
                if data:
                    client.reply += data
                else:
                    good = client.reply == expect
                    finish(client, good, "" if good else f"reply {bytes(client.reply[:80])!r}")
    finally:
        for client in list(live):
            finish(client, False, "timed out")
        selector.close()
    failed += len(pending)
    return Result(time.perf_counter() - start, ok, failed, detail)


def run_pingpong(address: Address, steps: int) -> Result:
    """Send one byte and wait for one back, ``steps`` times; then read to EOF."""
    with _connect(address) as sock:
        start = time.perf_counter()
        ok = 0
        for _ in range(steps):
            sock.sendall(b"x")
            if sock.recv(1) == b"y":
                ok += 1
        elapsed = time.perf_counter() - start
        tail = _read_to_eof(sock, 16)
    return Result(elapsed, ok, steps - ok + len(tail), repr(tail))


def run_bulk_read(address: Address, size: int) -> Result:
    """Read everything the server sends until EOF; ok is 1 if it was ``size`` bytes."""
    buffer = bytearray(_CHUNK)
    total = 0
    start = time.perf_counter()
    with _connect(address) as sock:
        sock.sendall(b"x")
        while total <= size:
            count = sock.recv_into(buffer)
            if not count:
                break
            total += count
    elapsed = time.perf_counter() - start
    return Result(elapsed, int(total == size), int(total != size), f"{total} of {size} bytes")


_PAYLOADS: dict[int, bytes] = {}


def run_bulk_write(address: Address, size: int, expect: bytes) -> Result:
    """Send ``size`` bytes, then read the reply to EOF; ok is 1 if it was ``expect``."""
    payload = _PAYLOADS.setdefault(size, b"\x5a" * size)
    start = time.perf_counter()
    with _connect(address) as sock:
        sock.sendall(payload)
        reply = _read_to_eof(sock, len(expect))
    elapsed = time.perf_counter() - start
    good = reply == expect
    return Result(elapsed, int(good), int(not good), repr(reply[:80]))


_JOBS: dict[str, Callable[..., Result]] = {
    "sequential": run_sequential,
    "concurrent": run_concurrent,
    "pingpong": run_pingpong,
    "bulk_read": run_bulk_read,
    "bulk_write": run_bulk_write,
}


def _worker(pipe: Connection) -> None:
    raise_fd_limit()
    pipe.send(None)  # ready: started and imported
    while True:
        job = pipe.recv()
        if job is None:
            return
        kind, kwargs = job
        try:
            pipe.send(_JOBS[kind](**kwargs))
        except Exception as exc:
            pipe.send(Result(0.0, 0, 1, f"{kind} raised {exc!r}"))


class ClientProcess:
    """A worker process that runs client jobs; use as a context manager."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=_worker, args=(child,), name="bench-clients", daemon=True
        )
        self._process.start()
        child.close()
        # Wait for it, so its start-up does not compete with the first scenario for the CPU.
        if not self._pipe.poll(JOB_SECONDS) or self._pipe.recv() is not None:
            raise RuntimeError("the client process did not start in time")

    def run(self, kind: str, **kwargs: Any) -> Result:
        """Run job ``kind`` in the worker and return its result (fails after ``JOB_SECONDS``)."""
        self._pipe.send((kind, kwargs))
        if not self._pipe.poll(JOB_SECONDS + 10.0):
            raise RuntimeError(f"client job {kind} did not finish in time")
        result = self._pipe.recv()
        assert isinstance(result, Result)
        return result

    def close(self) -> None:
        """Stop the worker."""
        try:
            self._pipe.send(None)
        except OSError:
            pass
        self._process.join(10.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10.0)
        self._pipe.close()
        self._process.close()

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
