"""What the process holds: descriptors, threads, resident memory (Linux ``/proc``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import threading
import time

__all__ = [
    "PeakSampler",
    "open_fds",
    "os_threads",
    "raise_fd_limit",
    "release_memory",
    "rss",
    "settled_threads",
    "time_wait",
]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def open_fds() -> int:
    """File descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def os_threads() -> int:
    """Threads in this process, as the kernel counts them (every thread, not just Python's)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise RuntimeError("no Threads: line in /proc/self/status")


def settled_threads(seconds: float = 2.0) -> int:
    """``os_threads()`` once threads that Python has joined have left the kernel too.

    ``Thread.join()`` returns before the OS thread is gone, so a count taken right after the
    previous implementation stopped can include its dying thread.
    """
    deadline = time.monotonic() + seconds
    count = os_threads()
    while count > threading.active_count() and time.monotonic() < deadline:
        time.sleep(0.001)
        count = os_threads()
    return count


def time_wait() -> int:
    """TCP connections in TIME_WAIT on the host (in this network namespace, all processes)."""
    with open("/proc/net/sockstat", encoding="ascii") as sockstat:
        for line in sockstat:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    raise RuntimeError("no TCP: line in /proc/net/sockstat")


def rss() -> int:
    """Resident set size in bytes."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * _PAGE


def release_memory() -> None:
    """Collect garbage and hand free heap back to the OS, so RSS deltas start from a floor."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: the delta is noisier, not wrong


class PeakSampler:
    """Samples thread count and RSS every ``interval`` seconds in a thread, keeping the peaks.

    Its own thread is not counted in ``peak_threads``.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_threads = os_threads()
        self.peak_rss = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._sample(own=0)

    def _sample(self, own: int) -> None:
        self.peak_threads = max(self.peak_threads, os_threads() - own)
        self.peak_rss = max(self.peak_rss, rss())

    def _run(self) -> None:
        deadline = time.monotonic() + 600.0
        while not self._stop.wait(self.interval) and time.monotonic() < deadline:
            self._sample(own=1)
