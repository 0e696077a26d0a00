"""The reference client: plays the peer's side of a script against a real server.

It is what selectserver uses to test itself, and what a user can use to check a script before
pointing their own client at it. Given a script and an address, :func:`play` connects and, step by
step, does what a well-behaved peer does:

* receive steps: it sends bytes that complete the step exactly (``RECEIVE``: a few bytes;
  ``n``: ``n`` bytes; ``ReadUntil(d)``: bytes without ``d``, then ``d``; ``Expect`` with a literal
  pattern: bytes, then the literal). The bytes come from ``random.Random`` seeded with ``seed``
  and the step's index, or from a ``payload`` callable;
* send steps (``str``/``bytes``, ``Drip``, ``Garbage``): it reads exactly that many bytes;
  ``Delay``, ``Throttle`` and drips just make it wait longer for them;
* ``HALF_CLOSE``, ``HANGUP`` and the end of the script: it expects EOF;
* ``RESET``: it expects a reset (see below); ``STALL``: it checks that nothing arrives for
  ``quiet`` seconds, then closes;
* ``StartTLS`` (with ``ssl_context=``): it runs the TLS handshake (see below);
  ``TRUNCATE``: it expects EOF, without TLS's close_notify if TLS is on.

It returns a :class:`Transcript`; :func:`expected_transcript` computes what it should be.

Step boundaries
---------------
TCP has no message boundaries, and the server's steps read greedily: ``RECEIVE`` takes every byte
available when it completes, and an ``int`` step every byte of the reads that complete it. So if
the bytes of a ``RECEIVE`` or ``int`` step and those of the next receive step travel together,
the server may take both in the first step and then wait for bytes that never come. The client
therefore sends each step's bytes with one ``sendall`` (a ``RECEIVE`` payload should fit in one
segment: the defaults are a few dozen bytes) and, before sending the next receive step's bytes,
makes sure the server has finished the previous one: a send or ``HALF_CLOSE`` in between shows
it on the wire (the client reads those bytes or that EOF first). ``ReadUntil`` and ``Expect`` take
an exact prefix, so nothing has to be shown after them. Where nothing shows it, the client calls
``sync`` (see :func:`server_sync`, which watches the server's record of the connection);
:func:`needs_sync` tells whether a script has such a boundary. Without ``sync`` the client sends
anyway: the joined bytes still match, but the server may split them differently and then wait,
so the connection can end by timeout.

What Linux shows a client on a reset
------------------------------------
Data that arrived before the RST stays readable: ``recv`` returns it, then raises
``ConnectionResetError`` once, then returns ``b""``. After a FIN (``HALF_CLOSE`` then ``RESET``)
``recv`` only ever returns ``b""``; the reset shows as ``POLLHUP``/``POLLERR`` and a pending
``SO_ERROR`` of ``EPIPE``, which is how the client sees it. An RST also makes the kernel drop what
the server's socket had accepted but not yet delivered, so a ``RESET`` right after a send larger
than the client's receive window can cut that send short.

TLS
---
Given ``ssl_context`` (e.g. ``server.client_ssl_context()``), the client plays a server made with
``tls=``: it runs the handshake at the script's ``StartTLS``, or first if the script has none,
and the rest of the script through TLS. ``sent`` and ``received`` then hold plaintext, and the
transcript's ``tls`` says whether a session was established. TLS runs over ``ssl.MemoryBIO``, so
the client reads the raw socket itself: a reset stays a reset (which a blocking
``ssl.SSLSocket`` reports as ``SSLEOFError`` on CPython before gh-115627), and an EOF without
close_notify (a truncated session: ``TRUNCATE``) ends the transcript with ``Ending.TRUNCATED``,
while ``HANGUP``, ``HALF_CLOSE`` and the end of the script send close_notify first
(``Ending.EOF``).

Before a ``StartTLS`` that follows a receive step, the client calls ``sync``, so the server cannot
take the ClientHello as that step's bytes. At ``STALL`` it sends close_notify before it closes. A
handshake that fails (``StartTLS(fail=...)``, a rejected certificate) does not stop the client at
once: with no session, ``received`` holds the raw bytes the server sent (``"garbage"``: its 64
bytes), and the client reads on, raw, to the end of the stream and ends as that does. The
server's record of a broken handshake has one receive step more than ``sent``: the ClientHello.
"""

