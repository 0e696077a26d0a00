"""Scale and hostile load: thousands of sockets on one reactor thread, and clients that misbehave.

Each hostile-client test ends with :func:`healthy`: the server under attack and a brand-new one
still answer a good client, and the reactor thread that started with the test is the one still
running. Every in-process test runs inside :func:`no_leaks`: once its servers are closed and the
reactor is stopped (``stop_reactor()``), the process holds exactly the descriptors it held
before. File-descriptor exhaustion runs in a subprocess, which lowers its own
``RLIMIT_NOFILE``. Concurrent clients are driven by one
selector (:func:`run_clients`), with a deadline.
"""

from __future__ import annotations

import collections
import errno
import json
import resource
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import HTTP_OK, connect, open_fds, read_exactly, read_to_eof

from selectserver import (
    RECEIVE,
    STALL,
    CommandServer,
    Outcome,
    ReadUntil,
    statistics,
    stop_reactor,
)

Address = tuple[str, int]

#: seconds any batch of clients, or any wait for the server, may take before the test fails
DEADLINE = 20.0
REACTOR = "selectserver-reactor"
LINGER_ZERO = struct.pack("ii", 1, 0)
HELLO = [RECEIVE, b"hello"]
BIG = b"\0" * (32 * 1024 * 1024)


@pytest.fixture(scope="module", autouse=True)
def enough_fds() -> None:
    """Raise the soft descriptor limit to 8192 (500 servers x 5 clients need ~5,500)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# ---- clients in one selector -----------------------------------------------------------------


@dataclass(eq=False)
class Client:
    """One scripted client: send ``request`` once connected, then read until EOF."""

    address: Address
    request: bytes
    reply: bytearray = field(default_factory=bytearray)
    error: str | None = None
    sock: socket.socket | None = None
    sent: bool = False


def run_clients(clients: Sequence[Client], deadline: float = DEADLINE) -> None:
    """Run every client at once until each has read EOF or failed; all sockets end up closed."""
    selector = selectors.DefaultSelector()
    live = 0
    try:
        for client in clients:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.sock = sock
            sock.setblocking(False)
            code = sock.connect_ex(client.address)
            if code not in (0, errno.EINPROGRESS):
                client.error = errno.errorcode.get(code, str(code))
                continue
            selector.register(sock, selectors.EVENT_WRITE, client)
            live += 1
        end = time.monotonic() + deadline
        while live and time.monotonic() < end:
            for key, _ in selector.select(0.5):
                client = key.data
                sock = client.sock
                if not client.sent:
                    sock.sendall(client.request)  # a short request fits an empty buffer
                    client.sent = True
                    selector.modify(sock, selectors.EVENT_READ, client)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError as exc:
                    client.error, data = repr(exc), b""
                client.reply += data
                if not data:
                    selector.unregister(sock)
                    live -= 1
        for key in list(selector.get_map().values()):
            key.data.error = "no EOF before the deadline"
    finally:
        selector.close()
        for client in clients:
            if client.sock is not None:
                client.sock.close()


def abort(sock: socket.socket) -> None:
    """Close ``sock`` with RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    sock.close()


# ---- health checks ---------------------------------------------------------------------------


def reactor_threads() -> list[threading.Thread]:
    """The live reactor threads of this process."""
    return [thread for thread in threading.enumerate() if thread.name == REACTOR]


@contextmanager
def no_leaks() -> Iterator[ExitStack]:
    """An ExitStack for servers; on exit, closes them, stops the reactor and checks that the
    process holds exactly the descriptors it held before."""
    stop_reactor()
    before = open_fds()
    with ExitStack() as stack:
        yield stack
    stop_reactor()
    assert open_fds() == before, "descriptors leaked"


def ask(address: Address, request: bytes, limit: int = 64 * 1024 * 1024) -> bytes:
    """Send ``request``, half-close, and read the whole reply (at most ``limit`` bytes)."""
    with connect(address) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock, limit)


