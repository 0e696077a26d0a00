"""A heap of timers: pure, and told the time rather than reading a clock.

Entries are ``(when, sequence, item)`` so two items are never compared (trio's ``Deadlines``).
There is no cancel: an owner that no longer wants its timer ignores it when it fires, and keeps
at most one entry armed (it only pushes an earlier time than the one already armed).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Generic, TypeVar

__all__ = ["TimerHeap"]

T = TypeVar("T")


class TimerHeap(Generic[T]):
    """Items ordered by the time they are due."""

    __slots__ = ("_heap", "_sequence")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, when: float, item: T) -> None:
        """Make ``item`` due at ``when``."""
        heapq.heappush(self._heap, (when, next(self._sequence), item))

    def next_deadline(self) -> float | None:
        """The earliest time anything is due, or None when empty."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[tuple[float, T]]:
        """Remove and return ``(when, item)`` for every item due at or before ``now``, in order."""
        heap = self._heap
        due = []
        while heap and heap[0][0] <= now:
            when, _, item = heapq.heappop(heap)
            due.append((when, item))
        return due

    def discard(self, items: set[T]) -> int:
        """Drop every entry whose item is in ``items``; returns how many went."""
        before = len(self._heap)
        self._heap = [entry for entry in self._heap if entry[2] not in items]
        heapq.heapify(self._heap)
        return before - len(self._heap)

    def clear(self) -> None:
        """Forget every timer."""
        self._heap.clear()
