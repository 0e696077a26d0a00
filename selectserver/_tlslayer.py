"""TLS as pure logic: an ``ssl.SSLObject`` between two ``ssl.MemoryBIO`` buffers.

The connection moves ciphertext between the socket and this layer; the step machine sees only
plaintext (asyncio's ``sslproto`` and trio's ``SSLStream`` work the same way). Nothing here
touches a socket, so tests drive a server layer against a client ``SSLObject`` in memory.

The rules the connection follows:

* bytes read from the socket go to :meth:`TLSLayer.receive` (``b""`` for EOF);
* after every call, :meth:`TLSLayer.outgoing` holds ciphertext to send (handshake messages,
  session tickets, alerts, close_notify, records);
* :meth:`handshake` says whether the handshake is done; :meth:`read` returns the plaintext
  that the received records hold, ``b""`` at the end of the peer's data (close_notify, or an
  EOF without one), or None when it needs more ciphertext;
* :meth:`shutdown` queues close_notify; reading goes on afterwards (a half-close), so bytes
  the peer sent after it are read, not lost.

A failing peer raises ``ssl.SSLError`` from :meth:`handshake` or :meth:`read`.
"""

from __future__ import annotations

import ssl

__all__ = ["TLSLayer"]

#: How much plaintext one ``SSLObject.read`` call returns at most.
READ_SIZE = 256 * 1024


class TLSLayer:
    """The server side of one TLS session, over memory buffers."""

    __slots__ = ("_early", "_eof", "_incoming", "_object", "_outgoing", "_shut")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._eof = False  # the peer's transport closed
        self._shut = False  # close_notify is queued
        self._early: bytes | ssl.SSLError | None = None  # read before close_notify was sent

    @property
    def version(self) -> str | None:
        """The negotiated protocol (``TLSv1.3``), once the handshake is done."""
        return self._object.version()

    @property
    def shut(self) -> bool:
        """Whether :meth:`shutdown` queued close_notify."""
        return self._shut

    @property
    def buffered(self) -> bool:
        """Whether received ciphertext or decrypted plaintext waits to be read."""
        return self._early is not None or self._incoming.pending > 0 or self._object.pending() > 0

    def peer_certificate(self) -> dict[str, object] | None:
        """The client's certificate, if it sent one the context verified."""
        cert = self._object.getpeercert()
        return dict(cert) if cert else None

    def receive(self, data: bytes) -> None:
        """Ciphertext arrived from the socket; ``b""`` means the peer closed it."""
        if data:
            self._incoming.write(data)
        elif not self._eof:
            self._eof = True
            self._incoming.write_eof()

    def outgoing(self) -> bytes:
        """Take the ciphertext waiting to be sent."""
        return self._outgoing.read() if self._outgoing.pending else b""

    def handshake(self) -> bool:
        """Advance the handshake; True once it is done (then read what it left buffered)."""
        try:
            self._object.do_handshake()
        except ssl.SSLWantReadError:
            if self._eof:
                raise ssl.SSLEOFError(
                    ssl.SSL_ERROR_EOF, "the peer closed the connection during the handshake"
                ) from None
            return False
        return True

    def read(self) -> bytes | None:
        """Plaintext the received records hold; ``b""`` at the peer's end; None: need more."""
        early, self._early = self._early, None
        if isinstance(early, ssl.SSLError):
            raise early
        if early:
            return early
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._object.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            if not chunk:
                if chunks:
                    break  # the EOF is found again on the next read
                return b""
            chunks.append(chunk)
            if sum(map(len, chunks)) >= READ_SIZE:
                break
        if chunks:
            return b"".join(chunks)
        return b"" if self._eof else None

    def write(self, data: memoryview) -> int:
        """Encrypt ``data`` whole into :meth:`outgoing`; returns its length."""
        return self._object.write(data)

    def shutdown(self) -> None:
        """Queue close_notify; the peer's data can still be read afterwards."""
        if self._shut:
            return
        self._shut = True
        # SSL_shutdown reads what is already received, and fails on application data there
        # (dropping it): read it first, to hand it out after.
        if self._incoming.pending:
            chunks = []
            try:
                while chunk := self.read():
                    chunks.append(chunk)
            except ssl.SSLError as exc:
                self._early = exc
            if chunks:
                self._early = b"".join(chunks)  # an error, if any, comes with the next read
        try:
            self._object.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is queued; the peer's comes when it does
        except ssl.SSLError:
            pass  # the session is already broken: reading will say so
