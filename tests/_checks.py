"""Checks shared by the property tests and the fuzz campaigns: a script, served and played.

A test's server can be reached by more than its own clients: the port it was given may have just
been freed by another process (another test, an xdist worker) whose check that its closed server
refuses connections then lands here. So records are matched to clients by address, never by count.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable, Sequence
from typing import TypeVar

from selectserver import CommandServer, ConnectionRecord
from selectserver._machine import Action, Close, Receive, ShutdownWrite, StepMachine
from selectserver.reference import (
    Payload,
    Transcript,
    expected_outcome,
    expected_transcript,
    play,
    server_sync,
)

__all__ = [
    "CLIENT_ERRORS",
    "check_connection",
    "check_round_trip",
    "fetch",
    "outcome",
    "records_of",
    "run_to_close",
    "serve_and_play",
]

T = TypeVar("T")

#: What an HTTP client may raise on a bad response: its own errors, socket errors, and
#: OverflowError, which http.client lets escape on a huge Content-Length or chunk size.
CLIENT_ERRORS: tuple[type[Exception], ...] = (http.client.HTTPException, OSError, OverflowError)


def records_of(
    server: CommandServer, transcripts: Sequence[Transcript], timeout: float = 5.0
) -> list[ConnectionRecord]:
    """The records of the connections the transcripts' clients made, once all have ended.

    They come in accept order, which is the clients' order when they connected one by one.
    """
    ours = [transcript.local_address for transcript in transcripts]
    for strangers in range(16):  # a foreign connection may end before ours: wait for one more
        ended = server.wait_for_connections(len(ours) + strangers, timeout)
        mine = [record for record in ended if record.peer in ours]
        if len(mine) == len(ours):
            return mine
    raise AssertionError(f"no records for {ours}: {[r.describe() for r in server.connections]}")


def check_connection(
    script: object,
    transcript: Transcript,
    record: ConnectionRecord,
    *,
    seed: int = 0,
    payload: Payload | None = None,
) -> None:
    """Check one connection's two sides against what the script says."""
    expected = expected_transcript(script, seed=seed, payload=payload)
    assert record.sent == expected.received, (record.describe(), transcript)
    assert transcript == expected, transcript.note
    assert record.received == list(transcript.sent), record.describe()
    assert record.outcome is expected_outcome(script), record.describe()


def check_round_trip(
    script: object, seed: int = 0, *, sync: bool = True, payload: Payload | None = None
) -> Transcript:
    """Serve ``script``, play it (with ``sync``), check both sides; return the transcript."""
    with CommandServer(script, verbose=False, timeout=5.0) as server:
        syncing = server_sync(server) if sync else None
        transcript = play(script, server.address, seed=seed, sync=syncing, payload=payload)
        (record,) = records_of(server, [transcript])
    check_connection(script, transcript, record, seed=seed, payload=payload)
    server.check()
    return transcript


def serve_and_play(script: object, seed: int, clients: int) -> None:
    """One server, ``clients`` clients in turn: each connection's record matches its client."""
    with CommandServer(script, verbose=False, timeout=5.0) as server:
        sync = server_sync(server)
        transcripts = [play(script, server.address, seed=seed, sync=sync) for _ in range(clients)]
        records = records_of(server, transcripts)
    for transcript, record in zip(transcripts, records, strict=True):
        check_connection(script, transcript, record, seed=seed)
    server.check()


def outcome(
    call: Callable[[], T], errors: tuple[type[Exception], ...] = CLIENT_ERRORS
) -> T | Exception:
    """``call()``, or the exception it raised (one of ``errors``), without its traceback."""
    try:
        return call()
    except errors as exc:
        # The traceback's frames would keep the client's socket alive until a garbage
        # collection, which may then warn about it (ResourceWarning) in some later test.
        link: BaseException | None = exc
        while link is not None:
            link.__traceback__ = None
            link = link.__cause__ or link.__context__
        return exc


def fetch(address: tuple[str, int]) -> tuple[int, bytes] | Exception:
    """GET / with http.client: the status and body, or the exception it raised."""

    def get() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(*address, timeout=5)
        try:
            conn.request("GET", "/")
            with conn.getresponse() as reply:
                return reply.status, reply.read()
        finally:
            conn.close()

    return outcome(get)


def run_to_close(machine: StepMachine, now: float = 0.0) -> Action:
    """Play a machine's closing actions as a socket whose peer closes at once would: the FIN
    goes out, the drain reads EOF, the socket closes. Returns the action after (``Done``)."""
    for _ in range(10):
        action = machine.next_action()
        if isinstance(action, ShutdownWrite):
            machine.write_shut(now)
        elif isinstance(action, Receive) and not machine.running:
            machine.receive_data(b"", now)
        elif isinstance(action, Close):
            machine.closed(now)
        else:
            return action
    raise AssertionError(f"the machine did not close: {machine.describe()}")
