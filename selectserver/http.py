"""HTTP/1.x for scripts: read whole requests, build responses, parse what was received.

::

    from selectserver import CommandServer
    from selectserver.http import ReadRequest, parse_request, response

    with CommandServer([ReadRequest(), response(body="hello")], verbose=False) as server:
        ...  # any HTTP client against server.url
    request = parse_request(server.received[0])
    assert request.method == "GET" and request.headers["host"]

* :class:`ReadRequest` is a receive step that takes exactly one request, framed as RFC 9112 says
  (``Content-Length``, chunked coding with trailers, or no body); pipelined bytes after it stay
  buffered for the next receive step. A malformed request fails the connection, and
  ``check()`` says why.
* :func:`response` builds a framed response (status line, headers, ``Content-Length`` or
  chunks), to use as a send step.
* :func:`parse_request` parses one received request into a :class:`Request`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TypeVar, Union, overload

from selectserver._script import ReceiveCondition

__all__ = ["MAX_HEAD", "Headers", "ReadRequest", "Request", "parse_request", "response"]

#: The longest request head (leading empty lines, request line, header fields and the blank
#: line) that ReadRequest accepts by default; no chunk-size or trailer line may be longer.
MAX_HEAD = 64 * 1024

_T = TypeVar("_T")
_Buffer = Union[bytes, bytearray]
_Fields = Union[Mapping[str, str], Iterable[tuple[str, str]]]

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_FIELD_VALUE = rb"[^\x00-\x08\x0a-\x1f\x7f]*"  # no control characters but HTAB
_METHOD_PREFIX = re.compile(_TCHAR + rb"*")
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) ([^\x00-\x20\x7f]+) (HTTP/1\.[0-9])")
_FIELD_LINE = re.compile(rb"(" + _TCHAR + rb"+):(" + _FIELD_VALUE + rb")")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;" + _FIELD_VALUE + rb")?")
_BLANK_LINE = re.compile(rb"\n\r?\n")
# RFC 9112 2.2: empty lines before the request line are ignored (a CR at the end may start one).
_EMPTY_LINES = re.compile(rb"(?:\r?\n)*(?:\r\Z)?")
_TOKEN = re.compile(_TCHAR.decode() + "+")
_DIGITS = re.compile("[0-9]{1,18}")
_REASONS = {status.value: status.phrase for status in HTTPStatus}

#: How many unfinished parses one ReadRequest remembers (one per buffer it is framing).
_MAX_PARSES = 1024


def _malformed(why: str) -> ValueError:
    return ValueError(f"malformed HTTP request: {why}")


def _show(data: _Buffer, limit: int = 80) -> str:
    """``data``'s repr, cut short."""
    text = repr(bytes(data[:limit]))
    return text + "..." if len(data) > limit else text


class Headers:
    """Header fields in the order received, looked up by name whatever its case.

    ``headers["host"]`` is the first value (``KeyError`` if absent), ``get_all(name)`` all of
    them; iteration yields the ``(name, value)`` pairs, so ``dict(headers)`` works.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: _Fields = ()) -> None:
        pairs = fields.items() if isinstance(fields, Mapping) else fields
        self._fields = tuple((name, value) for name, value in pairs)

    def get_all(self, name: str) -> list[str]:
        """Every value of the field ``name``, in order (``[]`` if absent)."""
        key = name.lower()
        return [value for field_name, value in self._fields if field_name.lower() == key]

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: _T) -> str | _T: ...
    def get(self, name: str, default: object = None) -> object:
        """The first value of the field ``name``, or ``default``."""
        values = self.get_all(name)
        return values[0] if values else default

    def __getitem__(self, name: str) -> str:
        values = self.get_all(name)
        if not values:
            raise KeyError(name)
        return values[0]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.get_all(name))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._fields == other._fields

    def __hash__(self) -> int:
        return hash(self._fields)

    def __repr__(self) -> str:
        return f"Headers({list(self._fields)!r})"


@dataclass(frozen=True)
class Request:
    """One HTTP request, as :func:`parse_request` read it (text decoded as Latin-1)."""

    method: str
    target: str
    version: str
    headers: Headers
    body: bytes = b""
    """The body, de-chunked if it came in chunked coding."""
    trailers: Headers = field(default_factory=Headers)
    """The trailer fields after a chunked body."""


# ---- parsing ------------------------------------------------------------------------------


def _field(line: bytes) -> tuple[str, str]:
    """A header or trailer field line's name and value."""
    match = _FIELD_LINE.fullmatch(line)
    if match is None:
        raise _malformed(f"bad header line {_show(line)} (expected 'Name: value')")
    return match[1].decode("ascii"), match[2].strip(b" \t").decode("latin-1")


