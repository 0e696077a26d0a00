"""TimerHeap: pure ordering of timers by due time, told the time rather than reading a clock."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from selectserver._timers import TimerHeap


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
