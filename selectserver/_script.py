"""The script vocabulary: what a fake server can be told to do, checked before it runs.

A script is a sequence of steps. Users write it with plain values (``RECEIVE``, ints, str and
bytes) and the step classes below; :func:`compile_script` turns it into a tuple of validated,
machine-ready steps, raising ``TypeError``/``ValueError`` that names the bad step in the caller's
thread. Nothing here does I/O.

Every user step compiles to one of five shapes, so the step machine has one path per idea:

* :class:`ReadStep`: read until a condition on this step's bytes holds (``RECEIVE``, ``int``,
  :class:`ReadUntil`, :class:`Expect`);
* :class:`SendStep`: send this buffer, maybe in timed slices (``str``/``bytes``, :class:`Drip`,
  :class:`Garbage`);
* :class:`Delay` (a pause) and :class:`Throttle` (a cap on later sends), used as they are;
* a :class:`Command` (``HANGUP``, ``RESET``, ``HALF_CLOSE``, ``STALL``).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
import random
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

__all__ = [
    "BREAK",
    "CLOSE",
    "HALF_CLOSE",
    "HANGUP",
    "RECEIVE",
    "RESET",
    "STALL",
    "TRUNCATE",
    "Command",
    "Delay",
    "Drip",
    "Expect",
    "Gate",
    "Garbage",
    "ReadStep",
    "ReadUntil",
    "ReceiveCondition",
    "Repeat",
    "Reply",
    "SendRaw",
    "SendStep",
    "StartTLS",
    "Step",
    "Throttle",
    "compile_script",
]


class Command(enum.Enum):
    """Script steps that take no argument."""

    RECEIVE = "RECEIVE"
    """Read whatever arrives (at least one byte)."""
    HANGUP = "HANGUP"
    """Close gracefully now (FIN), draining unread input as the end of a script does."""
    BREAK = "HANGUP"  # noqa: PIE796 - the seed library's name, an alias of HANGUP on purpose
    RESET = "RESET"
    """Abort the connection: the peer gets a connection reset (RST, SO_LINGER 0).

    Over a Unix-domain socket, which has no RST, the peer reads EOF instead."""
    HALF_CLOSE = "HALF_CLOSE"
    """Shut down the sending side (the peer reads EOF); later steps may still read."""
    STALL = "STALL"
    """Do nothing until the peer closes or the server is closed."""
    TRUNCATE = "TRUNCATE"
    """Close with FIN but no TLS close_notify (a truncated session); without TLS, as HANGUP."""
    CLOSE = "CLOSE"
    """Close now without draining, as a naive server does: with input unread the kernel sends
    RST, and a client still sending sees EPIPE or ECONNRESET."""

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


RECEIVE = Command.RECEIVE
HANGUP = Command.HANGUP
BREAK = Command.BREAK
RESET = Command.RESET
HALF_CLOSE = Command.HALF_CLOSE
STALL = Command.STALL
CLOSE = Command.CLOSE
TRUNCATE = Command.TRUNCATE


def _check_seconds(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be finite and >= 0, got {value!r}")


def _check_count(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value!r}")


def _check_seed(owner: str, seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{owner}: seed must be an int, got {seed!r}")


def _to_bytes(owner: str, name: str, value: object) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{owner}: {name} must be str or bytes, got {value!r}")


@dataclass(frozen=True, slots=True)
class Delay:
    """Pause this connection only, for ``seconds`` plus up to ``jitter`` more.

    The jitter is drawn uniformly from ``[0, jitter]`` by ``random.Random(seed)``, fresh for
    every connection, so a run replays exactly.
    """

    seconds: float
    jitter: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_seconds("Delay", "seconds", self.seconds)
        _check_seconds("Delay", "jitter", self.jitter)
        _check_seed("Delay", self.seed)


@dataclass(frozen=True, slots=True, init=False)
class Drip:
    """Send ``data`` in pieces of ``chunk`` bytes, ``interval`` (+ ``jitter``) seconds apart."""

    data: bytes
    chunk: int
    interval: float
    jitter: float
    seed: int

    # An explicit __init__ so the documented str/bytes-like arguments type-check; the field
    # stays ``bytes``.
    def __init__(
        self,
        data: str | bytes | bytearray | memoryview,
        chunk: int = 1,
        interval: float = 0.01,
        jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        _check_count("Drip", "chunk", chunk, 1)
        _check_seconds("Drip", "interval", interval)
        _check_seconds("Drip", "jitter", jitter)
        _check_seed("Drip", seed)
        for name, value in [
            ("data", _to_bytes("Drip", "data", data)),
            ("chunk", chunk),
            ("interval", interval),
            ("jitter", jitter),
            ("seed", seed),
        ]:
            object.__setattr__(self, name, value)


@dataclass(frozen=True, slots=True, init=False)
class ReadUntil:
    """Read until ``delimiter`` has arrived; the step takes the bytes up to and including it.

    Bytes after the delimiter stay buffered for the next receive step (pipelining works).
    """

    delimiter: bytes

    def __init__(self, delimiter: str | bytes | bytearray | memoryview) -> None:
        data = _to_bytes("ReadUntil", "delimiter", delimiter)
        if not data:
            raise ValueError("ReadUntil: delimiter must not be empty")
        object.__setattr__(self, "delimiter", data)


@dataclass(frozen=True, slots=True)
class Expect:
    """Read until this step's bytes contain a match of ``pattern`` (``re.search`` semantics).

    The step takes the bytes up to the end of the match. A str pattern is encoded as UTF-8. If
    the peer closes, the step times out, or the server closes first, ``check()`` reports it.
    """

    pattern: Union[bytes, str, re.Pattern[bytes], re.Pattern[str]]
    regex: re.Pattern[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = self.pattern
        try:
            if isinstance(pattern, re.Pattern):
                source = pattern.pattern
                flags = pattern.flags & ~re.UNICODE
                regex = re.compile(source.encode() if isinstance(source, str) else source, flags)
            elif isinstance(pattern, (str, bytes)):
                regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
            else:
                raise TypeError(
                    f"Expect: pattern must be str, bytes or re.Pattern, got {pattern!r}"
                )
        except re.error as exc:
            raise ValueError(f"Expect: bad pattern {pattern!r}: {exc}") from None
        object.__setattr__(self, "regex", regex)


class ReceiveCondition(abc.ABC):
    """Base of receive steps whose condition is code: subclass it and define :meth:`frame`.

    ``selectserver.http.ReadRequest`` is one. The subclass should be a frozen dataclass (its
    repr names the step in errors and transcripts).
    """

    __slots__ = ()

    @abc.abstractmethod
    def frame(self, buffer: bytearray) -> int:
        """Where the first whole unit in ``buffer`` ends, or -1 if it has not all arrived.

        Raises:
            ValueError: ``buffer`` can never hold a valid unit; the message says why, and the
                connection fails with it.
        """


@dataclass(frozen=True, slots=True)
class Throttle:
    """Cap the sends that follow at ``bytes_per_second``; ``Throttle(None)`` lifts the cap."""

    bytes_per_second: float | None

    def __post_init__(self) -> None:
        rate = self.bytes_per_second
        if rate is None:
            return
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise TypeError(f"Throttle: bytes_per_second must be a number or None, got {rate!r}")
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"Throttle: bytes_per_second must be finite and > 0, got {rate!r}")


@dataclass(frozen=True, slots=True)
class Garbage:
    """Send ``n`` reproducible random bytes: a server speaking nonsense."""

    n: int
    seed: int = 0

    def __post_init__(self) -> None:
        _check_count("Garbage", "n", self.n, 0)
        if self.n > MAX_GARBAGE:
            raise ValueError(
                f"Garbage: n must be <= {MAX_GARBAGE} (64 MiB; use several steps for more), "
                f"got {self.n!r}"
            )
        _check_seed("Garbage", self.seed)

    @property
    def data(self) -> bytes:
        """The bytes this step sends: the same for the same ``n`` and ``seed``."""
        return random.Random(self.seed).randbytes(self.n)


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Run the TLS handshake here; the steps after it speak through TLS.

    A server with ``tls=`` runs one at the start of every script that has none, so write it
    only to start TLS later (SMTP's STARTTLS) or to break the handshake on purpose:

    * ``fail="hangup"``: read the ClientHello, then close (FIN);
    * ``fail="reset"``: read the ClientHello, then reset (RST);
    * ``fail="garbage"``: answer the ClientHello with 64 random bytes, then close.
    """

    fail: Literal["hangup", "reset", "garbage"] | None = None

    def __post_init__(self) -> None:
        if self.fail not in (None, "hangup", "reset", "garbage"):
            raise ValueError(
                f"StartTLS: fail must be None, 'hangup', 'reset' or 'garbage', got {self.fail!r}"
            )


