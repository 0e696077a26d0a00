"""Fuzzing reaches TLS: generated scripts with ``StartTLS`` and ``TRUNCATE``, played by the
reference client through TLS against ``CommandServer(script, tls=True)``.

Only public behaviour is checked: the record's received and sent bytes, its outcome and ``tls``,
against the client's transcript and what :func:`expected_transcript` says it should be.
Profiles: see ``_hypothesis_profiles`` (``SELECTSERVER_HYPOTHESIS_PROFILE=dev pytest ...``).
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Sequence

import pytest
from _checks import check_round_trip, records_of
from _hypothesis_profiles import SETTINGS
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from selectserver import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    TRUNCATE,
    CommandServer,
    ConnectionRecord,
    Delay,
    Drip,
    Garbage,
    Outcome,
    ReadUntil,
    StartTLS,
    Throttle,
    compile_script,
)
from selectserver.reference import (
    Ending,
    Transcript,
    expected_outcome,
    expected_transcript,
    needs_sync,
    play,
    server_sync,
)
from selectserver.strategies import scripts

#: A real TLS handshake costs a few milliseconds: the profile's examples, at most 100 of them
#: for each property, keep this file well under 20 s.
TLS_SETTINGS = settings(SETTINGS, max_examples=min(SETTINGS.max_examples, 100))
#: The scripts the round-trip properties play: TLS, TRUNCATE, every misbehaviour.
TLS_SCRIPTS = scripts(max_steps=6, max_send_size=48, tls=True, truncate=True)


def broken_handshake(script: Sequence[object]) -> bool:
    """Whether the script ends with a ``StartTLS(fail=...)``."""
    return any(isinstance(step, StartTLS) and step.fail is not None for step in script)


def check_tls_connection(
    script: Sequence[object], transcript: Transcript, record: ConnectionRecord, *, seed: int = 0
) -> None:
    """Check one TLS connection's two sides against what the script says."""
    expected = expected_transcript(script, seed=seed, tls=True)
    assert transcript == expected, (transcript.note, record.describe())
    assert record.sent == expected.received, (record.describe(), transcript)
    assert record.tls is expected.tls, record.describe()
    assert record.outcome is expected_outcome(script, tls=True), (record.describe(), transcript)
    received = list(record.received)
    if broken_handshake(script):
        hello = received.pop()  # the server read the ClientHello, then broke the handshake
        assert hello[:1] == b"\x16", hello  # a TLS handshake record
    assert received == list(transcript.sent), (record.describe(), transcript)


def check_tls_round_trip(
    script: Sequence[object], seed: int = 0, *, sync: bool = True
) -> Transcript:
    """Serve ``script`` with TLS, play it through TLS, check both sides; return the transcript."""
    with CommandServer(script, tls=True, verbose=False, timeout=5.0) as server:
        transcript = play(
            script,
            server.address,
            seed=seed,
            sync=server_sync(server) if sync else None,
            ssl_context=server.client_ssl_context(),
        )
        (record,) = records_of(server, [transcript])
    check_tls_connection(script, transcript, record, seed=seed)
    server.check()
    return transcript


# ---- the strategy -------------------------------------------------------------------------------


@SETTINGS
@given(st.data(), st.booleans(), st.booleans(), st.booleans())
def test_tls_scripts_are_valid_for_a_tls_server(
    data: st.DataObject, broken: bool, truncate: bool, reset: bool
) -> None:
    script = data.draw(
        scripts(
            min_steps=1,
            max_steps=6,
            tls=True,
            allow_broken_handshake=broken,
            truncate=truncate,
            allow_reset=reset,
        )
    )
    compile_script(script, tls=True)  # raises if not valid for a server with tls=
    assert 1 <= len(script) <= 6
    starts = [index for index, step in enumerate(script) if isinstance(step, StartTLS)]
    assert len(starts) <= 1, script
    for index in starts:
        step = script[index]
        assert isinstance(step, StartTLS)
        assert HALF_CLOSE not in script[:index], script  # no handshake after the server's EOF
        if step.fail is not None:
            assert broken, script
            assert index == len(script) - 1, script
            assert reset or step.fail != "reset", script
    assert truncate or TRUNCATE not in script, script
    assert TRUNCATE not in script[:-1], script


