"""``python -m benchmarks.memory IMPL N``: idle memory per server, measured in a fresh process.

A long benchmark run leaves freed memory in the allocator's arenas, and new servers reuse it
without growing RSS, so an RSS delta taken mid-run says more about earlier scenarios than about
the servers. The ``idle`` scenario therefore runs this module once per sample, in a clean
interpreter: it warms the implementation up with one server, then opens ``N`` idle servers
(listening, no connections) and prints, as JSON, the RSS growth and the memory ``tracemalloc``
traced, each per server in KiB (the traced figure is Python objects only: no thread stacks,
no kernel socket buffers).
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc

from .common import HOST
from .impls import by_name, opened
from .system import raise_fd_limit, release_memory, rss

__all__ = ["measure"]

SCRIPT = (1, b"hello")


def measure(name: str, n: int) -> dict[str, float]:
    """Idle KiB per server of implementation ``name`` at ``n`` servers: RSS and traced."""
    impl = by_name(name)
    with opened(impl, SCRIPT, 1) as group:
        group.settle()
    release_memory()
    before = rss()
    with opened(impl, SCRIPT, n) as group:
        group.settle()
        gc.collect()
        rss_kib = (rss() - before) / n / 1024
    release_memory()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with opened(impl, SCRIPT, n) as group:
            group.settle()
            gc.collect()
            traced_kib = (tracemalloc.get_traced_memory()[0] - before) / n / 1024
    finally:
        tracemalloc.stop()
    return {"rss": rss_kib, "traced": traced_kib}


def main(argv: list[str]) -> int:
    """Print ``measure(IMPL, N)`` as JSON."""
    if len(argv) != 2 or not argv[1].isdigit():
        print(f"usage: python -m benchmarks.memory IMPL N  (servers listen on {HOST})")
        return 2
    raise_fd_limit()
    print(json.dumps(measure(argv[0], int(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