@dataclass(frozen=True, slots=True)
class Reply:
    """Send bytes computed when the step runs: ``fn(ctx)`` gets a :class:`ReplyContext`.

    ``fn`` returns str/bytes (sent) or a list of steps (run in its place, checked like a
    script: a bad one fails the connection, naming the step). It runs on the reactor thread:
    if it raises, the connection ends as ``ERROR`` and ``check()`` shows the traceback; a call
    slower than 0.1 s is logged as a warning.
    """

    fn: Callable[[ReplyContext], object]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Reply: fn must be callable, got {self.fn!r}")


@dataclass(frozen=True, slots=True, init=False)
class Repeat:
    """Run ``steps`` again and again: ``times`` times, or (None) until the peer closes.

    With ``times=None``, a peer that closes before the first byte of an iteration ends the
    connection as ``COMPLETED`` (that is how keep-alive connections end).
    """

    steps: tuple[Step, ...]
    times: int | None

    def __init__(self, steps: object, times: int | None = None) -> None:
        if times is not None:
            _check_count("Repeat", "times", times, 0)
        compiled = compile_script(steps, name="Repeat.steps")
        object.__setattr__(self, "steps", compiled)
        object.__setattr__(self, "times", times)


@dataclass(frozen=True, slots=True)
class Gate:
    """Park the connection here until the test lets it go (``server.gate(name)``).

    A parked connection is not timed out and costs no timer.
    """

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Gate: name must be a non-empty str, got {self.name!r}")


