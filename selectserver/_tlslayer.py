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
from collections import deque

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
        self._early: deque[bytes | ssl.SSLError] = deque()  # read before close_notify went

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
        return bool(self._early) or self._incoming.pending > 0 or self._object.pending() > 0

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
        """The plaintext of the next received record; ``b""`` at the peer's end; None: need
        more ciphertext.

        One record per call, as a socket read of a TLS stream gives: a peer's separate writes
        stay separate, whatever the TCP segments did with them.
        """
        early = self._early
        if early:
            item = early.popleft()
            if isinstance(item, ssl.SSLError):
                raise item
            return item
        return self._read_record()

    def _read_record(self) -> bytes | None:
        try:
            return self._object.read(READ_SIZE) or b""
        except ssl.SSLWantReadError:
            return b"" if self._eof else None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""

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
            try:
                while chunk := self._read_record():
                    self._early.append(chunk)
            except ssl.SSLError as exc:
                self._early.append(exc)  # raised in its turn
        try:
            self._object.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is queued; the peer's comes when it does
        except ssl.SSLError:
            pass  # the session is already broken: reading will say so
