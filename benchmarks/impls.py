"""The implementations under test: selectserver and the baselines it is measured against.

Every implementation serves the same step list (see ``benchmarks.common``). ``Impl.open`` makes
``n`` servers the way a user of that library would, one after another, and returns a
:class:`Group` whose ``close()`` closes them all and stops any loop thread the group started
(selectserver's default reactor is not the group's: it may stay up, idle, as it does for a
user). :func:`warm_up` readies an implementation before a baseline is taken. The baselines:

* ``threads``: ``socketserver.ThreadingTCPServer``, one ``serve_forever`` thread per server
  (and one thread per connection), as the seed library and pytest-httpserver work;
* ``asyncio``: one ``asyncio.start_server`` per server, all on one event loop in one thread;
* ``rawselect``: a minimal hand-written ``selectors`` loop in one thread (``benchmarks.rawselect``),
  no records and no script machinery beyond the step list: the pure-Python limit;
* ``plain``: one blocking socket in one thread per server (used for ``bulk``: the loopback
  limit, a ``sendall`` with nothing around it).

And one that is not a baseline but selectserver again, one hop further away:

* ``proxied``: each selectserver server behind its own ``FaultProxy(..., verbose=False)`` with
  no fault, both on the default reactor; the clients connect to the proxy. The ``proxy*``
  scenarios compare it with ``selectserver`` direct.

And the floor for ``proxied``, shown beside it in the ``proxy*`` scenarios:

* ``rawproxy``: each selectserver server behind a minimal relay (``benchmarks.rawproxy``) on
  the same reactor thread: recv, send, an unsent tail, EOF passed on; no records, timers or
  faults. The least a proxy on that thread can cost.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import selectserver

from .clients import exchange
from .common import (
    HELLO,
    HOST,
    RECV_SIZE,
    WAIT_SECONDS,
    Address,
    Group,
    Impl,
    Script,
    bounded_join,
    listening_socket,
    play_blocking,
)
from .rawproxy import RawProxyGroup
from .rawselect import RawGroup

__all__ = [
    "BASELINES",
    "DIRECT",
    "IMPLEMENTATIONS",
    "PROXIED",
    "RAW_PROXY",
    "Group",
    "Impl",
    "Script",
    "by_name",
    "opened",
    "warm_up",
]

T = TypeVar("T")
#: socketserver's poll interval: how long a thread-per-server takes to notice shutdown()
THREADS_POLL_SECONDS = 0.1


# ---- selectserver ---------------------------------------------------------------------------


class _SelectServerGroup:
    def __init__(self, script: Script, n: int) -> None:
        steps = [selectserver.RECEIVE if step == 1 else step for step in script]
        self.servers = [selectserver.CommandServer(steps, verbose=False) for _ in range(n)]
        self.addresses = [server.address for server in self.servers]

    def settle(self) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while selectserver.statistics().servers < len(self.servers):
            if time.monotonic() > deadline:
                raise RuntimeError("selectserver did not attach its servers in time")
            time.sleep(0.001)

    def connections(self) -> int:
        return selectserver.statistics().connections  # the default reactor's: this group's

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            server.check()


class _ProxiedGroup:
    """``n`` selectserver servers, each behind its own fault-free FaultProxy."""

    def __init__(self, script: Script, n: int) -> None:
        self.upstream = _SelectServerGroup(script, n)
        self.proxies: list[selectserver.FaultProxy] = []
        try:
            for server in self.upstream.servers:
                self.proxies.append(selectserver.FaultProxy(server.address, verbose=False))
        except BaseException:
            self.close()
            raise
        self.addresses = [proxy.address for proxy in self.proxies]

    def settle(self) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        wanted = len(self.upstream.servers) + len(self.proxies)
        while selectserver.statistics().servers < wanted:
            if time.monotonic() > deadline:
                raise RuntimeError("selectserver did not attach its servers and proxies in time")
            time.sleep(0.001)

    def close(self) -> None:
        try:
            for proxy in self.proxies:
                proxy.close()
        finally:
            self.upstream.close()
        for proxy in self.proxies:
            proxy.check()


# ---- threads: socketserver, a thread per server and per connection --------------------------


class _ScriptServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = socket.SOMAXCONN  # socketserver's default of 5 would drop SYNs

    def __init__(self, script: Script) -> None:
        self.script = script
        super().__init__((HOST, 0), _ScriptHandler)

    def request_shutdown(self) -> None:
        """Ask ``serve_forever`` to stop without waiting (``shutdown()`` waits for it)."""
        # socketserver has no public way to ask without waiting; this is what shutdown() sets.
        self._BaseServer__shutdown_request = True


class _ScriptHandler(socketserver.BaseRequestHandler):
    server: _ScriptServer

    def handle(self) -> None:
        play_blocking(self.request, self.server.script)


class _ThreadsGroup:
    def __init__(self, script: Script, n: int) -> None:
        self.servers: list[_ScriptServer] = []
        self.threads: list[threading.Thread] = []
        for _ in range(n):
            server = _ScriptServer(script)
            thread = threading.Thread(
                target=server.serve_forever, args=(THREADS_POLL_SECONDS,), daemon=True
            )
            thread.start()
            self.servers.append(server)
            self.threads.append(thread)
        self.addresses = [server.socket.getsockname()[:2] for server in self.servers]

    def settle(self) -> None:
        pass  # serve_forever runs as soon as its thread starts

    def close(self) -> None:
        # Ask every loop to stop first, so the poll intervals overlap instead of adding up.
        for server in self.servers:
            server.request_shutdown()
        for server, thread in zip(self.servers, self.threads, strict=True):
            server.shutdown()
            server.server_close()  # joins its connection threads (block_on_close)
            bounded_join(thread)


# ---- asyncio: one loop thread, one start_server per server -----------------------------------


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


class _AsyncioGroup:
    def __init__(self, script: Script, n: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="asyncio-baseline", daemon=True
        )
        self.thread.start()
        self.live = 0  # connections being served: changed on the loop thread only
        handler = self._handler(script)
        self.servers: list[asyncio.Server] = []
        try:
            for _ in range(n):
                self.servers.append(self._call(self._start(handler)))
        except BaseException:
            self.close()
            raise
        self.addresses = [server.sockets[0].getsockname()[:2] for server in self.servers]

    def _handler(self, script: Script) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.live += 1
            try:
                for step in script:
                    if isinstance(step, int):
                        got = 0
                        while got < step:
                            data = await reader.read(RECV_SIZE)
                            if not data:
                                return
                            got += len(data)
                    else:
                        writer.write(step)
                        await writer.drain()
            except ConnectionError:
                pass
            finally:
                self.live -= 1
                writer.close()

        return handle

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(WAIT_SECONDS)

    @staticmethod
    async def _start(handler: Handler) -> asyncio.Server:
        return await asyncio.start_server(handler, HOST, 0, backlog=socket.SOMAXCONN)

    @staticmethod
    async def _close_one(server: asyncio.Server) -> asyncio.Server:
        server.close()
        await server.wait_closed()
        return server

    @staticmethod
    async def _finish() -> None:
        """Let handlers that are still closing their transports run to the end."""
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.sleep(0)  # transports close on the next pass

    def settle(self) -> None:
        pass  # start_server returned: the loop serves it

    def connections(self) -> int:
        return self.live

    def close(self) -> None:
        for server in self.servers:
            self._call(self._close_one(server))
        self._call(self._finish())
        self.loop.call_soon_threadsafe(self.loop.stop)
        bounded_join(self.thread)
        self.loop.close()


# ---- plain: a blocking socket in a thread (the loopback limit for bulk) ----------------------


class _PlainGroup:
    def __init__(self, script: Script, n: int) -> None:
        self.socks = [listening_socket() for _ in range(n)]
        for sock in self.socks:
            sock.setblocking(True)
        self.threads = [
            threading.Thread(target=self._serve_one, args=(sock, script), daemon=True)
            for sock in self.socks
        ]
        for thread in self.threads:
            thread.start()
        self.addresses = [sock.getsockname()[:2] for sock in self.socks]

    @staticmethod
    def _serve_one(listener: socket.socket, script: Script) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # closed before a client came
        with conn:
            play_blocking(conn, script)

    def settle(self) -> None:
        pass

    def close(self) -> None:
        for thread, sock in zip(self.threads, self.socks, strict=True):
            if thread.is_alive():
                _poke(sock.getsockname()[:2])
            bounded_join(thread)
            sock.close()


def _poke(address: Address) -> None:
    """Connect and close at once, to release a thread blocked in ``accept``."""
    with socket.create_connection(address, timeout=WAIT_SECONDS):
        pass


IMPLEMENTATIONS: tuple[Impl, ...] = (
    Impl("selectserver", _SelectServerGroup),
    Impl("threads", _ThreadsGroup),
    Impl("asyncio", _AsyncioGroup),
    Impl("rawselect", RawGroup),
)
BASELINES = ("threads", "asyncio", "rawselect")
#: the proxy scenarios' pair: selectserver direct, and the same servers behind a FaultProxy
DIRECT, PROXIED = "selectserver", "proxied"
#: ... and the floor shown beside them: the same servers behind a minimal relay
RAW_PROXY = "rawproxy"
_ALL: dict[str, Impl] = {
    impl.name: impl
    for impl in (
        *IMPLEMENTATIONS,
        Impl("plain", _PlainGroup),
        Impl(PROXIED, _ProxiedGroup),
        Impl(RAW_PROXY, RawProxyGroup),
    )
}


def by_name(name: str) -> Impl:
    """The implementation called ``name``."""
    return _ALL[name]


def warm_up(impl: Impl) -> None:
    """Open one ``HELLO`` server of ``impl``, serve one client, close it.

    A baseline taken after this includes what the implementation keeps between groups
    (selectserver's default reactor may stay up, idle, for a grace period) and its first-use
    costs. Before a baseline's warm-up, a reactor lingering from selectserver's earlier run is
    stopped (``selectserver.stop_reactor()``), so its thread and descriptors going away are not
    charged to the baseline.
    """
    if impl.name not in (DIRECT, PROXIED, RAW_PROXY):  # those on selectserver's reactor
        selectserver.stop_reactor(WAIT_SECONDS)
    with opened(impl, HELLO, 1) as group:
        group.settle()
        exchange(group.addresses[0], b"x", b"hello")


@contextmanager
def opened(impl: Impl, script: Script, n: int) -> Iterator[Group]:
    """``impl.open(script, n)``, closed on exit however the block ends."""
    group = impl.open(script, n)
    try:
        yield group
    finally:
        group.close()
