"""Property tests of ``Flow``, the pure per-direction policy of FaultProxy, on a fake clock.

Random sequences of operations drive one flow: chunks fed (``feed``, or ``passed_through`` when
the flow is ``clear``, as the proxy does), an end fed, faults added and removed in random
directions, the clock advanced, and a destination that takes a random number of the bytes of
each ``Send``. A reference model beside the flow knows what was fed, what went out, which faults
act and the delays each queued item was given (it draws Latency's jitter from its own
``random.Random(seed)``, as the flow does), and after every step checks the invariants below.

What is checked holds for every sequence (each stated where it is checked):

* out is a prefix of the bytes fed, in order, without the chunks a Timeout dropped;
* ``passed`` is the bytes sent, ``buffered`` the bytes fed and neither sent nor dropped,
  ``dropped`` what a Timeout dropped plus what ``discard()`` cut (an Abort is followed by
  ``discard()``, as in the proxy);
* ``clear`` is exactly "no fault acts and nothing waits";
* ``next_action`` is stable, a Sleep's ``until`` is in the future, a Send never goes before the
  model's release time nor while a Hold acts, never past a LimitData/ResetPeer's limit, never
  bigger than a pace or a slice allows; an end goes only after every byte fed before it, never
  while a Hold or a Timeout acts;
* an Abort has a cause (a Timeout's deadline passed, or a LimitData/ResetPeer's count is reached),
  and a due cause always aborts;
* with no Hold, Bandwidth, Slicer or Timeout acting, what is due goes now, and what is not due
  sleeps exactly until the model's release time: removing a Latency or a SlowClose releases what
  it delayed as if it had never acted, removing a Hold releases what it held;
* removing a Latency, SlowClose, Hold, Bandwidth or Slicer never makes the flow wait longer;
* removing every fault lets everything queued go at once (nothing stays held without a fault),
  and with only lossless faults everything fed goes out, then the end.

Profiles: see ``_hypothesis_profiles`` (``SELECTSERVER_HYPOTHESIS_PROFILE=dev pytest ...``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from _hypothesis_profiles import SETTINGS
from hypothesis import given
from hypothesis import strategies as st

from selectserver import HANGUP, RESET
from selectserver._faults import (
    PACE_SECONDS,
    Abort,
    Action,
    AnyFault,
    Bandwidth,
    End,
    Flow,
    Hold,
    Latency,
    LimitData,
    PassEnd,
    ResetPeer,
    Send,
    Sleep,
    Slicer,
    SlowClose,
    Timeout,
)

DIRECTIONS = ("upstream", "downstream", "both")
LOSSY = (Timeout, LimitData, ResetPeer)
#: Faults that may keep back what is due: the model does not predict their timing.
PACERS = (Hold, Bandwidth, Slicer, Timeout)
#: Faults whose removal never makes a flow wait longer.
EASED_BY_REMOVAL = (Latency, SlowClose, Hold, Bandwidth, Slicer)


# ---- operations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feed:
    """The source sent ``data``; ``through``: as the proxy does when the flow is clear and the
    destination takes ``take`` of it at once (``passed_through``)."""

    data: bytes
    through: bool = False
    take: int = 4


@dataclass(frozen=True)
class FeedEnd:
    end: End


@dataclass(frozen=True)
class Add:
    fault: AnyFault


@dataclass(frozen=True)
class Remove:
    which: int  # among the faults added so far (removing one twice is allowed)


@dataclass(frozen=True)
class Advance:
    seconds: float


@dataclass(frozen=True)
class Wake:
    """Advance the clock to the ``until`` of the Sleep the flow asks for, if any."""


@dataclass(frozen=True)
class Step:
    """Do what the flow asks, up to ``times`` times (stopping at a Sleep); the destination takes
    ``take``/4 of each Send (0: nothing, 4: all)."""

    take: int = 4
    times: int = 1


@dataclass(frozen=True)
class Discard:
    """The destination went away."""


Op = Feed | FeedEnd | Add | Remove | Advance | Wake | Step | Discard


class Key:
    """A fault's key, as the proxy's FaultHandle: compared by identity."""

    __slots__ = ("number",)

    def __init__(self, number: int) -> None:
        self.number = number

    def __repr__(self) -> str:
        return f"Key({self.number})"


# ---- the model -----------------------------------------------------------------------------------


@dataclass
class Active:
    fault: AnyFault
    since: float
    count: int = 0  # bytes sent since it began (LimitData, ResetPeer)
    draws: random.Random | None = None  # Latency's jitter, as the flow draws it

    def latency(self) -> float:
        fault = self.fault
        assert isinstance(fault, Latency)
        if not fault.jitter:
            return fault.seconds
        assert self.draws is not None
        return max(0.0, fault.seconds + self.draws.uniform(-fault.jitter, fault.jitter))


@dataclass
class Item:
    """A queued chunk (``data`` left to send) or end (``end``), with its delays by key."""

    read_at: float
    delays: list[tuple[Key, float]]
    data: bytes = b""
    end: End | None = None

    def release(self) -> float:
        return self.read_at + sum(seconds for _, seconds in self.delays)


def take_of(size: int, take: int) -> int:
    return size * take // 4


@dataclass
class Model:
    flow: Flow
    now: float = 0.0
    active: dict[Key, Active] = field(default_factory=dict)
    keys: list[Key] = field(default_factory=list)
    queue: list[Item] = field(default_factory=list)
    fed: bytearray = field(default_factory=bytearray)  # every byte fed
    kept: bytearray = field(default_factory=bytearray)  # fed and not dropped by a Timeout
    out: bytearray = field(default_factory=bytearray)
    timeout_dropped: int = 0
    cut: int = 0  # what discard() dropped: queued, and fed after it
    end: End | None = None
    end_passed: bool = False
    gone: bool = False
    aborted: Abort | None = None
    lossy: bool = False  # a lossy fault or discard() acted at some point
    #: when pacing lets the next byte go (None: a Slicer's piece delay made it unknown)
    next_at: float | None = -math.inf
    sleeps: int = 0

    # ---- what acts

    def acting(self, kind: type | tuple[type, ...]) -> list[Active]:
        return [active for active in self.active.values() if isinstance(active.fault, kind)]

    def expired(self) -> list[Active]:
        """Timeouts whose deadline passed, and limits reached: each must abort."""
        found = []
        for active in self.active.values():
            fault = active.fault
            if isinstance(fault, Timeout) and fault.seconds is not None:
                if self.now >= active.since + fault.seconds:
                    found.append(active)
            elif isinstance(fault, (LimitData, ResetPeer)) and active.count >= fault.limit > 0:
                found.append(active)
        return found

    def may_abort(self, action: Abort) -> bool:
        """Whether a fault is a cause for ``action``."""
        for active in self.active.values():
            fault = active.fault
            if isinstance(fault, Timeout) and fault.seconds is not None:
                if self.now >= active.since + fault.seconds and not action.reset:
                    return True
            elif (
                isinstance(fault, (LimitData, ResetPeer))
                and active.count >= fault.limit
                and fault.reset == action.reset
            ):
                return True
        return False

    def latencies(self) -> list[tuple[Key, float]]:
        """The delay each Latency gives an item read now (jitter drawn, as the flow does)."""
        return [
            (key, a.latency()) for key, a in self.active.items() if isinstance(a.fault, Latency)
        ]

    def queued_bytes(self) -> int:
        return sum(len(item.data) for item in self.queue)

    # ---- the invariants after every operation

    def check(self) -> None:
        flow = self.flow
        # Out is the bytes fed, in order, minus the chunks a Timeout dropped: a prefix of `kept`.
        assert bytes(self.out) == bytes(self.kept[: len(self.out)]), "bytes out of order or lost"
        # `passed` is the bytes the destination took.
        assert flow.passed == len(self.out)
        if self.gone:
            # After discard() nothing is held; what was queued or fed since is counted dropped.
            assert flow.buffered == 0
            assert flow.dropped == self.timeout_dropped + self.cut
        else:
            # `buffered`: fed and not yet sent nor dropped; `dropped`: what a Timeout dropped.
            assert flow.buffered == len(self.kept) - len(self.out) == self.queued_bytes()
            assert flow.dropped == self.timeout_dropped
        assert flow.ended == (self.end is not None)
        assert flow.finished == self.end_passed
        # `clear` (the proxy's fast path) means: no fault acts here and nothing waits.
        assert flow.clear == (not self.active and not self.queue and not self.gone)

    # ---- operations

    def play(self, op: Op) -> None:
        if isinstance(op, Feed):
            self.feed(op)
        elif isinstance(op, FeedEnd):
            self.feed_end(op.end)
        elif isinstance(op, Add):
            self.add(op.fault)
        elif isinstance(op, Remove):
            if self.keys:
                self.remove(self.keys[op.which % len(self.keys)])
        elif isinstance(op, Advance):
            self.now += op.seconds
        elif isinstance(op, Wake):
            action = self.flow.next_action(self.now)
            if isinstance(action, Sleep) and action.until is not None:
                self.now = action.until
        elif isinstance(op, Step):
            for _ in range(op.times):
                if not self.step(op.take) or self.aborted:
                    break
        else:
            self.discard()

    def feed(self, op: Feed) -> None:
        if self.end is not None:
            return  # the proxy reads no more once the source ended
        flow, data = self.flow, op.data
        self.fed += data
        if op.through and flow.clear:
            sent = take_of(len(data), op.take)
            flow.passed_through(data, sent, self.now)
            self.kept += data
            self.out += data[:sent]
            if sent < len(data):
                self.queue.append(Item(self.now, [], data=data[sent:]))
            return
        flow.feed(data, self.now)
        if self.gone:
            self.cut += len(data)
        elif self.acting(Timeout):
            self.timeout_dropped += len(data)
        else:
            delays = self.latencies()
            self.kept += data
            self.queue.append(Item(self.now, delays, data=data))

    def feed_end(self, end: End) -> None:
        if self.end is not None:
            return
        self.flow.feed_end(end, self.now)
        self.end = end
        if self.gone:
            return
        delays = self.latencies()
        if end is End.EOF:
            delays += [
                (key, a.fault.seconds)
                for key, a in self.active.items()
                if isinstance(a.fault, SlowClose)
            ]
        self.queue.append(Item(self.now, delays, end=end))

    def add(self, fault: AnyFault) -> None:
        key = Key(len(self.keys))
        self.keys.append(key)
        applies = self.flow.add(key, fault, self.now)
        assert applies == fault.applies_to(self.flow.direction)
        if applies:
            jittered = isinstance(fault, Latency) and fault.jitter
            draws = random.Random(fault.seed) if isinstance(fault, Latency) and jittered else None
            self.active[key] = Active(fault, self.now, draws=draws)
            if isinstance(fault, LOSSY):
                self.lossy = True

    def remove(self, key: Key) -> None:
        before = self.flow.next_action(self.now)
        removed = self.active.pop(key, None)
        self.flow.remove(key)
        if removed is not None and isinstance(removed.fault, (Bandwidth, Slicer)):
            self.next_at = -math.inf  # no more waiting for a pace or a piece's delay
        for item in self.queue:
            item.delays = [(other, seconds) for other, seconds in item.delays if other is not key]
        after = self.flow.next_action(self.now)
        # Removing a fault that only delays never makes the flow wait longer.
        if (
            removed is not None
            and isinstance(removed.fault, EASED_BY_REMOVAL)
            and isinstance(after, Sleep)
        ):
            assert isinstance(before, Sleep), (removed, before, after)
            later = math.inf if after.until is None else after.until
            assert later <= (math.inf if before.until is None else before.until), (
                f"removing {removed.fault!r} made the flow wait longer: {before} -> {after}"
            )
        self.check_action(after)

    def discard(self) -> None:
        self.flow.discard()
        if not self.gone:
            self.cut += self.queued_bytes()
        self.queue.clear()
        self.gone = True
        self.lossy = True

    # ---- what the flow asks

    def check_action(self, action: Action) -> None:
        """``action`` is what the flow asks for now: check it against the model."""
        flow, now = self.flow, self.now
        # next_action is stable: the same answer while nothing is reported, fed or changed.
        again = flow.next_action(now)
        assert same(action, again), f"next_action is not stable: {action} then {again}"
        expired = self.expired()
        if expired and not isinstance(action, Abort):
            raise AssertionError(f"{expired[0].fault!r} is due to abort, the flow says {action}")
        if isinstance(action, Abort):
            assert self.may_abort(action), f"{action} without a cause: {self.active}"
            return
        head = self.queue[0] if self.queue else None
        paced = bool(self.acting(PACERS))
        start = None if head is None else head.release()
        if head is not None and head.end is None and self.acting(Bandwidth):
            # Only a pace, besides delays: the model knows when it lets the next byte go.
            paced = bool(self.acting((Hold, Slicer, Timeout))) or self.next_at is None
            if self.next_at is not None:
                start = max(head.release(), self.next_at)
        if isinstance(action, Sleep):
            # A Sleep's until is in the future.
            assert action.until is None or action.until > now, (action, now)
            if not paced and start is not None:
                # Nothing but a delay or a pace keeps back what is queued, and the model knows
                # until when: removing a Latency/SlowClose/Hold left nothing of it behind.
                assert start > now, f"{head} is due at {now}, the flow sleeps: {action}"
                assert action.until is not None
                assert math.isclose(action.until, start, abs_tol=1e-9), (
                    f"the flow sleeps until {action.until}, {head} is due at {start}"
                )
            return
        assert head is not None, f"{action} with nothing queued"
        assert not self.acting(Hold), f"{action} while a Hold acts"
        assert head.release() <= now + 1e-9, f"{action} before {head} is due"
        if isinstance(action, PassEnd):
            # An end goes only after every byte fed before it, and never while a Timeout acts.
            assert head.end is action.end
            assert len(self.queue) == 1
            assert bytes(self.out) == bytes(self.kept)
            assert not self.acting(Timeout)
            return
        data = bytes(action.data)
        assert data, "an empty Send"
        assert head.data.startswith(data), f"{data!r} is not the head of {head}"
        for active in self.acting((LimitData, ResetPeer)):
            limit = active.fault.limit  # type: ignore[union-attr]
            assert active.count + len(data) <= limit, f"{action} passes {active.fault!r}"
        rates = [a.fault.bytes_per_second for a in self.acting(Bandwidth)]  # type: ignore[union-attr]
        if rates:
            assert len(data) <= max(1, int(min(rates) * PACE_SECONDS))
        # A piece is at most what a slicer acting cuts: the newest one cuts from the next
        # piece on (a piece already planned by an older one is finished first).
        pieces = [a.fault.average_size + a.fault.size_variation for a in self.acting(Slicer)]  # type: ignore[union-attr]
        if pieces:
            assert len(data) <= max(pieces), f"{data!r}: pieces of at most {max(pieces)}"

    def step(self, take: int) -> bool:
        """Do what the flow asks once; False if it asks to sleep."""
        flow = self.flow
        action = flow.next_action(self.now)
        self.check_action(action)
        if isinstance(action, Sleep):
            self.sleeps += 1
            return False
        if isinstance(action, Abort):
            self.aborted = action
            self.lossy = True
            self.discard()  # the proxy ends the connection: both flows are discarded
            return False
        if isinstance(action, PassEnd):
            flow.end_passed()
            self.queue.pop(0)
            self.end_passed = True
            return True
        data = bytes(action.data)
        sent = take_of(len(data), take)
        flow.sent(sent, self.now)
        self.out += data[:sent]
        for active in self.acting((LimitData, ResetPeer)):
            active.count += sent
        rates = [a.fault.bytes_per_second for a in self.acting(Bandwidth)]  # type: ignore[union-attr]
        if rates and self.next_at is not None:
            self.next_at = max(self.next_at, self.now) + sent / min(rates)
        if self.acting(Slicer):
            self.next_at = None  # a piece's delay: not modelled
        head = self.queue[0]
        head.data = head.data[sent:]
        if not head.data:
            self.queue.pop(0)
        return True

    # ---- endings

    def drain(self, wake: bool, steps: int = 100_000) -> None:
        """Run to quiescence: the destination takes everything; ``wake``: sleep through
        timed Sleeps (else a Sleep with something queued fails)."""
        for _ in range(steps):
            if self.aborted:
                return
            action = self.flow.next_action(self.now)
            if isinstance(action, Sleep):
                self.check_action(action)
                if not self.queue:
                    return
                held = f"{self.queue[0]} stays held with faults {list(self.active.values())}"
                assert wake, held
                assert action.until is not None, held
                self.now = action.until
                continue
            self.step(4)
            self.check()
        raise AssertionError("the flow never settled")


def same(first: Action, second: Action) -> bool:
    if isinstance(first, Send) and isinstance(second, Send):
        return bytes(first.data) == bytes(second.data)
    return first == second


def run(direction: str, ops: Sequence[Op]) -> Model:
    assert direction in ("upstream", "downstream")
    model = Model(Flow(direction))  # type: ignore[arg-type]
    for op in ops:
        if model.aborted:
            break
        model.play(op)
        model.check()
    return model


# ---- strategies ----------------------------------------------------------------------------------

seconds = st.sampled_from([0.0, 0.001, 0.005, 0.01, 0.1, 0.25, 1.0]) | st.floats(0, 1)
directions = st.sampled_from(DIRECTIONS)
seeds = st.integers(0, 3)


def fault_kinds(lossy: bool) -> dict[str, st.SearchStrategy[AnyFault]]:
    """A strategy per fault class (each example draws a few, so that they meet often)."""
    kinds: dict[str, st.SearchStrategy[AnyFault]] = {
        "latency": st.builds(Latency, seconds, st.just(0.0) | seconds, seeds, directions),
        "bandwidth": st.builds(Bandwidth, st.sampled_from([100, 1000, 5000, 1e6]), directions),
        "slicer": st.integers(1, 16).flatmap(
            lambda size: st.builds(
                Slicer,
                st.just(size),
                st.integers(0, size - 1),
                st.just(0.0) | seconds,
                seeds,
                directions,
            )
        ),
        "slowclose": st.builds(SlowClose, seconds, directions),
        "hold": st.builds(Hold, directions),
    }
    if lossy:
        limits = st.integers(0, 40) | st.integers(0, 300)
        kinds["timeout"] = st.builds(Timeout, st.none() | seconds, directions)
        kinds["resetpeer"] = st.builds(ResetPeer, limits, directions)
        kinds["limitdata"] = st.builds(
            LimitData, limits, st.sampled_from([HANGUP, RESET]), directions
        )
    return kinds


LOSSLESS_KINDS = sorted(fault_kinds(lossy=False))
ALL_KINDS = sorted(fault_kinds(lossy=True))


@st.composite
def scenarios(draw: st.DrawFn, lossy: bool, kind: str) -> tuple[str, list[Op]]:
    """A flow's direction and its operations, with faults of ``kind`` (``"mixed"``: from a
    palette of 1 to 3 kinds, so that they meet often)."""
    kinds = fault_kinds(lossy)
    if kind == "mixed":
        palette = draw(
            st.lists(st.sampled_from(sorted(kinds)), min_size=1, max_size=3, unique=True)
        )
    else:
        palette = [kind]
    faults = st.one_of([kinds[name] for name in palette])
    takes = st.integers(0, 4)
    feeds = st.builds(Feed, st.binary(min_size=1, max_size=64), st.booleans(), takes)
    choices: list[st.SearchStrategy[Op]] = [
        feeds,
        feeds,
        feeds,
        st.builds(Add, faults),
        st.builds(Add, faults),
        st.builds(Remove, st.integers(0, 100)),
        st.builds(Advance, st.sampled_from([0.0, 0.0005, 0.005, 0.05, 0.3, 2.0])),
        st.just(Wake()),
        st.just(Wake()),
        st.builds(Step, takes, st.integers(1, 20)),
        st.builds(Step, takes, st.integers(1, 20)),
        st.builds(Step, st.just(4), st.just(50)),
    ]
    direction = draw(st.sampled_from(["upstream", "downstream"]))
    ops = draw(st.lists(st.one_of(choices), min_size=10, max_size=60))
    # An end (after which nothing is fed) and a lost destination come late, if at all.
    ends = [End.EOF, End.RESET] if lossy else [End.EOF]
    end = draw(st.none() | st.sampled_from(ends))
    if end is not None:
        ops.insert(draw(st.integers(len(ops) // 2, len(ops))), FeedEnd(end))
    if lossy and draw(st.integers(0, 3)) == 0:
        ops.insert(draw(st.integers(len(ops) // 2, len(ops))), Discard())
    return direction, ops


# ---- the properties ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*ALL_KINDS, "mixed"])
@SETTINGS
@given(data=st.data())
def test_flow_keeps_its_accounts_whatever_the_faults(kind: str, data: st.DataObject) -> None:
    """Any faults, added and removed at any moment, any destination: the invariants of the
    module docstring hold after every operation, and once every fault is removed everything
    still queued goes at once (nothing stays held without a fault), then the end."""
    scenario = data.draw(scenarios(lossy=True, kind=kind))
    model = run(*scenario)
    if model.aborted:
        return
    for key in list(model.keys):
        model.remove(key)
        model.check()
    model.drain(wake=False)
    model.check()
    assert not model.queue
    assert bytes(model.out) == bytes(model.kept) or model.gone
    if model.end is not None and not model.gone:
        assert model.end_passed


@pytest.mark.parametrize("kind", [*LOSSLESS_KINDS, "mixed"])
@SETTINGS
@given(data=st.data())
def test_lossless_faults_deliver_everything_then_the_end(kind: str, data: st.DataObject) -> None:
    """With only Latency, Bandwidth, Slicer, SlowClose and Hold (Holds removed at the end),
    sleeping through what the flow asks delivers every byte fed, in order, then the EOF."""
    scenario = data.draw(scenarios(lossy=False, kind=kind))
    model = run(*scenario)
    assert not model.lossy
    assert not model.aborted
    model.feed_end(End.EOF)
    for key, active in list(model.active.items()):
        if isinstance(active.fault, Hold):
            model.remove(key)
    model.check()
    model.drain(wake=True)
    model.check()
    assert bytes(model.out) == bytes(model.fed)
    assert model.end_passed
    assert model.flow.finished
    assert isinstance(model.flow.next_action(model.now), Sleep)


@pytest.mark.parametrize("kind", [*ALL_KINDS, "mixed"])
@SETTINGS
@given(data=st.data())
def test_removing_everything_and_waiting_lets_all_go(kind: str, data: st.DataObject) -> None:
    """Whatever happened, once the faults are gone a flow that was not aborted ends up empty
    when the clock advances: no byte is held forever without a fault."""
    scenario = data.draw(scenarios(lossy=True, kind=kind))
    model = run(*scenario)
    if model.aborted:
        return
    model.now += 1000.0
    for key in list(model.keys):
        model.remove(key)
    model.drain(wake=True)
    assert not model.queue
    assert model.flow.buffered == 0
