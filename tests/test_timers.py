"""TimerHeap: pure ordering of timers by due time, told the time rather than reading a clock."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from selectserver._timers import SLACK, TimerHeap


class Incomparable:
    """An item that raises if the heap ever compares it with another."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __lt__(self, other: object) -> bool:
        raise AssertionError(f"compared {self.name} with {other!r}")

    __gt__ = __le__ = __ge__ = __lt__

    def __eq__(self, other: object) -> bool:
        raise AssertionError(f"compared {self.name} with {other!r}")

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return self.name


def test_empty_heap() -> None:
    heap: TimerHeap[str] = TimerHeap()
    assert len(heap) == 0
    assert heap.next_deadline() is None
    assert heap.pop_due(math.inf) == []


def test_pops_in_time_order_whatever_the_push_order() -> None:
    heap: TimerHeap[str] = TimerHeap()
    for when, item in [(3.0, "c"), (1.0, "a"), (2.0, "b"), (0.5, "first")]:
        heap.push(when, item)
    assert len(heap) == 4
    assert heap.next_deadline() == 0.5
    assert heap.pop_due(10.0) == [(0.5, "first"), (1.0, "a"), (2.0, "b"), (3.0, "c")]
    assert len(heap) == 0
    assert heap.next_deadline() is None


def test_ties_pop_in_push_order() -> None:
    heap: TimerHeap[str] = TimerHeap()
    for item in ["one", "two", "three"]:
        heap.push(1.0, item)
    heap.push(0.0, "earlier")
    assert [item for _, item in heap.pop_due(1.0)] == ["earlier", "one", "two", "three"]


def test_pop_due_boundaries() -> None:
    heap: TimerHeap[str] = TimerHeap()
    heap.push(1.0, "a")
    heap.push(2.0, "b")
    heap.push(3.0, "c")
    assert heap.pop_due(0.999) == []
    assert heap.pop_due(1.0) == [(1.0, "a")], "due exactly at now counts as due"
    assert heap.pop_due(math.nextafter(2.0, 0.0)) == []
    assert heap.next_deadline() == 2.0
    assert heap.pop_due(2.5) == [(2.0, "b")]
    assert len(heap) == 1
    assert heap.next_deadline() == 3.0


def test_pop_due_returns_late_timers_with_their_own_time() -> None:
    heap: TimerHeap[str] = TimerHeap()
    heap.push(1.0, "late")
    assert heap.pop_due(100.0) == [(1.0, "late")]


def test_items_are_never_compared() -> None:
    heap: TimerHeap[Incomparable] = TimerHeap()
    items = [Incomparable(f"item{i}") for i in range(20)]
    for i, item in enumerate(items):
        heap.push(float(i % 3), item)  # many ties
    due = heap.pop_due(5.0)
    assert [when for when, _ in due] == sorted(float(i % 3) for i in range(20))
    assert [item.name for _, item in due] == [
        item.name for i in range(3) for item in items[i::3]
    ], "ties keep push order"


def test_clear_forgets_everything() -> None:
    heap: TimerHeap[str] = TimerHeap()
    heap.push(1.0, "a")
    heap.push(2.0, "b")
    heap.clear()
    assert len(heap) == 0
    assert heap.next_deadline() is None
    assert heap.pop_due(math.inf) == []


@given(
    whens=st.lists(st.integers(0, 20).map(float), max_size=40),
    now=st.integers(-1, 21).map(float),
)
def test_pop_due_is_a_stable_sort_split_at_now(whens: list[float], now: float) -> None:
    heap: TimerHeap[int] = TimerHeap()
    for index, when in enumerate(whens):
        heap.push(when, index)
    expected = sorted(enumerate(whens), key=lambda pair: pair[1])  # sorted() is stable
    due = heap.pop_due(now)
    assert due == [(when, index) for index, when in expected if when <= now]
    assert heap.pop_due(math.inf) == [(when, index) for index, when in expected if when > now]


# ---- cancel -----------------------------------------------------------------------------------


def test_a_cancelled_timer_never_pops() -> None:
    heap: TimerHeap[str] = TimerHeap()
    keep = heap.push(1.0, "keep")
    drop = heap.push(2.0, "drop")
    heap.push(3.0, "later")
    heap.cancel(drop)
    assert len(heap) == 2, "len counts live timers only"
    assert heap.entries == 3, "the cancelled entry waits in the heap until it is due"
    assert heap.pop_due(math.inf) == [(1.0, "keep"), (3.0, "later")]
    assert len(heap) == 0
    assert heap.entries == 0
    assert keep[2] is None


def test_cancelling_twice_counts_once() -> None:
    heap: TimerHeap[str] = TimerHeap()
    entry = heap.push(1.0, "a")
    heap.push(2.0, "b")
    heap.cancel(entry)
    heap.cancel(entry)
    assert len(heap) == 1
    assert heap.pop_due(math.inf) == [(2.0, "b")]
    assert (len(heap), heap.entries) == (0, 0)


