"""The public fake servers: CommandServer, OneShotServer, AsyncioCommandServer.

A server checks its script and binds its listening socket in the caller's thread (so a bad step
raises TypeError/ValueError and a taken port raises OSError right there), then hands the socket
to the shared reactor. Listening starts before the constructor returns: the kernel queues
connections until the reactor accepts them, so there is nothing to wait for.

Also here: RefusingServer and BlackholeServer, which hold a port without serving it, for tests
of connect errors and connect timeouts. They need no reactor.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import itertools
import math
import os
import socket
import ssl
import stat
import sys
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _output, _ports
from ._acceptor import Acceptor, format_address
from ._connection import Listener
from ._control import GateControl, GateState, run_on_reactor
from ._reactor import Reactor, attach
from ._records import DEFAULT_MAX_RECEIVE, ConnectionRecord, Latch, ServerLog
from ._script import Step, compile_script
from ._tls import TLSOption, tls_material

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncioCommandServer",
    "BlackholeServer",
    "CommandServer",
    "OneShotServer",
    "RefusingServer",
]

#: Seconds a receive or send step waits for the peer before the connection times out.
DEFAULT_TIMEOUT = 30.0
#: Seconds ``close()`` waits for the reactor before it raises ``TimeoutError``.
CLOSE_TIMEOUT = 30.0


_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _resolve(host: str, port: int) -> tuple[int, int, int, tuple[Any, ...]]:
    """Family, type, protocol and address to bind ``(host, port)``; an IPv4 literal (the
    usual host) without a getaddrinfo() call."""
    try:
        socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        return family, kind, proto, address
    return socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, (host, port)


def _bind(
    host: str, port: int, *, listen: bool, backlog: int = socket.SOMAXCONN, reuse: bool = True
) -> socket.socket:
    """A TCP socket bound to ``(host, port)``, listening if asked; errors raise ``OSError`` here."""
    _check_int("port", port, 0, 65535)
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, got {host!r}")
    family, kind, proto, address = _resolve(host, port)
    reuse = reuse and bool(getattr(socket, "SO_REUSEADDR", 0))
    ports = _ports.candidates() if port == 0 and family in _IP_FAMILIES else iter((port,))
    for candidate in ports:
        walked = candidate != port
        sock = socket.socket(family, kind, proto)
        try:
            if reuse and not walked:
                # Lets a port be bound again while old connections sit in TIME_WAIT; on POSIX
                # it never lets two sockets listen on one port.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            return _listen(
                sock, (address[0], candidate, *address[2:]), listen, backlog, reuse and walked
            )
        except OSError:
            sock.close()
            if not walked:
                raise  # the port asked for, or the kernel's choice: the caller hears why
            # A walked port refused (in use, or forbidden by a policy): try the next one.
        except BaseException:
            sock.close()
            raise
    raise AssertionError("unreachable: the last candidate port is the one asked for")


def _host_and_port(sock: socket.socket) -> tuple[str, int]:
    """``sock``'s bound host and port; every server on one host shares the host's string."""
    host, port = sock.getsockname()[:2]
    return sys.intern(host), port


def _bind_unix(path: str | bytes, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """A listening Unix-domain socket at ``path`` (a leading NUL names an abstract socket)."""
    if not hasattr(socket, "AF_UNIX"):
        raise OSError("Unix-domain sockets are not available on this platform")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        return _listen(sock, path, True, backlog)
    except BaseException:
        sock.close()
        raise


def _listen(
    sock: socket.socket,
    address: tuple[Any, ...] | str | bytes,
    listen: bool,
    backlog: int,
    reuse_after_bind: bool = False,
) -> socket.socket:
    sock.bind(address)
    if reuse_after_bind:
        # Set only once bound: bound with it, a walked port could be one that another socket
        # bound with SO_REUSEADDR and is about to listen on. Set before accepting, it still
        # passes to the connections (and so to their TIME_WAIT entries).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if listen:
        sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _is_abstract(path: str | bytes) -> bool:
    return path[:1] in ("\0", b"\0")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """TypeError unless ``value`` is an int (not a bool); ValueError unless low <= it <= high."""
    span = f"from {low} to {high}" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int {span}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an int {span}, got {value!r}")


def _check_path(path: object) -> None:
    if not isinstance(path, (str, bytes)) or not path:
        raise TypeError(f"path must be a non-empty str or bytes, got {path!r}")


class _SocketFile:
    """The file a Unix-domain server's bind made: removed at close only if it is still ours.

    The path is made absolute at bind (a later ``chdir`` changes nothing) and the file's
    identity noted, so close never removes a file that replaced it.
    """

    __slots__ = ("identity", "path")

    def __init__(self, path: str | bytes) -> None:
        self.path = os.path.abspath(path)
        info = os.stat(self.path)
        self.identity = (info.st_dev, info.st_ino)

    def remove(self) -> None:
        try:
            info = os.stat(self.path)
            if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == self.identity:
                os.unlink(self.path)
        except OSError:
            pass  # gone already


def _check_seconds(name: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number of seconds{' or None' if allow_none else ''}, got {value!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _compile_scripts(
    commands: object, scripts: object, *, tls: bool
) -> tuple[tuple[Step, ...], ...]:
    if scripts is None:
        if commands is None:
            raise TypeError("give a script: commands=[...] (or scripts=[[...], ...])")
        return (compile_script(commands, tls=tls),)
    if commands is not None:
        raise TypeError("give commands= or scripts=, not both")
    if isinstance(scripts, (str, bytes)) or not isinstance(scripts, Sequence) or not scripts:
        raise TypeError(f"scripts must be a non-empty list of scripts, got {scripts!r}")
    return tuple(
        compile_script(script, name=f"scripts[{index}]", tls=tls)
        for index, script in enumerate(scripts)
    )


class _Endpoint(abc.ABC):
    """What every fake server shares: an address, and a context manager that closes it."""

    # Slots keep a thousand idle servers small; a user's subclass still gets a __dict__.
    __slots__ = ("__weakref__", "_sock_name")

    _sock_name: object  # (host, port) for TCP; the path for a Unix-domain socket

    def _scheme(self) -> str:
        return "http"

    @property
    def path(self) -> str | bytes | None:
        """The Unix-domain socket's path, or None for a TCP server."""
        return None if isinstance(self._sock_name, tuple) else self._sock_name  # type: ignore[return-value]

    def _tcp_name(self) -> tuple[str, int]:
        name = self._sock_name
        if not isinstance(name, tuple):
            raise AttributeError(f"a Unix-domain server has no host or port; its path is {name!r}")
        return name

    @property
    def host(self) -> str:
        """The host the server listens on (an IP address, as bound)."""
        return self._tcp_name()[0]

    @property
    def port(self) -> int:
        """The TCP port the server listens on (chosen by the OS unless one was given)."""
        return self._tcp_name()[1]

    @property
    def address(self) -> Any:
        """``(host, port)`` for TCP, ready for ``socket.create_connection``; the path for Unix.

        Typed ``Any`` so that either use type-checks without a cast.
        """
        path = self.path
        return self._tcp_name() if path is None else path

    @property
    def url(self) -> str:
        """``http://host:port`` (``https`` with TLS; IPv6 hosts in brackets).

        A Unix-domain server's URL is ``http+unix://`` and its percent-encoded path.
        """
        path = self.path
        if path is None:
            return f"{self._scheme()}://{format_address(self._tcp_name())}"
        text = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path
        return f"{self._scheme()}+unix://{urllib.parse.quote(text, safe='')}"

    @abc.abstractmethod
    def close(self) -> None:
        """Release the address."""

    def stop(self) -> None:
        """The same as :meth:`close` (the seed library's name)."""
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Served(_Endpoint):
    """A server whose listener runs on a reactor: binding, control calls and closing."""

    __slots__ = ("_close_calls", "_listener", "_reactor", "_socket_file")

    _listener: Acceptor
    _reactor: Reactor

    def _bind_address(self, host: str, port: int, path: str | bytes | None) -> socket.socket:
        """Bind (and listen on) the address, in the caller's thread."""
        self._close_calls = itertools.count()
        self._socket_file: _SocketFile | None = None
        sock = _bind(host, port, listen=True) if path is None else _bind_unix(path)
        if path is not None and not _is_abstract(path):
            try:
                self._socket_file = _SocketFile(path)
            except OSError:
                sock.close()
                raise
        # A Unix socket keeps the path as the caller gave it: getsockname() would return an
        # abstract name as bytes and a bytes path as str.
        self._sock_name = _host_and_port(sock) if path is None else path
        return sock

    def _serve(self, listener: Acceptor, reactor: Reactor | None) -> None:
        """Hand ``listener`` to ``reactor`` (None: the shared default one)."""
        self._listener = listener
        if reactor is None:
            self._reactor = attach(listener)
        elif reactor.add_server(listener):
            self._reactor = reactor
        else:
            listener.close(0.0)
            self._remove_socket_file()
            raise RuntimeError(f"reactor {reactor!r} is closed")

    def _run(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the reactor thread; return once it has run.

        Raises:
            RuntimeError: the server is closed.
        """
        if self._closing:
            raise RuntimeError(f"{self!r} is closed")
        run_on_reactor(self._reactor, command)

    def down(self) -> None:
        """Refuse new connections, keeping the port so nobody else can take it (as
        ``RefusingServer`` does); live connections go on. In effect when it returns."""
        self._run(self._listener.down)

    def up(self) -> None:
        """Listen again on the same port after :meth:`down`. In effect when it returns."""
        self._run(self._listener.up)
        if self._socket_file is not None:
            self._socket_file = _SocketFile(self._socket_file.path)

    @property
    def _closing(self) -> bool:
        return self._listener.closed is not None

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Stop listening and close every connection; idempotent and thread-safe.

        Returns once the reactor has closed the listening socket and every connection. Safe
        from a signal handler and from a finalizer on the reactor thread (which cannot wait:
        the close then completes right after).

        Raises:
            TimeoutError: the reactor did not close the server within ``timeout`` seconds
                (saying what the reactor is busy with).
            RuntimeError: the reactor thread itself failed (the error is chained).
        """
        listener = self._listener
        reactor = self._reactor
        first = next(self._close_calls) == 0  # atomic: exactly one caller is first
        if first:
            closed = listener.closed = Latch()
            if not reactor.remove_server(listener):
                closed.set()  # the reactor already stopped, closing everything
            self._remove_socket_file()
        if threading.current_thread() is reactor.thread:
            return
        closed_event = listener.closed
        if closed_event is None:
            return  # the first close is under way on this thread (a signal handler)
        if not closed_event.wait(threading.TIMEOUT_MAX if timeout is None else timeout):
            raise TimeoutError(f"closing {self!r} took more than {timeout} s: {reactor.doing()}")
        if reactor.stopping:
            reactor.join(timeout)
        _output.flush()
        self._raise_reactor_error()

    def _remove_socket_file(self) -> None:
        if self._socket_file is not None:
            self._socket_file.remove()

    def _raise_reactor_error(self) -> None:
        error = self._reactor.error
        if error is not None:
            raise RuntimeError(f"the selectserver reactor thread failed: {error!r}") from error


def check_reactor(reactor: object) -> None:
    """TypeError/ValueError/RuntimeError unless ``reactor`` is None or a running Reactor."""
    if reactor is None:
        return
    if not isinstance(reactor, Reactor):
        raise TypeError(f"reactor must be a selectserver Reactor or None, got {reactor!r}")
    if not reactor.started:
        raise ValueError(f"reactor {reactor!r} was never started: call its start() first")
    if reactor.stopping:
        raise RuntimeError(f"reactor {reactor!r} is closed")


class CommandServer(_Served):
    """A fake TCP server that plays a script to every client, on the shared reactor thread.

    Example::

        with CommandServer([RECEIVE, "HTTP/1.0 200 OK\\r\\n\\r\\nhello"]) as srv:
            requests.get(srv.url)
        assert b"GET" in b"".join(srv.received)

    Args:
        commands: the script every connection runs: a list of steps, or a bare str/bytes ``S``
            meaning ``[RECEIVE, S]``. An empty list accepts and closes.
        host: where to listen; ``"::1"`` for IPv6.
        port: the port; 0 (the default) lets the OS choose a free one.
        verbose: print a ``SERVER: ...`` line per event (every event is also logged to the
            ``selectserver`` logger at DEBUG).
        scripts: per-connection scripts instead of ``commands``: connection k runs
            ``scripts[k]``, and later connections run the last one.
        max_connections: stop listening after this many accepted connections.
        timeout: seconds a receive or send step waits for the peer before the connection
            ends as ``TIMED_OUT`` (a failure ``check()`` reports); None waits forever.
        max_receive: how many received bytes each connection's record keeps at most; the rest
            is counted in the record's ``dropped``. A ``ReadUntil``/``Expect`` step that has
            buffered more than this many bytes without a match fails.
        tls: serve TLS: ``True`` makes a certificate for localhost, 127.0.0.1 and ::1 signed by
            a throwaway CA (needs the ``tls`` extra, trustme); ``"expired"`` and
            ``"wrong-host"`` make certificates clients must reject; or pass your own
            ``ssl.SSLContext``. Scripts start with a handshake unless they place ``StartTLS``.
        tls_client_auth: ask every client for a certificate signed by the throwaway CA
            (``client_ssl_context(client_cert=True)`` presents one); the record's
            ``peer_certificate`` holds it.
        path: listen on this Unix-domain socket path instead of TCP (a leading ``"\\0"``
            names a Linux abstract socket); the file is removed on close. Unix sockets have
            no RST: after ``RESET`` the peer reads EOF.
        reactor: a started :class:`Reactor` to serve on instead of the shared default one.

    Every argument is checked before the port is bound.

    Raises:
        TypeError, ValueError: a bad script or argument, naming the bad step.
        OSError: the address cannot be bound (in use, unknown host).
        ImportError: ``tls`` needs certificates and trustme is not installed.
    """

    def __init__(
        self,
        commands: object = None,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = True,
        *,
        scripts: Sequence[object] | None = None,
        max_connections: int | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_receive: int = DEFAULT_MAX_RECEIVE,
        tls: TLSOption | None = None,
        tls_client_auth: bool = False,
        path: str | bytes | None = None,
        reactor: Reactor | None = None,
    ) -> None:
        check_reactor(reactor)
        if path is not None:
            _check_path(path)
        if not isinstance(tls_client_auth, bool):
            raise TypeError(f"tls_client_auth must be a bool, got {tls_client_auth!r}")
        self._tls = tls_material(tls, client_auth=tls_client_auth)
        compiled = _compile_scripts(commands, scripts, tls=self._tls is not None)
        if max_connections is not None:
            _check_int("max_connections", max_connections, 1)
        _check_seconds("timeout", timeout, allow_none=True)
        _check_int("max_receive", max_receive, 0)
        self._log = self._make_log(max_receive)
        sock = self._bind_address(host, port, path)
        listener = Listener(
            sock,
            compiled,
            self._log,
            address=self._sock_name,
            verbose=bool(verbose),
            timeout=timeout,
            max_connections=max_connections,
            tls_context=None if self._tls is None else self._tls.context,
        )
        self._gates: dict[str, GateControl] | None = None  # made by the first gate()
        listener.owner = weakref.ref(self)
        self._serve(listener, reactor)

    __slots__ = ("_gates", "_log", "_tls")
    _listener: Listener

    def _make_log(self, max_receive: int) -> ServerLog:
        return ServerLog(max_receive)

    def _scheme(self) -> str:
        return "http" if self._tls is None else "https"

    @property
    def ca_path(self) -> str | None:
        """The PEM file of the CA that signed this server's certificate (for ``verify=``).

        None without TLS or with your own ``ssl.SSLContext``.
        """
        return None if self._tls is None else self._tls.ca_path

    def client_ssl_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        """A client ``ssl.SSLContext`` that trusts this server's CA (and checks hostnames).

        With ``client_cert``, it also presents a client certificate signed by the same CA
        (for ``tls_client_auth=True``; the server's record shows it as ``peer_certificate``).

        Raises:
            ValueError: the server has no TLS, or uses your own context.
        """
        if self._tls is None:
            raise ValueError("this server does not use TLS (pass tls=True)")
        return self._tls.client_context(client_cert=client_cert)

    # ---- runtime control ----------------------------------------------------------------------

    def gate(self, name: str) -> GateControl:
        """The control of the script's ``Gate(name)``: wait for arrivals, resume, open, close."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"gate: name must be a non-empty str, got {name!r}")
        if self._gates is None:
            self._gates = {}
        control = self._gates.get(name)
        if control is None:
            control = self._gates.setdefault(
                name, GateControl(self._gate_state(name), self._reactor)
            )
        return control

    def _gate_state(self, name: str) -> GateState:
        """Gate ``name``'s state, from the reactor thread (which also makes the states of
        gates that connections reach first, so one thread makes them all)."""
        listener = self._listener
        if threading.current_thread() is self._reactor.thread:
            return listener.gate_state(name)
        states: list[GateState] = []
        if not self._closing:
            try:
                self._run(lambda: states.append(listener.gate_state(name)))
            except RuntimeError:
                pass  # closed meanwhile
        if states:
            return states[0]
        state = GateState(name)  # closed: no connection will reach it
        state.closed = True
        return state

    def set_scripts(self, *scripts: object) -> None:
        """Later connections run ``scripts`` (connection k of them runs ``scripts[k]``, counting
        from 0 again, the last one repeating); live connections are not touched."""
        compiled = _compile_scripts(None, list(scripts), tls=self._tls is not None)
        listener = self._listener
        self._run(lambda: listener.set_scripts(compiled))

    @property
    def received(self) -> list[bytes]:
        """The bytes of every completed receive step, all connections, in completion order."""
        return self._log.received

    @property
    def connections(self) -> list[ConnectionRecord]:
        """One live record per accepted connection, in accept order."""
        return list(self._log.connections)

    def wait_for_connections(self, n: int, timeout: float | None = 5.0) -> list[ConnectionRecord]:
        """Block until ``n`` connections have ended; return the first ``n`` that ended.

        The records come in the order the connections ended, each with its ``outcome`` set:
        a record ends only once the wire shows it (the FIN or RST is sent).

        Raises:
            TimeoutError: after ``timeout`` seconds, naming what each unfinished connection is
                waiting for and how many never connected.
        """
        records = self._log.wait_for_connections(n, timeout)
        _output.flush()
        return records

    async def wait_for_connections_async(
        self, n: int, timeout: float | None = 5.0
    ) -> list[ConnectionRecord]:
        """:meth:`wait_for_connections` for a coroutine, on any running asyncio loop.

        The reactor wakes it with ``call_soon_threadsafe``; the loop runs meanwhile.
        """
        return await self._log.wait_for_connections_async(n, timeout)

    def check(self) -> None:
        """Raise ``AssertionError`` listing every server-side failure; silent if none.

        Failures are unmatched ``Expect`` steps, timeouts and internal errors, each named with
        its connection and step.
        """
        self._raise_reactor_error()
        self._log.check()

    def __repr__(self) -> str:
        state = "closed" if self._closing else "serving"
        return (
            f"<{type(self).__name__} {self.url} {state}, {len(self._log.connections)} connections>"
        )


class OneShotServer(CommandServer):
    """A CommandServer that serves one connection, then stops listening (later connects fail).

    It takes CommandServer's arguments, except ``max_connections``, which is 1.
    """

    __slots__ = ()

    def __init__(
        self,
        commands: object = None,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        if "max_connections" in kwargs:
            raise TypeError("OneShotServer serves one connection: max_connections is always 1")
        super().__init__(commands, host, port, verbose, max_connections=1, **kwargs)


class AsyncioCommandServer(CommandServer):
    """A CommandServer that also feeds what it receives into an ``asyncio.StreamReader``.

    Every completed receive step's bytes are fed with ``loop.call_soon_threadsafe``, and EOF is
    fed when a connection ends, so a coroutine can ``await server.reader.read()``.

    Args:
        loop: the event loop of ``reader``. If None, the running loop (construct the server
            inside a coroutine); outside one, pass it.
        reader: the StreamReader to feed; if None, a new one (``server.reader``).
        Other arguments are CommandServer's.
    """

    __slots__ = ("_eof_fed", "loop", "reader")

    def __init__(
        self,
        commands: object = None,
        loop: asyncio.AbstractEventLoop | None = None,
        reader: asyncio.StreamReader | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise TypeError(
                    "AsyncioCommandServer needs loop= when it is not constructed "
                    "inside a running event loop"
                ) from None
        if not isinstance(loop, asyncio.AbstractEventLoop):
            raise TypeError(f"loop must be an asyncio event loop, got {loop!r}")
        if reader is None:
            reader = asyncio.StreamReader(loop=loop)
        elif not isinstance(reader, asyncio.StreamReader):
            raise TypeError(f"reader must be an asyncio.StreamReader, got {reader!r}")
        self.loop = loop
        self.reader = reader
        self._eof_fed = False  # touched only in the loop's thread
        super().__init__(commands, host, port, verbose, **kwargs)

    def _make_log(self, max_receive: int) -> ServerLog:
        return ServerLog(max_receive, on_received=self._feed_data, on_end=self._feed_eof)

    def _feed_data(self, data: bytes) -> None:
        self._call_in_loop(data)

    def _feed_eof(self, record: ConnectionRecord) -> None:
        self._call_in_loop(b"")

    def _call_in_loop(self, data: bytes) -> None:
        """Run ``_feed_in_loop(data)`` in the loop's thread (``b""`` feeds EOF)."""
        try:
            self.loop.call_soon_threadsafe(self._feed_in_loop, data)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to read

    def _feed_in_loop(self, data: bytes) -> None:
        if self._eof_fed:
            return  # a StreamReader takes no data after EOF
        if data:
            self.reader.feed_data(data)
        else:
            self._eof_fed = True
            self.reader.feed_eof()