@dataclass(frozen=True, slots=True, init=False)
class SendRaw:
    """Write ``data`` on the raw socket, beneath an established TLS session (a corrupt
    record mid-session); without TLS, the same as sending ``data``."""

    data: bytes

    def __init__(self, data: str | bytes | bytearray | memoryview) -> None:
        object.__setattr__(self, "data", _to_bytes("SendRaw", "data", data))


@dataclass(eq=False)
class ReplyContext:
    """What a :class:`Reply` function sees.

    Attributes:
        received: this connection's receive-step chunks so far.
        last: the bytes of the latest completed receive step (``b""`` if none).
        record: the connection's :class:`~selectserver.ConnectionRecord`.
        server: the server (``ctx.server.url`` for a redirect to itself); None once it is gone.
        index: the connection's index on its server.
        state: a dict kept for this connection across its Reply calls.
    """

    received: list[bytes]
    last: bytes
    record: Any
    server: Any
    index: int
    state: dict[str, Any]


# ---- compiled steps: what the step machine runs -----------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadStep:
    """Read until a condition on this step's bytes holds.

    Exactly one condition is set: ``min_bytes`` (RECEIVE is 1, an int is itself; the step takes
    every byte it has read), ``delimiter``, ``regex`` or ``frame`` (a
    :class:`ReceiveCondition`'s; the step takes bytes up to the end of the delimiter, match or
    frame, and leaves the rest for the next receive step).
    """

    label: str
    min_bytes: int = 0
    delimiter: bytes | None = None
    regex: re.Pattern[bytes] | None = None
    max_width: int | None = None
    """The longest match ``regex`` can make, when that is known (the search can then skip
    what an earlier search already covered)."""
    frame: Callable[[bytearray], int] | None = None

    @property
    def must_match(self) -> bool:
        """Whether ending without the condition met is a failure (``Expect``)."""
        return self.regex is not None


@dataclass(frozen=True, slots=True)
class SendStep:
    """Send ``data``: whole (``chunk`` None) or in ``chunk``-byte slices ``interval`` apart."""

    label: str
    data: bytes | memoryview  # the caller's buffer if immutable; a copy of a mutable one
    chunk: int | None = None
    interval: float = 0.0
    jitter: float = 0.0
    seed: int = 0
    raw: bool = False  # SendRaw: written beneath TLS


_RECEIVE_STEP = ReadStep("RECEIVE", min_bytes=1)  # one for every script: steps are frozen

Step = Union[ReadStep, SendStep, Delay, Throttle, StartTLS, Command, Reply, Repeat, Gate]
_EXPECTED = (
    "expected RECEIVE, an int > 0, str/bytes, or a step "
    "(HANGUP, RESET, HALF_CLOSE, STALL, TRUNCATE, CLOSE, Delay, Drip, ReadUntil, Expect, "
    "Throttle, Garbage, StartTLS, Reply, Repeat, Gate, SendRaw, ReadRequest)"
)


