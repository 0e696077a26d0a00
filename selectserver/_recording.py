"""What a FaultProxy records, and how a recording becomes scripts that replay the server's side.

Each proxied connection has a :class:`ProxyRecord`: the chunks the client sent (``upstream``) and
the chunks the server sent (``downstream``), each a :class:`Chunk` ``(at, data)``: ``at`` is in
seconds since the proxy accepted the connection, strictly increasing across both lists, so
merging them by ``at`` gives the order in which the proxy read them.

:func:`script_of` turns a record into a CommandServer script that plays the server's side, by
position: each run of consecutive downstream chunks is one send step, preceded by an int
receive step of as many bytes as the client sent since the previous run (none if the server
spoke first), then a receive step for what the client sent after the last run, and ``HANGUP``
(``RESET`` if the server reset the connection). Identical requests and server-speaks-first
protocols (SMTP, Redis HELLO, PostgreSQL) replay alike.

The recording file (``proxy.save(path)``, read back by :func:`load_recording`) is UTF-8 JSON::

    {"format": "selectserver-recording", "version": 1, "upstream": "127.0.0.1:6379",
     "connections": [
       {"index": 0, "peer": "127.0.0.1:50312", "client_end": "eof", "server_end": "eof",
        "outcome": "completed", "detail": null, "failure": null, "unrecorded": 0,
        "faults": ["Latency(seconds=0.1, jitter=0.0, seed=0, direction='downstream')"],
        "upstream": [{"at": 0.000412, "data": "PING\\r\\n"}],
        "downstream": [{"at": 0.000733, "data": "+PONG\\r\\n"}]}]}

``data`` holds the bytes as a string of code points U+0000 to U+00FF, one per byte (the bytes
decoded as latin-1); JSON's own escapes (``\\r``, ``\\u0000``, ``\\u00ff``) keep the file ASCII
and readable. ``at`` is seconds since accept. ``faults`` are reprs, for people. A reader must
reject another ``format`` or a ``version`` it does not know; version 1 readers ignore unknown
keys.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._faults import AnyFault
from ._records import Outcome, Signal
from ._script import HANGUP, RESET

__all__ = [
    "DEFAULT_MAX_RECORD",
    "FORMAT",
    "VERSION",
    "Chunk",
    "ProxyLog",
    "ProxyRecord",
    "load_recording",
    "read_recording",
    "script_of",
]

#: Bytes a proxied connection's record keeps by default (its first ones, both sides together):
#: whole sessions of request-reply protocols, and a bounded cost for a flood or a download.
DEFAULT_MAX_RECORD = 8 * 1024 * 1024
FORMAT = "selectserver-recording"
VERSION = 1

_WAITERS_LOCK = threading.Lock()


class Chunk(NamedTuple):
    """Bytes one side sent, as one read took them: ``at`` seconds after accept."""

    at: float
    data: bytes


@dataclass(eq=False)
class ProxyRecord:
    """One proxied connection, updated live by the reactor.

    Attributes:
        index: the connection's number on its proxy, from 0, in accept order.
        peer: the client's address, as ``accept()`` gave it.
        accepted_at: ``time.monotonic()`` at accept.
        upstream: the chunks the client sent, as read (before any fault acted on them).
        downstream: the chunks the server sent, as read.
        client_end, server_end: how each side ended: ``"eof"`` (it sent FIN), ``"reset"``
            (RST), ``"error: ..."`` (a failed socket call or connect), ``"closed by proxy"`` or
            ``"reset by proxy"`` (the proxy closed it first); None while it is open.
        faults: the faults this connection drew, in the order they reached it (removed ones
            stay listed).
        outcome: how the connection ended (``COMPLETED``: both sides closed; ``PEER_RESET``: a
            side reset, passed on; ``RESET``/``HUNG_UP``: a fault, or an unreachable upstream,
            closed it; ``TIMED_OUT``: idle for ``timeout``; ``SERVER_CLOSED``: the proxy was
            closed; ``ERROR``: an internal error), or None while it runs.
        detail: why it ended, in words, when that is not obvious.
        failure: an internal error, for ``check()``.
        ended_at: ``time.monotonic()`` when it ended, or None.
        via: the proxy's own address on the upstream connection (the server's ``peer``).
        passed_upstream, passed_downstream: bytes passed on to the server and to the client.
        dropped: bytes not passed on (a ``Timeout`` dropped them, or their destination left).
        unrecorded: bytes read but not kept in ``upstream``/``downstream``: the record keeps
            the first ``max_record`` (8 MiB by default).
        peak_buffered: the most bytes the proxy held for this connection at once.
    """

    index: int
    peer: object
    accepted_at: float = field(default_factory=time.monotonic)
    upstream: list[Chunk] = field(default_factory=list)
    downstream: list[Chunk] = field(default_factory=list)
    client_end: str | None = None
    server_end: str | None = None
    faults: list[AnyFault] = field(default_factory=list)
    outcome: Outcome | None = None
    detail: str | None = None
    failure: str | None = None
    ended_at: float | None = None
    via: object = None
    passed_upstream: int = 0
    passed_downstream: int = 0
    dropped: int = 0
    unrecorded: int = 0
    peak_buffered: int = 0
    max_record: int = field(default=DEFAULT_MAX_RECORD, repr=False)
    _kept: int = field(default=0, repr=False)
    _last_at: float = field(default=-math.inf, repr=False)
    _on_end: Callable[[ProxyRecord], None] | None = field(default=None, repr=False)

    @property
    def ended(self) -> bool:
        """Whether the connection has ended."""
        return self.outcome is not None

    @property
    def client_sent(self) -> bytes:
        """Every recorded byte the client sent."""
        return b"".join(chunk.data for chunk in list(self.upstream))

    @property
    def server_sent(self) -> bytes:
        """Every recorded byte the server sent."""
        return b"".join(chunk.data for chunk in list(self.downstream))

    def add(self, upstream: bool, data: bytes, now: float) -> None:
        """A side sent ``data`` (read at ``now``): keep it. The record keeps the first
        ``max_record`` bytes (both sides together) and counts the rest in ``unrecorded``."""
        room = self.max_record - self._kept
        if len(data) > room:
            self.unrecorded += len(data) - room
            if not room:
                return
            data = data[:room]
        self._kept += len(data)
        at = max(now - self.accepted_at, math.nextafter(self._last_at, math.inf))
        self._last_at = at
        (self.upstream if upstream else self.downstream).append(Chunk(at, data))

    def end(self, outcome: Outcome, detail: str | None, now: float) -> None:
        """The connection ended (the first end counts)."""
        if self.outcome is not None:
            return
        self.detail = detail if self.detail is None else self.detail
        self.ended_at = now
        self.outcome = outcome
        if self._on_end is not None:
            self._on_end(self)

    def describe(self) -> str:
        """One line: who, how it ended, what moved."""
        state = self.outcome.value if self.outcome else "open"
        text = (
            f"proxied connection {self.index} from {_format(self.peer)}: {state}; "
            f"client sent {sum(len(c.data) for c in list(self.upstream))} bytes "
            f"({self.client_end or 'open'}), server sent "
            f"{sum(len(c.data) for c in list(self.downstream))} bytes "
            f"({self.server_end or 'open'})"
        )
        if self.detail:
            text += f"; {self.detail}"
        return text + (f"; FAILED: {self.failure}" if self.failure else "")


def _format(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, bytes):
        return address.decode("utf-8", "backslashreplace")
    return str(address) if address else "(unnamed)"


class ProxyLog:
    """Everything one proxy saw: its records, in accept order, and failures outside them."""

    __slots__ = ("_ended", "_signal", "failures", "max_record", "records")

    def __init__(self, max_record: int) -> None:
        self.max_record = max_record
        self.records: list[ProxyRecord] = []
        self.failures: list[str] = []
        self._ended: list[ProxyRecord] = []
        self._signal: Signal | None = None  # made by the first waiter

    def new_record(self, peer: object, now: float) -> ProxyRecord:
        """Start the record of a connection accepted at ``now``."""
        record = ProxyRecord(
            len(self.records),
            peer,
            accepted_at=now,
            max_record=self.max_record,
            _on_end=self._end,
        )
        self.records.append(record)
        return record

    def add_failure(self, message: str) -> None:
        self.failures.append(message)
        self._wake()

    def _end(self, record: ProxyRecord) -> None:
        self._ended.append(record)
        self._wake()

    def _wake(self) -> None:
        if self._signal is not None:
            self._signal.notify()

    def wait_for_connections(self, n: int, timeout: float | None) -> list[ProxyRecord]:
        """Block until ``n`` connections have ended; the first ``n`` to end, in that order."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"wait_for_connections: n must be an int >= 0, got {n!r}")
        if n < 0:
            raise ValueError(f"wait_for_connections: n must be an int >= 0, got {n!r}")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
        ):
            raise ValueError(f"wait_for_connections: timeout must be >= 0 or None, got {timeout!r}")
        if self._signal is None:
            with _WAITERS_LOCK:
                if self._signal is None:
                    self._signal = Signal()
        if not self._signal.wait(lambda: len(self._ended) >= n, timeout):
            lines = [
                f"{len(self._ended)} of {n} proxied connections ended within {timeout} s "
                f"({len(self.records)} accepted)"
            ]
            lines += [f"  {r.describe()}" for r in list(self.records) if not r.ended]
            raise TimeoutError("\n".join(lines))
        return self._ended[:n]

    def check(self) -> None:
        """Raise ``AssertionError`` listing every failure; silent when all is well."""
        problems = list(self.failures)
        problems += [
            f"proxied connection {r.index} from {_format(r.peer)}: {r.failure}"
            for r in list(self.records)
            if r.failure
        ]
        if problems:
            raise AssertionError(
                f"{len(problems)} proxy failure(s):\n" + "\n".join(f"  - {p}" for p in problems)
            )


