"""The command line: run a fake server in the foreground.

python -m selectserver serve [--host H] [--port P] [--once] [STEP ...]
"""

from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Sequence

from ._connection import format_address
from ._records import ConnectionRecord
from ._script import Command, Delay, Expect, ReadUntil, compile_script
from ._servers import CommandServer

__all__ = ["DEMO_SCRIPT", "main", "parse_step"]

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
  HANGUP (or BREAK) RESET HALF_CLOSE STALL
                       close (FIN), reset (RST), shut the sending side, hang forever
  text:TEXT or TEXT    send TEXT (backslash escapes such as \\r\\n work)

With no steps, a demo script answers any HTTP request with a small 200 response.
Example:
  python -m selectserver serve --port 8080 RECEIVE 'HTTP/1.0 200 OK\\r\\n\\r\\nhi'
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


def format_transcript(record: ConnectionRecord) -> str:
    """A connection's record as a few readable lines."""
    lines = [
        f"connection {record.index} from {format_address(record.peer)}: "
        f"{record.outcome.value if record.outcome else 'running'}"
    ]
    lines += [f"  <- {_preview(chunk)}" for chunk in record.received]
    sent = record.sent
    if sent:
        lines.append(f"  -> {_preview(sent)}")
    if record.failure:
        lines.append(f"  FAILED: {record.failure}")
    return "\n".join(lines)


def _preview(data: bytes, limit: int = 200) -> str:
    text = repr(data)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(data)} bytes)"


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
    serve.add_argument("-v", "--verbose", action="store_true", help="print every event")
    serve.add_argument("steps", nargs="*", type=parse_step, metavar="STEP")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    steps = args.steps or DEMO_SCRIPT
    try:
        compile_script(steps)
        server = CommandServer(
            steps,
            args.host,
            args.port,
            args.verbose,
            max_connections=1 if args.once else None,
            timeout=args.timeout,
        )
    except (TypeError, ValueError, OSError) as exc:
        print(f"selectserver: error: {exc}", file=sys.stderr)
        return 2
    print(f"selectserver: serving on {server.url} (Ctrl-C to stop)", flush=True)
    printed: set[int] = set()
    try:
        with server:
            while not args.once or not printed:
                for record in server.wait_for_connections(len(printed) + 1, timeout=None):
                    if record.index not in printed:
                        printed.add(record.index)
                        print(format_transcript(record), flush=True)
    except KeyboardInterrupt:
        print("selectserver: stopped", flush=True)
    return 1 if any(r.failure for r in server.connections) else 0


if __name__ == "__main__":
    sys.exit(main())
