"""FaultProxy under fire: random faults added and removed while clients talk through it.

A real ``FaultProxy`` sits in front of a real ``CommandServer`` (a generated script, the same for
every connection). Several clients connect through the proxy and make random moves (sends,
receives, half-closes, closes, RSTs, pauses, late connects) while the test thread adds and
removes random faults (every kind, every direction, targeted at some connections, drawn with
a probability and a seed). Then the faults are cleared, the clients leave (close, RST, or
half-close and read to the end), and the invariants are checked:

* ``proxy.check()`` raises nothing: no internal error;
* every proxied connection ends (``wait_for_connections``, bounded), and a client that reads to
  the end gets its EOF or RST promptly;
* each record is consistent: ``client_sent`` is a prefix of what the client really sent and
  ``server_sent`` of what the server's script sends, and the counts passed on are at most those;
* on a connection that never drew a lossy fault (``Timeout``, ``LimitData``, ``ResetPeer``),
  what the client received is a prefix of what the server sent, all of it when the client read
  a clean EOF, and what the server received is a prefix of what the client sent;
* an ordinary close is never turned into an RST: without a reset fault, the proxy resets a side
  only when the other one reset (or failed);
* an unrelated canary server still answers promptly, and once everything is closed and
  ``stop_reactor()`` has run, no thread or descriptor is left behind.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from _proxying import settle
from conftest import canary_answers
from hypothesis import given
from hypothesis import strategies as st
from test_stateful import open_fds, reactor_threads

from selectserver import (
    HANGUP,
    RESET,
    Bandwidth,
    CommandServer,
    FaultHandle,
    FaultProxy,
    Hold,
    Latency,
    LimitData,
    Outcome,
    ResetPeer,
    Slicer,
    SlowClose,
    Timeout,
    compile_script,
    statistics,
    stop_reactor,
)
from selectserver._script import SendStep
from selectserver.strategies import scripts

from ._campaign import FUZZ, Campaign

ABORT = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() sends RST
LOSSY = (Timeout, LimitData, ResetPeer)
#: Seconds a client that reads to the end may wait for its EOF or RST, once faults are cleared.
DRAIN_SECONDS = 3.0
#: Seconds every proxied connection has to end once the clients have left.
END_SECONDS = 10.0
MAX_CLIENTS = 6

Move = tuple[Any, ...]


def is_reset_fault(fault: object) -> bool:
    return isinstance(fault, ResetPeer) or (isinstance(fault, LimitData) and fault.then is RESET)


# ---- what an example does ------------------------------------------------------------------------


directions = st.sampled_from(["downstream", "upstream", "both"])
short = st.sampled_from([0.0, 0.001, 0.005, 0.02]) | st.floats(0, 0.02)
faults = st.one_of(
    st.builds(Latency, short, st.just(0.0) | short, st.integers(0, 3), directions),
    st.builds(Bandwidth, st.sampled_from([100_000, 1_000_000]), directions),
    st.integers(1, 64).flatmap(
        lambda size: st.builds(
            Slicer,
            st.just(size),
            st.integers(0, size - 1),
            st.just(0.0) | short,
            st.integers(0, 3),
            directions,
        )
    ),
    st.builds(SlowClose, short, directions),
    st.builds(Timeout, st.none() | st.sampled_from([0.0, 0.01, 0.05]), directions),
    st.builds(Hold, directions),
    st.builds(ResetPeer, st.integers(0, 2000), directions),
    st.builds(LimitData, st.integers(0, 2000), st.sampled_from([HANGUP, RESET]), directions),
)
#: connections=: all, some indices, or a predicate (kept as a name, so examples print well)
targets = st.none() | st.lists(st.integers(0, MAX_CLIENTS + 1), max_size=3) | st.just("even")
draws = st.just((1.0, 0)) | st.tuples(st.sampled_from([0.0, 0.5, 1.0]), st.integers(0, 5))


@dataclass(frozen=True)
class Plan:
    script: list[object]
    clients: int
    moves: list[Move]
    endings: list[str]  # how each client still open at the end leaves: close, rst or drain


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    script = draw(scripts(max_steps=8, max_delay=0.005, allow_stall=False, max_send_size=256))
    clients = draw(st.integers(1, 4))
    client = st.integers(0, MAX_CLIENTS - 1)
    moves = st.one_of(
        st.tuples(st.just("send"), client, st.binary(min_size=1, max_size=1024)),
        st.tuples(st.sampled_from(["recv", "close", "rst", "half-close"]), client),
        st.tuples(st.just("pause"), st.integers(0, 5000)),
        st.tuples(st.just("connect")),
        st.tuples(st.just("add"), faults, targets, draws),
        st.tuples(st.just("add"), faults, targets, draws),
        st.tuples(st.just("add"), faults, targets, draws),
        st.tuples(st.just("remove"), st.integers(0, 20)),
        st.tuples(st.just("clear")),
    )
    endings = st.sampled_from(["close", "rst", "drain", "drain"])
    return Plan(
        script,
        clients,
        draw(st.lists(moves, min_size=4, max_size=40)),
        draw(st.lists(endings, min_size=MAX_CLIENTS, max_size=MAX_CLIENTS)),
    )


@dataclass(eq=False)
class Client:
    sock: socket.socket
    name: tuple[str, int] | None  # its address: the proxy record's peer
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    eof: bool = False  # read a clean EOF
    reset: bool = False  # read ECONNRESET
    open: bool = True
    closed: bool = False  # it closed (or reset) its socket: its kernel resets what arrives next


def connect(proxy: FaultProxy) -> Client | None:
    """A non-blocking client (None if the proxy refused it), accepted by the proxy when this
    returns (two passes of its reactor), so the k-th client is the proxy's connection k; one
    reset before connect() returned is kept, as a client that saw a reset."""
    try:
        return _connect(proxy.address)
    finally:
        settle(proxy)


def _connect(address: tuple[str, int]) -> Client | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(address)
    except ConnectionResetError:
        return Client(sock, None, reset=True, open=False)
    except OSError:
        sock.close()
        return None
    try:
        name: tuple[str, int] | None = sock.getsockname()
    except OSError:  # reset already
        name = None
    sock.setblocking(False)
    return Client(sock, name)


def receive(client: Client) -> None:
    """One recv: bytes, a clean EOF or a reset (would-block is no news)."""
    if client.eof or client.reset:
        return
    try:
        data = client.sock.recv(65536)
    except (TimeoutError, BlockingIOError):
        return
    except ConnectionResetError:
        client.reset = True
        return
    except OSError:
        return
    if data:
        client.received += data
    else:
        client.eof = True


def leave(client: Client, how: str) -> None:
    if not client.open:
        return
    client.open = False
    client.closed = how != "drain"
    if how == "rst":
        try:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
        except OSError:
            pass
    elif how == "drain":
        client.sock.setblocking(True)
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + DRAIN_SECONDS
        while not (client.eof or client.reset):
            left = deadline - time.monotonic()
            assert left > 0, (
                f"no EOF or RST within {DRAIN_SECONDS} s of the faults' clearing, "
                f"after {len(client.received)} bytes"
            )
            client.sock.settimeout(left)
            receive(client)
    client.sock.close()


def predicate(target: object) -> Callable[[Any], object] | list[int] | None:
    if target == "even":
        return lambda record: record.index % 2 == 0
    assert target is None or isinstance(target, list)
    return target


def play_move(
    move: Move, proxy: FaultProxy, clients: list[Client], handles: list[FaultHandle]
) -> None:
    what = move[0]
    if what == "pause":
        time.sleep(move[1] / 1e6)
    elif what == "connect":
        if len(clients) < MAX_CLIENTS:
            client = connect(proxy)
            if client is not None:
                clients.append(client)
    elif what == "add":
        _, fault, target, (probability, seed) = move
        handles.append(
            proxy.add(fault, connections=predicate(target), probability=probability, seed=seed)
        )
    elif what == "remove":
        if handles:
            proxy.remove(handles[move[1] % len(handles)])
    elif what == "clear":
        proxy.clear()
    else:
        if not clients:
            return
        client = clients[move[1] % len(clients)]
        if not client.open:
            return
        try:
            if what == "send":
                client.sent += move[2][: client.sock.send(move[2])]
            elif what == "recv":
                receive(client)
            elif what == "half-close":
                client.sock.shutdown(socket.SHUT_WR)
            else:
                leave(client, what)
        except OSError:  # would block, reset, broken pipe: all fair
            pass


# ---- the checks ----------------------------------------------------------------------------------


def check_records(
    proxy: FaultProxy, server: CommandServer, clients: list[Client], script_output: bytes
) -> None:
    served = {record.peer: record for record in server.connections}
    records = proxy.connections
    assert len(records) == len(clients), (records, clients)
    for record, client in zip(records, clients, strict=True):
        assert client.name in (record.peer, None) or client.name[1] == 0, (record, client)
        upstream = served.get(record.via)
        client_sent, server_sent = record.client_sent, record.server_sent
        assert record.unrecorded == 0, record
        # The record keeps what each side really sent, and passes on no more.
        assert bytes(client.sent).startswith(client_sent), (client.sent, client_sent)
        assert script_output.startswith(server_sent), (script_output, server_sent)
        assert record.passed_upstream <= len(client_sent) <= len(client.sent), record
        assert record.passed_downstream <= len(server_sent), record
        lossy = any(isinstance(fault, LOSSY) for fault in record.faults)
        if not lossy:
            # Faithful without a lossy fault: what arrives is what was sent, in order.
            assert server_sent.startswith(bytes(client.received)), (
                f"the client got {bytes(client.received)!r}, the server sent {server_sent!r}"
                f" (faults {record.faults})"
            )
            if client.eof:
                assert bytes(client.received) == server_sent, (
                    f"a clean EOF after {bytes(client.received)!r}, the server sent "
                    f"{server_sent!r} (faults {record.faults})"
                )
                if upstream is not None and upstream.outcome in (
                    Outcome.COMPLETED,
                    Outcome.HUNG_UP,
                ):
                    assert server_sent == script_output, (server_sent, script_output)
            if upstream is not None:
                got = b"".join(upstream.received)
                assert bytes(client.sent).startswith(got), (
                    f"the server got {got!r}, the client sent {bytes(client.sent)!r}"
                    f" (faults {record.faults})"
                )
        if not any(is_reset_fault(fault) for fault in record.faults):
            # An ordinary close is never turned into an RST: the proxy resets only when a side
            # reset (or failed). A side that sent EOF and then RST keeps "eof" as its end, so
            # the server's own record says whether its script reset; a client that closed its
            # socket (not a half-close) resets what arrives after, in its kernel.
            ends = (record.client_end or "", record.server_end or "")
            server_reset = upstream is not None and upstream.outcome is Outcome.RESET
            someone_reset = (
                server_reset
                or client.closed
                or any(end == "reset" or end.startswith("error") for end in ends)
            )
            assert record.outcome is not Outcome.RESET, record
            if "reset by proxy" in ends or record.outcome is Outcome.PEER_RESET:
                assert someone_reset, f"a reset, but no one reset: {record}"
            if client.reset:
                assert someone_reset, f"the client was reset, but no one reset: {record}"


def test_fuzz_proxy_faults(campaign: Campaign) -> None:
    """Random faults added and removed at random moments while clients talk through a
    FaultProxy: no internal error, every connection ends, records agree with both sides, no
    byte is lost or made up without a lossy fault, no reset without a reset, the reactor still
    serves, and nothing leaks."""

    @FUZZ
    @given(plans())
    def one(plan: Plan) -> None:
        campaign.tick()
        stop_reactor()
        fds = open_fds()
        script_output = b"".join(
            bytes(step.data) for step in compile_script(plan.script) if isinstance(step, SendStep)
        )
        with ExitStack() as stack:
            server = stack.enter_context(CommandServer(plan.script, verbose=False, timeout=5.0))
            proxy = stack.enter_context(FaultProxy(server.address, verbose=False, timeout=5.0))
            clients: list[Client] = []
            for _ in range(plan.clients):
                client = connect(proxy)
                if client is not None:
                    clients.append(client)

            def close_all() -> None:
                for client in clients:
                    client.sock.close()

            stack.callback(close_all)
            handles: list[FaultHandle] = []
            for move in plan.moves:
                play_move(move, proxy, clients, handles)
            proxy.clear()
            assert not proxy.faults
            for client, how in zip(clients, plan.endings, strict=False):
                leave(client, how)
            proxy.wait_for_connections(len(proxy.connections), timeout=END_SECONDS)
            proxy.check()
            check_records(proxy, server, clients, script_output)
            canary_answers()
        assert reactor_threads() <= 1
        stop_reactor()  # the documented way to count exactly
        assert not statistics().running
        assert open_fds() == fds

    campaign.run(one)
