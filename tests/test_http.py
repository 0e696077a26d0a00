"""selectserver.http: ReadRequest framing, parse_request, response(), against real clients."""

from __future__ import annotations

import http.client
import re
import socket
import string
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
import urllib3
from _hypothesis_profiles import SETTINGS
from conftest import connect, read_to_eof
from hypothesis import given
from hypothesis import strategies as st

import selectserver.http
from selectserver import CommandServer, ConnectionRecord, Outcome, Repeat, Reply, ReplyContext
from selectserver.http import Headers, ReadRequest, Request, parse_request, response

GET = b"GET /hello?x=1 HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n"
POST = b"POST /upload HTTP/1.1\r\nHost: example\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"POST /upload HTTP/1.1\r\nHost: example\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n"
)


def serve(*steps: object) -> CommandServer:
    return CommandServer(list(steps), verbose=False, timeout=5.0)


def frames(data: bytes | bytearray) -> int:
    """What a fresh ReadRequest makes of ``data``."""
    return ReadRequest().frame(bytearray(data))


# ---- ReadRequest.frame: framing -----------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        GET,
        POST,
        CHUNKED,
        b"GET / HTTP/1.0\n\n",  # bare LF
        b"GET / HTTP/1.1\nHost: x\r\n\r\n",  # mixed
        b"\r\n\nGET / HTTP/1.1\r\n\r\n",  # empty lines before the request line (RFC 9112 2.2)
        b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\ncontent-length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, CHUNKED\r\n\r\n2\nab\n0\n\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    ],
)
def test_frame_ends_where_the_request_ends(request_bytes: bytes) -> None:
    assert frames(request_bytes) == len(request_bytes)
    assert frames(request_bytes + GET) == len(request_bytes)
    for cut in range(len(request_bytes)):
        assert frames(request_bytes[:cut]) == -1, request_bytes[:cut]


def test_frame_leaves_pipelined_requests_for_the_next_step() -> None:
    step = ReadRequest()
    buffer = bytearray(POST + CHUNKED + GET[:10])
    ends = []
    while (end := step.frame(buffer)) >= 0:
        ends.append(bytes(buffer[:end]))
        del buffer[:end]  # as the step machine does
    assert ends == [POST, CHUNKED]
    assert buffer == GET[:10]
    buffer += GET[10:]
    assert step.frame(buffer) == len(GET)