@SETTINGS
@given(scripts(max_steps=8))
def test_default_scripts_have_no_tls_and_no_truncate(script: list[object]) -> None:
    compile_script(script)  # valid for a plain server
    assert TRUNCATE not in script
    assert not any(isinstance(step, StartTLS) for step in script)


def test_tls_scripts_reach_every_shape() -> None:
    """A fixed sample of TLS scripts has every kind of StartTLS and TRUNCATE."""
    seen: set[str] = set()

    @settings(SETTINGS, max_examples=300, derandomize=True, database=None)
    @given(scripts(max_steps=6, tls=True, truncate=True))
    def collect(script: list[object]) -> None:
        starts = [index for index, step in enumerate(script) if isinstance(step, StartTLS)]
        if not starts:
            seen.add("implicit")
        for index in starts:
            step = script[index]
            assert isinstance(step, StartTLS)
            if step.fail is not None:
                seen.add(f"fail={step.fail}")
            else:
                seen.add("mid-script" if index else "first")
        if script[-1:] == [TRUNCATE]:
            seen.add("truncate-in-tls" if not starts or HALF_CLOSE not in script else "truncate")

    collect()
    assert seen >= {
        "implicit",
        "first",
        "mid-script",
        "fail=hangup",
        "fail=reset",
        "fail=garbage",
        "truncate-in-tls",
    }, seen


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tls": 1}, "tls=1"),
        ({"truncate": "yes"}, "truncate='yes'"),
        ({"tls": True, "allow_broken_handshake": None}, "allow_broken_handshake=None"),
    ],
)
def test_new_knobs_are_checked_when_called(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        scripts(**kwargs)  # type: ignore[arg-type]


# ---- the reference client's plan, without sockets ----------------------------------------------


@pytest.mark.parametrize(
    ("script", "ending", "outcome", "tls"),
    [
        pytest.param([RECEIVE, b"x"], Ending.EOF, Outcome.COMPLETED, True, id="implicit"),
        pytest.param([b"x", TRUNCATE], Ending.TRUNCATED, Outcome.TRUNCATED, True, id="truncate"),
        pytest.param(
            [b"x", HALF_CLOSE, 1, TRUNCATE],
            Ending.EOF,  # HALF_CLOSE already ended the stream, with close_notify
            Outcome.TRUNCATED,
            True,
            id="truncate-after-half-close",
        ),
        pytest.param(
            [b"plain", StartTLS(), TRUNCATE],
            Ending.TRUNCATED,
            Outcome.TRUNCATED,
            True,
            id="plain-then-tls-truncate",
        ),
        pytest.param(
            [RECEIVE, StartTLS(), STALL],
            Ending.CLIENT_CLOSED,
            Outcome.PEER_CLOSED,
            True,
            id="stall",
        ),
        pytest.param([StartTLS(fail="hangup")], Ending.EOF, Outcome.HUNG_UP, False, id="hangup"),
        pytest.param([StartTLS(fail="reset")], Ending.RESET, Outcome.RESET, False, id="reset"),
        pytest.param([StartTLS(fail="garbage")], Ending.EOF, Outcome.HUNG_UP, False, id="garbage"),
    ],
)
def test_expected_tls_transcripts(
    script: list[object], ending: Ending, outcome: Outcome, tls: bool
) -> None:
    transcript = expected_transcript(script, seed=4, tls=True)
    assert (transcript.ending, transcript.tls) == (ending, tls)
    assert expected_outcome(script, tls=True) is outcome


def test_garbage_handshake_is_expected_as_plain_bytes() -> None:
    transcript = expected_transcript([RECEIVE, b"hi", StartTLS(fail="garbage")], tls=True)
    assert transcript.received == b"hi" + Garbage(64).data
    assert not transcript.tls


def test_truncate_without_tls_is_a_plain_eof() -> None:
    assert expected_transcript([b"x", TRUNCATE]).ending is Ending.EOF
    assert expected_outcome([b"x", TRUNCATE]) is Outcome.TRUNCATED


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ([RECEIVE, StartTLS()], True),
        ([ReadUntil(b"x"), StartTLS(), b"ok"], True),  # the ClientHello must not join it
        ([RECEIVE, Delay(0), StartTLS(fail="reset")], True),
        ([RECEIVE, b"ok", StartTLS()], False),
        ([b"hello", StartTLS(), RECEIVE, RECEIVE], True),
        ([StartTLS(), RECEIVE, b"ok", RECEIVE], False),
        ([RECEIVE], False),  # the implicit StartTLS comes first
    ],
)
def test_needs_sync_before_a_handshake(script: list[object], expected: bool) -> None:
    assert needs_sync(script, tls=True) is expected