def healthy(
    stack: ExitStack,
    server: CommandServer,
    reactor: threading.Thread,
    request: bytes,
    reply: bytes,
    outcome: Outcome = Outcome.COMPLETED,
) -> None:
    """``server`` still answers ``request`` with ``reply`` (ending in ``outcome``), and a new
    server answers too, on the same, single, live reactor thread."""
    count = len(server.connections)
    assert ask(server.address, request) == reply
    (*_, record) = server.wait_for_connections(count + 1, timeout=DEADLINE)
    assert record.outcome is outcome
    fresh = stack.enter_context(CommandServer(HELLO, verbose=False))
    assert ask(fresh.address, b"x") == b"hello"
    assert reactor_threads() == [reactor]
    assert reactor.is_alive()
    assert statistics().running


def start(
    stack: ExitStack, script: Sequence[object], **kwargs: Any
) -> tuple[CommandServer, threading.Thread]:
    """A server on the default reactor (closed with ``stack``), and that reactor's thread."""
    server = stack.enter_context(CommandServer(script, verbose=False, **kwargs))
    (reactor,) = reactor_threads()
    return server, reactor


def outcomes(server: CommandServer, n: int) -> collections.Counter[Outcome | None]:
    """How the first ``n`` connections ended (waits for them)."""
    return collections.Counter(r.outcome for r in server.wait_for_connections(n, DEADLINE))


# ---- scale -----------------------------------------------------------------------------------


def test_1000_servers_alive_at_once_on_one_thread() -> None:
    """1000 servers listen together and each answers, on one thread, with 1000 + 3 descriptors."""
    with no_leaks() as stack:
        before = open_fds()
        reactor_fds = 0 if statistics().running else 3  # its selector and wake-up socketpair
        servers = [stack.enter_context(CommandServer(HELLO, verbose=False)) for _ in range(1000)]
        assert open_fds() - before == 1000 + reactor_fds
        for server in servers:
            assert ask(server.address, b"x") == b"hello"
        assert len(reactor_threads()) == 1
        assert statistics().servers == 1000
        for server in servers:
            (record,) = server.wait_for_connections(1, DEADLINE)
            assert record.received == [b"x"]
    assert statistics().servers == 0


def test_500_servers_times_5_concurrent_connections() -> None:
    """2500 simultaneous clients of 500 servers each get the reply; each server saw its five."""
    with no_leaks() as stack:
        servers = [
            stack.enter_context(CommandServer([ReadUntil(b"\n"), b"ok"], verbose=False))
            for _ in range(500)
        ]
        clients = [
            Client(server.address, b"%d/%d\n" % (index, k))
            for k in range(5)
            for index, server in enumerate(servers)
        ]
        run_clients(clients)
        assert [c.error for c in clients if c.error] == []
        assert all(c.reply == b"ok" for c in clients)
        for index, server in enumerate(servers):
            records = server.wait_for_connections(5, DEADLINE)
            assert {r.outcome for r in records} == {Outcome.COMPLETED}
            assert sorted(server.received) == [b"%d/%d\n" % (index, k) for k in range(5)]
        assert statistics().servers == 500


# ---- hostile clients -------------------------------------------------------------------------


def test_flood_into_a_receive_step() -> None:
    """50 MB into a RECEIVE step: the step keeps one read; STALL counts the rest as discarded."""
    total = 50 * 1000 * 1000
    with no_leaks() as stack:
        server, reactor = start(stack, [RECEIVE, b"ok", STALL])
        with connect(server.address) as sock:
            sender = threading.Thread(target=sock.sendall, args=(b"\0" * total,))
            sender.start()
            assert sock.recv(2) == b"ok"
            sender.join(DEADLINE)
            assert not sender.is_alive()
        (record,) = server.wait_for_connections(1, DEADLINE)
        assert record.outcome is Outcome.PEER_CLOSED
        (first,) = record.received
        assert 0 < len(first) <= 1024 * 1024, "one read is kept, not the flood"
        assert len(first) + record.discarded == total
        assert record.dropped == 0
        server.check()
        healthy(stack, server, reactor, b"x", b"ok", Outcome.PEER_CLOSED)  # STALL ends so