BAD_REQUESTS = [
    (b"GARBAGE\r\n\r\n", r"bad request line b'GARBAGE' \(expected 'METHOD target HTTP/1.x'\)"),
    (b"GET /\r\n\r\n", "bad request line"),  # HTTP/0.9
    (b"GET  / HTTP/1.1\r\n\r\n", "bad request line"),
    (b"GET / HTTP/2.0\r\n\r\n", "bad request line"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "bad request line"),
    (b"GET /a\x00b HTTP/1.1\r\n\r\n", "bad request line"),
    (b"\x16\x03\x01\x02\x00\x01", "a TLS handshake: is the client using https"),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", r"bad header line b'Host : x' \(expected"),
    (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", "bad header line"),
    (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", "bad header line b' folded'"),
    (b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", "bad header line"),
    (b"GET / HTTP/1.1\r\n\xffoo: bar\r\n\r\n", "bad header line"),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "bad Content-Length '-1'"),
    (b"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n", "bad Content-Length"),
    (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", "bad Content-Length ''"),
    (
        b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",
        "bad Content-Length",
    ),  # a digit, not ASCII
    (b"POST / HTTP/1.1\r\nContent-Length: 1" + b"0" * 30 + b"\r\n\r\n", "bad Content-Length"),
    (
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        r"conflicting Content-Length values \['1', '2'\]",
    ),
    (b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", "conflicting Content-Length"),
    (
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        "both Transfer-Encoding and Content-Length",
    ),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "chunked must be the last coding"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "must be the last"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "last coding, once"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "in an HTTP/1.0 request"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk-size line b'zz'"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "bad chunk-size line"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n", "chunk-size"),
    (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
        r"chunk data not followed by CRLF: b'c\\r\\n'",
    ),
    (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
        "bad header line b'bad trailer'",
    ),
]


@pytest.mark.parametrize(("request_bytes", "reason"), BAD_REQUESTS)
def test_frame_rejects_a_malformed_request(request_bytes: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match="^malformed HTTP request: .*" + reason):
        frames(request_bytes)
    with pytest.raises(ValueError, match=reason):
        parse_request(request_bytes)


@pytest.mark.parametrize("garbage", [b"\x16\x03\x01", b"{json", b"GET / HTTP/1.1 trailing\r\n"])
def test_a_request_line_that_cannot_be_fails_before_the_head_ends(garbage: bytes) -> None:
    with pytest.raises(ValueError, match="bad request line"):
        frames(garbage)


def test_a_head_or_line_longer_than_max_head_is_rejected() -> None:
    step = ReadRequest(max_head=100)
    head = b"GET / HTTP/1.1\r\nX: " + b"y" * 60 + b"\r\n"
    assert step.frame(bytearray(head)) == -1
    with pytest.raises(ValueError, match="no blank line ending the head within 100 bytes"):
        step.frame(bytearray(head + b"Z: " + b"z" * 30))
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(ValueError, match="chunk-size line longer than 100 bytes"):
        step.frame(bytearray(chunked + b"1;" + b"e" * 100))
    with pytest.raises(ValueError, match="trailer line longer than 100 bytes"):
        step.frame(bytearray(chunked + b"0\r\n" + b"T" * 100))
    assert frames(b"GET / HTTP/1.1\r\nX: " + b"y" * 65000 + b"\r\n\r\n") > 0  # the default


@pytest.mark.parametrize("max_head", [15, True, 1.5])
def test_max_head_is_checked(max_head: object) -> None:
    with pytest.raises((TypeError, ValueError), match="ReadRequest: max_head"):
        ReadRequest(max_head=max_head)  # type: ignore[arg-type]


# ---- ReadRequest.frame: resuming, shared instances, linear work ---------------------------


def test_one_instance_frames_many_buffers_at_once() -> None:
    step = ReadRequest()
    first, second = bytearray(), bytearray()
    for a, b in zip(CHUNKED, POST + bytes(len(CHUNKED) - len(POST)), strict=True):
        first.append(a)
        second.append(b)
        assert step.frame(first) == (len(CHUNKED) if first == CHUNKED else -1)
        assert step.frame(second) == (len(POST) if len(second) >= len(POST) else -1)


def test_a_buffer_refilled_with_another_request_is_parsed_afresh() -> None:
    step = ReadRequest()
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    buffer = bytearray(head + b"5\r\nhello\r\n")
    assert step.frame(buffer) == -1  # remembers: the next chunk starts at the end
    buffer[:] = b"GET / HTTP/1.1\r\n\r\n" + bytes(40)  # another head
    assert step.frame(buffer) == 18
    buffer[:] = head + b"1"  # the same head, shorter than the remembered parse
    assert step.frame(buffer) == -1
    buffer += b"\r\nx\r\n0\r\n\r\n"
    assert step.frame(buffer) == len(buffer)


def test_a_chunked_body_arriving_in_pieces_is_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    chunk = selectserver.http._chunk

    def counting(
        buffer: bytes | bytearray, position: int, limit: int
    ) -> tuple[int, int, int] | None:
        nonlocal calls
        calls += 1
        return chunk(buffer, position, limit)

    monkeypatch.setattr(selectserver.http, "_chunk", counting)
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"100\r\n" + bytes(256) + b"\r\n"
    request = head + body * 4096 + b"0\r\n\r\n"  # 1 MiB in 4096 chunks
    step, buffer, pieces = ReadRequest(), bytearray(), 0
    for start in range(0, len(request), 1000):
        buffer += request[start : start + 1000]
        pieces += 1
        end = step.frame(buffer)
    assert end == len(request)
    assert calls <= 4097 + pieces  # each chunk once, plus one unfinished look per piece


def test_a_large_content_length_body_in_64k_pieces_is_cheap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    heads = 0
    find_head = selectserver.http._find_head

    def counting(buffer: bytes | bytearray, limit: int) -> tuple[int, int] | None:
        nonlocal heads
        heads += 1
        return find_head(buffer, limit)

    monkeypatch.setattr(selectserver.http, "_find_head", counting)
    step, buffer = ReadRequest(), bytearray(b"PUT / HTTP/1.1\r\nContent-Length: 50000000\r\n\r\n")
    end, piece = step.frame(buffer), bytes(65536)
    while end < 0:
        buffer += piece
        end = step.frame(buffer)
    assert end == 50_000_000 + 44
    assert heads == 1  # the head is parsed once; each later look compares a length


# ---- Hypothesis: any valid request, cut anywhere ------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
tokens = st.text(TCHARS, min_size=1, max_size=8)
field_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
    | st.just("\t"),
    max_size=12,
).map(lambda value: value.strip(" \t"))
field_names = tokens.filter(
    lambda name: name.lower() not in ("content-length", "transfer-encoding")
)
newlines = st.sampled_from([b"\r\n", b"\n"])
spaces = st.sampled_from(["", " ", "\t", "  "])


@dataclass
class Sample:
    """A valid request's bytes and what parse_request should make of them."""

    raw: bytes
    expected: Request


@st.composite
def field_lines(draw: st.DrawFn, names: st.SearchStrategy[str]) -> tuple[tuple[str, str], bytes]:
    name, value = draw(names), draw(field_values)
    line = f"{name}:{draw(spaces)}{value}{draw(spaces)}".encode("latin-1") + draw(newlines)
    return (name, value), line


@st.composite
def samples(draw: st.DrawFn) -> Sample:
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    version = (
        "HTTP/1.1" if framing == "chunked" else draw(st.sampled_from(["HTTP/1.0", "HTTP/1.1"]))
    )
    method = draw(st.sampled_from(["GET", "POST", "PUT"]) | tokens)
    target = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1))
    raw = b"".join(draw(st.lists(newlines, max_size=2)))
    raw += f"{method} {target} {version}".encode() + draw(newlines)
    fields = draw(st.lists(field_lines(field_names), max_size=4))
    headers = [pair for pair, _ in fields]
    raw += b"".join(line for _, line in fields)
    body, trailers, tail = b"", [], b""
    if framing == "length":
        body = draw(st.binary(max_size=100))
        name = draw(st.sampled_from(["Content-Length", "content-length", "CONTENT-LENGTH"]))
        headers.append((name, str(len(body))))
        raw += f"{name}: {len(body)}".encode() + draw(newlines)
        tail = body
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        raw += b"Transfer-Encoding: chunked" + draw(newlines)
        chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
        body = b"".join(chunks)
        for data in [*chunks, b""]:
            size = draw(st.sampled_from(["%x", "%X", "00%x"])) % len(data)
            extension = draw(st.sampled_from([b"", b";a", b' ;a=b;c="d e"']))
            tail += size.encode() + extension + draw(newlines) + data
            if data:
                tail += draw(newlines)
        trailer_fields = draw(st.lists(field_lines(tokens), max_size=2))
        trailers = [pair for pair, _ in trailer_fields]
        tail += b"".join(line for _, line in trailer_fields) + draw(newlines)
    raw += draw(newlines) + tail
    expected = Request(method, target, version, Headers(headers), body, Headers(trailers))
    return Sample(raw, expected)


@SETTINGS
@given(samples(), st.data())
def test_any_request_frames_to_its_length_however_it_is_cut(
    sample: Sample, data: st.DataObject
) -> None:
    raw = sample.raw
    cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=20)))
    step, buffer = ReadRequest(), bytearray()
    for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        buffer += raw[start:end]
        got = step.frame(buffer)
        assert got == (len(raw) if end == len(raw) else -1)
        assert got == frames(buffer)  # what it remembered changes nothing


