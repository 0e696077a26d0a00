"""The command line: run a fake server, a fault proxy or a replay in the foreground.

python -m selectserver serve [--host H] [--port P] [--once] [--tls] [--script FILE | STEP ...]
python -m selectserver proxy UPSTREAM [--latency S] [--bandwidth BPS] [--reset-after N] ...
python -m selectserver replay FILE [--host H] [--port P] [--once]

Each prints its address first, then each connection's transcript as it ends, until Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

from ._connection import format_address
from ._faults import AnyFault, Bandwidth, Latency, ResetPeer
from ._proxy import FaultProxy
from ._recording import DEFAULT_MAX_RECORD, ProxyRecord, load_recording
from ._records import ConnectionRecord
from ._script import Command, Delay, Expect, ReadUntil, compile_script
from ._servers import CommandServer

__all__ = [
    "DEMO_SCRIPT",
    "format_proxy_transcript",
    "format_transcript",
    "load_script",
    "main",
    "parse_step",
    "parse_upstream",
]

_DEMO_BODY = b"hello from selectserver\n"
#: With no steps, the server answers any HTTP request with this small 200 response.
DEMO_SCRIPT: list[object] = [
    ReadUntil(b"\r\n\r\n"),
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_DEMO_BODY), _DEMO_BODY),
]

_STEPS_HELP = """\
steps (played in order to every connection):
  RECEIVE              read whatever arrives (at least 1 byte)
  N                    read at least N bytes (an integer)
  until:TEXT           read until TEXT arrives (e.g. until:\\r\\n\\r\\n)
  expect:REGEX         read until REGEX matches; a miss is reported
  delay:SECONDS        pause
  HANGUP (or BREAK) RESET HALF_CLOSE STALL TRUNCATE
                       close (FIN), reset (RST), shut the sending side, hang forever,
                       close without TLS close_notify
  text:TEXT or TEXT    send TEXT (backslash escapes such as \\r\\n work)

With no steps, a demo script answers any HTTP request with a small 200 response.
--script FILE reads the steps from a JSON list instead: each element is a STEP word
as above (a string) or an integer, e.g. ["until:\\r\\n\\r\\n", "HTTP/1.0 200 OK\\r\\n\\r\\nhi"].
Examples:
  python -m selectserver serve --port 8080 RECEIVE 'HTTP/1.0 200 OK\\r\\n\\r\\nhi'
  python -m selectserver serve --tls --script steps.json
"""

_PROXY_HELP = """\
Each fault option adds one fault that acts on every connection, in --direction: the
latency delays each chunk as it is read, the bandwidth paces what goes out, the reset
counts the bytes passed on.
Examples:
  python -m selectserver proxy 127.0.0.1:6379 --port 6380 --latency 0.2 --jitter 0.05
  python -m selectserver proxy '[::1]:8080' --bandwidth 1000 --direction both
  python -m selectserver proxy /run/app.sock --reset-after 100 --record app.json
  python -m selectserver replay app.json --port 6380