# ---- scripts from recordings ----------------------------------------------------------------


def script_of(
    upstream: Sequence[Chunk], downstream: Sequence[Chunk], server_end: str | None
) -> list[object]:
    """A CommandServer script that plays the server's side of a recorded connection.

    See the module docstring: receive steps count the client's bytes since the server's
    previous reply; the server's replies are sent whole; the end is ``HANGUP`` or ``RESET``.
    """
    events = sorted([(c.at, 0, c.data) for c in upstream] + [(c.at, 1, c.data) for c in downstream])
    script: list[object] = []
    waiting = 0  # bytes the client sent since the server's previous reply
    reply = bytearray()
    for _, from_server, data in events:
        if from_server:
            if not reply and waiting:
                script.append(waiting)
                waiting = 0
            reply += data
        else:
            if reply:
                script.append(bytes(reply))
                reply.clear()
            waiting += len(data)
    if reply:
        script.append(bytes(reply))
    if waiting:
        script.append(waiting)
    script.append(RESET if server_end == "reset" else HANGUP)
    return script


def record_script(record: ProxyRecord) -> list[object]:
    """:func:`script_of` a record; ``ValueError`` if it was not recorded in full."""
    if record.unrecorded:
        raise ValueError(
            f"connection {record.index} was not recorded in full ({record.unrecorded} bytes "
            "past max_record): its replay would be wrong"
        )
    return script_of(list(record.upstream), list(record.downstream), record.server_end)


