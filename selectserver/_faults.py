"""What a FaultProxy does to the bytes it passes on: the faults, and the pure policy behind them.

A fault is a frozen dataclass, checked when it is made (``TypeError``/``ValueError`` naming the
argument). Each acts on one ``direction``: ``"downstream"`` (server to client, the default),
``"upstream"`` (client to server) or ``"both"`` (each direction on its own: two counts, two
clocks). ``proxy.add(fault, connections=..., probability=..., seed=...)`` wraps it in a
:class:`FaultHandle` that says which connections it targets.

A :class:`Flow` is one direction of one proxied connection: the chunks its source sent, on their
way to its destination. It is pure, in the style of the step machine: told what arrived, what
was sent and what time it is, it says what to do next (:class:`Send` these bytes,
:class:`Sleep` until then, :class:`PassEnd` the source's FIN or RST, or :class:`Abort` the
connection). When each fault acts:

=================  ==========================================================================
``Latency``        as a chunk is read: it may go ``seconds`` ± ``jitter`` after it was read
                   (delays run side by side, never add up; order is kept; removal releases
                   what it delays)
``Timeout``        as a chunk is read: dropped while the fault is on (an EOF or RST waits for
                   its removal instead); ``seconds`` after it began, the connection closes
``SlowClose``      as the source's EOF is read: it is passed on ``seconds`` later (or removal)
``Hold``           as bytes go out: nothing goes (neither bytes nor ends) until it is removed
``Bandwidth``      as bytes go out: paced at ``bytes_per_second`` (removal speeds up at once)
``Slicer``         as bytes go out: each chunk in pieces, ``delay`` after each piece
``LimitData``      as bytes go out: the chunk that brings the count to ``n`` is cut there, then
``ResetPeer``      the connection closes (``ResetPeer``: with RST on both sides). With 0, the
                   first chunk triggers it and none of it passes
=================  ==========================================================================

Several faults on one direction compose: latencies add, the lowest bandwidth wins, the newest
slicer cuts. Counts and clocks start when a fault reaches a connection (at accept, or when it is
added for a live one). Jitter and piece sizes come from ``random.Random(seed)``, fresh for each
connection and direction, so runs replay exactly.

However the faults stand, a flow holds at most about :data:`MAX_BUFFERED` bytes: past that the
proxy stops reading its source, whose own buffers then fill (backpressure).
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from ._script import Command

__all__ = [
    "MAX_BUFFERED",
    "Abort",
    "Action",
    "Bandwidth",
    "End",
    "Fault",
    "FaultHandle",
    "Flow",
    "Hold",
    "Latency",
    "LimitData",
    "PassEnd",
    "ResetPeer",
    "Send",
    "Sleep",
    "Slicer",
    "SlowClose",
    "Timeout",
]

Direction = Literal["downstream", "upstream", "both"]
_DIRECTIONS = ("downstream", "upstream", "both")

#: Bytes a flow holds for its destination before the proxy stops reading its source.
MAX_BUFFERED = 1024 * 1024
#: A paced flow sends at most this many seconds' worth of bytes at once.
PACE_SECONDS = 0.01


# ---- validation --------------------------------------------------------------------------------


def _check_number(owner: str, name: str, value: object, *, positive: bool = False) -> None:
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a number {bound}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{owner}: {name} must be a finite number {bound}, got {value!r}")


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")


def _check_seed(owner: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: seed must be an int, got {value!r}")


def _check_direction(fault: Fault) -> None:
    if fault.direction not in _DIRECTIONS:
        raise ValueError(
            f"{type(fault).__name__}: direction must be one of {', '.join(map(repr, _DIRECTIONS))}"
            f", got {fault.direction!r}"
        )


# ---- the faults --------------------------------------------------------------------------------


class Fault:
    """Base of the faults: each acts on ``direction`` (see the module docstring)."""

    __slots__ = ()
    direction: Direction

    def applies_to(self, direction: str) -> bool:
        """Whether this fault acts on ``direction`` (``"upstream"`` or ``"downstream"``)."""
        return self.direction in (direction, "both")


@dataclass(frozen=True)
class Latency(Fault):
    """Each chunk goes ``seconds`` (± up to ``jitter``, never below 0) after it was read."""

    seconds: float
    jitter: float = 0.0
    seed: int = 0
    direction: Direction = "downstream"

    def __post_init__(self) -> None:
        _check_number("Latency", "seconds", self.seconds)
        _check_number("Latency", "jitter", self.jitter)
        _check_seed("Latency", self.seed)
        _check_direction(self)


@dataclass(frozen=True)
class Bandwidth(Fault):
    """Bytes go out at ``bytes_per_second`` at most."""

    bytes_per_second: float
    direction: Direction = "downstream"

    def __post_init__(self) -> None:
        _check_number("Bandwidth", "bytes_per_second", self.bytes_per_second, positive=True)
        _check_direction(self)


@dataclass(frozen=True)
class Slicer(Fault):
    """Each chunk goes out in pieces of ``average_size`` ± ``size_variation`` bytes, with
    ``delay`` seconds after each piece."""

    average_size: int
    size_variation: int = 0
    delay: float = 0.0
    seed: int = 0
    direction: Direction = "downstream"

    def __post_init__(self) -> None:
        _check_int("Slicer", "average_size", self.average_size, 1)
        _check_int("Slicer", "size_variation", self.size_variation, 0)
        if self.size_variation >= self.average_size:
            raise ValueError(
                f"Slicer: size_variation must be smaller than average_size ({self.average_size})"
                f", got {self.size_variation!r}"
            )
        _check_number("Slicer", "delay", self.delay)
        _check_seed("Slicer", self.seed)
        _check_direction(self)


@dataclass(frozen=True)
class SlowClose(Fault):
    """The source's EOF (FIN) is passed on ``seconds`` after it was read."""

    seconds: float
    direction: Direction = "downstream"

    def __post_init__(self) -> None:
        _check_number("SlowClose", "seconds", self.seconds)
        _check_direction(self)