"""


def _unescape(text: str) -> bytes:
    return codecs.escape_decode(text.encode("utf-8"))[0]


def parse_step(word: str) -> object:
    """One command-line word as a script step (see ``serve --help``)."""
    try:
        return _parse_step(word)
    except (TypeError, ValueError) as exc:  # argparse would print only "invalid value"
        raise argparse.ArgumentTypeError(f"{word!r}: {exc}") from None


def _parse_step(word: str) -> object:
    if word.isdigit():
        return int(word)
    if word in Command.__members__:
        return Command[word]
    prefix, sep, rest = word.partition(":")
    if sep:
        if prefix == "until":
            return ReadUntil(_unescape(rest))
        if prefix == "expect":
            return Expect(rest)  # re reads \r, \n, \xNN itself; unescaping would break \b, \d
        if prefix == "delay":
            return Delay(float(rest))
        if prefix == "text":
            return _unescape(rest)
    return _unescape(word)


def load_script(path: str) -> list[object]:
    """The steps of a ``--script`` file: a JSON list of STEP words (strings) and integers.

    Raises:
        ValueError: the file is unreadable, not a JSON list, or an element is not a valid
            step; the message names the file and the element's index.
    """
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(document, list):
        raise ValueError(f"{path}: expected a JSON list of steps, got {type(document).__name__}")
    steps: list[object] = []
    for index, element in enumerate(document):
        try:
            if isinstance(element, str):
                steps.append(_parse_step(element))
            elif isinstance(element, int) and not isinstance(element, bool):
                steps.append(element)
            else:
                raise TypeError("expected a STEP word (a JSON string) or an integer")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: script[{index}] = {json.dumps(element)}: {exc}") from None
    try:
        compile_script(steps, tls=True)  # the order of steps; the server checks TLS itself
    except (TypeError, ValueError) as exc:  # it names the step: script[3] = ...
        raise ValueError(f"{path}: {exc}") from None
    return steps


#: Receive steps a transcript shows at most (the first and last halves); the rest are counted.
MAX_TRANSCRIPT_STEPS = 20


def format_transcript(record: ConnectionRecord, *, limit: int = 200) -> str:
    """A connection's record as a few readable lines, with at most ``limit`` bytes per payload.

    One ``<-`` line per receive step (at most ``MAX_TRANSCRIPT_STEPS``), one ``->`` line for
    everything sent, then why it ended early and its failure, if any.
    """
    lines = [
        f"connection {record.index} from {format_address(record.peer)}: "
        f"{record.outcome.value if record.outcome else 'running'}"
    ]
    received = list(record.received)
    if len(received) > MAX_TRANSCRIPT_STEPS:
        half = MAX_TRANSCRIPT_STEPS // 2
        hidden = received[half:-half]
        lines += [f"  <- {_preview(chunk, limit)}" for chunk in received[:half]]
        lines.append(f"  <- ... {len(hidden)} more steps, {sum(map(len, hidden))} bytes")
        received = received[-half:]
    lines += [f"  <- {_preview(chunk, limit)}" for chunk in received]
    sent = record.sent
    if sent:
        lines.append(f"  -> {_preview(sent, limit)}")
    counts = ((record.discarded, "discarded"), (record.dropped, "dropped"))
    _add_ending(lines, counts, record.detail, record.failure, f"at step {record.step}")
    return "\n".join(lines)


def _add_ending(
    lines: list[str],
    counts: Iterable[tuple[int, str]],
    detail: str | None,
    failure: str | None,
    where: str,
) -> None:
    """The last lines of a transcript: bytes not shown, why it ended, its failure."""
    uncounted = [f"{count} bytes {what}" for count, what in counts if count]
    if uncounted:
        lines.append(f"  ({', '.join(uncounted)})")
    if detail and not (failure and detail in failure):
        lines.append(f"  {where}: {detail}")
    if failure:
        lines.append(f"  FAILED: {failure}")


def _preview(data: bytes, limit: int = 200) -> str:
    """``repr(data)``, or of its first ``limit`` bytes and the full length."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r}... ({len(data)} bytes)"


def format_proxy_transcript(record: ProxyRecord, *, limit: int = 200) -> str:
    """A proxied connection's record as a few readable lines, at most ``limit`` bytes shown
    per direction.

    One line per direction: the bytes that side sent as the proxy read them (before faults),
    how many were passed on when that differs, and how the side ended; then the faults the
    connection drew, why it ended, and its failure, if any.
    """
    lines = [
        f"connection {record.index} from {format_address(record.peer)}: "
        f"{record.outcome.value if record.outcome else 'running'}"
    ]
    for arrow, chunks, passed, end in (
        ("client -> server", record.upstream, record.passed_upstream, record.client_end),
        ("server -> client", record.downstream, record.passed_downstream, record.server_end),
    ):
        data = b"".join(chunk.data for chunk in list(chunks))
        line = f"  {arrow}: {len(data)} bytes"
        if passed != len(data):
            line += f" ({passed} passed on)"
        line += f", then {end or 'still open'}"
        if data:
            line += f": {data[:limit]!r}{'...' if len(data) > limit else ''}"
        lines.append(line)
    if record.faults:
        lines.append(f"  faults: {', '.join(map(repr, list(record.faults)))}")
    counts = ((record.dropped, "dropped"), (record.unrecorded, "not recorded"))
    _add_ending(lines, counts, record.detail, record.failure, "ended")
    return "\n".join(lines)