from __future__ import annotations

import enum
import errno
import random
import re
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, Union

from ._records import Outcome
from ._script import Command, ReadStep, SendStep, StartTLS, Step, compile_script

__all__ = [
    "Ending",
    "Payload",
    "Sync",
    "Transcript",
    "expected_outcome",
    "expected_transcript",
    "needs_sync",
    "play",
    "server_sync",
]

#: A payload callable: ``payload(index, step)`` returns the bytes to send for the receive step
#: ``step`` (as written in the script) at ``index``, or None for the seeded default.
Payload = Callable[[int, object], Union[bytes, None]]

#: A sync callable: ``sync(sock, n, since)`` returns once the server has completed ``n`` receive
#: steps on the connection of the client socket ``sock`` (or that connection has ended);
#: ``since`` is ``time.monotonic()`` just before the client connected.
Sync = Callable[[socket.socket, int, float], None]

#: The seeded default sizes: a RECEIVE payload, and the bytes before a delimiter or literal.
RECEIVE_SIZES = (1, 32)
PREFIX_SIZES = (0, 16)
#: How much unexpected data the client reads while waiting for an EOF or a reset.
EXTRA_LIMIT = 1024 * 1024
_RECV_SIZE = 256 * 1024
#: The most socket reads one TLS operation (a handshake, a read of plaintext) makes.
_TLS_READS = 1024
_LITERAL_META = frozenset(b".^$*+?{}[]|()")


class Ending(enum.Enum):
    """How a connection ended, as the client saw it."""

    EOF = "eof"
    """The server closed gracefully: the client read EOF (after close_notify, under TLS)."""
    TRUNCATED = "truncated"
    """Under TLS, the server closed without close_notify: EOF in the middle of the session."""
    RESET = "reset"
    """The connection was reset."""
    CLIENT_CLOSED = "client closed"
    """The client closed first (after ``STALL``: nothing arrived for ``quiet`` seconds)."""
    TIMED_OUT = "timed out"
    """The server was silent for longer than the client's ``timeout``; the client closed."""

    def __repr__(self) -> str:
        return f"Ending.{self.name}"


@dataclass(frozen=True, slots=True)
class Transcript:
    """What one connection looked like from the client's side.

    Attributes:
        sent: the bytes the client sent for each receive step, in order.
        received: every byte the client received.
        ending: how the connection ended.
        note: what went wrong, in words, if anything did (not compared).
        local_address: the client socket's address, which the server's record of the
            connection has as its ``peer`` (not compared; None in an expected transcript).
        tls: whether a TLS session was established, as the server's ``record.tls`` says.
    """

    sent: tuple[bytes, ...]
    received: bytes
    ending: Ending
    note: str = field(default="", compare=False)
    local_address: object = field(default=None, compare=False)
    tls: bool = False


# ---- the plan: what the client does, computed once from the script --------------------------


@dataclass(frozen=True, slots=True)
class _Feed:
    """Send ``data`` for the receive step at ``index``; first ``sync`` to ``synced`` steps."""

    index: int
    data: bytes
    synced: int | None


@dataclass(frozen=True, slots=True)
class _Read:
    """Read exactly ``size`` bytes."""

    size: int


@dataclass(frozen=True, slots=True)
class _Eof:
    """Read EOF (``HALF_CLOSE``)."""


@dataclass(frozen=True, slots=True)
class _Handshake:
    """Run the TLS handshake of the StartTLS at ``index`` (None: the implicit one at the start);
    first ``sync`` to ``synced`` steps."""

    index: int | None
    synced: int | None


_Move = Union[_Feed, _Read, _Eof, _Handshake]


@dataclass(frozen=True, slots=True)
class _Plan:
    moves: tuple[_Move, ...]
    received: bytes  # every send step's bytes, joined
    ending: Ending
    outcome: Outcome
    tls: bool  # whether a TLS session is established


