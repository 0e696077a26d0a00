"""A state machine drives the real reactor through random interleavings of servers and clients.

Servers open and close (sometimes from another thread), clients connect, send lines, read
replies and leave (close, RST or half-close), in any order. Invariants: at most one reactor
thread; it runs while a server is open; every open server answers a fresh client, and a closed
one refuses; at teardown every server is clean, its records agree with what the clients did, and
no file descriptor is left behind.
"""

from __future__ import annotations

import gc
import os
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from _hypothesis_profiles import SETTINGS
from conftest import assert_refused
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

import selectserver
from selectserver import CommandServer, Outcome, ReadUntil, statistics

T = TypeVar("T")

LINE = b"ping\n"
REPLY = b"ok\n"
#: Every connection answers up to 100 lines, one reply per line.
SCRIPT = [ReadUntil(b"\n"), REPLY] * 100
TIMEOUT = 5.0
MAX_SERVERS = 4
MAX_CLIENTS = 8
#: How connections may end here: the clients leave, or their server closes.
ENDINGS = (Outcome.PEER_CLOSED, Outcome.PEER_RESET, Outcome.SERVER_CLOSED)


def in_thread(function: Callable[[], T], elsewhere: bool) -> T:
    """Run ``function`` here, or in another thread (re-raising what it raised there)."""
    if not elsewhere:
        return function()
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(function).result(timeout=2 * TIMEOUT)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def read_to_end(sock: socket.socket) -> bytes:
    """Everything until EOF or a reset (what a client of a closed server may get)."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def open_fds() -> int:
    """File descriptors open in this process (Linux)."""
    return len(os.listdir("/proc/self/fd"))


def reactor_threads() -> int:
    return sum(t.name == "selectserver-reactor" for t in threading.enumerate() if t.is_alive())


@dataclass(eq=False)
class Server:
    server: CommandServer
    closed: bool = False


@dataclass(eq=False)
class Client:
    server: Server
    sock: socket.socket
    address: tuple[str, int]
    sent: int = 0  # lines sent
    read: int = 0  # replies read
    closed: bool = False

    @property
    def pending(self) -> int:
        return self.sent - self.read


class ReactorMachine(RuleBasedStateMachine):
    """The model: which servers are open, and what each client sent and read."""

    servers = Bundle("servers")
    clients = Bundle("clients")

    def __init__(self) -> None:
        super().__init__()
        selectserver.stop_reactor()
        gc.collect()  # sockets an earlier example dropped are closed now, not mid-count
        self.fds = open_fds()
        self.all_servers: list[Server] = []
        self.all_clients: list[Client] = []
        self.probes: list[object] = []  # the local addresses of probe() connections

    def live(self) -> list[Server]:
        return [server for server in self.all_servers if not server.closed]

    # ---- servers ----------------------------------------------------------------------------

    @precondition(lambda self: len(self.live()) < MAX_SERVERS)
    @rule(target=servers, elsewhere=st.booleans())
    def open_server(self, elsewhere: bool) -> Server:
        server = in_thread(lambda: CommandServer(SCRIPT, verbose=False, timeout=TIMEOUT), elsewhere)
        model = Server(server)
        self.all_servers.append(model)
        return model

    @rule(server=consumes(servers), elsewhere=st.booleans())
    def close_server(self, server: Server, elsewhere: bool) -> None:
        in_thread(server.server.close, elsewhere)
        server.closed = True
        self.assert_refused(server)

    @rule(server=servers)
    def probe(self, server: Server) -> None:
        """A fresh client of an open server gets its answer."""
        with socket.create_connection(server.server.address, timeout=TIMEOUT) as sock:
            self.probes.append(sock.getsockname())
            sock.sendall(LINE)
            assert read_exactly(sock, len(REPLY)) == REPLY

    def assert_refused(self, server: Server) -> None:
        # Not a bare connect: another process (an xdist worker) may take the freed port at once.
        assert_refused(server.server.address)

    # ---- clients ----------------------------------------------------------------------------

    @precondition(lambda self: sum(not c.closed for c in self.all_clients) < MAX_CLIENTS)
    @rule(target=clients, server=servers)
    def connect(self, server: Server) -> Client:
        sock = socket.create_connection(server.server.address, timeout=TIMEOUT)
        client = Client(server, sock, sock.getsockname())
        self.all_clients.append(client)
        return client

    @rule(client=clients)
    def send(self, client: Client) -> None:
        if client.closed or client.server.closed:
            return
        client.sock.sendall(LINE)
        client.sent += 1

    @rule(client=clients)
    def read(self, client: Client) -> None:
        if client.closed or client.server.closed or not client.pending:
            return
        assert read_exactly(client.sock, len(REPLY)) == REPLY
        client.read += 1

    @rule(client=consumes(clients), how=st.sampled_from(["close", "reset", "half-close"]))
    def disconnect(self, client: Client, how: str) -> None:
        if client.closed:
            return
        sock = client.sock
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "half-close":
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # ENOTCONN: its closed server reset it (it had unread lines)
                assert client.server.closed
            rest = read_to_end(sock)
            expected = REPLY * client.pending
            if client.server.closed:
                assert expected.startswith(rest)
            else:
                assert rest == expected  # the server answers what was sent, then closes
                client.read = client.sent
        sock.close()
        client.closed = True

    # ---- invariants ---------------------------------------------------------------------------

    @invariant()
    def one_reactor_thread(self) -> None:
        assert reactor_threads() <= 1

    @invariant()
    def reactor_runs_while_a_server_is_open(self) -> None:
        if self.live():
            assert statistics().running

    def teardown(self) -> None:
        for client in self.all_clients:
            client.sock.close()
        for server in self.all_servers:
            server.server.close()
        for server in self.all_servers:
            server.server.check()
            self.check_records(server)
        assert reactor_threads() <= 1
        selectserver.stop_reactor()
        assert not statistics().running
        assert reactor_threads() == 0
        gc.collect()
        assert open_fds() == self.fds

    def check_records(self, server: Server) -> None:
        """Each record got at least the lines its client saw answered, at most those it sent.

        Loopback reuses ports quickly (tcp_tw_reuse), and a connection the server never
        accepted has no record, so a peer address that two records or two clients (counting
        probes) shared names no one client: it is skipped.
        """
        records = server.server.connections
        peers = Counter(record.peer for record in records)
        owners = Counter([client.address for client in self.all_clients] + self.probes)
        clients: dict[object, Client] = {client.address: client for client in self.all_clients}
        for record in records:
            assert record.outcome in ENDINGS, record
            client = clients.get(record.peer)
            if client is not None and peers[record.peer] == owners[client.address] == 1:
                lines = sum(data == LINE for data in record.received)
                assert client.read <= lines <= client.sent, (client, record)


ReactorMachine.TestCase.settings = settings(SETTINGS, stateful_step_count=30)
TestReactorMachine = ReactorMachine.TestCase