def test_the_handle_of_a_fired_timer_cancels_nothing() -> None:
    heap: TimerHeap[str] = TimerHeap()
    fired = heap.push(1.0, "fired")
    heap.push(2.0, "other")
    assert heap.pop_due(1.0) == [(1.0, "fired")]
    heap.cancel(fired)  # its owner did not know it had fired: harmless
    assert len(heap) == 1
    assert heap.entries == 1
    assert heap.pop_due(math.inf) == [(2.0, "other")]
    assert len(heap) == 0


def test_handles_of_cleared_timers_cancel_nothing() -> None:
    heap: TimerHeap[str] = TimerHeap()
    old = heap.push(1.0, "old")
    heap.clear()
    heap.push(2.0, "new")
    heap.cancel(old)
    assert len(heap) == 1
    assert heap.pop_due(math.inf) == [(2.0, "new")]


def test_a_cancelled_head_may_still_be_the_next_deadline() -> None:
    heap: TimerHeap[str] = TimerHeap()
    head = heap.push(1.0, "head")
    heap.push(5.0, "live")
    heap.cancel(head)
    deadline = heap.next_deadline()
    assert deadline in (1.0, 5.0), "never later than the first live timer"
    assert heap.pop_due(1.0) == []
    assert heap.next_deadline() == 5.0


def test_cancelled_entries_are_compacted() -> None:
    heap: TimerHeap[int] = TimerHeap()
    handles = [heap.push(float(i), i) for i in range(100)]
    for handle in handles[:90]:
        heap.cancel(handle)
    assert len(heap) == 10
    assert heap.entries <= 2 * len(heap) + SLACK + 1
    assert heap.pop_due(math.inf) == [(float(i), i) for i in range(90, 100)]
    assert (len(heap), heap.entries) == (0, 0)


def test_handles_survive_a_compaction() -> None:
    heap: TimerHeap[int] = TimerHeap()
    handles = [heap.push(float(i), i) for i in range(4 * SLACK)]
    survivor = handles[-1]
    for handle in handles[:-2]:  # enough to compact, at least once
        heap.cancel(handle)
    assert heap.entries < len(handles) - 2
    heap.cancel(survivor)  # a handle made before the compaction still cancels its timer
    assert len(heap) == 1
    assert heap.pop_due(math.inf) == [(float(4 * SLACK - 2), 4 * SLACK - 2)]


# Operations: push at a time, cancel the k-th handle ever pushed, or pop what is due by a time.
operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 50)),
        st.tuples(st.just("cancel"), st.integers(0, 10_000)),
        st.tuples(st.just("pop"), st.integers(0, 50)),
    ),
    max_size=400,
)


@given(operations)
def test_cancel_against_a_model(ops: list[tuple[str, int]]) -> None:
    heap: TimerHeap[int] = TimerHeap()
    handles: list[list[object]] = []
    live: dict[int, float] = {}  # the model: item -> when, for timers neither cancelled nor due
    for op, value in ops:
        if op == "push":
            item = len(handles)
            handles.append(heap.push(float(value), item))
            live[item] = float(value)
        elif op == "cancel" and handles:
            item = value % len(handles)
            heap.cancel(handles[item])
            live.pop(item, None)
        elif op == "pop":
            due = heap.pop_due(float(value))
            # Ties pop in push order, which is item order.
            expected = sorted((when, item) for item, when in live.items() if when <= value)
            assert due == expected
            for _, item in due:
                del live[item]
        assert len(heap) == len(live)
        if op == "cancel":  # after pops, see test_pops_never_leave_cancelled_entries_...
            assert heap.entries <= 2 * len(live) + SLACK + 1, (heap.entries, len(live))
        deadline = heap.next_deadline()
        if live:
            assert deadline is not None
            assert deadline <= min(live.values())
    assert heap.pop_due(math.inf) == sorted((when, item) for item, when in live.items())


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1000)), min_size=1, max_size=2000))
def test_a_long_run_of_pushes_and_cancels_stays_bounded(steps: list[tuple[bool, int]]) -> None:
    heap: TimerHeap[int] = TimerHeap()
    handles: list[list[object]] = []
    cancelled: set[int] = set()
    for index, (cancel, pick) in enumerate(steps):
        if cancel and handles:
            chosen = pick % len(handles)
            heap.cancel(handles[chosen])
            cancelled.add(chosen)
        else:
            handles.append(heap.push(float(pick), index))
        live = len(handles) - len(cancelled)
        assert len(heap) == live
        assert heap.entries <= 2 * live + SLACK + 1
    survivors = heap.pop_due(math.inf)
    assert len(survivors) == len(handles) - len(cancelled)
    assert heap.entries == 0


def test_pops_never_leave_cancelled_entries_outnumbering_live_ones() -> None:
    # The module's promise, "at most about twice as many entries as there are live timers,
    # whatever the owners do", must hold after pop_due too, not only after cancel.
    heap: TimerHeap[int] = TimerHeap()
    later = [heap.push(100.0, i) for i in range(40)]
    for i in range(40):
        heap.push(1.0, 100 + i)
    for handle in later:
        heap.cancel(handle)  # 40 cancelled, 40 live: no compaction yet, rightly
    assert heap.entries <= 2 * len(heap) + SLACK + 1
    assert len(heap.pop_due(1.0)) == 40  # every live timer fires
    assert len(heap) == 0
    assert heap.entries <= 2 * len(heap) + SLACK + 1, f"{heap.entries} entries, none live"