def test_starttls_needs_tls() -> None:
    with pytest.raises(ValueError, match="StartTLS needs a server made with tls="):
        expected_transcript([RECEIVE, StartTLS()])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ssl_context": "context"}, "ssl_context must be an ssl.SSLContext"),
        ({"server_hostname": b"localhost"}, "server_hostname must be a str"),
    ],
)
def test_bad_tls_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TypeError, match=re.escape(message)):
        play([], ("127.0.0.1", 9), **kwargs)  # type: ignore[arg-type]


# ---- examples against real servers ------------------------------------------------------------

EXAMPLES = [
    pytest.param([RECEIVE, b"hello"], id="implicit"),
    pytest.param([], id="empty"),
    pytest.param([RECEIVE, b"partial", TRUNCATE], id="truncate"),
    pytest.param([TRUNCATE], id="truncate-at-once"),
    pytest.param([RECEIVE, b"x", RESET], id="reset"),
    pytest.param([b"hi", HALF_CLOSE, 3, 2], id="half-close"),
    pytest.param([b"hi", HALF_CLOSE, 3, RESET], id="half-close-reset"),
    pytest.param([b"hi", HALF_CLOSE, TRUNCATE], id="half-close-truncate"),
    pytest.param([RECEIVE, STALL], id="stall"),
    pytest.param(
        ["220 ready\r\n", ReadUntil(b"\r\n"), "220 go\r\n", StartTLS(), ReadUntil(b"\r\n"), "250"],
        id="starttls-after-a-dialogue",
    ),
    pytest.param([RECEIVE, StartTLS(), 5, b"secure", TRUNCATE], id="starttls-after-a-receive"),
    pytest.param(
        [Drip(b"abcdef", 2, 0.002), StartTLS(), Throttle(1e6), Garbage(300), RECEIVE],
        id="starttls-after-a-drip",
    ),
    pytest.param([StartTLS(fail="hangup")], id="fail-hangup"),
    pytest.param([StartTLS(fail="reset")], id="fail-reset"),
    pytest.param([RECEIVE, b"ok", StartTLS(fail="garbage")], id="fail-garbage"),
]


@pytest.mark.parametrize("script", EXAMPLES)
def test_tls_examples(script: list[object]) -> None:
    check_tls_round_trip(script, 5)


def test_truncate_on_a_plain_server() -> None:
    assert check_round_trip([RECEIVE, b"cut", TRUNCATE], 2).ending is Ending.EOF


def test_truncate_and_reset_are_told_apart() -> None:
    """Under TLS the client sees FIN without close_notify, and a reset as a reset."""
    assert check_tls_round_trip([RECEIVE, b"x", TRUNCATE]).ending is Ending.TRUNCATED
    assert check_tls_round_trip([RECEIVE, b"x", RESET]).ending is Ending.RESET
    assert check_tls_round_trip([RECEIVE, b"x", HANGUP]).ending is Ending.EOF


@pytest.mark.parametrize(
    ("server_end", "client_end", "ending", "note"),
    [
        (TRUNCATE, HANGUP, Ending.TRUNCATED, "EOF without close_notify instead of EOF after"),
        (HANGUP, TRUNCATE, Ending.EOF, "EOF instead of EOF without close_notify"),
        (TRUNCATE, RESET, Ending.TRUNCATED, "EOF without close_notify instead of a reset"),
    ],
)
def test_a_wrong_ending_shows_in_the_transcript(
    server_end: object, client_end: object, ending: Ending, note: str
) -> None:
    with CommandServer([RECEIVE, b"x", server_end], tls=True, verbose=False) as server:
        client_script = [RECEIVE, b"x", client_end]
        transcript = play(client_script, server.address, ssl_context=server.client_ssl_context())
    assert (transcript.ending, transcript.received, transcript.tls) == (ending, b"x", True)
    assert note in transcript.note
    assert transcript != expected_transcript(client_script, tls=True)