def _user_steps(script: object) -> list[object]:
    """The script as a list of the user's steps (a bare str/bytes ``S`` is ``[RECEIVE, S]``)."""
    if isinstance(script, (str, bytes, bytearray, memoryview)):
        return [Command.RECEIVE, script]
    if isinstance(script, Iterable) and not isinstance(script, (dict, set, frozenset)):
        return list(script)
    compile_script(script)  # raises compile_script's TypeError
    raise AssertionError("unreachable")  # pragma: no cover


def _literal(regex: re.Pattern[bytes]) -> bytes | None:
    """The bytes a regex matches if it is a plain literal (as ``re.escape`` makes), else None."""
    if regex.flags & re.VERBOSE:
        return None
    out = bytearray()
    escaped = False
    for byte in regex.pattern:
        if escaped:
            if chr(byte).isalnum():
                return None  # \d, \w, \1 ...: not a literal
            out.append(byte)
            escaped = False
        elif byte == 0x5C:  # a backslash
            escaped = True
        elif byte in _LITERAL_META:
            return None
        else:
            out.append(byte)
    if not out or regex.fullmatch(out) is None:
        return None
    return bytes(out)


def _completes(step: ReadStep, data: bytes) -> bool:
    """Whether ``data``, arriving at once, completes ``step`` exactly (no byte left over)."""
    if step.min_bytes == 1:
        return bool(data)
    if step.min_bytes:
        return len(data) == step.min_bytes
    if step.delimiter is not None:
        return data.find(step.delimiter) == len(data) - len(step.delimiter)
    assert step.regex is not None
    match = step.regex.search(data)
    return match is not None and match.end() == len(data)


def _seeded(seed: int, index: int, step: ReadStep) -> bytes:
    """The default bytes for ``step``: reproducible from ``seed`` and ``index``."""
    rng = random.Random(f"selectserver.reference:{seed}:{index}")
    if step.min_bytes:
        size = step.min_bytes if step.min_bytes > 1 else rng.randint(*RECEIVE_SIZES)
        return rng.randbytes(size)
    if step.delimiter is not None:
        tail = step.delimiter
    else:
        assert step.regex is not None
        if step.regex.search(b""):
            return b""  # the pattern matches nothing at all: the step takes no bytes
        literal = _literal(step.regex)
        if literal is None:
            raise ValueError(
                f"cannot make bytes that match {step.label} (not a literal pattern); "
                "pass payload= to supply them"
            )
        tail = literal
    # A prefix without the tail's first byte (in either case) cannot hold an earlier match.
    banned = {tail[0], ord(chr(tail[0]).swapcase()) if tail[0] < 128 else tail[0]}
    prefix = bytes(b for b in rng.randbytes(rng.randint(*PREFIX_SIZES)) if b not in banned)
    return prefix + tail if _completes(step, prefix + tail) else tail


_DataFor = Callable[[int, object, ReadStep], bytes]