def test_slowloris_half_open_connections_time_out() -> None:
    """200 clients send half a request and stall; others are served meanwhile; all are reaped."""
    with no_leaks() as stack:
        server, reactor = start(stack, [ReadUntil(b"\r\n\r\n"), HTTP_OK], timeout=1.0)
        stalled = [stack.enter_context(connect(server.address)) for _ in range(200)]
        for sock in stalled:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: slow")
        assert ask(server.address, b"GET / HTTP/1.0\r\n\r\n") == HTTP_OK
        # Accepts come in connect order, so the 200 are in, waiting for their timeout (1 s).
        assert statistics().connections >= 200
        counts = outcomes(server, 201)
        assert counts == {Outcome.TIMED_OUT: 200, Outcome.COMPLETED: 1}
        for sock in stalled:
            assert sock.recv(1) == b""  # the server closed it
        with pytest.raises(AssertionError, match="200 server-side failure"):
            server.check()
        healthy(stack, server, reactor, b"GET / HTTP/1.0\r\n\r\n", HTTP_OK)


def test_connect_then_reset_clients() -> None:
    """500 clients connect and reset at once; each record says PEER_RESET, nothing fails."""
    with no_leaks() as stack:
        server, reactor = start(stack, HELLO)
        for _ in range(500):
            abort(socket.create_connection(server.address, timeout=DEADLINE))
        counts = outcomes(server, 500)
        assert set(counts) <= {Outcome.PEER_RESET, Outcome.PEER_CLOSED}
        assert sum(counts.values()) == 500
        server.check()
        healthy(stack, server, reactor, b"x", b"hello")


@pytest.mark.parametrize(
    ("script", "vanish_after", "full_reply", "outcome"),
    [
        # More than the socket buffers of both ends hold, so the send is cut short.
        pytest.param([RECEIVE, BIG], 1024, BIG, Outcome.COMPLETED, id="mid-send"),
        pytest.param(
            [RECEIVE, b"first", RECEIVE, b"second"],
            5,
            b"first",
            Outcome.PEER_CLOSED,  # a half-closing client ends the second receive step
            id="mid-receive",
        ),
    ],
)
def test_clients_vanishing_mid_script(
    script: list[object], vanish_after: int, full_reply: bytes, outcome: Outcome
) -> None:
    """100 clients leave mid-script, half with FIN, half with RST: each ends as the peer's doing."""
    with no_leaks() as stack:
        server, reactor = start(stack, script)
        for index in range(100):
            with connect(server.address) as sock:
                sock.sendall(b"x")
                read_exactly(sock, vanish_after)
                if index % 2:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        counts = outcomes(server, 100)
        assert set(counts) <= {Outcome.PEER_CLOSED, Outcome.PEER_RESET}, counts
        server.check()
        healthy(stack, server, reactor, b"x", full_reply, outcome)


def test_closed_connections_leave_no_timers_behind() -> None:
    """2000 short connections: the timer heap holds little more than the live connections'."""
    with no_leaks() as stack:
        server, _ = start(stack, HELLO)
        for _ in range(2000):
            with connect(server.address) as sock:
                sock.sendall(b"x")
                assert read_to_eof(sock) == b"hello"
        assert outcomes(server, 2000) == {Outcome.COMPLETED: 2000}
        # Each connection arms a receive deadline and a drain deadline: 4000 if none is dropped.
        assert statistics().timers < 1000


# ---- limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "max_receive", "kept", "dropped"),
    [
        # A count step reads all 5 MB but keeps max_receive of it.
        pytest.param([5_000_000, b"ok"], 65536, [65536], 5_000_000 - 65536, id="count"),
        # The cap is per connection: the second step keeps what the first left room for.
        pytest.param([1000, b"a", 1000, b"ok"], 1500, [1000, 500], 500, id="two-steps"),
    ],
)
def test_max_receive_caps_what_a_record_keeps(
    script: list[object], max_receive: int, kept: list[int], dropped: int
) -> None:
    """``max_receive`` bounds the bytes a record keeps; ``dropped`` counts the rest exactly."""
    with no_leaks() as stack:
        server, _ = start(stack, script, max_receive=max_receive)
        with connect(server.address) as sock:
            for size, answer in zip(script[0::2], script[1::2], strict=True):
                assert isinstance(size, int)
                assert isinstance(answer, bytes)
                sock.sendall(b"z" * size)
                assert read_exactly(sock, len(answer)) == answer
        (record,) = server.wait_for_connections(1, DEADLINE)
        assert record.outcome is Outcome.COMPLETED
        assert [len(data) for data in record.received] == kept
        assert record.dropped == dropped
        server.check()