def test_a_rejected_certificate_shows_in_the_transcript() -> None:
    with CommandServer([RECEIVE, b"x"], tls="expired", verbose=False) as server:
        transcript = play([RECEIVE, b"x"], server.address, ssl_context=server.client_ssl_context())
        (record,) = records_of(server, [transcript])
    assert not transcript.tls
    assert "certificate has expired" in transcript.note
    assert transcript.received[:1] == b"\x16"  # no session: the raw ServerHello and the rest
    assert record.outcome is Outcome.TLS_FAILED


def _handshake_then_send(server: CommandServer, data: bytes) -> bytes:
    """A TLS client that sends ``data`` in the same segment as its Finished, then reads to EOF.

    (The reference client waits for each EOF before it sends; this one does not.)
    """
    with socket.create_connection(server.address, timeout=5) as sock:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = server.client_ssl_context()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        for _ in range(20):
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(data)
        sock.sendall(outgoing.read())  # the client's Finished and ``data``, together
        received = bytearray()
        for _ in range(100):
            try:
                chunk = tls.read(1024)
            except ssl.SSLWantReadError:
                raw = sock.recv(65536)
                if raw:
                    incoming.write(raw)
                else:
                    incoming.write_eof()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            received += chunk
        return bytes(received)


def test_bytes_sent_right_after_the_handshake_survive_half_close() -> None:
    """The peer may send while the server half-closes: its bytes are still read.

    A server that sends close_notify with ``SSLSocket.unwrap()`` calls ``SSL_shutdown`` twice;
    the second call reads, and if the peer's data is already there OpenSSL fails
    (APPLICATION_DATA_AFTER_CLOSE_NOTIFY) and drops it.
    """
    with CommandServer([b"hi", HALF_CLOSE, 3], tls=True, verbose=False, timeout=2.0) as server:
        assert _handshake_then_send(server, b"abc") == b"hi"
        (record,) = server.wait_for_connections(1, 5.0)
    assert record.received == [b"abc"], record.describe()
    assert record.outcome is Outcome.COMPLETED, record.describe()


def test_a_plain_client_of_a_tls_server_does_not_hang() -> None:
    """Without ssl_context the client speaks plaintext; the server's handshake fails."""
    started = time.monotonic()
    with CommandServer([RECEIVE, b"x"], tls=True, verbose=False, timeout=0.5) as server:
        transcript = play([RECEIVE, b"x"], server.address, timeout=2)
        (record,) = records_of(server, [transcript])
    assert time.monotonic() - started < 4
    assert not transcript.tls
    assert transcript != expected_transcript([RECEIVE, b"x"], tls=True)
    assert record.outcome is Outcome.TLS_FAILED


# ---- properties --------------------------------------------------------------------------------


@TLS_SETTINGS
@example([RECEIVE, StartTLS(), RECEIVE, b"\x00", TRUNCATE], 0)
@example([HALF_CLOSE, 1, TRUNCATE], 0)
@example([b"\x00", StartTLS(fail="garbage")], 0)
@given(TLS_SCRIPTS, st.integers(0, 1000))
def test_tls_round_trip(script: list[object], seed: int) -> None:
    """Server and client agree on every step's bytes, the sends, TLS and how it ended."""
    check_tls_round_trip(script, seed)


@TLS_SETTINGS
@given(TLS_SCRIPTS.filter(lambda script: not needs_sync(script, tls=True)), st.integers(0, 1000))
def test_tls_round_trip_without_sync_where_the_wire_shows_each_boundary(
    script: list[object], seed: int
) -> None:
    check_tls_round_trip(script, seed, sync=False)


@TLS_SETTINGS
@given(scripts(max_steps=4, tls=True, truncate=True), st.integers(2, 3))
def test_tls_clients_in_turn_each_get_their_own_session(script: list[object], clients: int) -> None:
    with CommandServer(script, tls=True, verbose=False, timeout=5.0) as server:
        context = server.client_ssl_context()
        sync = server_sync(server)
        transcripts = [
            play(script, server.address, seed=seed, sync=sync, ssl_context=context)
            for seed in range(clients)
        ]
        records = records_of(server, transcripts)
    for seed, (transcript, record) in enumerate(zip(transcripts, records, strict=True)):
        check_tls_connection(script, transcript, record, seed=seed)
    server.check()