def _line(buffer: _Buffer, position: int, limit: int, what: str) -> tuple[bytes, int] | None:
    """The line at ``position`` without its CRLF (or LF) and where the next one starts."""
    end = buffer.find(b"\n", position, position + limit)
    if end < 0:
        if len(buffer) >= position + limit:
            raise _malformed(f"{what} longer than {limit} bytes: {_show(buffer[position:])}")
        return None
    line = bytes(buffer[position:end])
    return (line[:-1] if line.endswith(b"\r") else line), end + 1


def _chunk(buffer: _Buffer, position: int, limit: int) -> tuple[int, int, int] | None:
    """The chunk at ``position``: where its data starts and ends, and where the next begins.

    None until all of it has arrived; the last chunk (size 0) has no data and its "next" is
    where the trailer section starts.
    """
    found = _line(buffer, position, limit, "chunk-size line")
    if found is None:
        return None
    line, start = found
    match = _CHUNK_LINE.fullmatch(line)
    if match is None:
        raise _malformed(f"bad chunk-size line {_show(line)}")
    end = start + int(match[1], 16)
    if end == start:
        return start, start, start
    ending = bytes(buffer[end : end + 2])
    if ending.startswith(b"\n"):
        return start, end, end + 1
    if ending == b"\r\n":
        return start, end, end + 2
    if ending in (b"", b"\r"):
        return None
    raise _malformed(f"chunk data not followed by CRLF: {_show(buffer[end:])}")


def _skip(pattern: re.Pattern[bytes], buffer: _Buffer, position: int) -> int:
    """Where ``pattern`` (which matches the empty string too) stops matching at ``position``."""
    match = pattern.match(buffer, position)
    assert match is not None
    return match.end()


def _find_head(buffer: _Buffer, limit: int) -> tuple[int, int] | None:
    """Where the request line starts and where the head ends (past its blank line).

    None while the head is incomplete; a first line that cannot start a request fails early.
    """
    start = _skip(_EMPTY_LINES, buffer, 0)
    blank = _BLANK_LINE.search(buffer, start, limit)
    if blank is not None:
        return start, blank.end()
    line_end = buffer.find(b"\n", start, limit)
    if line_end >= 0:
        _request_line(bytes(buffer[start:line_end]).removesuffix(b"\r"))
    else:
        method_end = _skip(_METHOD_PREFIX, buffer, start)
        if buffer[method_end : method_end + 1] not in (b"", b" "):  # a method ends, but not so
            raise _bad_request_line(bytes(buffer[start:]))
    if len(buffer) >= limit:
        raise _malformed(f"no blank line ending the head within {limit} bytes")
    return None