@dataclass(frozen=True)
class Timeout(Fault):
    """Bytes are dropped (they stay dropped); ``seconds`` after the fault began the connection
    closes (FIN to both sides). ``None``: it never closes; removing the fault resumes the flow."""

    seconds: float | None = None
    direction: Direction = "downstream"

    def __post_init__(self) -> None:
        if self.seconds is not None:
            _check_number("Timeout", "seconds", self.seconds)
        _check_direction(self)


@dataclass(frozen=True)
class Hold(Fault):
    """Bytes are held, not dropped, until the fault is removed; then they all flow."""

    direction: Direction = "downstream"

    def __post_init__(self) -> None:
        _check_direction(self)


@dataclass(frozen=True)
class ResetPeer(Fault):
    """After ``after_bytes`` bytes have passed, both sides get an RST."""

    after_bytes: int = 0
    direction: Direction = "downstream"

    def __post_init__(self) -> None:
        _check_int("ResetPeer", "after_bytes", self.after_bytes, 0)
        _check_direction(self)

    @property
    def limit(self) -> int:
        return self.after_bytes

    @property
    def reset(self) -> bool:
        return True


@dataclass(frozen=True)
class LimitData(Fault):
    """``n`` bytes pass, then the connection closes: ``then=HANGUP`` (FIN) or ``RESET`` (RST)."""

    n: int
    then: Command = Command.HANGUP
    direction: Direction = "downstream"

    def __post_init__(self) -> None:
        _check_int("LimitData", "n", self.n, 0)
        if self.then not in (Command.HANGUP, Command.RESET):
            raise ValueError(f"LimitData: then must be HANGUP or RESET, got {self.then!r}")
        _check_direction(self)

    @property
    def limit(self) -> int:
        return self.n

    @property
    def reset(self) -> bool:
        return self.then is Command.RESET


AnyFault = Union[Latency, Bandwidth, Slicer, SlowClose, Timeout, Hold, ResetPeer, LimitData]
_FAULTS = (Latency, Bandwidth, Slicer, SlowClose, Timeout, Hold, ResetPeer, LimitData)


