"""``python -m benchmarks.memory KIND IMPL N``: memory per server or connection, in a fresh process.

A long benchmark run leaves freed memory in the allocator's arenas, and new servers reuse it
without growing RSS, so an RSS delta taken mid-run says more about earlier scenarios than about
the servers. The memory scenarios therefore run this module once per sample, in a clean
interpreter, after :func:`~benchmarks.impls.warm_up`. It prints its figures as JSON, in KiB:

* ``idle``: ``N`` idle servers (listening, no connections): RSS growth and the memory
  ``tracemalloc`` traced, per server (Python objects only: no thread stacks, no kernel buffers);
* ``idleconns``: one server, ``N`` clients connected and sending nothing, so every server
  connection waits in its first receive: traced per connection;
* ``records`` (selectserver only): one server, ``N`` sequential clients that send ``x`` and read
  ``hello`` to EOF: traced memory the ended connections keep (their records), per connection,
  minus the 6 bytes each carried.

``idleconns`` and ``records`` count only allocations with a frame in the implementation's own
files (:data:`SOURCES`), so the clients this process makes are not counted; and each measures
from after the server's first connection, so one-off costs (a reactor's receive buffer) are not
spread over the others.
"""

from __future__ import annotations

import asyncio
import fnmatch
import gc
import json
import os
import socket
import sys
import time
import tracemalloc
from collections.abc import Callable

import selectserver

from . import rawselect
from .clients import abortive, exchange
from .common import HELLO, HOST, WAIT_SECONDS, CountingGroup
from .impls import by_name, opened, warm_up
from .system import raise_fd_limit, release_memory, rss

__all__ = ["MEASURES", "SOURCES", "idle_connections", "idle_servers", "records"]

#: the files whose allocations are the server's: those with one of them in any frame
SOURCES = {
    "selectserver": os.path.join(os.path.dirname(selectserver.__file__), "*"),
    "rawselect": rawselect.__file__,
    "asyncio": os.path.join(os.path.dirname(asyncio.__file__), "*"),
}
#: frames kept per traced allocation: enough to reach the server's thread or caller
FRAMES = 25
#: bytes one ``records`` connection carries: ``x`` in, ``hello`` out
CARRIED = 1 + 5


def idle_servers(name: str, n: int) -> dict[str, float]:
    """Idle KiB per server of implementation ``name`` at ``n`` servers: RSS and traced."""
    impl = by_name(name)
    warm_up(impl)
    release_memory()
    before = rss()
    with opened(impl, HELLO, n) as group:
        group.settle()
        gc.collect()
        rss_kib = (rss() - before) / n / 1024
    release_memory()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with opened(impl, HELLO, n) as group:
            group.settle()
            gc.collect()
            traced_kib = (tracemalloc.get_traced_memory()[0] - before) / n / 1024
    finally:
        tracemalloc.stop()
    return {"rss": rss_kib, "traced": traced_kib}


def _traced(name: str) -> int:
    """Bytes traced now in allocations made by implementation ``name`` (after a collection).

    ``Snapshot.filter_traces`` with ``all_frames`` would match every trace's frames in Python
    (seconds for 50,000 traces); grouped by traceback first, there are a few hundred to match.
    """
    gc.collect()
    pattern = SOURCES[name]
    return sum(
        stat.size
        for stat in tracemalloc.take_snapshot().statistics("traceback")
        if any(fnmatch.fnmatch(frame.filename, pattern) for frame in stat.traceback)
    )


def _wait(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.001)


def idle_connections(name: str, n: int) -> dict[str, float]:
    """Traced KiB per idle connection: ``n`` clients connected to one server, sending nothing."""
    impl = by_name(name)
    warm_up(impl)
    tracemalloc.start(FRAMES)
    try:
        with opened(impl, HELLO, 1) as group:
            if not isinstance(group, CountingGroup):
                raise SystemExit(f"idleconns: {name} cannot count its connections")
            group.settle()
            address = group.addresses[0]
            exchange(address, b"x", b"hello")  # the server's first connection
            _wait(lambda: group.connections() == 0, "the first connection to end")
            before = _traced(name)
            clients = []
            try:
                for _ in range(n):
                    clients.append(abortive(socket.create_connection(address, WAIT_SECONDS)))
                _wait(lambda: group.connections() == n, f"{n} connections")
                traced = _traced(name) - before
            finally:
                for client in clients:
                    client.close()
    finally:
        tracemalloc.stop()
    return {"traced": traced / n / 1024}


def records(name: str, n: int) -> dict[str, float]:
    """Traced KiB an ended connection keeps, less the bytes it carried (selectserver only)."""
    if name != "selectserver":
        raise SystemExit("records: only selectserver keeps records")
    warm_up(by_name(name))
    tracemalloc.start(FRAMES)
    try:
        with selectserver.CommandServer([selectserver.RECEIVE, b"hello"], verbose=False) as server:
            exchange(server.address, b"x", b"hello")  # the server's first connection
            server.wait_for_connections(1, timeout=WAIT_SECONDS)
            before = _traced(name)
            for _ in range(n):
                exchange(server.address, b"x", b"hello")
            server.wait_for_connections(n + 1, timeout=WAIT_SECONDS)
            retained = _traced(name) - before
        server.check()
    finally:
        tracemalloc.stop()
    return {"retained": (retained / n - CARRIED) / 1024}


MEASURES: dict[str, Callable[[str, int], dict[str, float]]] = {
    "idle": idle_servers,
    "idleconns": idle_connections,
    "records": records,
}


def main(argv: list[str]) -> int:
    """Print ``MEASURES[KIND](IMPL, N)`` as JSON."""
    if len(argv) != 3 or argv[0] not in MEASURES or not argv[2].isdigit():
        print(
            f"usage: python -m benchmarks.memory {{{','.join(MEASURES)}}} IMPL N"
            f"  (servers listen on {HOST})"
        )
        return 2
    raise_fd_limit()
    print(json.dumps(MEASURES[argv[0]](argv[1], int(argv[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
