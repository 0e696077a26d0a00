"""The reference client: expected transcripts, payloads, and plays against real servers."""

from __future__ import annotations

import errno
import re
import select
import socket
import time
from types import SimpleNamespace

import pytest
from _checks import check_round_trip, records_of

from selectserver import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    CommandServer,
    Delay,
    Drip,
    Expect,
    Garbage,
    Outcome,
    ReadUntil,
    Throttle,
    compile_script,
)
from selectserver._script import ReadStep
from selectserver.reference import (
    Ending,
    _literal,
    _plan,
    _Player,
    _seeded,
    expected_outcome,
    expected_transcript,
    needs_sync,
    play,
    server_sync,
)


def serve(script: object, **kwargs: object) -> CommandServer:
    """A quiet server with a short timeout, so a test that goes wrong fails fast."""
    kwargs.setdefault("timeout", 5.0)
    return CommandServer(script, verbose=False, **kwargs)  # type: ignore[arg-type]


# ---- plans, without sockets --------------------------------------------------------------------


PLAYS = [
    pytest.param([RECEIVE, b"hello"], Ending.EOF, Outcome.COMPLETED, id="receive-send"),
    pytest.param("hello", Ending.EOF, Outcome.COMPLETED, id="bare-str"),
    pytest.param([], Ending.EOF, Outcome.COMPLETED, id="empty"),
    pytest.param([b"abc", RESET], Ending.RESET, Outcome.RESET, id="send-reset"),
    pytest.param([RESET], Ending.RESET, Outcome.RESET, id="reset"),
    pytest.param([HALF_CLOSE, RESET], Ending.RESET, Outcome.RESET, id="half-close-reset"),
    pytest.param(
        [b"abc", HALF_CLOSE, RECEIVE, RESET], Ending.RESET, Outcome.RESET, id="read-after-fin"
    ),
    pytest.param(
        [RECEIVE, RECEIVE, 5, ReadUntil(b"\r\n"), Expect(re.escape("a.b")), b"x", HANGUP],
        Ending.EOF,
        Outcome.HUNG_UP,
        id="every-receive-kind",
    ),
    pytest.param([RECEIVE, STALL], Ending.CLIENT_CLOSED, Outcome.PEER_CLOSED, id="stall"),
    pytest.param(
        [HALF_CLOSE, RECEIVE, 3, STALL],
        Ending.CLIENT_CLOSED,
        Outcome.PEER_CLOSED,
        id="stall-after-fin",
    ),
    pytest.param(
        [Delay(0.01), Drip(b"abcdef", 2, 0.005), Throttle(1e5), b"y" * 50, HALF_CLOSE, 4],
        Ending.EOF,
        Outcome.COMPLETED,
        id="pauses",
    ),
    pytest.param(
        [Expect(re.compile(b"ab", re.IGNORECASE)), Garbage(100, seed=3), b"", ReadUntil(b"a")],
        Ending.EOF,
        Outcome.COMPLETED,
        id="ignorecase-garbage-empty",
    ),
]


@pytest.mark.parametrize(("script", "ending", "outcome"), PLAYS)
def test_expected_transcript_and_outcome(script: object, ending: Ending, outcome: Outcome) -> None:
    transcript = expected_transcript(script, seed=7)
    assert transcript.ending is ending
    assert expected_outcome(script) is outcome
    assert transcript == expected_transcript(script, seed=7)  # reproducible


@pytest.mark.parametrize(("script", "ending", "outcome"), PLAYS)
def test_plays_against_a_real_server(script: object, ending: Ending, outcome: Outcome) -> None:
    assert check_round_trip(script, 3).ending is ending


def test_transcript_contents() -> None:
    transcript = expected_transcript([RECEIVE, b"a", 3, "\u00e9", ReadUntil(b"!")], seed=1)
    first, second, third = transcript.sent
    assert 1 <= len(first) <= 32
    assert len(second) == 3
    assert third.index(b"!") == len(third) - 1
    assert transcript.received == b"a\xc3\xa9"
    assert expected_transcript([RECEIVE], seed=1) != expected_transcript([RECEIVE], seed=2)


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ([RECEIVE, RECEIVE], True),
        ([5, Delay(0), Throttle(None), b"", ReadUntil(b"x")], True),
        ([HALF_CLOSE, 1, 2], True),
        ([RECEIVE, b"ok", RECEIVE], False),
        ([RECEIVE, HALF_CLOSE, RECEIVE], False),
        ([ReadUntil(b"x"), RECEIVE, b"ok"], False),
        ([Expect("y"), 3], False),
        ([Expect("a*"), RECEIVE], False),
        ([RECEIVE], False),
    ],
)
def test_needs_sync(script: list[object], expected: bool) -> None:
    assert needs_sync(script) is expected


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        (re.escape(b"a.b*c"), b"a.b*c"),
        (re.escape("tab\there"), b"tab\there"),
        (re.escape("\u00e9t\u00e9"), "\u00e9t\u00e9".encode()),
        (b"plain", b"plain"),
        (rb"\d+", None),
        (b"a|b", None),
        (b"(x)", None),
        (rb"\n", None),
        (b"", None),
    ],
)
def test_literal_patterns(pattern: bytes | str, literal: bytes | None) -> None:
    assert _literal(Expect(pattern).regex) == literal


