"""TLS material for fake servers: contexts, a throwaway CA, and deliberately bad certificates.

``tls=True`` (or ``"expired"``, ``"wrong-host"``) makes certificates with ``trustme``, an
optional extra imported only here and only then. One CA serves the whole process; its PEM is
written once to a temporary file (removed at exit) so clients can trust it by path, as
``requests.get(url, verify=server.ca_path)`` needs.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any, Literal, Union

__all__ = ["CERTIFICATES", "TLSMaterial", "TLSOption", "tls_material"]

#: The certificates ``tls=`` can name: a good one, and two that clients must reject.
CERTIFICATES = ("valid", "expired", "wrong-host")
TLSOption = Union[bool, ssl.SSLContext, Literal["valid", "expired", "wrong-host"]]

#: The names a valid certificate covers.
IDENTITIES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TLSMaterial:
    """A server-side context, and what a client needs to trust it (None for a user's context)."""

    context: ssl.SSLContext
    ca_path: str | None

    def client_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        """A client context that trusts this server's CA and checks hostnames; with
        ``client_cert``, presenting a client certificate the same CA signed."""
        if self.ca_path is None:
            raise ValueError(
                "this server uses an SSLContext you supplied: selectserver does not know "
                "which CA signed its certificate"
            )
        context = ssl.create_default_context(cafile=self.ca_path)
        if client_cert:
            _client_cert().configure_cert(context)
        return context


#: The name in the client certificate that ``client_ssl_context(client_cert=True)`` presents.
CLIENT_IDENTITY = "client.selectserver.test"


def tls_material(option: object, *, client_auth: bool = False) -> TLSMaterial | None:
    """What ``tls=option`` means: None (no TLS), or the context and CA to use.

    ``client_auth`` asks every client for a certificate signed by the throwaway CA
    (``CERT_REQUIRED``); with your own context, set its ``verify_mode`` yourself.

    Raises:
        TypeError, ValueError: ``option`` is none of False/None, True, a certificate name
            or an ``ssl.SSLContext``.
        ImportError: certificates are needed and the ``tls`` extra (trustme) is missing.
    """
    if option is None or option is False:
        return None
    if isinstance(option, ssl.SSLContext):
        if client_auth:
            raise ValueError(
                "tls_client_auth applies to selectserver's certificates: with your own "
                "SSLContext, set its verify_mode and load_verify_locations instead"
            )
        return TLSMaterial(option, None)
    if option is True:
        option = "valid"
    if not isinstance(option, str):
        raise TypeError(
            f"tls must be True, an ssl.SSLContext, or one of {CERTIFICATES}, got {option!r}"
        )
    if option not in CERTIFICATES:
        raise ValueError(f"tls must name one of the certificates {CERTIFICATES}, got {option!r}")
    return TLSMaterial(_server_context(option, client_auth), _ca()[1])


@functools.cache
def _ca() -> tuple[Any, str]:
    """The process's CA, and the path of its PEM file."""
    try:
        import trustme
    except ImportError:
        raise ImportError(
            "tls=True makes certificates with trustme, which is not installed: "
            "pip install 'selectserver[tls]'"
        ) from None
    ca = trustme.CA(organization_name="selectserver test CA")
    handle, path = tempfile.mkstemp(prefix="selectserver-ca-", suffix=".pem")
    with os.fdopen(handle, "wb") as file:
        file.write(ca.cert_pem.bytes())
    atexit.register(_remove, path)
    return ca, path


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@functools.cache
def _client_cert() -> Any:
    return _ca()[0].issue_cert(CLIENT_IDENTITY)


@functools.cache
def _server_context(certificate: str, client_auth: bool = False) -> ssl.SSLContext:
    """A server context presenting the named certificate, shared by every server using it."""
    ca = _ca()[0]
    if certificate == "wrong-host":
        cert = ca.issue_cert("wrong.host.invalid")
    elif certificate == "expired":
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = ca.issue_cert(
            *IDENTITIES,
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
    else:
        cert = ca.issue_cert(*IDENTITIES)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    if client_auth:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context
