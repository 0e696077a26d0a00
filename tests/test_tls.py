"""TLS fake servers with real clients: HTTPS, SMTPS, STARTTLS, bad certificates, broken handshakes.

Every test talks to a real server over loopback through a real TLS stack: requests, urllib3,
http.client, asyncio, smtplib, or a bare ``ssl.SSLSocket`` where the test is about what the
socket sees (close_notify, truncation, record boundaries).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import random
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import pytest
import requests
import trustme
import urllib3
from conftest import CLIENT_TIMEOUT, HTTP_OK, exchange, read_to_eof

import selectserver
from selectserver import (
    HALF_CLOSE,
    HANGUP,
    RECEIVE,
    RESET,
    TRUNCATE,
    AsyncioCommandServer,
    Command,
    CommandServer,
    ConnectionRecord,
    Drip,
    OneShotServer,
    Outcome,
    ReadUntil,
    StartTLS,
)

HTTP_SCRIPT: list[object] = [ReadUntil(b"\r\n\r\n"), HTTP_OK]
MiB = 1024 * 1024
BadCertificate = Literal["expired", "wrong-host"]
Failure = Literal["hangup", "reset", "garbage"]


@contextmanager
def tls_client(
    srv: CommandServer, *, context: ssl.SSLContext | None = None, ragged_eofs_ok: bool = True
) -> Iterator[ssl.SSLSocket]:
    """A blocking TLS client of ``srv`` (as ``localhost``), handshake done, closed on exit."""
    context = srv.client_ssl_context() if context is None else context
    with (
        socket.create_connection(srv.address, timeout=CLIENT_TIMEOUT) as raw,
        context.wrap_socket(
            raw, server_hostname="localhost", suppress_ragged_eofs=ragged_eofs_ok
        ) as sock,
    ):
        yield sock


def only_record(srv: CommandServer) -> ConnectionRecord:
    """The server's one connection, once it has ended."""
    (record,) = srv.wait_for_connections(1)
    assert len(srv.connections) == 1
    return record


# ---- real HTTPS clients --------------------------------------------------------------------------


def _get_requests(srv: CommandServer) -> bytes:
    return requests.get(srv.url, verify=srv.ca_path, timeout=CLIENT_TIMEOUT).content


def _get_urllib3(srv: CommandServer) -> bytes:
    with urllib3.PoolManager(ca_certs=srv.ca_path, retries=False, timeout=CLIENT_TIMEOUT) as pool:
        return pool.request("GET", srv.url).data


def _get_http_client(srv: CommandServer) -> bytes:
    conn = http.client.HTTPSConnection(
        "localhost", srv.port, context=srv.client_ssl_context(), timeout=CLIENT_TIMEOUT
    )
    try:
        conn.request("GET", "/")
        return conn.getresponse().read()
    finally:
        conn.close()


async def _asyncio_get(srv: CommandServer) -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("localhost", srv.port, ssl=srv.client_ssl_context()),
        CLIENT_TIMEOUT,
    )
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()
    return response.partition(b"\r\n\r\n")[2]


def _get_asyncio(srv: CommandServer) -> bytes:
    return asyncio.run(_asyncio_get(srv))


@dataclass(frozen=True)
class HttpsClient:
    """A real HTTPS client: how it fetches a body, and what it raises for a bad certificate."""

    name: str
    get: Callable[[CommandServer], bytes]
    verify_error: type[BaseException]


CLIENTS = [
    HttpsClient("requests", _get_requests, requests.exceptions.SSLError),
    HttpsClient("urllib3", _get_urllib3, urllib3.exceptions.SSLError),
    HttpsClient("http.client", _get_http_client, ssl.SSLCertVerificationError),
    HttpsClient("asyncio", _get_asyncio, ssl.SSLCertVerificationError),
]


@pytest.mark.parametrize("client", CLIENTS, ids=lambda client: client.name)
def test_https_with_verification(client: HttpsClient) -> None:
    with CommandServer(HTTP_SCRIPT, tls=True, verbose=False) as srv:
        assert srv.url == f"https://127.0.0.1:{srv.port}"
        assert srv.ca_path is not None
        assert os.path.isfile(srv.ca_path)
        assert client.get(srv) == b"hello"
        record = only_record(srv)
    assert record.outcome is Outcome.COMPLETED
    assert record.tls
    assert record.received[0].startswith(b"GET / HTTP/1.")  # the plaintext inside the session
    assert record.sent == HTTP_OK