def _data_for(seed: int, payload: Payload | None) -> _DataFor:
    """What to send for each receive step: ``payload``'s bytes, else the seeded default."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if payload is not None and not callable(payload):
        raise TypeError(f"payload must be a callable or None, got {payload!r}")

    def data_for(index: int, written: object, step: ReadStep) -> bytes:
        data = payload(index, written) if payload is not None else None
        if data is None:
            return _seeded(seed, index, step)
        if not isinstance(data, bytes) or not _completes(step, data):
            raise ValueError(
                f"payload for script[{index}] = {step.label} must be bytes that complete "
                f"the step exactly, got {data!r}"
            )
        return data

    return data_for


def _no_data(index: int, written: object, step: ReadStep) -> bytes:
    return b""


def _plan(script: object, data_for: _DataFor, tls: bool = False) -> _Plan:
    """Check ``script`` (for a server with TLS if ``tls``) and work out every move of the client."""
    user = _user_steps(script)
    compile_script(user, tls=tls)  # the whole script's rules
    moves: list[_Move] = []
    sends: list[bytes] = []
    fed = 0
    unconfirmed = False  # the last fed step was a count step the wire has not shown complete
    secure = half_closed = False
    ending, outcome = Ending.EOF, Outcome.COMPLETED
    if tls and not any(isinstance(step, StartTLS) for step in user):
        moves.append(_Handshake(None, None))
        secure = True
    for index, written in enumerate(user):
        steps: list[Step]
        if isinstance(written, StartTLS):
            # The server must be done with the receive step before, or it may take the
            # ClientHello (or part of it) as that step's bytes.
            last_fed = bool(moves) and isinstance(moves[-1], _Feed)
            moves.append(_Handshake(index, fed if last_fed else None))
            unconfirmed = False
            secure = written.fail is None
            # A broken handshake is plain I/O: it reads the ClientHello (no step of the
            # client's), then maybe sends garbage, then ends.
            compiled = compile_script([written], tls=True)
            steps = [step for step in compiled if not isinstance(step, (ReadStep, StartTLS))]
        else:
            steps = list(compile_script([written]))
        for step in steps:
            if isinstance(step, ReadStep):
                synced = fed if unconfirmed else None
                moves.append(_Feed(index, data_for(index, written, step), synced))
                fed += 1
                unconfirmed = bool(step.min_bytes)
            elif isinstance(step, SendStep) and step.data:
                sends.append(bytes(step.data))
                if moves and isinstance(moves[-1], _Read):
                    moves[-1] = _Read(moves[-1].size + len(step.data))
                else:
                    moves.append(_Read(len(step.data)))
                unconfirmed = False
            elif step is Command.HALF_CLOSE:
                moves.append(_Eof())
                unconfirmed = False
                half_closed = True
            elif step is Command.HANGUP:
                outcome = Outcome.HUNG_UP
            elif step is Command.TRUNCATE:
                # After HALF_CLOSE the stream already ended, with close_notify.
                truncated = secure and not half_closed
                ending, outcome = Ending.TRUNCATED if truncated else Ending.EOF, Outcome.TRUNCATED
            elif step is Command.RESET:
                ending, outcome = Ending.RESET, Outcome.RESET
            elif step is Command.STALL:
                ending, outcome = Ending.CLIENT_CLOSED, Outcome.PEER_CLOSED
    return _Plan(tuple(moves), b"".join(sends), ending, outcome, secure)


def expected_transcript(
    script: object, *, seed: int = 0, payload: Payload | None = None, tls: bool = False
) -> Transcript:
    """The transcript :func:`play` returns when the server plays ``script`` faithfully.

    ``sent`` holds the bytes for each receive step, ``received`` the script's sends joined, and
    ``ending`` follows the script's last step (``RESET``: RESET, ``STALL``: CLIENT_CLOSED,
    ``TRUNCATE`` under TLS: TRUNCATED, else EOF). ``tls``: the server has TLS (``tls=``), as
    :func:`play`'s ``ssl_context`` says; the other arguments are :func:`play`'s.

    Raises:
        TypeError, ValueError: a bad script (``StartTLS`` without ``tls``); an ``Expect`` that
            is not a literal pattern and for which ``payload`` gives no bytes; a payload that
            does not complete its step exactly.
    """
    plan = _plan(script, _data_for(seed, payload), tls)
    sent = tuple(move.data for move in plan.moves if isinstance(move, _Feed))
    return Transcript(sent, plan.received, plan.ending, tls=plan.tls)


def expected_outcome(script: object, *, tls: bool = False) -> Outcome:
    """How the server's record ends when this client plays ``script`` against it.

    ``HANGUP``: HUNG_UP; ``RESET``: RESET; ``TRUNCATE``: TRUNCATED; ``STALL``: PEER_CLOSED (the
    client closes); a broken handshake: RESET for ``StartTLS(fail="reset")``, else HUNG_UP;
    otherwise COMPLETED. ``tls``: the server has TLS.
    """
    return _plan(script, _no_data, tls).outcome


def needs_sync(script: object, *, tls: bool = False) -> bool:
    """Whether the client needs ``sync`` to keep two of the script's receive steps apart.

    True when a ``RECEIVE`` or int step is followed by another receive step with no send or
    ``HALF_CLOSE`` in between, so nothing on the wire shows that the first step is complete; or
    when a ``StartTLS`` comes right after a receive step, whose bytes the ClientHello must not
    join. ``tls``: the server has TLS.
    """
    moves = _plan(script, _no_data, tls).moves
    return any(isinstance(move, (_Feed, _Handshake)) and move.synced is not None for move in moves)


# ---- playing ----------------------------------------------------------------------------------


class _Connections(Protocol):
    @property
    def connections(self) -> Sequence[_Record]: ...


class _Record(Protocol):
    @property
    def peer(self) -> object: ...
    @property
    def accepted_at(self) -> float: ...
    @property
    def received(self) -> list[bytes]: ...
    @property
    def ended(self) -> bool: ...


def server_sync(server: _Connections, *, timeout: float = 5.0) -> Sync:
    """A ``sync`` for :func:`play` that watches ``server``'s records (a CommandServer).

    It finds the record whose peer is the client socket's address, accepted after the client
    began to connect (loopback reuses ports at once), and waits, polling every few milliseconds
    for at most ``timeout`` seconds, until that connection has completed the asked number of
    receive steps or has ended.

    Raises (from the returned callable):
        TimeoutError: the connection did not get there within ``timeout`` seconds.
    """

    def sync(sock: socket.socket, steps: int, since: float) -> None:
        me = sock.getsockname()[:2]
        deadline = time.monotonic() + timeout
        pause = 0.0005
        record: _Record | None = None
        while True:
            if record is None:
                mine = (r for r in server.connections if r.accepted_at >= since)
                record = next((r for r in mine if _address(r.peer) == me), None)
            if record is not None and (len(record.received) >= steps or record.ended):
                return
            if time.monotonic() >= deadline:
                state = "never accepted" if record is None else f"{len(record.received)} done"
                raise TimeoutError(f"server did not complete {steps} receive steps: {state}")
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    return sync


def _address(peer: object) -> object:
    return tuple(peer[:2]) if isinstance(peer, tuple) else peer


class _Stop(Exception):
    """The connection ended before the plan did."""

    def __init__(self, ending: Ending, note: str) -> None:
        super().__init__(note)
        self.ending = ending
        self.note = note


def play(
    script: object,
    address: tuple[str, int],
    *,
    seed: int = 0,
    payload: Payload | None = None,
    sync: Sync | None = None,
    timeout: float = 5.0,
    quiet: float = 0.05,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Transcript:
    """Connect to ``address`` and play the peer's side of ``script``; see the module docstring.

    Args:
        script: the server's script, as given to the server (steps, or a bare str/bytes).
        address: where the server listens, e.g. ``server.address``.
        seed: picks the bytes sent for receive steps (the same seed sends the same bytes).
        payload: ``payload(index, step)`` gives the bytes for a receive step, or None for the
            seeded default. Needed for ``Expect`` with a pattern that is not a literal.
        sync: called before sending a receive step's bytes (or a ClientHello) where nothing on
            the wire shows that the previous step is complete (see :func:`server_sync`,
            :func:`needs_sync`).
        timeout: seconds the client waits on any one operation, so it never hangs: a silent
            server ends the transcript with ``Ending.TIMED_OUT``.
        quiet: seconds the client waits at ``STALL`` to confirm that nothing arrives.
        ssl_context: for a server made with ``tls=``: the client context of the TLS handshake,
            e.g. ``server.client_ssl_context()``. None: the server has no TLS.
        server_hostname: the name the handshake sends and checks; by default ``address``'s
            host (a ``tls=True`` certificate covers localhost, 127.0.0.1 and ::1).

    Returns:
        The :class:`Transcript`; compare it with :func:`expected_transcript` (with ``tls=True``
        if ``ssl_context`` is given).

    Raises:
        TypeError, ValueError: as :func:`expected_transcript`, or a bad timeout or context.
        OSError: the connection could not be made, or failed other than by reset or timeout
            (``ssl.SSLError``: a bad TLS record after the handshake).
    """
    if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
        raise TypeError(f"ssl_context must be an ssl.SSLContext or None, got {ssl_context!r}")
    if server_hostname is not None and not isinstance(server_hostname, str):
        raise TypeError(f"server_hostname must be a str or None, got {server_hostname!r}")
    plan = _plan(script, _data_for(seed, payload), ssl_context is not None)
    for name, value in (("timeout", timeout), ("quiet", quiet)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    family, kind, proto, _, where = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        since = time.monotonic()
        try:
            sock.connect(where)
            early = 0
        except (ConnectionResetError, BrokenPipeError) as exc:
            # A connect with a timeout asks SO_ERROR once the socket is writable; a server that
            # resets at once is reported here (and the error is consumed), not by recv().
            early = exc.errno or errno.ECONNRESET
        hostname = str(address[0]) if server_hostname is None else server_hostname
        player = _Player(sock, sync, since, timeout, quiet, early, ssl_context, hostname)
        return player.run(plan)


class _Player:
    """Carries out a plan on one connected socket (with a timeout set)."""

    def __init__(
        self,
        sock: socket.socket,
        sync: Sync | None,
        since: float,
        timeout: float,
        quiet: float,
        early: int,
        context: ssl.SSLContext | None = None,
        hostname: str | None = None,
    ) -> None:
        self.sock = sock
        self.since = since
        self.early = early  # errno of a reset that connect() reported, or 0
        self.sync = sync
        self.timeout = timeout
        self.quiet = quiet
        self.context = context
        self.hostname = hostname
        self.sent: list[bytes] = []
        self.received = bytearray()
        self.eof: Ending | None = None  # EOF, or TRUNCATED (no close_notify), once it came
        self.tls: ssl.SSLObject | None = None  # once the handshake is done
        self.incoming = ssl.MemoryBIO()  # the raw bytes TLS has yet to read
        self.outgoing = ssl.MemoryBIO()  # the raw bytes TLS wrote, yet to send

    def run(self, plan: _Plan) -> Transcript:
        ending, note = plan.ending, ""
        try:
            for move in plan.moves:
                if isinstance(move, _Feed):
                    self._feed(move)
                elif isinstance(move, _Read):
                    self._read(move.size)
                elif isinstance(move, _Handshake):
                    self._handshake(move)
                else:
                    self._end_of_stream(Ending.EOF, "at HALF_CLOSE")
            if plan.ending is Ending.CLIENT_CLOSED:
                self._stall()
            else:
                self._end_of_stream(plan.ending, "at the end of the script")
        except _Stop as stop:
            ending, note = stop.ending, stop.note
        local = self.sock.getsockname()
        return Transcript(
            tuple(self.sent), bytes(self.received), ending, note, local, self.tls is not None
        )

    def _stop(self, exc: OSError, where: str) -> _Stop:
        """The :class:`_Stop` for a timeout or reset; other errors propagate."""
        if isinstance(exc, TimeoutError):
            return _Stop(Ending.TIMED_OUT, f"{where}: nothing for {self.timeout:g} s")
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            return _Stop(Ending.RESET, f"{where}: {exc}")
        raise exc

    def _sync_to(self, synced: int | None, where: str) -> None:
        if synced is not None and self.sync is not None:
            try:
                self.sync(self.sock, synced, self.since)
            except TimeoutError as exc:
                raise _Stop(Ending.TIMED_OUT, f"{where}: {exc}") from None

    def _feed(self, move: _Feed) -> None:
        where = f"sending for script[{move.index}]"
        self._sync_to(move.synced, where)
        if move.data:
            if self.tls is not None:
                self.tls.write(move.data)
            self._send(move.data if self.tls is None else self.outgoing.read(), where)
        self.sent.append(move.data)

    def _send(self, data: bytes, where: str) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise self._stop(exc, where) from None

    def _flush(self, where: str) -> None:
        """Send what TLS has written."""
        if self.outgoing.pending:
            self._send(self.outgoing.read(), where)

    def _raw_recv(self, size: int, where: str, deadline: float | None = None) -> bytes:
        """One recv() on the socket (waiting until ``deadline`` at most); _Stop on a timeout or
        reset."""
        try:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
            data = self.sock.recv(size)
        except OSError as exc:
            raise self._stop(exc, where) from None
        finally:
            if deadline is not None:
                self.sock.settimeout(self.timeout)
        if not data and self.early == errno.ECONNRESET:
            self.early = 0  # the reset connect() reported ends the stream where EOF shows
            raise _Stop(Ending.RESET, f"{where}: connection reset (reported by connect)")
        return data

    def _recv(self, size: int, where: str) -> bytes:
        """Up to ``size`` bytes (plaintext under TLS) into ``received``; b"" at EOF, which
        sets ``eof``; a timeout or reset raises _Stop."""
        if self.tls is None:
            data = self._raw_recv(size, where)
            if not data:
                self.eof = Ending.EOF
        else:
            data = self._tls_recv(size, where)
        self.received += data
        return data

    def _tls_recv(self, size: int, where: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        for _ in range(_TLS_READS):
            data = self._tls_read(size, where)
            if data is not None:
                return data
            self._feed_tls(self._raw_recv(_RECV_SIZE, where, deadline))
        raise _Stop(Ending.TIMED_OUT, f"{where}: no plaintext in {_TLS_READS} reads")

    def _feed_tls(self, raw: bytes) -> None:
        if raw:
            self.incoming.write(raw)
        else:
            self.incoming.write_eof()

    def _tls_read(self, size: int, where: str) -> bytes | None:
        """Plaintext from what TLS has already got: bytes, b"" at EOF (setting ``eof``), or
        None if it needs more from the socket."""
        assert self.tls is not None
        data: bytes | None
        try:
            data = self.tls.read(size)
        except ssl.SSLWantReadError:
            data = None
        except ssl.SSLZeroReturnError:
            data = b""
        except ssl.SSLEOFError:
            self.eof = Ending.TRUNCATED  # FIN (or nothing more) without close_notify
            return b""
        self._flush(where)  # what reading made TLS write (rare after the handshake)
        if data == b"":
            self.eof = Ending.EOF  # close_notify
        return data

    def _eof_words(self) -> str:
        return "EOF without close_notify" if self.eof is Ending.TRUNCATED else "EOF"

    def _handshake(self, move: _Handshake) -> None:
        if move.index is None:
            where = "in the TLS handshake"
        else:
            where = f"in the TLS handshake of script[{move.index}]"
            self._sync_to(move.synced, f"starting TLS for script[{move.index}]")
        assert self.context is not None, "a StartTLS planned without an ssl_context"
        tls = self.context.wrap_bio(self.incoming, self.outgoing, server_hostname=self.hostname)
        raw = bytearray()  # what the server sent during the handshake
        ended = False  # whether the socket read EOF
        deadline = time.monotonic() + self.timeout
        try:
            for _ in range(_TLS_READS):
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    self._handshake_failed(raw, ended, f"{where}: {exc}")
                else:
                    self.tls = tls
                    self._flush(where)  # TLS 1.3: the client's Finished
                    return
                self._flush(where)
                data = self._raw_recv(_RECV_SIZE, where, deadline)
                raw += data
                self._feed_tls(data)
                ended = not data
        except _Stop:
            self.received += raw  # no session: the bytes that came instead are all it got
            raise
        raise _Stop(Ending.TIMED_OUT, f"{where}: not done after {_TLS_READS} reads")

    def _handshake_failed(self, raw: bytearray, ended: bool, note: str) -> None:
        """Read on (raw, into ``raw``) to the end of the stream, and stop as it ends."""
        try:
            self.sock.sendall(self.outgoing.read())  # the alert a failing client sends
        except OSError:
            pass  # the server is gone: the reads below say how
        deadline = time.monotonic() + self.timeout
        try:
            while not ended:
                if len(raw) > EXTRA_LIMIT:
                    raise _Stop(Ending.TIMED_OUT, "the server keeps sending")
                data = self._raw_recv(_RECV_SIZE, "reading on", deadline)
                raw += data
                ended = not data
        except _Stop as stop:
            raise _Stop(stop.ending, f"{note}; then {stop.note}") from None
        self.eof = Ending.EOF
        raise _Stop(Ending.EOF, f"{note}; then EOF")

    def _read(self, size: int) -> None:
        where = f"reading {size} bytes"
        goal = len(self.received) + size
        while len(self.received) < goal:
            if not self._recv(min(goal - len(self.received), _RECV_SIZE), where):
                got = size - (goal - len(self.received))
                raise _Stop(self.eof or Ending.EOF, f"{where}: {self._eof_words()} after {got}")

    def _end_of_stream(self, want: Ending, where: str) -> None:
        """Read until EOF (with or without close_notify, as ``want`` says) or a reset, whichever
        ``want`` says should come, else stop.

        Unexpected bytes go into ``received`` (at most ``EXTRA_LIMIT`` of them).
        """
        if self.eof is not None:
            if want is Ending.RESET:
                self._reset_after_eof()
            return
        start = len(self.received)
        try:
            while self._recv(_RECV_SIZE, f"waiting for {want.value} {where}"):
                if len(self.received) - start > EXTRA_LIMIT:
                    raise _Stop(Ending.TIMED_OUT, f"{where}: the server keeps sending")
        except _Stop as stop:
            if stop.ending is not want:
                raise
        else:
            if self.eof is not want:
                wanted = {Ending.RESET: "a reset", Ending.TRUNCATED: "EOF without close_notify"}
                instead = wanted.get(want, "EOF after close_notify")
                raise _Stop(
                    self.eof or Ending.EOF, f"{where}: {self._eof_words()} instead of {instead}"
                )
        if len(self.received) > start:
            raise _Stop(want, f"{where}: {len(self.received) - start} unexpected bytes")

    def _reset_after_eof(self) -> None:
        """After a FIN, recv() reports nothing more: wait for the hang-up, then ask SO_ERROR."""
        where = "waiting for a reset after EOF"
        if self.early:
            return  # connect() reported it (EPIPE: the reset came after the FIN)
        if not hasattr(select, "poll"):  # pragma: no cover - Linux and macOS have poll
            raise _Stop(Ending.EOF, f"{where}: cannot see it on this platform")
        poller = select.poll()
        poller.register(self.sock, select.POLLHUP | select.POLLERR)
        if not poller.poll(self.timeout * 1000):
            raise _Stop(Ending.TIMED_OUT, f"{where}: nothing for {self.timeout:g} s")
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error not in (errno.EPIPE, errno.ECONNRESET):
            raise _Stop(Ending.EOF, f"{where}: the server closed (SO_ERROR {error})")

    def _stall(self) -> None:
        """Check that nothing arrives for ``quiet`` seconds (the client then closes)."""
        if self.eof is not None:
            return
        where = "during STALL"
        deadline = time.monotonic() + self.quiet
        for _ in range(_TLS_READS):
            # Under TLS, bytes may come that hold no plaintext (TLS 1.3's session tickets).
            data = None if self.tls is None else self._tls_read(_RECV_SIZE, where)
            if data is None:
                left = max(0.0, deadline - time.monotonic())
                readable, _, _ = select.select([self.sock], [], [], left)
                if not readable:
                    break
                if self.tls is None:
                    data = self._recv(_RECV_SIZE, where)
                else:
                    self._feed_tls(self._raw_recv(_RECV_SIZE, where))
                    continue
            else:
                self.received += data
            what = f"{len(data)} unexpected bytes" if data else self._eof_words()
            raise _Stop(
                Ending.CLIENT_CLOSED if data else self.eof or Ending.EOF, f"{where}: {what}"
            )
        if self.tls is not None:
            # A client that closes first says so: close_notify.
            try:
                self.tls.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: close_notify is written, the server's is not read
            try:
                self.sock.sendall(self.outgoing.read())
            except OSError:
                pass
