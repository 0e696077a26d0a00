"""A heap of timers: pure, and told the time rather than reading a clock.

Entries are ``[when, sequence, item]`` lists so two items are never compared (trio's
``Deadlines``). :meth:`TimerHeap.push` returns the entry, which its owner may
:meth:`~TimerHeap.cancel`: a cancelled entry stays in the heap, emptied, until it is due or
until cancelled entries outnumber live ones, when the heap is rebuilt without them. So the heap
holds at most about twice as many entries as there are live timers, whatever the owners do.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Generic, TypeVar

__all__ = ["TimerHeap"]

T = TypeVar("T")

#: Cancelled entries the heap keeps before it compacts, beyond one per live entry.
SLACK = 16


class TimerHeap(Generic[T]):
    """Items ordered by the time they are due."""

    __slots__ = ("_cancelled", "_heap", "_sequence")

    def __init__(self) -> None:
        self._heap: list[list[object]] = []
        self._sequence = itertools.count()
        self._cancelled = 0

    def __len__(self) -> int:
        """Live (not cancelled) timers."""
        return len(self._heap) - self._cancelled

    @property
    def entries(self) -> int:
        """Entries in the heap, cancelled ones included."""
        return len(self._heap)

    def push(self, when: float, item: T) -> list[object]:
        """Make ``item`` due at ``when``; returns a handle for :meth:`cancel`."""
        entry: list[object] = [when, next(self._sequence), item]
        heapq.heappush(self._heap, entry)
        return entry

    def cancel(self, entry: list[object]) -> None:
        """Drop the timer ``entry`` (one already due or cancelled is ignored)."""
        if entry[2] is None:
            return
        entry[2] = None
        self._cancelled += 1
        self._compact()

    def _compact(self) -> None:
        """Rebuild the heap without cancelled entries once they outnumber live ones."""
        if self._cancelled > len(self._heap) - self._cancelled + SLACK:
            self._heap = [entry for entry in self._heap if entry[2] is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def next_deadline(self) -> float | None:
        """The earliest time anything (perhaps cancelled) is due, or None when empty."""
        return self._heap[0][0] if self._heap else None  # type: ignore[return-value]

    def pop_due(self, now: float) -> list[tuple[float, T]]:
        """Remove and return ``(when, item)`` for every live item due by ``now``, in order."""
        heap = self._heap
        due: list[tuple[float, T]] = []
        while heap and heap[0][0] <= now:  # type: ignore[operator]
            entry = heapq.heappop(heap)
            item = entry[2]
            if item is None:
                self._cancelled -= 1
                continue
            entry[2] = None  # a handle to a fired timer cancels nothing
            due.append((entry[0], item))  # type: ignore[arg-type]
        if due:
            self._compact()
        return due

    def clear(self) -> None:
        """Forget every timer."""
        for entry in self._heap:
            entry[2] = None
        self._heap.clear()
        self._cancelled = 0