@pytest.mark.parametrize(
    ("certificate", "reason"),
    [("expired", "certificate has expired"), ("wrong-host", "mismatch")],
)
@pytest.mark.parametrize("client", CLIENTS, ids=lambda client: client.name)
def test_bad_certificate_fails_verification(
    client: HttpsClient, certificate: BadCertificate, reason: str
) -> None:
    with CommandServer(HTTP_SCRIPT, tls=certificate, verbose=False) as srv:
        with pytest.raises(client.verify_error, match=reason):
            client.get(srv)
        record = only_record(srv)
    assert record.outcome is Outcome.TLS_FAILED
    assert record.detail is not None
    assert record.detail.startswith("TLS failed")
    assert not record.tls
    assert record.received == []
    assert record.failure is None  # the client refusing us is what the test wanted


@pytest.mark.parametrize(
    ("certificate", "verify_code"),
    [("expired", 10), ("wrong-host", 62)],  # X509_V_ERR_CERT_HAS_EXPIRED, _HOSTNAME_MISMATCH
)
def test_bad_certificate_verify_code(certificate: BadCertificate, verify_code: int) -> None:
    with CommandServer(HTTP_SCRIPT, tls=certificate, verbose=False) as srv:
        with pytest.raises(ssl.SSLCertVerificationError) as info, tls_client(srv):
            pass
        assert info.value.verify_code == verify_code
        assert only_record(srv).outcome is Outcome.TLS_FAILED


