"""Output that never blocks the reactor: ``SERVER:`` lines and log records, written elsewhere.

The reactor thread only appends to a bounded deque; a writer thread (started when there is
something to write, gone after a second of quiet) prints the lines to the stream that was
``sys.stdout`` when each event happened, and hands log records to ``logging``. A pipe nobody
drains, or a logging handler that blocks, stalls the writer, never a server. Past
:data:`MAX_PENDING` waiting entries new ones are dropped and counted, and the writer says how
many once it catches up.

:func:`flush` lets a caller (``close()``, ``wait_for_connections()``) wait, briefly, for what was
queued before it, so a test's captured output holds its servers' lines.
"""

from __future__ import annotations

import _thread
import logging
import os
import sys
import threading
import time
from collections import deque
from typing import Any, TextIO

__all__ = ["MAX_PENDING", "flush", "line", "log", "stop"]

logger = logging.getLogger("selectserver")

#: Entries waiting to be written past which new ones are dropped.
MAX_PENDING = 100_000
#: How long the writer waits for more before it ends.
IDLE_SECONDS = 1.0
#: How long :func:`flush` waits at most, and how long a stalled writer is trusted to resume.
FLUSH_SECONDS = 1.0

_Entry = tuple[Any, ...]


class _Writer:
    """One process's queue of pending output and the thread that writes it."""

    def __init__(self) -> None:
        self.pending: deque[_Entry] = deque()
        self.queued = 0  # entries ever queued
        self.written = 0  # entries ever written (or found unwritable)
        self.dropped = 0
        self.running = False
        self.thread: threading.Thread | None = None
        self.stop_requested = False  # end as soon as the queue is empty
        self.busy_since: float | None = None  # when the current write began
        self.wakeup = _thread.allocate_lock()
        self.wakeup.acquire()

    def put(self, entry: _Entry) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self.pending.append(entry)
        self.queued += 1
        if not self.running:
            self.running = True
            thread = threading.Thread(target=self.run, name="selectserver-output", daemon=True)
            self.thread = thread
            thread.start()
        else:
            self.wake()

    def wake(self) -> None:
        if self.wakeup.locked():
            try:
                self.wakeup.release()
            except RuntimeError:
                pass  # released by another putter just now

    def run(self) -> None:
        while True:
            while self.pending:
                entry = self.pending.popleft()
                self.busy_since = time.monotonic()
                try:
                    _write(entry)
                except Exception:
                    pass  # a closed stream, a broken handler: the line is lost, not the writer
                self.busy_since = None
                self.written += 1
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                _write(("log", logging.WARNING, "selectserver dropped %d output lines", (dropped,)))
            if not self.stop_requested:
                self.wakeup.acquire(timeout=IDLE_SECONDS)
            if not self.pending:
                self.running = False
                if self.pending:  # a put() saw running=True just before we stopped
                    self.running = True
                    continue
                return

    def flush(self, timeout: float) -> None:
        """Wait until what is queued now is written, unless the writer is stuck."""
        target = self.queued
        deadline = time.monotonic() + timeout
        while self.written < target and self.running:
            now = time.monotonic()
            busy = self.busy_since
            if now >= deadline or (busy is not None and now - busy > FLUSH_SECONDS / 4):
                return  # a stream nobody drains: its lines come when it does
            time.sleep(0.001)

    def stop(self, timeout: float | None) -> None:
        """Write what is queued, end the thread and wait for it."""
        thread = self.thread
        if thread is None or thread is threading.current_thread():
            return
        self.stop_requested = True
        try:
            self.wake()
            thread.join(None if timeout is None else min(max(timeout, 0.0), threading.TIMEOUT_MAX))
        finally:
            self.stop_requested = False
        if thread.is_alive():
            raise TimeoutError(f"selectserver's output writer did not stop within {timeout} s")


def _write(entry: _Entry) -> None:
    if entry[0] == "line":
        _, stream, text = entry
        if stream is not None:
            stream.write(text + "\n")
            stream.flush()
    else:
        _, level, message, args, *exc = entry
        logger.log(level, message, *args, exc_info=exc[0] if exc else None)


_writer = _Writer()


def line(text: str) -> None:
    """Print ``text`` on the current ``sys.stdout``, from the writer thread."""
    stream: TextIO | None = sys.stdout
    _writer.put(("line", stream, text))


def log(level: int, message: str, *args: object, exc_info: BaseException | None = None) -> None:
    """Log to the ``selectserver`` logger, from the writer thread."""
    if logger.isEnabledFor(level):
        _writer.put(("log", level, message, args, exc_info))


def flush(timeout: float = FLUSH_SECONDS) -> None:
    """Wait (at most ``timeout``) for the output queued so far to be written."""
    if threading.current_thread().name != "selectserver-output":
        _writer.flush(timeout)


def stop(timeout: float | None) -> None:
    """End the writer thread once what is queued is written (it starts again when needed)."""
    _writer.stop(timeout)


def _after_fork_in_child() -> None:
    global _writer
    _writer = _Writer()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
