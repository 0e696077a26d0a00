"""Hypothesis strategies for selectserver scripts: fuzz your client against a misbehaving server.

Needs Hypothesis (``pip install 'selectserver[hypothesis]'``); nothing else in selectserver
imports it. Every strategy checks its arguments when called, before anything is drawn, and
raises ``hypothesis.errors.InvalidArgument`` (a ``TypeError``) naming the bad one.

* :func:`scripts`: valid scripts mixing receive steps, sends and (by default) every kind of
  misbehaviour, with knobs to switch each off, to bound sizes and delays, and to add TLS
  (``StartTLS``) and ``TRUNCATE``;
* :func:`http_responses`: valid, truncated and malformed HTTP/1.x responses, as scripts that
  read a request head first, with what a correct client should make of them;
* the pieces they are built from, to use alone: :func:`receive_steps`, :func:`send_steps`,
  :func:`pauses`, :func:`http_heads`, :func:`http_bodies`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

try:
    from hypothesis import strategies as st
    from hypothesis.errors import InvalidArgument
except ImportError as exc:  # pragma: no cover - the extra is installed wherever this is tested
    raise ImportError(
        "selectserver.strategies needs Hypothesis: pip install 'selectserver[hypothesis]'"
    ) from exc

from ._script import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    STALL,
    TRUNCATE,
    Delay,
    Drip,
    Expect,
    Garbage,
    ReadUntil,
    StartTLS,
    Throttle,
)

__all__ = [
    "HTTPResponseScript",
    "http_bodies",
    "http_heads",
    "http_responses",
    "pauses",
    "receive_steps",
    "scripts",
    "send_steps",
]

Kind = Literal["valid", "truncated", "malformed"]
KINDS: tuple[Kind, ...] = ("valid", "truncated", "malformed")
#: The delimiter that ends a request head: what every :func:`http_responses` script reads first.
REQUEST_HEAD_END = b"\r\n\r\n"


# ---- argument checks ---------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}={value!r} must be an int")
    if value < minimum:
        raise InvalidArgument(f"{name}={value!r} must be >= {minimum}")
    return value


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name}={value!r} must be a number of seconds")
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{name}={value!r} must be finite and >= 0")
    return float(value)


def _check_flags(**flags: object) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise InvalidArgument(f"{name}={value!r} must be True or False")


# ---- script pieces -----------------------------------------------------------------------------

#: Short byte strings: delimiters, literals, small payloads.
_short_bytes = st.binary(min_size=1, max_size=4)
#: Literal Expect patterns, bytes or str, escaped so ``re.search`` matches them as written.
_literal_patterns = st.one_of(
    _short_bytes.map(re.escape),
    st.text(min_size=1, max_size=4).map(re.escape),
)


def receive_steps(*, max_size: int = 64) -> st.SearchStrategy[object]:
    """Receive steps: ``RECEIVE``, an int up to ``max_size``, ``ReadUntil``, a literal ``Expect``.

    Example::

        @given(receive_steps(max_size=8))
        def test_any_receive_step_compiles(step):
            compile_script([step])
    """
    _check_int("max_size", max_size, 1)
    return st.one_of(
        st.just(RECEIVE),
        st.integers(1, max_size),
        st.builds(ReadUntil, _short_bytes),
        st.builds(Expect, _literal_patterns),
    )


@st.composite
def _drips(draw: st.DrawFn, max_size: int, max_delay: float) -> Drip:
    """A Drip whose pieces all go out within ``max_delay`` seconds."""
    data = draw(st.binary(min_size=1, max_size=max(1, min(max_size, 16))))
    chunk = draw(st.integers(1, len(data)))
    pieces = -(-len(data) // chunk)
    total = draw(st.floats(0, max_delay)) if max_delay else 0.0
    return Drip(data, chunk, interval=total / pieces, seed=draw(st.integers(0, 2**16)))


def send_steps(
    *, max_size: int = 64, allow_drip: bool = True, max_delay: float = 0.01
) -> st.SearchStrategy[object]:
    """Send steps: bytes and str (empty too), ``Garbage`` and, if allowed, ``Drip``.

    A str step is at most ``max_size // 4`` characters, so its UTF-8 fits ``max_size`` bytes; a
    Drip sends at most 16 bytes and all its pieces within ``max_delay`` seconds.

    Example::

        @given(send_steps(max_size=4096, allow_drip=False))
        def test_client_reads_any_reply(step):
            ...
    """
    _check_int("max_size", max_size, 0)
    _check_flags(allow_drip=allow_drip)
    delay = _check_seconds("max_delay", max_delay)
    options: list[st.SearchStrategy[object]] = [
        st.binary(max_size=max_size),
        st.text(max_size=max_size // 4),
        st.builds(Garbage, st.integers(0, max_size), st.integers(0, 2**16)),
    ]
    if allow_drip and max_size:
        options.append(_drips(max_size, delay))
    return st.one_of(options)


@st.composite
def _delays(draw: st.DrawFn, max_delay: float) -> Delay:
    seconds = draw(st.floats(0, max_delay))
    jitter = draw(st.floats(0, max_delay - seconds)) if max_delay > seconds else 0.0
    return Delay(seconds, jitter, seed=draw(st.integers(0, 2**16)))


def pauses(
    *,
    max_delay: float = 0.01,
    max_send_size: int = 64,
    allow_delay: bool = True,
    allow_throttle: bool = True,
) -> st.SearchStrategy[object]:
    """``Delay`` (with jitter) of at most ``max_delay`` s, and ``Throttle``, each if allowed.

    A Throttle's rate lets a ``max_send_size`` send go out within ``max_delay`` seconds, or is
    ``None`` (lifting the cap); there is no Throttle when ``max_delay`` is 0.

    Example::

        @given(pauses(max_delay=0.05))
        def test_pause_is_short(step):
            assert not isinstance(step, Delay) or step.seconds + step.jitter <= 0.05
    """
    delay = _check_seconds("max_delay", max_delay)
    size = _check_int("max_send_size", max_send_size, 1)
    _check_flags(allow_delay=allow_delay, allow_throttle=allow_throttle)
    options: list[st.SearchStrategy[object]] = []
    if allow_delay:
        options.append(_delays(delay))
    if allow_throttle and delay > 0:
        rates = st.floats(size / delay, 100 * size / delay)
        options.append(st.builds(Throttle, st.one_of(st.none(), rates)))
    if not options:
        raise InvalidArgument("pauses() needs allow_delay, or allow_throttle with max_delay > 0")
    return st.one_of(options)


#: How ``StartTLS(fail=...)`` breaks a handshake on purpose.
_Failure = Literal["hangup", "reset", "garbage"]


@st.composite
def _scripts(
    draw: st.DrawFn,
    *,
    sizes: tuple[int, int],
    receive: st.SearchStrategy[object],
    send: st.SearchStrategy[object],
    pause: st.SearchStrategy[object] | None,
    half_close: bool,
    finals: tuple[object, ...],
    tls: bool,
    failures: tuple[_Failure, ...],
) -> list[object]:
    size = draw(st.integers(*sizes))
    # After HALF_CLOSE the server may still read, and pause, but never send.
    quiet_steps = st.one_of(receive, pause) if pause is not None else receive
    any_step = st.one_of(quiet_steps, send)
    start_tls: StartTLS | None = None
    if tls and size and draw(st.booleans()):
        size -= 1
        start_tls = StartTLS()
        if len(failures) > 0 and draw(st.booleans()):
            # A broken handshake ends the connection: it comes last, with nothing final or
            # HALF_CLOSE before it (the client could not start TLS after EOF).
            fail = draw(st.sampled_from(failures))
            steps = draw(st.lists(any_step, min_size=size, max_size=size))
            return [*steps, StartTLS(fail)]
    final: list[object] = []
    if size and finals and draw(st.booleans()):
        final = [draw(st.sampled_from(finals))]
        size -= 1
    split = size
    if half_close and size and draw(st.booleans()):
        split = draw(st.integers(0, size - 1))
    steps = draw(st.lists(any_step, min_size=split, max_size=split))
    if start_tls is not None:
        # Anywhere before HALF_CLOSE, which would end what the server sends (the handshake).
        steps.insert(draw(st.integers(0, split)), start_tls)
    if split < size:
        steps.append(HALF_CLOSE)
        steps += draw(st.lists(quiet_steps, min_size=size - split - 1, max_size=size - split - 1))
    return steps + final


def scripts(
    *,
    min_steps: int = 0,
    max_steps: int = 8,
    max_send_size: int = 64,
    max_receive_size: int = 64,
    max_delay: float = 0.01,
    allow_hangup: bool = True,
    allow_reset: bool = True,
    allow_half_close: bool = True,
    allow_stall: bool = True,
    allow_delay: bool = True,
    allow_throttle: bool = True,
    allow_drip: bool = True,
    tls: bool = False,
    allow_broken_handshake: bool = True,
    truncate: bool = False,
) -> st.SearchStrategy[list[object]]:
    """Valid scripts of ``min_steps`` to ``max_steps`` steps, with every misbehaviour allowed.

    Scripts mix receive steps (:func:`receive_steps`), sends (:func:`send_steps`) and pauses
    (:func:`pauses`), and keep ``compile_script``'s rules: ``HANGUP``, ``RESET`` or ``STALL``
    only last, at most one ``HALF_CLOSE`` and no send after it. Each ``allow_*`` flag switches
    one kind of step off; ``max_delay`` bounds each Delay, Drip and throttled send, so a script
    runs within about ``max_steps * max_delay`` seconds.

    Two knobs, off by default, add steps (a ``StartTLS`` counts as a step):

    * ``tls``: scripts for a server made with ``tls=``. A script may have one ``StartTLS``,
      first or after plain steps, but before ``HALF_CLOSE``; without one, the server starts
      TLS first. If ``allow_broken_handshake``, it may instead end with a ``StartTLS(fail=...)``
      that breaks the handshake ("hangup", "garbage", and "reset" if ``allow_reset``);
    * ``truncate``: a script may end with ``TRUNCATE`` (FIN without TLS's close_notify).

    Example::

        from selectserver import CommandServer
        from selectserver.reference import expected_transcript, play, server_sync

        @given(scripts(allow_stall=False))
        def test_reference_client(script):
            with CommandServer(script, verbose=False) as server:
                transcript = play(script, server.address, sync=server_sync(server))
            assert transcript == expected_transcript(script)

    With ``tls=True``, serve with ``CommandServer(script, tls=True)``, play with
    ``ssl_context=server.client_ssl_context()`` and expect ``expected_transcript(script,
    tls=True)``.
    """
    low = _check_int("min_steps", min_steps, 0)
    high = _check_int("max_steps", max_steps, 0)
    if low > high:
        raise InvalidArgument(f"min_steps={min_steps!r} must be <= max_steps={max_steps!r}")
    send_size = _check_int("max_send_size", max_send_size, 0)
    receive_size = _check_int("max_receive_size", max_receive_size, 1)
    delay = _check_seconds("max_delay", max_delay)
    _check_flags(
        allow_hangup=allow_hangup,
        allow_reset=allow_reset,
        allow_half_close=allow_half_close,
        allow_stall=allow_stall,
        allow_delay=allow_delay,
        allow_throttle=allow_throttle,
        allow_drip=allow_drip,
        tls=tls,
        allow_broken_handshake=allow_broken_handshake,
        truncate=truncate,
    )
    finals = tuple(
        step
        for step, allowed in (
            (HANGUP, allow_hangup),
            (RESET, allow_reset),
            (STALL, allow_stall),
            (TRUNCATE, truncate),
        )
        if allowed
    )
    failures: tuple[_Failure, ...] = ()
    if allow_broken_handshake:
        failures = ("hangup", "reset", "garbage") if allow_reset else ("hangup", "garbage")
    pause = None
    if allow_delay or (allow_throttle and delay > 0):
        pause = pauses(
            max_delay=delay,
            max_send_size=max(send_size, 1),
            allow_delay=allow_delay,
            allow_throttle=allow_throttle,
        )
    return _scripts(
        sizes=(low, high),
        receive=receive_steps(max_size=receive_size),
        send=send_steps(max_size=send_size, allow_drip=allow_drip, max_delay=delay),
        pause=pause,
        half_close=allow_half_close,
        finals=finals,
        tls=tls,
        failures=failures,
    )


# ---- HTTP responses ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HTTPResponseScript:
    """One generated HTTP response and the script that serves it.

    Attributes:
        script: the steps: ``ReadUntil(b"\\r\\n\\r\\n")`` (the request head), the response in
            one or more sends (maybe dripped), and maybe ``HANGUP`` or ``RESET``.
        kind: ``"valid"`` (well-formed and complete: a correct client returns ``status`` and
            ``body``), ``"truncated"`` (a valid response cut before its framing says it ends:
            a strict client reports an error) or ``"malformed"`` (broken syntax: a client may
            reject it or, if lenient, accept it; it must not hang).
        data: every byte the server sends.
        status: the status code of the response before truncation or damage, if any.
        body: the body a correct client returns (``"valid"`` only, else None).
    """

    script: tuple[object, ...]
    kind: Kind
    data: bytes
    status: int | None
    body: bytes | None


_STATUSES = (200, 201, 202, 203, 204, 206, 301, 302, 304, 400, 401, 403, 404, 418, 500, 503)
_NO_BODY = (204, 304)
_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_header_value = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=24
)


def http_heads(
    *, versions: Sequence[str] = ("HTTP/1.0", "HTTP/1.1")
) -> st.SearchStrategy[tuple[str, int, list[tuple[str, str]]]]:
    """``(version, status, headers)`` of a response head, without framing headers.

    Example::

        @given(http_heads(versions=["HTTP/1.1"]))
        def test_head(head):
            version, status, headers = head
            assert version == "HTTP/1.1" and 200 <= status < 600
    """
    choices = _check_versions(versions)
    extra = st.lists(st.tuples(_token.map(lambda name: f"X-{name}"), _header_value), max_size=4)
    content_type = st.sampled_from(["text/plain", "application/octet-stream", "text/html"])
    return st.tuples(st.sampled_from(choices), st.sampled_from(_STATUSES), extra, content_type).map(
        lambda head: (head[0], head[1], [("Content-Type", head[3]), *head[2]])
    )


def _check_versions(versions: object) -> list[str]:
    allowed = ("HTTP/1.0", "HTTP/1.1")
    if isinstance(versions, str) or not isinstance(versions, Sequence) or not versions:
        raise InvalidArgument(f"versions={versions!r} must be a non-empty list of {allowed}")
    for index, version in enumerate(versions):
        if version not in allowed:
            raise InvalidArgument(f"versions[{index}]={version!r} must be one of {allowed}")
    return list(versions)


def http_bodies(*, max_size: int = 256) -> st.SearchStrategy[bytes]:
    """Response bodies: any bytes up to ``max_size``.

    Example::

        @given(http_bodies(max_size=16))
        def test_small(body):
            assert len(body) <= 16
    """
    return st.binary(max_size=_check_int("max_size", max_size, 0))


Framing = Literal["length", "chunked", "close"]


@dataclass(frozen=True, slots=True)
class _Valid:
    """A valid response: its bytes, and where the parts a truncation must cut into begin."""

    data: bytes
    status: int
    body: bytes
    framing: Framing
    head_end: int
    last_chunk: int


def _chunked(draw: st.DrawFn, body: bytes) -> tuple[bytes, int]:
    """``body`` in chunked coding, and the offset of the final ``0`` chunk in it."""
    out = bytearray()
    rest = body
    while rest:
        size = draw(st.integers(1, len(rest)))
        hexa = f"{size:x}"
        out += (hexa.upper() if draw(st.booleans()) else hexa).encode() + b"\r\n"
        out += rest[:size] + b"\r\n"
        rest = rest[size:]
    return bytes(out) + b"0\r\n\r\n", len(out)


@st.composite
def _valid_responses(draw: st.DrawFn, versions: list[str], max_body: int) -> _Valid:
    version, status, headers = draw(http_heads(versions=versions))
    body = b"" if status in _NO_BODY else draw(http_bodies(max_size=max_body))
    framings: list[Framing] = ["length", "close"]
    if version == "HTTP/1.1":
        framings.append("chunked")
    framing: Framing = "length" if status in _NO_BODY else draw(st.sampled_from(framings))
    payload, last_chunk = body, len(body)
    if status in _NO_BODY:
        pass
    elif framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        payload, last_chunk = _chunked(draw, body)
    if framing == "close" or draw(st.booleans()):
        headers.append(("Connection", "close"))
    headers = draw(st.permutations(headers))
    reason = HTTPStatus(status).phrase
    head = f"{version} {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    head_bytes = head.encode("ascii") + b"\r\n"
    return _Valid(
        head_bytes + payload,
        status,
        body,
        framing,
        len(head_bytes),
        len(head_bytes) + last_chunk,
    )


#: Ways to break a response's syntax: each takes a valid response's bytes and returns new ones.
_BAD_STATUS_LINES = [
    b"HTTP/1.1 abc OK",
    b"HTTX/1.1 200 OK",
    b"HTTP/1.1",
    b"",
    b"\x00\xff\xfe garbage",
    b"HTTP/9.9 200 OK",
    b"HTTP/1.1 99999 Too Big",
]
_BAD_HEADER_LINES = [
    b"No-Colon-Here",
    b"Bad Name: space in the name",
    b" folded: continuation line first",
    b"Content-Length: abc",
    b"Content-Length: -1",
    b"Content-Length: 99999999999999999999999",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3",
    b"\x00: nul",
]


@st.composite
def _malformed(draw: st.DrawFn, valid: _Valid) -> bytes:
    data = valid.data
    how = draw(st.sampled_from(["status", "header", "chunk", "lf"]))
    if how == "status":
        line_end = data.index(b"\r\n")
        return draw(st.sampled_from(_BAD_STATUS_LINES)) + data[line_end:]
    if how == "header":
        line_end = data.index(b"\r\n") + 2
        return (
            data[:line_end] + draw(st.sampled_from(_BAD_HEADER_LINES)) + b"\r\n" + data[line_end:]
        )
    if how == "chunk" and valid.framing == "chunked":
        bad = draw(st.sampled_from([b"zz\r\n", b"-1\r\n", b"\r\n", b"ffffffffffffffffffff\r\n"]))
        return data[: valid.head_end] + bad + data[valid.head_end :]
    # Bare LF line ends in the head (what "chunk" becomes when the body is not chunked).
    return data[: valid.head_end].replace(b"\r\n", b"\n") + data[valid.head_end :]


@st.composite
def _delivery(draw: st.DrawFn, data: bytes, allow_drip: bool, max_delay: float) -> list[object]:
    """``data`` as send steps: whole, split in a few sends, or (small pieces) dripped."""
    if not data:
        return []
    style = draw(st.sampled_from(["whole", "split", "drip"] if allow_drip else ["whole", "split"]))
    if style == "whole":
        return [data]
    if style == "drip":
        chunk = draw(st.integers(max(1, len(data) // 8), len(data)))
        pieces = -(-len(data) // chunk)
        return [Drip(data, chunk, interval=draw(st.floats(0, max_delay)) / pieces)]
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=3)))
    bounds = [0, *[cut for cut in cuts if cut < len(data)], len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


@st.composite
def _http_responses(
    draw: st.DrawFn,
    kinds: list[Kind],
    versions: list[str],
    max_body: int,
    allow_reset: bool,
    allow_drip: bool,
    max_delay: float,
) -> HTTPResponseScript:
    kind: Kind = draw(st.sampled_from(kinds))
    valid = draw(_valid_responses(versions, max_body))
    ending: list[object] = []
    body: bytes | None = None
    if kind == "valid":
        data, body = valid.data, valid.body
    elif kind == "truncated":
        # Cut where a client must notice: before the end of a framed message, or inside the
        # head of a close-delimited one (its body ends wherever the connection does).
        limit = {"length": len(valid.data), "chunked": valid.last_chunk, "close": valid.head_end}
        data = valid.data[: draw(st.integers(0, limit[valid.framing] - 1))]
        ending = [draw(st.sampled_from([HANGUP, RESET] if allow_reset else [HANGUP]))]
    else:
        data = draw(_malformed(valid))
        if allow_reset and draw(st.booleans()):
            ending = [RESET]
    steps = [ReadUntil(REQUEST_HEAD_END), *draw(_delivery(data, allow_drip, max_delay)), *ending]
    return HTTPResponseScript(tuple(steps), kind, data, valid.status, body)


def http_responses(
    *,
    kinds: Sequence[Kind] = KINDS,
    versions: Sequence[str] = ("HTTP/1.0", "HTTP/1.1"),
    max_body_size: int = 256,
    allow_reset: bool = True,
    allow_drip: bool = True,
    max_delay: float = 0.01,
) -> st.SearchStrategy[HTTPResponseScript]:
    """HTTP/1.x responses to one GET, as :class:`HTTPResponseScript` objects.

    Valid responses frame their body by ``Content-Length``, chunked coding (HTTP/1.1) or the
    end of the connection; 204 and 304 have none. Truncated ones end with ``HANGUP`` or
    (if ``allow_reset``) ``RESET``; malformed ones have a broken status line, header, chunk
    size or bare-LF line ends. The response goes out whole, split over several sends, or (if
    ``allow_drip``) dripped within ``max_delay`` seconds.

    Example::

        import http.client
        from selectserver import CommandServer

        @given(http_responses(kinds=["valid"]))
        def test_http_client_reads_body(response):
            with CommandServer(response.script, verbose=False) as server:
                conn = http.client.HTTPConnection(*server.address, timeout=5)
                conn.request("GET", "/")
                reply = conn.getresponse()
                assert (reply.status, reply.read()) == (response.status, response.body)
                conn.close()
    """
    if isinstance(kinds, str) or not isinstance(kinds, Sequence) or not kinds:
        raise InvalidArgument(f"kinds={kinds!r} must be a non-empty list of {KINDS}")
    for index, kind in enumerate(kinds):
        if kind not in KINDS:
            raise InvalidArgument(f"kinds[{index}]={kind!r} must be one of {KINDS}")
    checked_versions = _check_versions(versions)
    max_body = _check_int("max_body_size", max_body_size, 0)
    _check_flags(allow_reset=allow_reset, allow_drip=allow_drip)
    delay = _check_seconds("max_delay", max_delay)
    return _http_responses(list(kinds), checked_versions, max_body, allow_reset, allow_drip, delay)