def test_verbose_patterns_are_not_literal() -> None:
    assert _literal(re.compile(b"a b", re.VERBOSE)) is None


def test_payload_callable_supplies_bytes() -> None:
    script = [Expect(rb"\d+;"), RECEIVE, b"ok"]

    def payload(index: int, step: object) -> bytes | None:
        return b"12;" if isinstance(step, Expect) else None

    transcript = check_round_trip(script, payload=payload)
    assert transcript.sent[0] == b"12;"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"script": [Expect(rb"\d")]}, ValueError, "pass payload="),
        ({"script": [3], "payload": lambda i, s: b"ab"}, ValueError, "complete the step"),
        ({"script": [ReadUntil(b"!")], "payload": lambda i, s: b"a!b!"}, ValueError, "exactly"),
        ({"script": [RECEIVE], "payload": lambda i, s: b""}, ValueError, "exactly"),
        ({"script": [RECEIVE], "payload": lambda i, s: "text"}, ValueError, "bytes"),
        ({"script": [RECEIVE], "payload": b"x"}, TypeError, "callable"),
        ({"script": [RECEIVE], "seed": True}, TypeError, "seed"),
        ({"script": [3.5]}, TypeError, "script[0]"),
        ({"script": {RECEIVE}}, TypeError, "list of steps"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        expected_transcript(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(error, match=re.escape(message)):
        play(address=("127.0.0.1", 9), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["timeout", "quiet"])
@pytest.mark.parametrize("value", [0, -1.0, True, "1"])
def test_bad_timeouts(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        play([], ("127.0.0.1", 9), **{name: value})  # type: ignore[arg-type]


def test_prefix_never_matches_early() -> None:
    """The seeded bytes before a delimiter avoid its first byte, in either case."""
    (step,) = compile_script([Expect(re.compile(b"Ab", re.IGNORECASE))])
    assert isinstance(step, ReadStep)
    for seed in range(200):
        data = _seeded(seed, 0, step)
        assert data.lower().find(b"ab") == len(data) - 2


# ---- plays that go wrong: the client notices, and never hangs ----------------------------------


def test_a_silent_server_times_the_client_out() -> None:
    with serve([RECEIVE, Delay(30), b"late"]) as server:
        started = time.monotonic()
        transcript = play([RECEIVE, b"late"], server.address, timeout=0.2)
        assert time.monotonic() - started < 3
    assert transcript.ending is Ending.TIMED_OUT
    assert "reading 4 bytes" in transcript.note
    assert records_of(server, [transcript])[0].outcome is Outcome.SERVER_CLOSED


@pytest.mark.parametrize(
    ("server_script", "client_script", "ending", "received", "note"),
    [
        ([b"abcdef"], [b"abc"], Ending.EOF, b"abcdef", "3 unexpected bytes"),
        ([b"ab"], [b"abc"], Ending.EOF, b"ab", "EOF after 2"),
        ([b"x"], [b"x", RESET], Ending.EOF, b"x", "EOF instead of a reset"),
        ([RESET], [], Ending.RESET, b"", "reset"),
        ([RESET], [HALF_CLOSE], Ending.RESET, b"", "at HALF_CLOSE"),
        ([b"abc"], [STALL], Ending.CLIENT_CLOSED, b"abc", "during STALL: 3 unexpected bytes"),
        ([], [STALL], Ending.EOF, b"", "during STALL: EOF"),
        ([HALF_CLOSE], [HALF_CLOSE, RESET], Ending.TIMED_OUT, b"", "reset after EOF"),
        ([STALL], [], Ending.TIMED_OUT, b"", "waiting for eof"),
    ],
)
def test_mismatches_show_in_the_transcript(
    server_script: list[object],
    client_script: list[object],
    ending: Ending,
    received: bytes,
    note: str,
) -> None:
    with serve(server_script) as server:
        transcript = play(client_script, server.address, timeout=0.3)
    assert (transcript.ending, transcript.received) == (ending, received)
    assert note in transcript.note
    assert transcript != expected_transcript(client_script)


def test_a_flood_is_cut_off() -> None:
    flood = Drip(b"z" * (2 * 1024 * 1024), chunk=256 * 1024, interval=0)
    with serve([flood]) as server:
        transcript = play([], server.address, timeout=2)
    assert transcript.ending is Ending.TIMED_OUT
    assert "keeps sending" in transcript.note


def pending_error(sock: socket.socket) -> int:
    """Wait (5 s at most) for the hang-up, then take the pending error, as connect() does."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP | select.POLLERR)
    assert poller.poll(5000), "no hang-up within 5 s"
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


@pytest.mark.parametrize(
    ("rest", "error"), [([b"abc", RESET], errno.ECONNRESET), ([HALF_CLOSE, RESET], errno.EPIPE)]
)
def test_reset_reported_by_connect(rest: list[object], error: int) -> None:
    """CPython's connect() with a timeout reads SO_ERROR: a fast RST surfaces there, consumed.

    Data that came before it stays readable, then recv() gives b"" (ECONNRESET: the client
    counts that EOF as the reset; EPIPE: the reset came after the FIN). Here the server waits
    for a byte first, so the connect succeeds, and the error is consumed by hand.
    """
    with serve([1, *rest]) as server, socket.create_connection(server.address, 5) as sock:
        sock.sendall(b"!")
        assert pending_error(sock) == error
        plan = _plan(rest, lambda index, written, step: b"")
        transcript = _Player(sock, None, 0.0, 5.0, 0.05, error).run(plan)
    assert transcript == expected_transcript(rest)


def test_reset_keeps_every_send_before_it() -> None:
    """Found by test_reference_client_round_trip, before accepted sockets had TCP_NODELAY.

    The client's delayed ACK left b"b" unacknowledged, Nagle held b"c" back, and the RST
    (SO_LINGER 0) discarded it: the client got b"ab".
    """
    check_round_trip([b"a", RECEIVE, b"b", b"c", RESET])


def test_linux_reset_semantics() -> None:
    """What the client relies on: data first, then ECONNRESET once, then EOF."""
    with serve([1, b"abc", RESET]) as server, socket.create_connection(server.address, 5) as sock:
        sock.sendall(b"!")  # the server resets only after this, so connect() cannot see it
        server.wait_for_connections(1)
        assert sock.recv(10) == b"abc"
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
        assert sock.recv(10) == b""


def test_observable_boundaries_need_no_sync() -> None:
    script = [RECEIVE, b"one", 4, b"two", ReadUntil(b"\n"), RECEIVE, HALF_CLOSE, 2]
    assert not needs_sync(script)
    check_round_trip(script, 11, sync=False)


def test_sync_timeout_ends_the_play() -> None:
    with serve([RECEIVE, RECEIVE, b"never"]) as server:

        def slow_sync(sock: socket.socket, steps: int, since: float) -> None:
            server_sync(server, timeout=0.05)(sock, steps + 5, since)

        transcript = play([RECEIVE, RECEIVE, b"never"], server.address, sync=slow_sync)
    assert transcript.ending is Ending.TIMED_OUT
    assert "did not complete 6 receive steps: 1 done" in transcript.note


def test_server_sync_ignores_an_older_connection_from_the_same_port() -> None:
    """Loopback reuses a closed client's port at once: only a record accepted since counts."""
    with socket.socket() as client:
        client.bind(("127.0.0.1", 0))
        peer = client.getsockname()
        old = SimpleNamespace(peer=peer, accepted_at=1.0, received=[b"x"] * 5, ended=True)
        server = SimpleNamespace(connections=[old])
        with pytest.raises(TimeoutError, match="never accepted"):
            server_sync(server, timeout=0.01)(client, 1, 2.0)
        server.connections.append(
            SimpleNamespace(peer=peer, accepted_at=2.5, received=[b"y"], ended=False)
        )
        server_sync(server, timeout=0.01)(client, 1, 2.0)


def test_server_sync_names_an_unknown_connection() -> None:
    with serve([RECEIVE]) as server, socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        with pytest.raises(TimeoutError, match="never accepted"):
            server_sync(server, timeout=0.01)(stranger, 1, 0.0)


def test_plays_over_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    script = [RECEIVE, b"six", HANGUP]
    try:
        server = CommandServer(script, host="::1", verbose=False)
    except OSError:
        pytest.skip("no IPv6 loopback")
    with server:
        transcript = play(script, server.address, sync=server_sync(server))
    assert transcript == expected_transcript(script)