def _request_line(line: bytes) -> tuple[str, str, str]:
    """The method, target and version of a request line."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise _bad_request_line(line)
    method, target, version = (part.decode("latin-1") for part in match.groups())
    return method, target, version


def _bad_request_line(line: bytes) -> ValueError:
    hint = " (a TLS handshake: is the client using https?)" if line[:2] == b"\x16\x03" else ""
    return _malformed(f"bad request line {_show(line)} (expected 'METHOD target HTTP/1.x'){hint}")


def _body_length(version: str, headers: Headers) -> int | None:
    """The body's length from the head, or None for a chunked body (RFC 9112 6.3)."""
    lengths = {v.strip() for value in headers.get_all("content-length") for v in value.split(",")}
    if "transfer-encoding" in headers:
        codings = ", ".join(headers.get_all("transfer-encoding"))
        names = [coding.split(";")[0].strip().lower() for coding in codings.split(",")]
        if version == "HTTP/1.0":
            raise _malformed("Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            raise _malformed("both Transfer-Encoding and Content-Length (ambiguous framing)")
        if names[-1] != "chunked" or names.count("chunked") > 1:
            raise _malformed(
                f"Transfer-Encoding {codings!r}: chunked must be the last coding, once"
            )
        return None
    if not lengths:
        return 0
    if len(lengths) > 1:
        raise _malformed(f"conflicting Content-Length values {sorted(lengths)}")
    (length,) = lengths
    if not _DIGITS.fullmatch(length):
        raise _malformed(f"bad Content-Length {length!r}")
    return int(length)


class _Parse:
    """One request's parse in one buffer, resumed where it stopped as more bytes arrive."""

    __slots__ = (
        "body",
        "buffer",
        "head",
        "headers",
        "length",
        "limit",
        "position",
        "request_line",
        "trailers",
    )

    def __init__(self, buffer: _Buffer, start: int, end: int, limit: int) -> None:
        self.buffer = buffer  # held, so that no other buffer can take its id while cached
        self.head = bytes(buffer[:end])
        self.limit = limit
        lines = [line.removesuffix(b"\r") for line in self.head[start:].split(b"\n")[:-2]]
        self.request_line = _request_line(lines[0])
        self.headers = Headers(map(_field, lines[1:]))
        self.length = _body_length(self.request_line[2], self.headers)
        self.position = end  # chunked: where the next chunk or trailer line starts
        self.body: list[bytes] | None = None  # chunks' data, when parse_request collects it
        self.trailers: list[tuple[str, str]] | None = None  # once the last chunk has arrived

    def fits(self, buffer: _Buffer) -> bool:
        """Whether this parse is still of ``buffer``: it only grew since."""
        return (
            self.buffer is buffer and len(buffer) >= self.position and buffer.startswith(self.head)
        )

    def advance(self) -> int:
        """Where the request ends, or -1 if it has not all arrived yet."""
        buffer = self.buffer
        if self.length is not None:
            end = len(self.head) + self.length
            return end if len(buffer) >= end else -1
        while self.trailers is None:
            chunk = _chunk(buffer, self.position, self.limit)
            if chunk is None:
                return -1
            start, end, self.position = chunk
            if start == end:
                self.trailers = []
            elif self.body is not None:
                self.body.append(bytes(buffer[start:end]))
        while True:
            found = _line(buffer, self.position, self.limit, "trailer line")
            if found is None:
                return -1
            line, self.position = found
            if not line:
                return self.position
            self.trailers.append(_field(line))


@dataclass(frozen=True, slots=True)
class ReadRequest(ReceiveCondition):
    """Read exactly one HTTP/1.x request: its head, then its body (RFC 9112 framing).

    The body is framed by ``Content-Length``, by chunked coding (trailers too), or absent.
    The step's bytes are the request as received; whatever follows stays buffered for the
    next receive step, so pipelined requests are read one step each. A malformed request (a
    bad request line or header line, a bad or conflicting ``Content-Length``, a
    ``Transfer-Encoding`` not ending in chunked, a bad chunk, a head longer than ``max_head``
    bytes) fails the connection, and ``check()`` says why.
    """

    max_head: int = MAX_HEAD
    _parses: dict[int, _Parse] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_head, bool) or not isinstance(self.max_head, int):
            raise TypeError(f"ReadRequest: max_head must be an int, got {self.max_head!r}")
        if self.max_head < 16:
            raise ValueError(f"ReadRequest: max_head must be >= 16, got {self.max_head!r}")

    def frame(self, buffer: bytearray) -> int:
        """Where the first whole request in ``buffer`` ends, or -1 if it has not all arrived.

        Once a request's head is in, its parse is remembered for this buffer (one instance
        may serve many connections) and resumed on the next call, so a body arriving in many
        pieces is scanned once. That assumes the parsed bytes do not change in place while the
        request is incomplete, as the step machine's buffers only grow; a buffer cleared or
        with another head is parsed afresh.

        Raises:
            ValueError: the request is malformed; the message says how.
        """
        parses = self._parses
        key = id(buffer)
        parse = parses.pop(key, None)  # dropped for good if the request ends or fails
        if parse is None or not parse.fits(buffer):
            head = _find_head(buffer, self.max_head)
            if head is None:
                return -1
            parse = _Parse(buffer, *head, self.max_head)
        end = parse.advance()
        if end < 0:
            if len(parses) >= _MAX_PARSES:
                parses.clear()  # parses of connections that ended mid-request
            parses[key] = parse
        return end