@pytest.mark.parametrize("certificate", ["expired", "wrong-host"])
def test_bad_certificate_is_accepted_without_verification(certificate: BadCertificate) -> None:
    """Only verification fails: the certificate and the session are otherwise sound."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with CommandServer([RECEIVE, "sound"], tls=certificate, verbose=False) as srv:
        with tls_client(srv, context=context) as sock:
            sock.sendall(b"x")
            assert read_to_eof(sock) == b"sound"
        assert only_record(srv).outcome is Outcome.COMPLETED


def test_one_shot_server_with_tls() -> None:
    with OneShotServer(HTTP_SCRIPT, tls=True, verbose=False) as srv:
        assert _get_requests(srv) == b"hello"
        assert only_record(srv).tls


def test_plaintext_client_on_a_tls_server() -> None:
    """A client speaking plain HTTP to a TLS port is refused, and the record says why."""
    with CommandServer(HTTP_SCRIPT, tls=True, verbose=False) as srv:
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(srv.url.replace("https://", "http://"), timeout=CLIENT_TIMEOUT)
        record = only_record(srv)
    assert record.outcome is Outcome.TLS_FAILED
    assert record.detail is not None
    assert "HTTP_REQUEST" in record.detail


def test_silent_client_times_out_in_the_handshake() -> None:
    with (
        CommandServer(HTTP_SCRIPT, tls=True, verbose=False, timeout=0.2) as srv,
        socket.create_connection(srv.address, timeout=CLIENT_TIMEOUT) as sock,
    ):
        record = only_record(srv)
        assert sock.recv(1) == b""  # the server closed on us
    assert record.outcome is Outcome.TIMED_OUT
    assert record.failure is not None
    assert "StartTLS" in record.failure
    assert "handshake" in record.failure
    with pytest.raises(AssertionError, match="handshake"):
        srv.check()


# ---- SMTP: implicit TLS, and STARTTLS in the middle of a script ----------------------------------

#: greeting, EHLO, STARTTLS: the plaintext part of an SMTP session that upgrades to TLS
SMTP_STARTTLS: list[object] = [
    "220 fake ESMTP\r\n",
    ReadUntil(b"\r\n"),
    "250-fake\r\n250 STARTTLS\r\n",
    ReadUntil(b"\r\n"),
    "220 go ahead\r\n",
]
SMTP_EHLO_QUIT: list[object] = [ReadUntil(b"\r\n"), "250 ok\r\n", ReadUntil(b"\r\n"), "221 bye\r\n"]
EHLO = b"ehlo client.test\r\n"


def test_smtp_ssl() -> None:
    with CommandServer(["220 fake ESMTP\r\n", *SMTP_EHLO_QUIT], tls=True, verbose=False) as srv:
        smtp = smtplib.SMTP_SSL(
            "localhost",
            srv.port,
            local_hostname="client.test",
            context=srv.client_ssl_context(),
            timeout=CLIENT_TIMEOUT,
        )
        try:
            assert smtp.ehlo()[0] == 250
        finally:
            smtp.quit()
        record = only_record(srv)
    assert record.received == [EHLO, b"quit\r\n"]
    assert record.outcome is Outcome.COMPLETED
    assert record.tls


def test_smtp_starttls_mid_script() -> None:
    with CommandServer(
        [*SMTP_STARTTLS, StartTLS(), *SMTP_EHLO_QUIT], tls=True, verbose=False
    ) as srv:
        smtp = smtplib.SMTP(
            "localhost", srv.port, local_hostname="client.test", timeout=CLIENT_TIMEOUT
        )
        try:
            smtp.ehlo()
            assert smtp.has_extn("starttls")
            assert smtp.starttls(context=srv.client_ssl_context())[0] == 220
            assert isinstance(smtp.sock, ssl.SSLSocket)
            assert smtp.ehlo()[0] == 250
        finally:
            smtp.quit()
        record = only_record(srv)
    assert record.received == [EHLO, b"STARTTLS\r\n", EHLO, b"quit\r\n"]
    assert record.outcome is Outcome.COMPLETED
    assert record.tls


# ---- a handshake broken on purpose ---------------------------------------------------------------


def _handshake_raw(srv: CommandServer) -> None:
    with tls_client(srv):
        pass


def _handshake_requests(srv: CommandServer) -> None:
    _get_requests(srv)


def _handshake_smtp(srv: CommandServer) -> None:
    smtp = smtplib.SMTP("localhost", srv.port, local_hostname="client.test", timeout=CLIENT_TIMEOUT)
    try:
        smtp.ehlo()
        smtp.starttls(context=srv.client_ssl_context())
    finally:
        smtp.close()


#: How a broken server's handshake looks to a bare ssl socket (and smtplib, which is one).
SOCKET_ERRORS: dict[str, type[BaseException]] = {
    "hangup": ssl.SSLEOFError,  # EOF occurred in violation of protocol
    "reset": ConnectionResetError,
    "garbage": ssl.SSLError,  # WRONG_VERSION_NUMBER or similar: not a TLS record
}
REQUESTS_ERRORS: dict[str, type[BaseException]] = {
    "hangup": requests.exceptions.SSLError,
    "reset": requests.exceptions.ConnectionError,
    "garbage": requests.exceptions.SSLError,
}
BROKEN_OUTCOMES = {"hangup": Outcome.HUNG_UP, "reset": Outcome.RESET, "garbage": Outcome.HUNG_UP}


@dataclass(frozen=True)
class HandshakeClient:
    """A client whose TLS handshake the server breaks after ``before`` plaintext steps."""

    name: str
    before: list[object]
    run: Callable[[CommandServer], None]
    errors: dict[str, type[BaseException]]


HANDSHAKE_CLIENTS = [
    HandshakeClient("ssl-socket", [], _handshake_raw, SOCKET_ERRORS),
    HandshakeClient("requests", [], _handshake_requests, REQUESTS_ERRORS),
    HandshakeClient("smtp-starttls", SMTP_STARTTLS, _handshake_smtp, SOCKET_ERRORS),
]


@pytest.mark.parametrize("fail", ["hangup", "reset", "garbage"])
@pytest.mark.parametrize("client", HANDSHAKE_CLIENTS, ids=lambda client: client.name)
def test_broken_handshake(client: HandshakeClient, fail: Failure) -> None:
    script = [*client.before, StartTLS(fail=fail)]
    with CommandServer(script, tls=True, verbose=False) as srv:
        with pytest.raises(client.errors[fail]) as info:
            client.run(srv)
        record = only_record(srv)
    if fail == "garbage":  # a protocol error, not an EOF or a certificate problem
        assert not isinstance(info.value, (ssl.SSLEOFError, ssl.SSLCertVerificationError))
    assert record.outcome is BROKEN_OUTCOMES[fail]
    assert record.received[-1][:1] == b"\x16"  # the server read the ClientHello (a handshake)
    assert not record.tls


# ---- how a TLS connection ends -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "outcome"), [(HANGUP, Outcome.HUNG_UP), (TRUNCATE, Outcome.TRUNCATED)]
)
def test_hangup_sends_close_notify_and_truncate_does_not(step: Command, outcome: Outcome) -> None:
    with CommandServer([RECEIVE, "partial", step], tls=True, verbose=False) as srv:
        with tls_client(srv, ragged_eofs_ok=False) as sock:
            sock.sendall(b"x")
            received = bytearray()
            if step is TRUNCATE:
                with pytest.raises(ssl.SSLEOFError):  # noqa: PT012 - the EOF comes after data
                    while chunk := sock.recv(100):
                        received += chunk
            else:
                received += read_to_eof(sock)  # a clean EOF: close_notify came first
        assert received == b"partial"
        assert only_record(srv).outcome is outcome


async def _asyncio_read_after(srv: CommandServer, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(
        "localhost", srv.port, ssl=srv.client_ssl_context()
    )
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionResetError:
            pass  # the reset we are testing, reported again


def test_reset_under_tls() -> None:
    """RESET aborts without close_notify: the client's transport sees the RST.

    asyncio reads the socket itself and sees ``ConnectionResetError``. (A blocking
    ``ssl.SSLSocket`` on CPython before gh-115627 reports it as ``SSLEOFError``, as it reports
    every failed ``SSL_read_ex``, so it cannot tell RESET from TRUNCATE.)
    """
    with CommandServer([RECEIVE, RESET], tls=True, verbose=False) as srv:
        with pytest.raises(ConnectionResetError):
            asyncio.run(_asyncio_read_after(srv, b"x"))
        record = only_record(srv)
    assert record.outcome is Outcome.RESET
    assert record.received == [b"x"]
    assert record.tls


def test_half_close_under_tls() -> None:
    with (
        CommandServer(["hi", HALF_CLOSE, 3, 2], tls=True, verbose=False) as srv,
        tls_client(srv, ragged_eofs_ok=False) as sock,
    ):
        assert read_to_eof(sock) == b"hi"  # close_notify, then FIN: a clean EOF
        sock.sendall(b"abc")
        sock.sendall(b"de")
        record = only_record(srv)
    assert record.received == [b"abc", b"de"]
    assert record.half_closed
    assert record.outcome is Outcome.COMPLETED


def test_asyncio_server_reads_tls_plaintext() -> None:
    async def main() -> bytes:
        srv = AsyncioCommandServer([5, "world"], tls=True, verbose=False)
        with srv:
            assert await _asyncio_read_after(srv, b"hello") == b"world"
            return await asyncio.wait_for(srv.reader.read(), CLIENT_TIMEOUT)

    assert asyncio.run(main()) == b"hello"


# ---- payloads: drip, large, pipelined ------------------------------------------------------------


def test_drip_over_tls_sends_one_record_per_chunk() -> None:
    with CommandServer(
        [RECEIVE, Drip(b"abcdef", chunk=2, interval=0.01)], tls=True, verbose=False
    ) as srv:
        with tls_client(srv) as sock:
            sock.sendall(b"go")
            chunks = [sock.recv(100) for _ in range(4)]  # a TLS read returns one record
        assert chunks == [b"ab", b"cd", b"ef", b""]
        assert only_record(srv).outcome is Outcome.COMPLETED


PAYLOAD = random.Random(6).randbytes(8 * MiB)


def test_large_download_over_tls() -> None:
    with CommandServer([RECEIVE, PAYLOAD], tls=True, verbose=False) as srv:
        with tls_client(srv) as sock:
            sock.sendall(b"go")
            assert read_to_eof(sock) == PAYLOAD
        record = only_record(srv)
    assert record.outcome is Outcome.COMPLETED
    assert record.bytes_sent == len(PAYLOAD)


def test_large_upload_over_tls() -> None:
    with CommandServer([len(PAYLOAD), "ok"], tls=True, verbose=False) as srv:
        with tls_client(srv) as sock:
            sock.sendall(PAYLOAD)
            assert read_to_eof(sock) == b"ok"
        record = only_record(srv)
    assert b"".join(record.received) == PAYLOAD
    assert record.outcome is Outcome.COMPLETED


def test_pipelined_read_until_over_tls() -> None:
    """Requests sent in one write, one spanning several TLS records, are split as TCP's are."""
    requests_ = [b"GET /a\r\n\r\n", b"POST /b\r\n" + b"x" * 40000 + b"\r\n\r\n", b"GET /c\r\n\r\n"]
    script: list[object] = []
    for index in range(len(requests_)):
        script += [ReadUntil(b"\r\n\r\n"), str(index)]
    with CommandServer(script, tls=True, verbose=False) as srv:
        with tls_client(srv) as sock:
            sock.sendall(b"".join(requests_))
            assert read_to_eof(sock) == b"012"
        record = only_record(srv)
    assert record.received == requests_
    assert record.outcome is Outcome.COMPLETED


