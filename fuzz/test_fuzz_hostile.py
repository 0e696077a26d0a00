"""Hostile clients: random bytes and random disconnects, thrown at live servers."""

from __future__ import annotations

import socket
import struct
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st
from test_stateful import open_fds, reactor_threads, read_exactly

from selectserver import RECEIVE, CommandServer, Outcome, statistics, stop_reactor
from selectserver.strategies import scripts

from ._campaign import FUZZ, Campaign

#: A move: (what, which client or server, bytes to send). ``pause`` waits ``which`` microseconds.
Move = tuple[str, int, bytes]
ABORT = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() sends RST


@dataclass(frozen=True)
class Attack:
    scripts: list[list[object]]
    targets: list[int]  # the server each client connects to
    moves: list[Move]
    endings: list[str]  # how each client still open at the end leaves: "close" or "rst"


@st.composite
def attacks(draw: st.DrawFn) -> Attack:
    servers = draw(st.lists(scripts(max_steps=10, max_delay=0.005), min_size=1, max_size=4))
    clients = draw(st.integers(1, 8))
    client = st.integers(0, clients - 1)
    targets = draw(st.lists(st.integers(0, len(servers) - 1), min_size=clients, max_size=clients))
    moves = st.one_of(
        st.tuples(st.just("send"), client, st.binary(min_size=1, max_size=4096)),
        st.tuples(st.sampled_from(["recv", "close", "rst", "half-close"]), client, st.just(b"")),
        st.tuples(st.just("pause"), st.integers(0, 5000), st.just(b"")),
        st.tuples(st.just("kill"), st.integers(0, len(servers) - 1), st.just(b"")),
    )
    endings = st.sampled_from(["close", "rst"])
    return Attack(
        servers,
        targets,
        draw(st.lists(moves, max_size=60)),
        draw(st.lists(endings, min_size=clients, max_size=clients)),
    )


def connect(address: tuple[str, int]) -> socket.socket | None:
    """A non-blocking client, or None if the server reset it before connect() returned."""
    try:
        sock = socket.create_connection(address)
    except ConnectionResetError:
        return None
    sock.setblocking(False)
    return sock


def leave(sock: socket.socket, how: str) -> None:
    if how == "rst":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
    sock.close()


def play_move(
    move: Move, clients: list[socket.socket | None], servers: list[CommandServer], killed: set[int]
) -> None:
    what, which, data = move
    if what == "pause":
        time.sleep(which / 1e6)
        return
    if what == "kill":
        killer = threading.Thread(target=servers[which].close)
        killer.start()
        killer.join(10)
        assert not killer.is_alive(), "close() from another thread hung"
        killed.add(which)
        return
    sock = clients[which]
    if sock is None:
        return
    try:
        if what == "send":
            sock.send(data)
        elif what == "recv":
            sock.recv(65536)
        elif what == "half-close":
            sock.shutdown(socket.SHUT_WR)
        else:
            leave(sock, what)
            clients[which] = None
    except OSError:  # would block, reset, broken pipe: all fair for a hostile client
        pass


def assert_survived(servers: list[CommandServer], killed: set[int]) -> None:
    """The reactor runs, a fresh server answers, and no connection died of an internal error."""
    assert statistics().running or len(killed) == len(servers)
    with (
        CommandServer([RECEIVE, b"alive"], verbose=False) as fresh,
        socket.create_connection(fresh.address, timeout=5) as sock,
    ):
        sock.sendall(b"?")
        assert read_exactly(sock, 5) == b"alive"
    problems = []
    for server in servers:
        server.close()
        for record in server.connections:
            assert record.outcome is not None, record
            assert record.outcome is not Outcome.ERROR, record.describe()
        try:
            server.check()
        except AssertionError as exc:  # unmatched Expect steps and the like are fair
            problems.append(str(exc))
    assert not [text for text in problems if "internal error" in text or "listener" in text]


def test_fuzz_hostile_clients(campaign: Campaign) -> None:
    """Whatever bytes clients send and however they leave (close, RST, half-close, mid-step,
    while servers close), the reactor keeps running, a fresh server answers, no connection ends
    in an internal error, and closing everything leaves no thread or descriptor behind."""

    @FUZZ
    @given(attacks())
    def one(attack: Attack) -> None:
        campaign.tick()
        stop_reactor()
        fds = open_fds()
        with ExitStack() as stack:
            servers = [
                stack.enter_context(CommandServer(script, verbose=False, timeout=5.0))
                for script in attack.scripts
            ]
            clients = [connect(servers[target].address) for target in attack.targets]
            for sock in clients:
                if sock is not None:
                    stack.callback(sock.close)
            killed: set[int] = set()
            for move in attack.moves:
                play_move(move, clients, servers, killed)
            for sock, how in zip(clients, attack.endings, strict=True):
                if sock is not None:
                    leave(sock, how)
            assert_survived(servers, killed)
        assert reactor_threads() <= 1
        stop_reactor()  # the documented way to count exactly
        assert not statistics().running
        assert open_fds() == fds

    campaign.run(one)