#: The most bytes one Garbage step makes.
MAX_GARBAGE = 64 * 1024 * 1024
LABEL_LENGTH = 60
_BRACKETS = {list: ("[", "]"), tuple: ("(", ")")}


def _label(value: object) -> str:
    """A short repr of a step, built from bounded pieces whatever the payload's size."""
    if isinstance(value, memoryview):
        text = f"memoryview({bytes(value[:LABEL_LENGTH])!r})"
    elif isinstance(value, (str, bytes, bytearray)):
        text = repr(value[:LABEL_LENGTH])
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(
            f"{f.name}={_label(getattr(value, f.name))}"
            for f in dataclasses.fields(value)
            if f.repr
        )
        text = f"{type(value).__name__}({fields})"
    elif isinstance(value, re.Pattern):
        text = f"re.compile({_label(value.pattern)})"
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = ", ".join([_label(item) for item in list(value)[:4]])
        items += (
            ", ..." if len(value) > 4 else "," if len(value) == 1 and type(value) is tuple else ""
        )
        opening, closing = _BRACKETS.get(type(value), ("{", "}"))
        text = opening + items + closing
    elif isinstance(value, dict):
        pairs = [f"{_label(k)}: {_label(v)}" for k, v in list(value.items())[:4]]
        text = "{" + ", ".join(pairs) + (", ...}" if len(value) > 4 else "}")
    else:
        text = repr(value)
    return text if len(text) <= LABEL_LENGTH else text[: LABEL_LENGTH - 3] + "..."


