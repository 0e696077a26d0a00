"""Port choice for ``port=0``: a walk over the ephemeral range that TIME_WAIT does not slow."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import read_to_eof

from selectserver import RECEIVE, CommandServer, RefusingServer, _ports

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc")


@pytest.fixture
def files(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Fake /proc files for a fresh walk (and a fresh walk again afterwards)."""
    contents: dict[str, str] = {}
    monkeypatch.setattr(_ports, "_read", lambda path: contents.get(path, ""))
    monkeypatch.setattr(_ports, "_walk", None)
    monkeypatch.setattr(sys, "platform", "linux")
    yield contents
    monkeypatch.setattr(_ports, "_walk", None)


def test_the_walk_covers_odd_ports_of_the_range_skipping_reserved_ones(
    files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    files[_ports._RANGE_FILE] = "40000\t40009\n"
    files[_ports._RESERVED_FILE] = "40003,40007-40008\n"
    monkeypatch.setattr("random.randrange", lambda count: 0)
    seen: list[int] = []
    for _ in range(4):
        *ports, last = _ports.candidates()
        assert last == 0  # the kernel's choice comes last
        seen += ports
    assert set(seen) == {40001, 40005, 40009}
    # 64 steps from the first port: 12 rounds of 5 ports (3 free) and 40001, 40005 again
    assert len(seen) == 12 * 3 + 2
    assert seen[:3] == [40001, 40005, 40009]


@pytest.mark.parametrize("text", ["", "garbage", "10 5", "0 70000", "1 2 3"])
def test_an_unreadable_range_falls_back_to_linuxs_default(files: dict[str, str], text: str) -> None:
    files[_ports._RANGE_FILE] = text
    ports = list(_ports.candidates())[:-1]
    assert ports
    assert all(32769 <= port <= 60999 and port % 2 for port in ports)


def test_elsewhere_the_kernel_chooses(
    files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert list(_ports.candidates()) == [0]


@linux_only
def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next ports of the walk are taken (one listening, one bound by a client-like
    socket without SO_REUSEADDR): the server binds past them and serves."""
    walk = _ports._Walk()
    monkeypatch.setattr(_ports, "_walk", walk)
    step = next(walk.steps)
    walk.steps = iter(range(step, step + 100))  # type: ignore[assignment]
    taken = []
    for offset in range(2):
        port = walk.first + 2 * ((step + offset) % walk.count)
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue  # someone else holds it: skipped all the same
        if offset == 0:
            sock.listen()
        taken.append(sock)
    try:
        with CommandServer([RECEIVE, "ok"], verbose=False) as server:
            assert server.port not in {sock.getsockname()[1] for sock in taken}
            with socket.create_connection(server.address, timeout=10) as client:
                client.sendall(b"hi")
                assert read_to_eof(client) == b"ok"
    finally:
        for sock in taken:
            sock.close()


@linux_only
def test_when_every_walked_port_is_taken_the_kernel_chooses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    monkeypatch.setattr(_ports, "candidates", lambda: iter([holder.getsockname()[1]] * 3 + [0]))
    try:
        with CommandServer([RECEIVE, "ok"], verbose=False) as server:
            assert server.port != holder.getsockname()[1]
    finally:
        holder.close()


def test_a_port_asked_for_is_never_replaced() -> None:
    with RefusingServer() as first, pytest.raises(OSError, match="in use"):
        CommandServer([RECEIVE], port=first.port, verbose=False)


@linux_only
def test_a_server_binds_again_a_port_whose_connections_sit_in_time_wait() -> None:
    """The server closes first, so its port holds TIME_WAIT entries; SO_REUSEADDR binds it."""
    with CommandServer("bye", verbose=False) as server:
        for _ in range(3):
            with socket.create_connection(server.address, timeout=10) as client:
                client.sendall(b"x")
                assert read_to_eof(client) == b"bye"
        server.wait_for_connections(3)
    with (
        CommandServer("again", port=server.port, verbose=False) as again,
        socket.create_connection(again.address, timeout=10) as client,
    ):
        client.sendall(b"x")
        assert read_to_eof(client) == b"again"


@linux_only
def test_a_walked_port_another_socket_bound_to_listen_on_is_left_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bound with SO_REUSEADDR but not listening yet (between its bind and its listen), the
    other socket keeps its port: the server binds the next one, and the other can listen."""
    walk = _ports._Walk()
    monkeypatch.setattr(_ports, "_walk", walk)
    step = next(walk.steps)
    walk.steps = iter(range(step, step + 100))  # type: ignore[assignment]
    port = walk.first + 2 * (step % walk.count)
    other = socket.socket()
    try:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind(("127.0.0.1", port))
        except OSError:
            pytest.skip(f"port {port} is in use here")
        with CommandServer([RECEIVE, "ok"], verbose=False) as server:
            assert server.port != port
            other.listen()  # it still can
    finally:
        other.close()


class _RefusingWalkedPorts(socket.socket):
    """A socket whose bind to any named port fails as a security policy would."""

    def bind(self, address: Any) -> None:
        if address[1] != 0:
            raise PermissionError(13, "Permission denied (injected)")
        super().bind(address)


@linux_only
def test_a_walked_port_that_refuses_for_any_reason_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every walked bind fails (not EADDRINUSE): the kernel's choice serves, and a canary on
    the same reactor, made before, still answers."""
    with CommandServer([RECEIVE, "canary"], verbose=False) as canary:
        monkeypatch.setattr(socket, "socket", _RefusingWalkedPorts)
        with CommandServer([RECEIVE, "ok"], verbose=False) as server:
            monkeypatch.undo()
            for address, reply in ((server.address, b"ok"), (canary.address, b"canary")):
                with socket.create_connection(address, timeout=10) as client:
                    client.sendall(b"hi")
                    assert read_to_eof(client) == reply


def test_a_port_asked_for_that_refuses_raises_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "socket", _RefusingWalkedPorts)
    with pytest.raises(PermissionError, match="injected"):
        CommandServer([RECEIVE], port=40001, verbose=False)