@dataclass(frozen=True, eq=False)
class FaultHandle:
    """A fault as added to a proxy, with the connections it targets; ``proxy.remove`` takes it.

    Attributes:
        fault: the fault.
        connections: ``None`` (every connection, live and later), the indices of the
            connections it targets, or a predicate called with each connection's
            ``ProxyRecord`` on the reactor thread (keep it quick).
        probability: the chance that a targeted connection gets the fault, drawn once per
            connection (when it is accepted, or when the fault is added for a live one).
        seed: the draw for connection k depends only on ``seed`` and k: runs replay exactly.
    """

    fault: AnyFault
    connections: Collection[int] | Callable[[Any], object] | None = None
    probability: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        fault: object = self.fault  # checked at run time, whatever the annotation says
        if not isinstance(fault, _FAULTS):
            names = ", ".join(kind.__name__ for kind in _FAULTS)
            raise TypeError(f"fault must be one of {names}, got {fault!r}")
        connections = self.connections
        if connections is not None and not callable(connections):
            if isinstance(connections, (str, bytes)) or not isinstance(connections, Collection):
                raise TypeError(
                    "connections must be None, a list of connection indices or a predicate, "
                    f"got {connections!r}"
                )
            for index in connections:
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise TypeError(
                        f"connections must hold connection indices (ints >= 0), got {index!r}"
                    )
            object.__setattr__(self, "connections", frozenset(connections))
        probability = self.probability
        if isinstance(probability, bool) or not isinstance(probability, (int, float)):
            raise TypeError(f"probability must be a number from 0 to 1, got {probability!r}")
        if not 0 <= probability <= 1:
            raise ValueError(f"probability must be a number from 0 to 1, got {probability!r}")
        _check_seed("FaultHandle", self.seed)

    def selects(self, index: int, record: object) -> bool:
        """Whether connection ``index`` (whose record is ``record``) gets this fault."""
        connections = self.connections
        if connections is None:
            targeted = True
        elif callable(connections):
            targeted = bool(connections(record))
        else:
            targeted = index in connections
        return targeted and draw(self.probability, self.seed, index)


def draw(probability: float, seed: int, index: int) -> bool:
    """The draw of connection ``index``: True with ``probability``, the same every run."""
    if probability >= 1:
        return True
    if probability <= 0:
        return False
    return random.Random(f"selectserver-fault/{seed}/{index}").random() < probability


# ---- what a flow asks for -------------------------------------------------------------------


class End(enum.Enum):
    """How a flow's source ended."""

    EOF = "eof"
    """It shut down its sending side: pass on a FIN."""
    RESET = "reset"
    """It reset the connection (or failed): reset the destination."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` to the destination; report with :meth:`Flow.sent` what the socket took."""

    data: memoryview


@dataclass(frozen=True, slots=True)
class Sleep:
    """Nothing to send before ``until`` (None: until something arrives or a fault changes)."""

    until: float | None


@dataclass(frozen=True, slots=True)
class PassEnd:
    """Pass the source's end on; report with :meth:`Flow.end_passed`."""

    end: End


@dataclass(frozen=True, slots=True)
class Abort:
    """A fault ends the whole connection: with RST on both sides if ``reset``, else FIN."""

    reset: bool
    reason: str


Action = Union[Send, Sleep, PassEnd, Abort]
_IDLE = Sleep(None)


class _Queued:
    """What a flow holds: when it was read, the delays faults gave it, when it may go."""

    __slots__ = ("delays", "read_at", "release_at")

    def __init__(self) -> None:
        self.read_at = -math.inf
        self.delays: tuple[tuple[object, float], ...] = ()  # (fault key, seconds)
        self.release_at = -math.inf


class _Chunk(_Queued):
    __slots__ = ("data", "offset")

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data
        self.offset = 0  # bytes of it already sent


class _Mark(_Queued):
    __slots__ = ("end",)

    def __init__(self, end: End) -> None:
        super().__init__()
        self.end = end


class _Active:
    """A fault as one flow carries it: since when, its count, its random numbers."""

    __slots__ = ("count", "fault", "key", "random", "since")

    def __init__(self, key: object, fault: AnyFault, since: float) -> None:
        self.key = key
        self.fault = fault
        self.since = since
        self.count = 0  # bytes passed since (LimitData, ResetPeer)
        self.random = random.Random(fault.seed) if isinstance(fault, (Latency, Slicer)) else None

    def latency(self) -> float:
        fault, draws = self.fault, self.random
        assert isinstance(fault, Latency)
        assert draws is not None
        if not fault.jitter:
            return fault.seconds
        return max(0.0, fault.seconds + draws.uniform(-fault.jitter, fault.jitter))

    def piece_size(self) -> int:
        fault, draws = self.fault, self.random
        assert isinstance(fault, Slicer)
        assert draws is not None
        variation = fault.size_variation
        return fault.average_size + (draws.randint(-variation, variation) if variation else 0)