def _immutable(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    """``data`` itself if nobody can change it later, else a copy made once."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview) and data.readonly:
        return data
    return bytes(data)


def _match_width(regex: re.Pattern[bytes]) -> int | None:
    """The longest match ``regex`` can make, or None if unbounded or not known.

    A lookahead can depend on bytes past the match, so such a pattern counts as unbounded.
    """
    source = regex.pattern
    if any(marker in source for marker in (b"(?=", b"(?!", b"(?(")):
        return None
    try:
        from re import _parser  # type: ignore[attr-defined]

        width = _parser.parse(source, regex.flags).getwidth()[1]
    except Exception:  # a private module: any change in it only costs speed
        return None
    return width if isinstance(width, int) and width < sys.maxsize else None


def _compile_step(value: object) -> Step:
    if isinstance(value, Command):
        if value is Command.RECEIVE:
            return _RECEIVE_STEP
        return value
    if isinstance(value, bool):
        raise TypeError(_EXPECTED)
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("an int step reads at least that many bytes, so it must be > 0")
        return ReadStep(str(value), min_bytes=value)
    if isinstance(value, str):
        return SendStep(_label(value), value.encode("utf-8"))
    if isinstance(value, (bytes, bytearray)):
        return SendStep(_label(value), _immutable(value))
    if isinstance(value, memoryview):
        if not value.c_contiguous:
            return SendStep(_label(value), value.tobytes())  # socket.send() needs contiguity
        if value.format != "B" or value.ndim != 1:
            value = value.cast("B")
        return SendStep(_label(value), _immutable(value))
    if isinstance(value, ReadUntil):
        return ReadStep(_label(value), delimiter=value.delimiter)
    if isinstance(value, Expect):
        return ReadStep(_label(value), regex=value.regex, max_width=_match_width(value.regex))
    if isinstance(value, ReceiveCondition):
        return ReadStep(_label(value), frame=value.frame)
    if isinstance(value, Drip):
        return SendStep(
            _label(value),
            value.data,
            value.chunk,
            value.interval,
            value.jitter,
            value.seed,
        )
    if isinstance(value, Garbage):
        return SendStep(_label(value), value.data)
    if isinstance(value, SendRaw):
        return SendStep(_label(value), value.data, raw=True)
    if isinstance(value, (Delay, Throttle, StartTLS, Reply, Repeat, Gate)):
        return value
    raise TypeError(_EXPECTED)


def _expand(step: Step) -> tuple[Step, ...]:
    """A failing StartTLS is plain I/O on the ClientHello; anything else is itself."""
    if not isinstance(step, StartTLS) or step.fail is None:
        return (step,)
    read_hello = _RECEIVE_STEP
    if step.fail == "hangup":
        return (read_hello, Command.HANGUP)
    if step.fail == "reset":
        return (read_hello, Command.RESET)
    garbage = Garbage(64)
    return (read_hello, SendStep(_label(garbage), garbage.data), Command.HANGUP)


def compile_script(
    commands: object, *, name: str = "script", tls: bool = False
) -> tuple[Step, ...]:
    """Check a user's script and compile it into machine steps.

    Args:
        commands: a list or tuple of steps, or a bare str/bytes ``S`` meaning ``[RECEIVE, S]``.
        name: how error messages name the script (``scripts[1]`` for per-connection scripts).
        tls: whether the server has a TLS context: a script without ``StartTLS`` then starts
            with one; without TLS, ``StartTLS`` is an error.

    Raises:
        TypeError: the script is not a sequence, or a step has the wrong type, e.g.
            ``script[3] = 3.5: expected RECEIVE, an int > 0, ...``.
        ValueError: a step has a bad value, e.g. ``script[0] = -1: ... must be > 0``.
    """
    if isinstance(commands, (str, bytes, bytearray, memoryview)):
        commands = [RECEIVE, commands]
    key = _cache_key(commands, tls)
    if key is not None:
        cached = _compiled.get(key)
        if cached is None:
            cached = _compiled[key] = _compile(commands, name, tls)
            if len(_compiled) > CACHED_SCRIPTS:
                _compiled.pop(next(iter(_compiled)), None)  # the oldest (another thread may too)
        return cached
    return _compile(commands, name, tls)


#: scripts of plain steps whose compiled form is kept, for servers made again and again
CACHED_SCRIPTS = 256
#: the most payload bytes a cached script holds (a cache must not keep big payloads alive)
CACHED_BYTES = 4096
_PLAIN = (str, bytes, int, Command)
_compiled: dict[tuple[object, ...], tuple[Step, ...]] = {}


def _cache_key(commands: object, tls: bool) -> tuple[object, ...] | None:
    """What identifies a script made only of plain steps (str, bytes, int, commands), or None.

    Compiled steps are frozen, so servers with the same script share them. Types are in the
    key: ``1``, ``True`` and ``1.0`` are equal but not the same step.
    """
    if not isinstance(commands, (list, tuple)) or len(commands) > 64:
        return None
    size = 0
    for value in commands:
        if type(value) not in _PLAIN and not isinstance(value, Command):
            return None
        if isinstance(value, (str, bytes)):
            size += len(value)
    if size > CACHED_BYTES:
        return None
    return (tls, *[(type(value), value) for value in commands])


def _compile(commands: object, name: str, tls: bool) -> tuple[Step, ...]:
    if not isinstance(commands, (list, tuple)):
        if isinstance(commands, Iterable) and not isinstance(commands, (dict, set, frozenset)):
            commands = list(commands)
        else:
            raise TypeError(f"{name} must be a list of steps or a str/bytes, got {commands!r}")
    steps: list[Step] = []
    started_tls = half_closed = False
    for index, value in enumerate(commands):
        try:
            step = _compile_step(value)
            if isinstance(step, StartTLS):
                if not tls:
                    raise ValueError("StartTLS needs a server made with tls=")
                if started_tls:
                    raise ValueError("TLS is already started by an earlier StartTLS")
                started_tls = True
            for part in _expand(step):
                _check_order(steps, part, half_closed)
                half_closed = half_closed or part is Command.HALF_CLOSE
                steps.append(part)
        except (TypeError, ValueError) as exc:
            # Not type(exc): subclasses such as UnicodeEncodeError take other arguments.
            kind = TypeError if isinstance(exc, TypeError) else ValueError
            raise kind(f"{name}[{index}] = {_label(value)}: {exc}") from None
    if tls and not started_tls:
        steps.insert(0, StartTLS())
    return tuple(steps)


_FINAL = (Command.HANGUP, Command.RESET, Command.STALL, Command.TRUNCATE, Command.CLOSE)


def _check_order(before: list[Step], step: Step, half_closed: bool) -> None:
    """Reject a step that could never run, or could not work, after the ones ``before``."""
    if before and isinstance(before[-1], Command) and before[-1] in _FINAL:
        raise ValueError(f"no step can follow {before[-1]!r}: it ends the connection")
    if isinstance(step, SendStep) and half_closed:
        raise ValueError("cannot send after HALF_CLOSE shut the sending side")
    if step is Command.HALF_CLOSE and half_closed:
        raise ValueError("the sending side is already shut by an earlier HALF_CLOSE")