def parse_request(data: bytes | bytearray | memoryview) -> Request:
    """Parse ``data``, exactly one whole HTTP/1.x request (a :class:`ReadRequest` step's bytes).

    Raises:
        ValueError: ``data`` is malformed, incomplete, or has bytes after the request.
    """
    data = bytes(data)  # no copy if it is bytes already
    head = _find_head(data, max(len(data), MAX_HEAD))
    if head is None:
        raise _malformed(f"incomplete head (no blank line yet): {_show(data)}")
    parse = _Parse(data, *head, MAX_HEAD)
    parse.body = []
    end = parse.advance()
    if end < 0:
        raise _malformed(f"incomplete body ({len(data) - len(parse.head)} bytes of it arrived)")
    if end < len(data):
        raise _malformed(f"{len(data) - end} bytes after the request: {_show(data[end:])}")
    body = data[len(parse.head) : end] if parse.length is not None else b"".join(parse.body)
    trailers = Headers(parse.trailers or ())
    return Request(*parse.request_line, parse.headers, body, trailers)


# ---- responses ----------------------------------------------------------------------------


def _has_body(status: int) -> bool:
    return status >= 200 and status not in (204, 304)


def _line_text(what: str, text: str) -> bytes:
    """``text`` as Latin-1 bytes for a response's head, refusing what would break framing."""
    if any(c in text for c in "\r\n\0"):
        raise ValueError(f"response: {what} {text!r} contains CR, LF or NUL")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"response: {what} {text!r} is not Latin-1 text") from None


def response(
    status: int = 200,
    body: str | bytes | bytearray | memoryview = b"",
    headers: _Fields = (),
    *,
    reason: str | None = None,
    version: str = "HTTP/1.1",
    chunked: bool = False,
    close: bool = False,
) -> bytes:
    """A whole HTTP response, ready to be a send step.

    ``headers`` (pairs or a mapping) come first, as given; then ``Content-Length`` (or, with
    ``chunked``, ``Transfer-Encoding: chunked`` and the body as one chunk), unless they are
    among ``headers`` already (so a wrong length on purpose stays wrong), and
    ``Connection: close`` if ``close``. A str body is UTF-8; ``reason`` defaults to the
    status's phrase. 1xx, 204 and 304 responses have no body and no ``Content-Length``; to
    answer a HEAD request, give the ``Content-Length`` in ``headers`` and no body.

    Raises:
        ValueError: a bad status, a body for a status without one, chunked in HTTP/1.0, or a
            header that would break the framing (CR, LF or NUL; a name not a token).
    """
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 999:
        raise ValueError(f"response: status must be an int in 100..999, got {status!r}")
    payload = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    fields = list(Headers(headers))
    given = {name.lower() for name, _ in fields}
    if not _has_body(status):
        if payload or chunked:
            raise ValueError(f"response: a {status} response has no body")
    elif chunked:
        if version == "HTTP/1.0":
            raise ValueError("response: chunked coding needs HTTP/1.1")
        if "transfer-encoding" not in given:
            fields.append(("Transfer-Encoding", "chunked"))
        payload = (b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b"") + b"0\r\n\r\n"
    elif not given & {"content-length", "transfer-encoding"}:
        fields.append(("Content-Length", str(len(payload))))
    if close and "connection" not in given:
        fields.append(("Connection", "close"))
    phrase = _REASONS.get(status, "") if reason is None else reason
    lines = [_line_text("status line", f"{version} {status} {phrase}")]
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"response: header name {name!r} is not a token")
        lines.append(_line_text(f"header {name}", f"{name}: {value}"))
    return b"\r\n".join([*lines, b"", payload])