class Flow:
    """One direction of a proxied connection, from its source to its destination.

    Feed it what the source sent (:meth:`feed`, :meth:`feed_end`); ask :meth:`next_action`
    what to do; report what was done (:meth:`sent`, :meth:`end_passed`). No socket, no clock:
    every call takes ``now``.
    """

    __slots__ = (
        "_active",
        "_gone",
        "_last_release",
        "_next_at",
        "_piece_left",
        "_queue",
        "buffered",
        "direction",
        "dropped",
        "ended",
        "finished",
        "passed",
    )

    def __init__(self, direction: Literal["upstream", "downstream"]) -> None:
        self.direction = direction
        self._queue: deque[_Chunk | _Mark] = deque()
        self._active: list[_Active] = []
        self._last_release = -math.inf  # when the newest queued item may go
        self._next_at = -math.inf  # when pacing or slicing lets the next byte go
        self._piece_left = 0  # bytes left in the current Slicer piece
        self._gone = False  # the destination went away
        self.buffered = 0
        """Bytes held for the destination now."""
        self.passed = 0
        """Bytes handed to the destination."""
        self.dropped = 0
        """Bytes a Timeout dropped, or that were lost with a destination that went away."""
        self.ended = False
        """Whether the source's end was fed."""
        self.finished = False
        """Whether the source's end was passed on."""

    # ---- faults ---------------------------------------------------------------------------

    def add(self, key: object, fault: AnyFault, now: float) -> bool:
        """Let ``fault`` (known by ``key``) act from ``now``, if it acts on this direction."""
        if not fault.applies_to(self.direction):
            return False
        self._active.append(_Active(key, fault, now))
        if isinstance(fault, Slicer):
            self._piece_left = 0  # the newest slicer sizes the next piece
        return True

    def remove(self, key: object) -> None:
        """The fault known by ``key`` no longer acts (its count and clock are forgotten); what
        it delays goes as if it had never acted."""
        removed = [active.fault for active in self._active if active.key == key]
        self._active = [active for active in self._active if active.key != key]
        if any(isinstance(fault, (Bandwidth, Slicer)) for fault in removed):
            self._next_at = -math.inf  # no more waiting for a pace or a piece's delay
            self._piece_left = 0
        if any(isinstance(fault, (Latency, SlowClose)) for fault in removed):
            self._release_again(key)

    def _release_again(self, key: object) -> None:
        """The queued items lose the delays ``key``'s fault gave them; their order is kept."""
        last = -math.inf
        for item in self._queue:
            item.delays = tuple(delay for delay in item.delays if delay[0] != key)
            last = max(item.read_at + sum(seconds for _, seconds in item.delays), last)
            item.release_at = last
        self._last_release = last

    def _faults(self, kind: type | tuple[type, ...]) -> Sequence[_Active]:
        if not self._active:
            return ()  # the usual case, on every chunk
        return [active for active in self._active if isinstance(active.fault, kind)]

    def _rate(self) -> float | None:
        """The bandwidth cap, if any (the lowest wins)."""
        if not self._active:
            return None
        rates = [a.fault.bytes_per_second for a in self._active if isinstance(a.fault, Bandwidth)]
        return min(rates) if rates else None

    # ---- what the source sent -------------------------------------------------------------

    @property
    def wants_data(self) -> bool:
        """Whether to read the source: it has not ended, and the buffer has room."""
        return not self.ended and self.buffered < MAX_BUFFERED

    @property
    def clear(self) -> bool:
        """Whether bytes read now may go out at once: no fault acts and nothing waits."""
        return not self._active and not self._queue and not self._gone

    def passed_through(self, data: bytes, sent: int, now: float) -> None:
        """While :attr:`clear`, ``data`` (read at ``now``) went out at once, ``sent`` bytes of
        it: as :meth:`feed` then :meth:`sent`, without queueing what went."""
        self.passed += sent
        if sent < len(data):
            chunk = _Chunk(data)
            chunk.offset = sent
            self._hold(chunk, now, ())
            self.buffered += len(data) - sent

    def feed(self, data: bytes, now: float) -> None:
        """The source sent ``data`` (read at ``now``)."""
        if self._gone or self._faults(Timeout):
            self.dropped += len(data)
            return
        self._hold(_Chunk(data), now, self._latencies())
        self.buffered += len(data)

    def feed_end(self, end: End, now: float) -> None:
        """The source ended (read at ``now``): its end goes after what it sent."""
        self.ended = True
        if self._gone:
            return
        delays = self._latencies()
        if end is End.EOF:
            delays += tuple(
                (a.key, a.fault.seconds) for a in self._active if isinstance(a.fault, SlowClose)
            )
        self._hold(_Mark(end), now, delays)

    def discard(self) -> None:
        """The destination is gone: drop what waits for it, and whatever comes later."""
        self._gone = True
        self.dropped += self.buffered
        self.buffered = 0
        self._queue.clear()

    def _latencies(self) -> tuple[tuple[object, float], ...]:
        """The delay each Latency gives a chunk read now (jitter drawn)."""
        return tuple((active.key, active.latency()) for active in self._faults(Latency))

    def _hold(
        self, item: _Chunk | _Mark, now: float, delays: tuple[tuple[object, float], ...]
    ) -> None:
        """Queue ``item``, read at ``now``: it goes after its ``delays``, and after what is
        queued before it."""
        item.read_at = now
        item.delays = delays
        release = now + sum(seconds for _, seconds in delays) if delays else now
        item.release_at = self._last_release = max(release, self._last_release)
        self._queue.append(item)

    def holding(self, now: float) -> bool:
        """Whether a fault keeps back what this flow holds (a delay, a pace, a Hold, a Timeout
        holding an end), rather than its destination not taking it."""
        return bool(self._queue) and isinstance(self.next_action(now), Sleep)

    # ---- what to do -----------------------------------------------------------------------

    def next_action(self, now: float) -> Action:
        """What to do at ``now``: the same answer until something is reported or fed."""
        wake: float | None = None
        for active in self._active:
            fault = active.fault
            if isinstance(fault, Timeout) and fault.seconds is not None:
                deadline = active.since + fault.seconds
                if now >= deadline:
                    return Abort(False, f"{fault!r} closed the connection")
                wake = deadline if wake is None else min(wake, deadline)
            elif isinstance(fault, (LimitData, ResetPeer)) and active.count >= fault.limit > 0:
                return Abort(fault.reset, f"{fault!r}: {active.count} bytes passed")
        if not self._queue or self._faults(Hold):
            return _IDLE if wake is None else Sleep(wake)
        head = self._queue[0]
        start = head.release_at if isinstance(head, _Mark) else max(head.release_at, self._next_at)
        if start > now:
            return Sleep(start if wake is None else min(start, wake))
        if isinstance(head, _Mark):
            if self._faults(Timeout):  # an end waits for the Timeout's removal
                return _IDLE if wake is None else Sleep(wake)
            return PassEnd(head.end)
        return self._send(head)

    def _send(self, head: _Chunk) -> Action:
        size = len(head.data) - head.offset
        for active in self._active:
            fault = active.fault
            if isinstance(fault, (LimitData, ResetPeer)):
                left = fault.limit - active.count
                if left <= 0:
                    return Abort(fault.reset, f"{fault!r}: {active.count} bytes passed")
                size = min(size, left)
        rate = self._rate()
        if rate is not None:
            size = min(size, max(1, int(rate * PACE_SECONDS)))
        slicers = self._faults(Slicer)
        if slicers:
            if not self._piece_left:
                self._piece_left = slicers[-1].piece_size()
            size = min(size, self._piece_left)
        else:
            self._piece_left = 0
        return Send(memoryview(head.data)[head.offset : head.offset + size])

    def sent(self, count: int, now: float) -> None:
        """The destination took ``count`` bytes of the last :class:`Send`."""
        head = self._queue[0]
        assert isinstance(head, _Chunk)
        head.offset += count
        self.buffered -= count
        self.passed += count
        for active in self._faults((LimitData, ResetPeer)):
            active.count += count
        rate = self._rate()
        if rate is not None:
            self._next_at = max(self._next_at, now) + count / rate
        finished = head.offset >= len(head.data)
        slicers = [a.fault for a in self._active if isinstance(a.fault, Slicer)]
        if slicers and self._piece_left:
            self._piece_left = 0 if finished else max(0, self._piece_left - count)
            if not self._piece_left:
                self._next_at = max(self._next_at, now + slicers[-1].delay)
        if finished:
            self._queue.popleft()

    def end_passed(self) -> None:
        """The source's end was passed on (the last :class:`PassEnd`)."""
        head = self._queue.popleft()
        assert isinstance(head, _Mark)
        self.finished = True
