"""Helpers shared by the FaultProxy tests (``test_proxy.py``, ``test_proxy_faults.py``).

- ``proxied``: a quiet CommandServer with a quiet FaultProxy in front of it.
- ``settle``, ``settle_until``: whole passes of a proxy's reactor, which the tests wait for
  instead of sleeping.
- ``live_clients``: clients kept open past a first round trip, for faults added live.
- ``tls_exchange``: one TLS request and its reply, through a proxy to a TLS CommandServer.
- ``redis_client``: a redis-py client that never retries, so a fault's error reaches the test.

What both files share that is not about FaultProxy is in ``conftest``: raw clients (and
``reset_close``), ``MiB``, the canary (``canary_answers``), and the real upstreams as fixtures
(``web``, ``redis_address``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from conftest import connect, read_exactly, read_to_eof

from selectserver import CommandServer, FaultProxy

__all__ = [
    "live_clients",
    "proxied",
    "redis_client",
    "settle",
    "settle_until",
    "tls_exchange",
]


@contextmanager
def proxied(
    commands: object = None, *, proxy: Mapping[str, Any] | None = None, **server: Any
) -> Iterator[tuple[CommandServer, FaultProxy]]:
    """A quiet CommandServer playing ``commands`` (``server``: its other keywords) and a quiet
    FaultProxy in front of it (``proxy``: its keywords); both closed on exit, the proxy first."""
    with (
        CommandServer(commands, verbose=False, **server) as upstream,
        FaultProxy(upstream.address, verbose=False, **(proxy or {})) as front,
    ):
        yield upstream, front


def settle(proxy: FaultProxy, passes: int = 2, timeout: float = 5.0) -> None:
    """Return once ``proxy``'s reactor has run ``passes`` more passes of its loop.

    A command runs at the end of a pass, so the pass after the first barrier selected after
    this call: the proxy has read what its sockets held when it was made (on loopback, bytes
    are readable once the peer's ``send()`` returned) and updated its records.
    """
    reactor = proxy._reactor
    for _ in range(passes):
        done = threading.Event()
        assert reactor.submit(done.set), f"{reactor!r} has stopped"
        assert done.wait(timeout), f"no pass within {timeout} s: {reactor.doing()}"


def settle_until(proxy: FaultProxy, done: Callable[[], object], passes: int = 200) -> None:
    """Let ``proxy``'s reactor run pass after pass (bounded) until ``done()`` is true."""
    for _ in range(passes):
        settle(proxy, passes=1)
        if done():
            return
    raise AssertionError(f"not done after {passes} passes of the reactor")


@contextmanager
def live_clients(proxy: FaultProxy, count: int) -> Iterator[list[socket.socket]]:
    """``count`` clients of ``proxy``, each live past one round trip: it sent ``b"1"`` and read
    ``b"a"`` (the upstream's script starts ``RECEIVE, "a"``). All are closed on exit."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect(proxy.address)) for _ in range(count)]
        for sock in socks:
            sock.sendall(b"1")
        for sock in socks:
            assert read_exactly(sock, 1) == b"a"
        yield socks


def tls_exchange(server: CommandServer, address: tuple[str, int], request: bytes) -> bytes:
    """Connect to ``address`` (a proxy in front of ``server``), shake hands with a client that
    trusts ``server``'s certificate, send ``request``; returns the reply, read to EOF."""
    context = server.client_ssl_context()
    with (
        connect(address) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(request)
        return read_to_eof(tls)


def redis_client(address: tuple[str, int], timeout: float = 2.0, **options: Any) -> Any:
    """A ``redis.Redis`` for ``address`` that waits at most ``timeout`` s and never retries
    (a fault's error reaches the test); ``options`` go to ``redis.Redis`` (``protocol=3``)."""
    import redis  # the fixture ``redis_address`` skips when it is missing
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    host, port = address
    return redis.Redis(
        host=host,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        **options,
    )