class _HeldPort(_Endpoint):
    """A bound port that is never served."""

    __slots__ = ("_extra", "_sock")

    def __init__(self, host: str, port: int, *, listen: bool) -> None:
        # No SO_REUSEADDR: on Linux two sockets that both set it may share a port while neither
        # listens, so a held port must not set it, or any server could take the port.
        self._sock: socket.socket | None = _bind(host, port, listen=listen, backlog=0, reuse=False)
        self._sock_name = _host_and_port(self._sock)
        self._extra: list[socket.socket] = []

    def close(self) -> None:
        """Release the port."""
        for sock in self._extra:
            sock.close()
        self._extra.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class RefusingServer(_HeldPort):
    """Holds a port (bound, never listening) so every connect to it is refused.

    Unlike closing a server and hoping its port stays free, no other process can take the port
    while this object lives. On Linux and macOS a client gets ``ConnectionRefusedError``
    (ECONNREFUSED) at once; on Windows the connect fails with WSAECONNREFUSED after the stack's
    SYN retries (about 2 s).
    """

    __slots__ = ()

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port, listen=False)


class BlackholeServer(_HeldPort):
    """A listener that never accepts and whose backlog is full, so connects time out.

    It listens with a backlog of 0 and fills the accept queue with its own connections; the
    kernel then drops further SYNs. On Linux a client's ``connect`` hangs until its own timeout
    (``socket.timeout``/``TimeoutError``; with no timeout, about two minutes of SYN retries).
    macOS behaves the same; on Windows a full backlog answers with RST, so clients see
    ``ConnectionRefusedError`` instead.
    """

    __slots__ = ()

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, fill: int = 8) -> None:
        super().__init__(host, port, listen=True)
        for _ in range(fill):
            filler = socket.socket(self._family(), socket.SOCK_STREAM)
            filler.setblocking(False)
            self._extra.append(filler)
            if filler.connect_ex(self.address) not in (0, errno.EINPROGRESS):
                break

    def _family(self) -> socket.AddressFamily:
        assert self._sock is not None
        return self._sock.family