def parse_upstream(text: str) -> tuple[str, int] | str:
    """A ``proxy`` UPSTREAM as FaultProxy's ``upstream``: ``HOST:PORT`` and ``[IPv6]:PORT``
    give ``(host, port)``; anything with a ``/`` is a Unix socket path.

    Raises:
        argparse.ArgumentTypeError: none of these, or a port outside 1 to 65535.
    """
    if "/" in text:
        return text
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise argparse.ArgumentTypeError(
                f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:6379"
            )
    if not sep or not host or not port:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected HOST:PORT, [IPv6]:PORT or a Unix socket path (with a /)"
        )
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be 1 to 65535, got {port!r}")
    return host, int(port)


def _number(text: str, *, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(
            f"expected a finite number {'> 0' if positive else '>= 0'}, got {text!r}"
        )
    return value


def _seconds(text: str) -> float:
    return _number(text, positive=False)


def _rate(text: str) -> float:
    return _number(text, positive=True)


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


class _Record(Protocol):
    @property
    def index(self) -> int: ...


_R = TypeVar("_R", bound=_Record)


class _Stop:
    """Ctrl-C and SIGTERM, made to stop a command only while it waits, never halfway through
    printing a transcript: inside ``with``, each sets :attr:`requested`, and raises
    ``KeyboardInterrupt`` if :attr:`waiting`. Handlers are set in the main thread only, and not
    for a signal that is ignored (a background job's SIGINT)."""

    def __init__(self) -> None:
        self.requested = False
        self.waiting = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        if self.waiting:
            self.waiting = False  # one interrupt per wait
            raise KeyboardInterrupt

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]


def _print_transcripts(
    wait: Callable[[int, float | None], Sequence[_R]],
    describe: Callable[[_R], str],
    printed: set[int],
    limit: int | None,
    stop: _Stop,
) -> None:
    """Print each connection's transcript as it ends, until ``limit`` have (None: no limit).

    ``wait(n, timeout)`` blocks until ``n`` connections have ended and returns them.
    ``printed`` collects the indices printed. When ``stop`` is requested, it prints the
    connections that have ended, then raises ``KeyboardInterrupt``.
    """

    def show(records: Sequence[_R]) -> None:
        for record in records:
            if record.index not in printed:
                printed.add(record.index)
                print(describe(record), flush=True)

    while limit is None or len(printed) < limit:
        records: Sequence[_R] = ()
        stop.waiting = True
        try:
            if not stop.requested:
                records = wait(len(printed) + 1, None)
        except KeyboardInterrupt:
            pass
        finally:
            stop.waiting = False
        show(records)
        if stop.requested:
            while limit is None or len(printed) < limit:
                try:
                    show(wait(len(printed) + 1, 0.0))
                except TimeoutError:
                    break
            raise KeyboardInterrupt


def _error(message: object) -> int:
    print(f"selectserver: error: {message}", file=sys.stderr)
    return 2


def _run_server(server: CommandServer, once: bool, banner: list[str]) -> int:
    """Print ``banner``, then transcripts until one connection (``once``) or Ctrl-C/SIGTERM;
    close ``server``. Returns 1 if a connection failed, else 0."""
    try:
        with server, _Stop() as stop:
            for line in banner:
                print(line, flush=True)
            _print_transcripts(
                lambda n, timeout: server.wait_for_connections(n, timeout),
                format_transcript,
                set(),
                1 if once else None,
                stop,
            )
    except KeyboardInterrupt:
        print("selectserver: stopped", flush=True)
    return 1 if any(r.failure for r in server.connections) else 0


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.script is not None and args.steps:
        parser.error("give --script FILE or STEP arguments, not both")
    try:
        if args.script is not None:
            steps = load_script(args.script)
        else:
            steps = args.steps or DEMO_SCRIPT
            compile_script(steps, tls=args.tls)
        server = CommandServer(
            steps,
            args.host,
            args.port,
            args.verbose,
            max_connections=1 if args.once else None,
            timeout=args.timeout,
            tls=True if args.tls else None,
        )
    except (TypeError, ValueError, OSError, ImportError) as exc:
        return _error(exc)
    banner = [f"selectserver: serving on {server.url} (Ctrl-C to stop)"]
    if server.ca_path is not None:
        banner.append(
            f"selectserver: CA certificate: {server.ca_path} "
            f"(e.g. curl --cacert {server.ca_path} {server.url}/)"
        )
    return _run_server(server, args.once, banner)