def test_read_until_beyond_max_receive_fails() -> None:
    """A ReadUntil that buffers more than max_receive without its delimiter fails, not grows."""
    with no_leaks() as stack:
        server, reactor = start(stack, [ReadUntil(b"\n"), b"never"], max_receive=1000)
        with connect(server.address) as sock:
            sock.sendall(b"y" * 5000)
            assert read_to_eof(sock) == b""
        (record,) = server.wait_for_connections(1, DEADLINE)
        assert record.outcome is Outcome.ERROR
        assert "max_receive=1000" in (record.failure or "")
        with pytest.raises(AssertionError, match="max_receive=1000"):
            server.check()
        healthy(stack, server, reactor, b"line\n", b"never")


# ---- file-descriptor exhaustion (in a subprocess: it lowers its own RLIMIT_NOFILE) ----------

EXHAUST = r"""
import json, os, resource, sys, time
from selectserver import RECEIVE, CommandServer, statistics

def say(*words):
    print(*words, flush=True)

srv = CommandServer([RECEIVE, b"hello"], verbose=False)
say("port", srv.port)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
hog = []
try:
    for _ in range(64):
        hog.append(os.open(os.devnull, os.O_RDONLY))
except OSError as exc:
    assert exc.errno == 24, exc
else:
    raise SystemExit("could not exhaust descriptors")
say("exhausted", len(hog))
sys.stdin.readline()  # the parent has connected its clients
cpu, wall = time.process_time(), time.monotonic()
time.sleep(1.0)  # the measured interval: the reactor retries accept() meanwhile
cpu, wall = time.process_time() - cpu, time.monotonic() - wall
stats = statistics()
for fd in hog:
    os.close(fd)
say("measured", json.dumps({"cpu": cpu, "wall": wall, "running": stats.running,
                            "connections": stats.connections}))
sys.stdin.readline()  # the parent has read every reply
records = srv.wait_for_connections(3, timeout=10)
srv.check()
srv.close()
say("done", json.dumps([r.outcome.value for r in records]))
"""


def test_fd_exhaustion_neither_spins_nor_kills_the_reactor() -> None:
    """accept() fails with EMFILE: the reactor idles (low CPU), lives, and serves once fds free."""
    child = subprocess.Popen(
        [sys.executable, "-c", EXHAUST],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None
    assert child.stdout is not None

    def expect(word: str) -> str:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith(word + " "), f"child said {line!r}, expected {word!r}"
        return line.split(" ", 1)[1]

    try:
        port = int(expect("port"))
        expect("exhausted")
        with ExitStack() as stack:
            clients = [stack.enter_context(connect(("127.0.0.1", port))) for _ in range(3)]
            for sock in clients:
                sock.sendall(b"x")
            child.stdin.write("go\n")
            child.stdin.flush()
            measured = json.loads(expect("measured"))
            for sock in clients:
                assert read_to_eof(sock) == b"hello"
        child.stdin.write("go\n")
        child.stdin.flush()
        done = json.loads(expect("done"))
        assert child.wait(DEADLINE) == 0
    finally:
        child.kill()
        child.wait(DEADLINE)
        child.stdin.close()
        child.stdout.close()
    assert measured["running"]
    assert measured["connections"] == 0, "nothing can be accepted while fds are exhausted"
    assert measured["cpu"] < 0.25 * measured["wall"], f"the reactor spins: {measured}"
    assert done == ["completed"] * 3


# ---- churn: a long suite's worth of short-lived servers ---------------------------------------


def test_100000_connections_over_1000_successive_servers_raise_no_error() -> None:
    """Each server closes its connections first, so each leaves a TIME_WAIT entry on its port;
    100,000 of them must not make a later server fail to bind (EADDRINUSE, EADDRNOTAVAIL) or
    any client fail to connect. The clients close normally (no RST), as real ones do."""
    servers, clients_each = 1000, 100
    with no_leaks():
        for _ in range(servers):
            with CommandServer(HELLO, verbose=False) as server:
                clients = [Client(server.address, b"x") for _ in range(clients_each)]
                run_clients(clients)
                assert [(c.error, bytes(c.reply)) for c in clients] == [
                    (None, b"hello")
                ] * clients_each
                records = server.wait_for_connections(clients_each, timeout=DEADLINE)
                assert {record.outcome for record in records} == {Outcome.COMPLETED}
            server.check()