def _encode(chunks: Sequence[Chunk]) -> list[dict[str, object]]:
    return [{"at": chunk.at, "data": chunk.data.decode("latin-1")} for chunk in chunks]


def to_document(records: Sequence[ProxyRecord], upstream: str) -> dict[str, object]:
    """The recording of ``records`` as a JSON-ready dict (the format of the module docstring)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "upstream": upstream,
        "connections": [
            {
                "index": record.index,
                "peer": _format(record.peer),
                "client_end": record.client_end,
                "server_end": record.server_end,
                "outcome": None if record.outcome is None else record.outcome.value,
                "detail": record.detail,
                "failure": record.failure,
                "unrecorded": record.unrecorded,
                "faults": [repr(fault) for fault in list(record.faults)],
                "upstream": _encode(list(record.upstream)),
                "downstream": _encode(list(record.downstream)),
            }
            for record in records
        ],
    }


def save_document(document: dict[str, object], path: str | os.PathLike[str]) -> None:
    """Write ``document`` to ``path`` (replaced whole: a reader never sees half a file)."""
    temporary = f"{os.fspath(path)}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=1)
        file.write("\n")
    os.replace(temporary, path)


def _decode(where: str, chunks: object) -> list[Chunk]:
    if not isinstance(chunks, list):
        raise ValueError(f"{where}: expected a list of chunks, got {chunks!r:.80}")
    decoded = []
    for number, chunk in enumerate(chunks):
        at = chunk.get("at") if isinstance(chunk, dict) else None
        data = chunk.get("data") if isinstance(chunk, dict) else None
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not isinstance(data, str):
            raise ValueError(f'{where}[{number}]: expected {{"at": seconds, "data": str}}')
        try:
            decoded.append(Chunk(float(at), data.encode("latin-1")))
        except UnicodeEncodeError:
            raise ValueError(
                f"{where}[{number}]: data holds a code point above U+00FF (not one byte each)"
            ) from None
    return decoded


def read_recording(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The connections of a recording file, checked, with their chunks decoded to bytes.

    Raises:
        ValueError: not a selectserver recording, a version this reader does not know, or
            malformed content (saying where).
        OSError: the file cannot be read.
    """
    with open(path, encoding="utf-8") as file:
        try:
            document = json.load(file)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{os.fspath(path)}: not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)}: not a {FORMAT} file")
    if document.get("version") != VERSION:
        raise ValueError(
            f"{os.fspath(path)}: {FORMAT} version {document.get('version')!r} is not supported "
            f"(this reader knows version {VERSION})"
        )
    connections = document.get("connections")
    if not isinstance(connections, list):
        raise ValueError(f"{os.fspath(path)}: connections must be a list")
    result = []
    for number, connection in enumerate(connections):
        where = f"{os.fspath(path)}: connections[{number}]"
        if not isinstance(connection, dict):
            raise ValueError(f"{where}: expected an object")
        entry = dict(connection)
        entry["upstream"] = _decode(f"{where}.upstream", connection.get("upstream"))
        entry["downstream"] = _decode(f"{where}.downstream", connection.get("downstream"))
        entry.setdefault("index", number)
        result.append(entry)
    return sorted(result, key=lambda entry: entry["index"])


def load_recording(path: str | os.PathLike[str]) -> list[list[object]]:
    """Scripts that replay a recording's server side, one per connection in accept order:
    ``CommandServer(scripts=load_recording(path))`` answers the same clients the same way.

    Raises:
        ValueError: not a recording, an unknown version, malformed, or a connection that was
            not recorded in full.
    """
    scripts = []
    for entry in read_recording(path):
        if entry.get("unrecorded"):
            raise ValueError(
                f"{os.fspath(path)}: connection {entry['index']} was not recorded in full"
            )
        server_end = entry.get("server_end")
        scripts.append(
            script_of(
                entry["upstream"],
                entry["downstream"],
                server_end if isinstance(server_end, str) else None,
            )
        )
    if not scripts:
        raise ValueError(f"{os.fspath(path)}: the recording has no connections to replay")
    return scripts
