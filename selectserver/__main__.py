"""The command line: run a fake server in the foreground.

python -m selectserver serve [--host H] [--port P] [--once] [--tls] [--script FILE | STEP ...]
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from collections.abc import Sequence

from ._connection import format_address
from ._records import ConnectionRecord
from ._script import Command, Delay, Expect, ReadUntil, compile_script
from ._servers import CommandServer

__all__ = ["DEMO_SCRIPT", "format_transcript", "load_script", "main", "parse_step"]

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
    uncounted = [
        f"{count} bytes {what}"
        for count, what in ((record.discarded, "discarded"), (record.dropped, "dropped"))
        if count
    ]
    if uncounted:
        lines.append(f"  ({', '.join(uncounted)})")
    if record.detail and not (record.failure and record.detail in record.failure):
        lines.append(f"  at step {record.step}: {record.detail}")
    if record.failure:
        lines.append(f"  FAILED: {record.failure}")
    return "\n".join(lines)


def _preview(data: bytes, limit: int = 200) -> str:
    """``repr(data)``, or of its first ``limit`` bytes and the full length."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r}... ({len(data)} bytes)"


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
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
        print(f"selectserver: error: {exc}", file=sys.stderr)
        return 2
    print(f"selectserver: serving on {server.url} (Ctrl-C to stop)", flush=True)
    if server.ca_path is not None:
        print(
            f"selectserver: CA certificate: {server.ca_path} "
            f"(e.g. curl --cacert {server.ca_path} {server.url}/)",
            flush=True,
        )
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