@SETTINGS
@given(samples(), samples(), st.binary(max_size=20))
def test_concatenated_requests_frame_one_at_a_time(
    first: Sample, second: Sample, junk: bytes
) -> None:
    step = ReadRequest()
    buffer = bytearray(first.raw + second.raw + junk)
    assert step.frame(buffer) == len(first.raw)
    del buffer[: len(first.raw)]
    assert step.frame(buffer) == len(second.raw)


@SETTINGS
@given(samples())
def test_parse_request_reads_back_any_request(sample: Sample) -> None:
    assert parse_request(sample.raw) == sample.expected


# ---- parse_request and Headers ------------------------------------------------------------


def test_parse_request() -> None:
    request = parse_request(CHUNKED)
    assert (request.method, request.target, request.version) == ("POST", "/upload", "HTTP/1.1")
    assert request.headers["host"] == "example"
    assert request.body == b"hello world"
    assert request.trailers["x-checksum"] == "42"
    assert parse_request(POST).body == b"hello"
    assert parse_request(bytearray(GET)).headers.get("Accept") == "*/*"  # bytes-like works
    assert parse_request(GET).trailers == Headers()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "incomplete head"),
        (GET[:-2], "incomplete head"),
        (POST[:-1], r"incomplete body \(4 bytes of it arrived\)"),
        (CHUNKED[:-2], "incomplete body"),
        (POST + b"GET", r"3 bytes after the request: b'GET'"),
    ],
)
def test_parse_request_wants_exactly_one_whole_request(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_request(data)


def test_headers_is_a_case_insensitive_multi_mapping() -> None:
    headers = parse_request(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Tag: one\r\nx-tag:  two \r\n\r\n"
    ).headers
    assert headers["HOST"] == headers["host"] == "a"
    assert headers["x-tag"] == "one"  # the first
    assert headers.get_all("X-TAG") == ["one", "two"]
    assert headers.get_all("missing") == []
    assert headers.get("missing") is None
    assert headers.get("missing", "") == ""
    assert "x-TAG" in headers
    assert "missing" not in headers
    assert 1 not in headers
    assert list(headers) == [("Host", "a"), ("X-Tag", "one"), ("x-tag", "two")]
    assert len(headers) == 3
    assert dict(headers) == {"Host": "a", "X-Tag": "one", "x-tag": "two"}
    assert headers == Headers([("Host", "a"), ("X-Tag", "one"), ("x-tag", "two")])
    assert headers != Headers({"Host": "a"})
    assert hash(Headers({"a": "b"})) == hash(Headers([("a", "b")]))
    assert repr(Headers({"a": "b"})) == "Headers([('a', 'b')])"
    with pytest.raises(KeyError):
        headers["missing"]


# ---- response() ---------------------------------------------------------------------------


def test_response_bytes() -> None:
    assert response() == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert response(404, "é", {"X-A": "1"}, close=True) == (
        b"HTTP/1.1 404 Not Found\r\nX-A: 1\r\nContent-Length: 2\r\nConnection: close\r\n"
        b"\r\n\xc3\xa9"
    )
    assert response(body=b"hello", chunked=True) == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert response(chunked=True).endswith(b"\r\n\r\n0\r\n\r\n")
    assert response(599, version="HTTP/1.0") == b"HTTP/1.0 599 \r\nContent-Length: 0\r\n\r\n"
    assert response(200, reason="Fine").startswith(b"HTTP/1.1 200 Fine\r\n")


@pytest.mark.parametrize("status", [100, 101, 204, 304])
def test_response_without_a_body_has_no_content_length(status: int) -> None:
    assert b"Content-Length" not in response(status)
    with pytest.raises(ValueError, match=f"a {status} response has no body"):
        response(status, "body")


def test_response_respects_framing_headers_given() -> None:
    # A wrong length on purpose stays wrong: a truncated response for the client under test.
    assert response(body="short", headers=[("content-length", "100")]) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort"
    )
    raw = b"3\r\nabc\r\n0\r\n\r\n"
    assert response(body=raw, headers={"Transfer-Encoding": "chunked"}).endswith(
        b"Transfer-Encoding: chunked\r\n\r\n" + raw
    )
    framed = response(body="abc", headers={"Transfer-Encoding": "gzip, chunked"}, chunked=True)
    assert framed.count(b"Transfer-Encoding") == 1
    assert response(headers={"Connection": "keep-alive"}, close=True).count(b"Connection") == 1


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"status": 99}, "status must be an int in 100..999"),
        ({"status": True}, "status must be"),
        ({"chunked": True, "version": "HTTP/1.0"}, "chunked coding needs HTTP/1.1"),
        ({"headers": {"X": "a\r\nInjected: 1"}}, "contains CR, LF or NUL"),
        ({"headers": {"Bad Name": "a"}}, "header name 'Bad Name' is not a token"),
        ({"headers": {"X": "\u2603"}}, "is not Latin-1 text"),
        ({"reason": "OK\r\n"}, "status line"),
    ],
)
def test_response_refuses_what_would_break_framing(kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        response(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("close", [False, True])
def test_http_client_reads_response(chunked: bool, close: bool) -> None:
    body = "héllo " * 1000
    answer = response(201, body, [("X-Tag", "a"), ("X-Tag", "b")], chunked=chunked, close=close)
    with serve(ReadRequest(), answer) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
        try:
            conn.request("GET", "/")
            reply = conn.getresponse()
            assert (reply.status, reply.reason) == (201, "Created")
            assert reply.headers.get_all("X-Tag") == ["a", "b"]
            assert reply.chunked is chunked
            assert reply.will_close is close
            assert reply.read().decode() == body
        finally:
            conn.close()
        server.wait_for_connections(1)
    server.check()


# ---- real clients against [ReadRequest(), response(...)] ----------------------------------


def only_record(server: CommandServer) -> ConnectionRecord:
    (record,) = server.wait_for_connections(1)
    server.check()
    return record


def test_requests_get() -> None:
    with serve(ReadRequest(), response(body="hello")) as server:
        reply = requests.get(server.url + "/path?q=1", headers={"X-Test": "yes"}, timeout=5)
        record = only_record(server)
    assert reply.text == "hello"
    assert record.outcome is Outcome.COMPLETED
    (request_bytes,) = record.received
    request = parse_request(request_bytes)
    assert (request.method, request.target) == ("GET", "/path?q=1")
    assert request.headers["x-test"] == "yes"
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert request.body == b""


def test_post_with_content_length() -> None:
    with serve(ReadRequest(), response(body="ok")) as server:
        assert requests.post(server.url, data=b"x" * 100_000, timeout=5).text == "ok"
        record = only_record(server)
    request = parse_request(record.received[0])
    assert request.headers["content-length"] == "100000"
    assert request.body == b"x" * 100_000


def test_http_client_post() -> None:
    with serve(ReadRequest(), response(body="ok")) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
        conn.request("PUT", "/item", body=b"payload", headers={"Content-Type": "text/plain"})
        assert conn.getresponse().read() == b"ok"
        conn.close()
        record = only_record(server)
    request = parse_request(record.received[0])
    assert (request.method, request.body) == ("PUT", b"payload")
    assert request.headers["content-type"] == "text/plain"


def pieces() -> Iterator[bytes]:
    yield b"hello"
    yield b" "
    yield b"world" * 1000


def test_requests_chunked_upload() -> None:
    with serve(ReadRequest(), response(body="ok")) as server:
        assert requests.post(server.url, data=pieces(), timeout=5).text == "ok"
        record = only_record(server)
    (request_bytes,) = record.received
    assert request_bytes.endswith(b"0\r\n\r\n")
    request = parse_request(request_bytes)
    assert request.headers["transfer-encoding"] == "chunked"
    assert request.body == b"".join(pieces())


def test_urllib3_chunked_upload() -> None:
    with serve(ReadRequest(), response(body="ok")) as server, urllib3.PoolManager() as pool:
        reply = pool.request("POST", server.url, body=pieces(), chunked=True)
        assert reply.data == b"ok"
        record = only_record(server)
    assert parse_request(record.received[0]).body == b"".join(pieces())


def test_http_client_chunked_upload_with_trailer_free_body() -> None:
    with serve(ReadRequest(), response(body="ok")) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
        conn.request("POST", "/", body=pieces(), encode_chunked=True)
        assert conn.getresponse().read() == b"ok"
        conn.close()
        record = only_record(server)
    assert parse_request(record.received[0]).body == b"".join(pieces())


def test_a_large_upload() -> None:
    body = bytes(50_000_000)
    with serve(ReadRequest(), response(body="ok")) as server:
        assert requests.put(server.url, data=body, timeout=30).text == "ok"
        record = only_record(server)
    assert len(record.received[0]) == len(body) + record.received[0].index(b"\r\n\r\n") + 4


def test_pipelined_requests_in_one_send_are_two_entries() -> None:
    script = [ReadRequest(), response(body="one"), ReadRequest(), response(body="two")]
    with serve(*script) as server:
        with connect(server.address) as client:
            client.sendall(CHUNKED + GET)
            assert read_to_eof(client) == response(body="one") + response(body="two")
        record = only_record(server)
    assert record.received == [CHUNKED, GET]
    assert server.received == [CHUNKED, GET]


# ---- malformed requests fail the connection, and check() says why --------------------------


@pytest.mark.parametrize(("request_bytes", "reason"), BAD_REQUESTS[::4])
def test_a_malformed_request_fails_the_connection(request_bytes: bytes, reason: str) -> None:
    with serve(ReadRequest(), response(body="never sent")) as server:
        with connect(server.address) as client:
            client.sendall(request_bytes)
            try:
                assert read_to_eof(client) == b""
            except ConnectionResetError:
                pass
        (record,) = server.wait_for_connections(1)
    assert record.outcome is Outcome.ERROR
    assert record.received == [request_bytes]
    with pytest.raises(AssertionError) as info:
        server.check()
    message = str(info.value)
    assert "step 0 (ReadRequest(max_head=65536)): malformed HTTP request: " in message
    assert re.search(reason, message), message


def test_https_against_a_plain_server_is_named() -> None:
    with serve(ReadRequest(), response()) as server:
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"https://{server.host}:{server.port}/", timeout=5)
        server.wait_for_connections(1)
    with pytest.raises(AssertionError, match="a TLS handshake: is the client using https"):
        server.check()


# ---- keep-alive, with Repeat and Reply --------------------------------------------------------


def echo(ctx: ReplyContext) -> bytes:
    request = parse_request(ctx.last)
    return response(body=request.body, headers={"X-Target": request.target})


def test_keep_alive_echo_server() -> None:
    with serve(Repeat([ReadRequest(), Reply(echo)])) as server, requests.Session() as session:
        for n in range(5):
            # No variable keeps a Response: the last one would hold the socket open after
            # session.close(), and the server would wait for its close until it timed out.
            assert (
                session.post(f"{server.url}/{n}", data=f"body {n}", timeout=5).text == f"body {n}"
            )
        session.close()
        record = only_record(server)
    assert len(server.connections) == 1
    assert record.outcome is Outcome.COMPLETED
    assert [parse_request(r).target for r in record.received] == [f"/{n}" for n in range(5)]


def test_keep_alive_serves_pipelined_requests_in_order() -> None:
    with serve(Repeat([ReadRequest(), Reply(echo)])) as server:
        with connect(server.address) as client:
            client.sendall(POST + CHUNKED + GET)
            client.shutdown(socket.SHUT_WR)
            replies = read_to_eof(client)
        record = only_record(server)
    assert replies == b"".join(
        response(body=body, headers={"X-Target": target})
        for body, target in [
            (b"hello", "/upload"),
            (b"hello world", "/upload"),
            (b"", "/hello?x=1"),
        ]
    )
    assert record.received == [POST, CHUNKED, GET]
    assert record.outcome is Outcome.COMPLETED


def test_a_malformed_request_ends_a_keep_alive_connection() -> None:
    with serve(Repeat([ReadRequest(), Reply(echo)])) as server:
        with connect(server.address) as client:
            client.sendall(GET + b"GET / HTTP/1.1\r\nHost : x\r\n\r\n")
            assert read_to_eof(client) == response(headers={"X-Target": "/hello?x=1"})
        (record,) = server.wait_for_connections(1)
    assert record.outcome is Outcome.ERROR
    with pytest.raises(
        AssertionError, match=r"step \S+ \(ReadRequest.*bad header line b'Host : x'"
    ):
        server.check()
