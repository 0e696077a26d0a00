"""The sans-I/O TLS layer alone: a server ``TLSLayer`` against a client ``ssl.SSLObject``.

No socket: the test moves ciphertext between the two sides' memory buffers by hand, so each
test decides exactly what the layer has received when it is asked to read.
"""

from __future__ import annotations

import random
import ssl

import pytest
import trustme

from selectserver._tlslayer import READ_SIZE, TLSLayer


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    return context


class Pair:
    """A server layer and a client SSLObject, with the wire between them in the test's hands."""

    def __init__(self, server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> None:
        self.layer = TLSLayer(server_context)
        self.incoming = ssl.MemoryBIO()  # the client's side of the wire
        self.outgoing = ssl.MemoryBIO()
        self.client = client_context.wrap_bio(
            self.incoming, self.outgoing, server_hostname="localhost"
        )

    def to_server(self) -> bytes:
        """Move what the client wrote to the layer; returns it."""
        data = self.outgoing.read()
        if data:
            self.layer.receive(data)
        return data

    def to_client(self) -> bytes:
        """Move what the layer wrote to the client; returns it."""
        data = self.layer.outgoing()
        if data:
            self.incoming.write(data)
        return data

    def client_step(self) -> bool:
        """Advance the client's handshake; True once it is done."""
        try:
            self.client.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def handshake(self) -> None:
        """Run both handshakes to their end, and deliver the session tickets."""
        for _ in range(10):
            client_done = self.client_step()
            self.to_server()
            server_done = self.layer.handshake()
            self.to_client()
            if client_done and server_done:
                break
        else:
            raise AssertionError("the handshake did not finish")
        assert self.client_read() == b""  # the client takes the session tickets

    def client_read(self) -> bytes:
        """What plaintext the client has (b"" if none yet)."""
        chunks = []
        while True:
            try:
                chunk = self.client.read(65536)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def client_close_notify(self) -> None:
        """The client sends close_notify."""
        try:
            self.client.unwrap()
        except ssl.SSLWantReadError:
            pass  # the layer's close_notify has not arrived: ours is written anyway

    def read_all(self) -> bytes:
        """Everything the layer can read now (it must not be at the end)."""
        chunks = []
        while (chunk := self.layer.read()) is not None:
            assert chunk, "the end of the peer's data came too soon"
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def pair(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> Pair:
    return Pair(server_context, client_context)


@pytest.fixture
def connected(pair: Pair) -> Pair:
    pair.handshake()
    return pair


# ---- the handshake ----------------------------------------------------------------------------


def test_the_handshake_completes(pair: Pair) -> None:
    assert pair.layer.handshake() is False, "no ClientHello yet"
    assert pair.layer.outgoing() == b""
    version_before = pair.layer.version
    assert version_before is None
    assert not pair.client_step()
    hello = pair.to_server()
    assert hello[:1] == b"\x16", "a handshake record"
    assert pair.layer.handshake() is False, "TLS 1.3: the client's Finished is still to come"
    assert pair.to_client(), "ServerHello .. Finished"
    assert pair.client_step()
    pair.to_server()
    assert pair.layer.handshake() is True
    assert pair.layer.handshake() is True, "done stays done"
    assert pair.layer.version == pair.client.version() == "TLSv1.3"
    assert pair.layer.peer_certificate() is None, "the client sent no certificate"
    assert not pair.layer.buffered
    pair.to_client()  # session tickets
    assert pair.client_read() == b""


def test_a_tls_1_2_handshake_completes(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    client_context.maximum_version = ssl.TLSVersion.TLSv1_2
    pair = Pair(server_context, client_context)
    pair.handshake()
    assert pair.layer.version == "TLSv1.2"
    pair.client.write(b"ping")
    pair.to_server()
    assert pair.layer.read() == b"ping"


def test_a_client_certificate_is_seen(ca: trustme.CA, client_context: ssl.SSLContext) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    server.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server)
    ca.issue_cert("client@example.org").configure_cert(client_context)
    pair = Pair(server, client_context)
    pair.handshake()
    certificate = pair.layer.peer_certificate()
    assert certificate is not None
    assert "client@example.org" in repr(certificate["subjectAltName"])


# ---- application data -------------------------------------------------------------------------


def test_application_data_both_ways(connected: Pair) -> None:
    connected.client.write(b"hello server")
    connected.to_server()
    waiting = connected.layer.buffered
    assert waiting
    assert connected.layer.read() == b"hello server"
    assert not connected.layer.buffered
    assert connected.layer.write(memoryview(b"hello client")) == 12
    assert connected.to_client()
    assert connected.client_read() == b"hello client"


def test_data_sent_with_the_clients_finished_is_read_after_the_handshake(pair: Pair) -> None:
    pair.client_step()
    pair.to_server()
    pair.layer.handshake()
    pair.to_client()
    assert pair.client_step()
    pair.client.write(b"GET / HTTP/1.1\r\n\r\n")  # rides in the same flight as Finished
    pair.to_server()
    assert pair.layer.handshake() is True
    assert pair.layer.buffered, "the request waits in the layer"
    assert pair.layer.read() == b"GET / HTTP/1.1\r\n\r\n"
    assert pair.layer.read() is None


def test_read_returns_none_when_it_needs_more(connected: Pair) -> None:
    assert connected.layer.read() is None, "nothing received"
    connected.client.write(b"a whole record")
    record = connected.outgoing.read()
    connected.layer.receive(record[:10])
    assert connected.layer.read() is None, "half a record"
    connected.layer.receive(record[10:])
    assert connected.layer.read() == b"a whole record"
    assert connected.layer.read() is None


def test_many_records_arrive_whole_in_order(connected: Pair) -> None:
    data = random.Random(1).randbytes(3 * READ_SIZE + 12345)
    connected.client.write(data)
    wire = connected.outgoing.read()
    got = bytearray()
    for start in range(0, len(wire), 7000):  # ciphertext in pieces that split records
        connected.layer.receive(wire[start : start + 7000])
        while (chunk := connected.layer.read()) is not None:
            assert chunk
            assert len(chunk) < 2 * READ_SIZE
            got += chunk
    assert got == data


def test_a_big_reply_goes_out_whole(connected: Pair) -> None:
    data = random.Random(2).randbytes(1_000_000)
    assert connected.layer.write(memoryview(data)) == len(data)
    connected.to_client()
    assert connected.client_read() == data


# ---- the end of the session -------------------------------------------------------------------


def test_shutdown_is_a_half_close(connected: Pair) -> None:
    layer = connected.layer
    shut_before = layer.shut
    assert not shut_before
    layer.shutdown()
    assert layer.shut
    assert connected.to_client(), "close_notify goes out"
    assert connected.client_read() == b"", "the client sees the end of the server's data"
    layer.shutdown()
    assert layer.outgoing() == b"", "one close_notify only"
    # The client still talks, and the layer still reads it.
    connected.client.write(b"one more thing")
    connected.to_server()
    assert layer.read() == b"one more thing"
    assert layer.read() is None
    connected.client.write(b"and another")
    connected.to_server()
    assert connected.read_all() == b"and another"
    connected.client_close_notify()
    connected.to_server()
    assert layer.read() == b"", "the client's close_notify ends its data"
    assert layer.read() == b"", "and stays the end"


@pytest.mark.parametrize("size", [10, 20_000])
def test_data_received_but_unread_at_shutdown_is_still_read(connected: Pair, size: int) -> None:
    data = random.Random(5).randbytes(size)
    connected.client.write(data)
    connected.to_server()  # ciphertext in the layer, not read yet
    connected.layer.shutdown()
    assert connected.to_client(), "close_notify goes out"
    connected.client.write(b"after")
    connected.to_server()
    assert connected.read_all() == data + b"after"


def test_a_record_cut_at_shutdown_is_read_once_whole(connected: Pair) -> None:
    data = random.Random(6).randbytes(20_000)  # two records
    connected.client.write(data)
    wire = connected.outgoing.read()
    connected.layer.receive(wire[:-5000])
    connected.layer.shutdown()
    connected.layer.receive(wire[-5000:])
    assert connected.read_all() == data


def test_more_than_read_size_unread_at_shutdown_is_still_read(connected: Pair) -> None:
    # shutdown() reads what is pending before SSL_shutdown would drop it, but only one
    # read()'s worth (READ_SIZE): the rest must not be lost, nor read as the end.
    data = random.Random(7).randbytes(READ_SIZE + 40_000)
    connected.client.write(data)
    connected.to_server()
    connected.layer.shutdown()
    connected.client.write(b"after")
    connected.to_server()
    assert connected.read_all() == data + b"after"


def test_buffered_counts_plaintext_held_since_shutdown(connected: Pair) -> None:
    connected.client.write(b"pending")
    connected.to_server()
    before = connected.layer.buffered
    assert before
    connected.layer.shutdown()
    assert connected.layer.buffered, "b'pending' still waits to be read"
    assert connected.layer.read() == b"pending"
    assert not connected.layer.buffered


def test_data_and_close_notify_unread_at_shutdown(connected: Pair) -> None:
    connected.client.write(b"bye")
    connected.client_close_notify()
    connected.to_server()
    connected.layer.shutdown()
    assert connected.layer.read() == b"bye"
    assert connected.layer.read() == b""


def test_close_notify_unread_at_shutdown(connected: Pair) -> None:
    connected.client_close_notify()
    connected.to_server()
    connected.layer.shutdown()
    assert connected.to_client()
    assert connected.layer.read() == b""


def test_data_then_close_notify_in_one_delivery(connected: Pair) -> None:
    connected.client.write(b"bye")
    connected.client_close_notify()
    connected.to_server()
    assert connected.layer.read() == b"bye"
    assert connected.layer.read() == b"", "the end is found on the next read"


def test_close_notify_before_ours(connected: Pair) -> None:
    connected.client_close_notify()
    connected.to_server()
    assert connected.layer.read() == b""
    connected.layer.shutdown()
    assert connected.to_client(), "our close_notify still goes out"
    assert connected.layer.shut


def test_transport_eof_without_close_notify_reads_as_the_end(connected: Pair) -> None:
    connected.layer.receive(b"")
    assert connected.layer.read() == b""
    assert connected.layer.read() == b""
    connected.layer.receive(b"")  # a second EOF changes nothing
    assert connected.layer.read() == b""


def test_data_then_transport_eof(connected: Pair) -> None:
    connected.client.write(b"truncated")
    connected.to_server()
    connected.layer.receive(b"")
    assert connected.layer.read() == b"truncated"
    assert connected.layer.read() == b""


def test_transport_eof_after_half_a_record(connected: Pair) -> None:
    connected.client.write(b"cut short")
    record = connected.outgoing.read()
    connected.layer.receive(record[:-3])
    assert connected.layer.read() is None
    connected.layer.receive(b"")
    assert connected.layer.read() == b"", "the end, never the cut record's plaintext"


def test_eof_before_the_client_hello_raises(pair: Pair) -> None:
    pair.layer.receive(b"")
    with pytest.raises(ssl.SSLError):
        pair.layer.handshake()


def test_eof_during_the_handshake_raises(pair: Pair) -> None:
    pair.client_step()
    hello = pair.outgoing.read()
    pair.layer.receive(hello[: len(hello) // 2])
    assert pair.layer.handshake() is False
    pair.layer.receive(b"")
    with pytest.raises(ssl.SSLError):
        pair.layer.handshake()


def test_eof_before_the_clients_finished_raises(pair: Pair) -> None:
    pair.client_step()
    pair.to_server()
    assert pair.layer.handshake() is False
    pair.to_client()
    pair.layer.receive(b"")
    with pytest.raises(ssl.SSLError):
        pair.layer.handshake()


# ---- a peer speaking nonsense -----------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", random.Random(3).randbytes(600)],
    ids=["http", "random"],
)
def test_garbage_in_the_handshake_raises(pair: Pair, garbage: bytes) -> None:
    pair.layer.receive(garbage)
    with pytest.raises(ssl.SSLError):
        pair.layer.handshake()


def test_a_record_header_then_eof_in_the_handshake_raises(pair: Pair) -> None:
    pair.layer.receive(b"\x16\x03\x01\xff")  # a handshake record's header, cut short
    assert pair.layer.handshake() is False, "it may yet come whole"
    pair.layer.receive(b"")
    with pytest.raises(ssl.SSLError):
        pair.layer.handshake()


def test_a_forged_record_after_the_handshake_raises(connected: Pair) -> None:
    # An application-data record (TLS 1.3 wraps everything in one) that decrypts to nothing.
    connected.layer.receive(b"\x17\x03\x03\x00\x20" + random.Random(4).randbytes(32))
    with pytest.raises(ssl.SSLError):
        connected.layer.read()


def test_a_tampered_record_raises(connected: Pair) -> None:
    connected.client.write(b"genuine")
    record = bytearray(connected.outgoing.read())
    record[-1] ^= 0x01
    connected.layer.receive(bytes(record))
    with pytest.raises(ssl.SSLError):
        connected.layer.read()


def test_write_takes_every_byte_at_once(connected: Pair) -> None:
    """write() encrypts the whole view: the connection never has to retry a part."""
    sizes = [1, 16384, 16385, 100_000]
    for size in sizes:
        assert connected.layer.write(memoryview(bytes(size))) == size
    connected.to_client()
    assert connected.client_read() == bytes(sum(sizes))