# ---- one reactor thread --------------------------------------------------------------------------


def test_tls_server_and_200_plain_servers_share_the_reactor_thread() -> None:
    before = threading.active_count()
    with CommandServer([RECEIVE, "secure"], tls=True, verbose=False) as tls_srv:
        plain = [CommandServer([RECEIVE, f"plain {i}"], verbose=False) for i in range(200)]
        try:
            with tls_client(tls_srv) as sock:
                sock.sendall(b"x")
                assert read_to_eof(sock) == b"secure"
            for i, srv in enumerate(plain):
                assert exchange(srv.address, b"x") == f"plain {i}".encode()
            assert threading.active_count() <= before + 1
            # every server has served a connection, so the reactor has taken each one on
            stats = selectserver.statistics()
            assert stats.running
            assert stats.servers >= 201
        finally:
            for srv in plain:
                srv.close()
        assert only_record(tls_srv).tls


# ---- configuration errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"commands": [], "tls": 5}, TypeError, "tls must be True"),
        ({"commands": [], "tls": b"valid"}, TypeError, "tls must be True"),
        ({"commands": [], "tls": "bogus"}, ValueError, "'bogus'"),
        (
            {"commands": [RECEIVE, StartTLS()]},
            ValueError,
            r"script\[1\] = StartTLS\(fail=None\): StartTLS needs a server made with tls=",
        ),
        (
            {"commands": [StartTLS(), RECEIVE, StartTLS()], "tls": True},
            ValueError,
            r"script\[2\] = StartTLS.*already started",
        ),
        (
            {"scripts": [[RECEIVE], [StartTLS(fail="reset")]]},
            ValueError,
            r"scripts\[1\]\[0\] = StartTLS\(fail='reset'\)",
        ),
    ],
    ids=["int", "bytes", "unknown-name", "without-tls", "second-starttls", "scripts"],
)
def test_bad_tls_configuration(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        CommandServer(verbose=False, **kwargs)  # type: ignore[arg-type]


def test_bad_starttls_failure_mode() -> None:
    with pytest.raises(ValueError, match="fail must be"):
        StartTLS(fail="bogus")  # type: ignore[arg-type]


def test_plain_server_has_no_tls_material() -> None:
    with CommandServer([], verbose=False) as srv:
        assert srv.ca_path is None
        assert srv.url.startswith("http://")
        with pytest.raises(ValueError, match="tls=True"):
            srv.client_ssl_context()


def test_user_supplied_ssl_context() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with CommandServer([RECEIVE, "mine"], tls=server_context, verbose=False) as srv:
        assert srv.ca_path is None
        assert srv.url.startswith("https://")
        with pytest.raises(ValueError, match="SSLContext you supplied"):
            srv.client_ssl_context()
        with tls_client(srv, context=client_context) as sock:
            sock.sendall(b"x")
            assert read_to_eof(sock) == b"mine"
        # selectserver's own CA did not sign this certificate
        own_ca = ssl.create_default_context(cafile=own_ca_path())
        with pytest.raises(ssl.SSLCertVerificationError), tls_client(srv, context=own_ca):
            pass
        assert [r.outcome for r in srv.wait_for_connections(2)] == [
            Outcome.COMPLETED,
            Outcome.TLS_FAILED,
        ]


def own_ca_path() -> str:
    """The path of selectserver's own CA (the one ``tls=True`` servers use)."""
    with CommandServer([], tls=True, verbose=False) as srv:
        assert srv.ca_path is not None
        return srv.ca_path


# ---- the optional trustme extra ------------------------------------------------------------------


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its stdout (fails the test if it fails)."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


PLAIN_EXCHANGE = """
import socket, sys
import selectserver
with selectserver.CommandServer([selectserver.RECEIVE, "pong"], verbose=False) as srv:
    with socket.create_connection(srv.address, timeout=5) as sock:
        sock.sendall(b"ping")
        assert sock.recv(10) == b"pong"
"""


def test_plain_use_never_imports_trustme() -> None:
    run_python(PLAIN_EXCHANGE + "assert 'trustme' not in sys.modules, 'trustme imported'\n")


def test_missing_trustme_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['trustme'] = None\n"
        + PLAIN_EXCHANGE
        + (
            "try:\n"
            "    selectserver.CommandServer([], tls=True, verbose=False)\n"
            "except ImportError as exc:\n"
            "    print(exc)\n"
            "else:\n"
            "    raise SystemExit('tls=True worked without trustme')\n"
        )
    )
    assert "selectserver[tls]" in run_python(code)


def test_ca_file_is_removed_at_exit() -> None:
    path = run_python(
        "import selectserver\n"
        "with selectserver.CommandServer([], tls=True, verbose=False) as srv:\n"
        "    print(srv.ca_path)\n"
    ).strip()
    assert path.endswith(".pem")
    assert not os.path.exists(path)