def _replay(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    path = args.file
    try:
        scripts = load_recording(path)
    except (TypeError, ValueError, OSError) as exc:
        message = str(exc)
        return _error(message if message.startswith(f"{path}: ") else f"{path}: {message}")
    try:
        server = CommandServer(
            None,
            args.host,
            args.port,
            args.verbose,
            scripts=scripts,
            max_connections=1 if args.once else None,
            timeout=args.timeout,
        )
    except (TypeError, ValueError, OSError) as exc:
        return _error(exc)
    banner = [
        f"selectserver: serving on {server.url} (Ctrl-C to stop)",
        f"selectserver: replaying the {len(scripts)} connection(s) recorded in {path} "
        "(later connections replay the last)",
    ]
    return _run_server(server, args.once, banner)


def _check_writable(path: str) -> None:
    """OSError unless a file can be saved at ``path`` (checked before the proxy starts)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OSError(f"--record {path}: is a directory")
    if not os.path.isdir(directory):
        raise OSError(f"--record {path}: no such directory {directory}")
    if not os.access(directory, os.W_OK):
        raise OSError(f"--record {path}: directory {directory} is not writable")


def _proxy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.jitter is not None and args.latency is None:
        parser.error("--jitter needs --latency (--latency 0 --jitter J: delays of 0 to J s)")
    direction = args.direction
    faults: list[AnyFault] = []
    if args.latency is not None:
        faults.append(Latency(args.latency, jitter=args.jitter or 0.0, direction=direction))
    if args.bandwidth is not None:
        faults.append(Bandwidth(args.bandwidth, direction=direction))
    if args.reset_after is not None:
        faults.append(ResetPeer(after_bytes=args.reset_after, direction=direction))
    try:
        if args.record is not None:
            _check_writable(args.record)
        proxy = FaultProxy(
            args.upstream,
            args.host,
            args.port,
            args.verbose,
            timeout=args.timeout,
            max_record=args.max_record,
        )
    except (TypeError, ValueError, OSError) as exc:
        return _error(exc)
    printed: set[int] = set()
    with proxy:
        try:
            with _Stop() as stop:
                for fault in faults:  # before the address is printed: every client gets them
                    proxy.add(fault)
                print(
                    f"selectserver: proxying {format_address(proxy.address)} -> "
                    f"{proxy.upstream} (Ctrl-C to stop)",
                    flush=True,
                )
                _print_transcripts(
                    lambda n, timeout: proxy.wait_for_connections(n, timeout),
                    format_proxy_transcript,
                    printed,
                    None,
                    stop,
                )
        except KeyboardInterrupt:
            pass
        proxy.close()  # ends the live connections, so their records are complete
    for record in proxy.connections:
        if record.index not in printed:
            print(format_proxy_transcript(record), flush=True)
    status = 0
    if args.record is not None:
        try:
            proxy.save(args.record)
        except OSError as exc:
            print(f"selectserver: error: saving {args.record}: {exc}", file=sys.stderr)
            status = 1
        else:
            count = len(proxy.connections)
            print(f"selectserver: saved {count} connection(s) to {args.record}", flush=True)
            for record in proxy.connections:
                if record.unrecorded:
                    print(
                        f"selectserver: connection {record.index} was not recorded in full "
                        f"({record.unrecorded} bytes past --max-record {args.max_record}): "
                        "replay refuses it",
                        file=sys.stderr,
                    )
    print("selectserver: stopped", flush=True)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selectserver", description="Scriptable, misbehaving TCP servers for tests."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run a fake server in the foreground until Ctrl-C",
        description="Run a fake TCP server that plays STEPs to every client, printing each "
        "connection's transcript, until Ctrl-C.",
        epilog=_STEPS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; ::1 for IPv6)"
    )
    serve.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    serve.add_argument("--once", action="store_true", help="serve one connection, then exit")
    serve.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a step waits for the client (default 30)",
    )
    serve.add_argument(
        "--tls",
        action="store_true",
        help="serve TLS with a certificate from a throwaway CA, whose PEM file is printed "
        "(needs selectserver[tls])",
    )
    serve.add_argument(
        "--script", metavar="FILE", help="read the steps from a JSON list instead of STEPs"
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="print every event")
    serve.add_argument("steps", nargs="*", type=parse_step, metavar="STEP")
    serve.set_defaults(run=_serve, parser=serve)

    proxy = commands.add_parser(
        "proxy",
        help="run a fault-injecting TCP proxy in the foreground until Ctrl-C",
        description="Relay every client to UPSTREAM with the faults given, printing each "
        "connection's transcript as it ends,\nuntil Ctrl-C or SIGTERM (then --record saves "
        "every connection).",
        epilog=_PROXY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    proxy.add_argument(
        "upstream",
        type=parse_upstream,
        metavar="UPSTREAM",
        help="where to connect: HOST:PORT, [IPv6]:PORT, or a Unix socket path (with a /)",
    )
    _add_address(proxy)
    proxy.add_argument(
        "--latency", type=_seconds, metavar="S", help="delay each chunk by S seconds"
    )
    proxy.add_argument(
        "--jitter", type=_seconds, metavar="S", help="with --latency: vary each delay by up to ±S"
    )
    proxy.add_argument(
        "--bandwidth", type=_rate, metavar="BPS", help="pass at most BPS bytes per second"
    )
    proxy.add_argument(
        "--reset-after",
        type=_count,
        metavar="N",
        help="reset both sides (RST) once N bytes have passed (0: at the first chunk)",
    )
    proxy.add_argument(
        "--direction",
        choices=("downstream", "upstream", "both"),
        default="downstream",
        help="which way the faults act: server to client (the default), client to server, "
        "or each way on its own",
    )
    proxy.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        default=30.0,
        help="seconds a connection may pass no bytes before it is closed, and the longest an "
        "upstream connect may take (default 30)",
    )
    proxy.add_argument(
        "--record",
        metavar="FILE",
        help="on Ctrl-C or SIGTERM, save every connection to FILE, for replay FILE",
    )
    proxy.add_argument(
        "--max-record",
        type=_count,
        metavar="BYTES",
        default=DEFAULT_MAX_RECORD,
        help="bytes each connection's record keeps, its first ones (default "
        f"{DEFAULT_MAX_RECORD // (1024 * 1024)} MiB); a connection past it cannot be replayed",
    )
    proxy.add_argument("-v", "--verbose", action="store_true", help="print every event")
    proxy.set_defaults(run=_proxy, parser=proxy)

    replay = commands.add_parser(
        "replay",
        help="serve the server side of a proxy --record FILE",
        description="Serve the server's side of each connection recorded by proxy --record "
        "(connection k replays recorded connection k; later ones replay the last), printing "
        "each connection's transcript, until Ctrl-C or SIGTERM.",
    )
    replay.add_argument("file", metavar="FILE", help="a recording saved by proxy --record")
    _add_address(replay)
    replay.add_argument("--once", action="store_true", help="serve one connection, then exit")
    replay.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        default=30.0,
        help="seconds a step waits for the client (default 30)",
    )
    replay.add_argument("-v", "--verbose", action="store_true", help="print every event")
    replay.set_defaults(run=_replay, parser=replay)
    return parser


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; ::1 for IPv6)"
    )
    parser.add_argument("--port", type=int, default=0, help="port (default: any free port)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.ArgumentParser, argparse.Namespace], int] = args.run
    return run(args.parser, args)  # the subcommand's parser, for its usage in errors


if __name__ == "__main__":
    sys.exit(main())
