"""TLS pieces shared by the server, the client and the bench: standard library ``ssl`` only.

:func:`client_context` builds the context a client (or a follower, or ``logd bench``)
connects with; :func:`describe` turns an :class:`ssl.SSLError` into one line that says
what went wrong and what to do; :func:`subject_text` names a peer certificate's subject
as an auth file spells it.  No I/O beyond reading the certificate files.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any, Final

from logd_trio.core.errors import ConnectionLost, LogdError

__all__ = [
    "MIN_VERSION",
    "RECORD_HANDSHAKE",
    "TLSConfigError",
    "TLSFailed",
    "client_context",
    "describe",
    "load_ca",
    "load_chain",
    "subject_text",
]

# The first byte of every TLS connection (a handshake record): how a plaintext port
# recognises a TLS client, and a TLS port a plaintext one.
RECORD_HANDSHAKE: Final = 0x16
MIN_VERSION: Final = ssl.TLSVersion.TLSv1_2


class TLSConfigError(LogdError, ValueError):
    """A certificate, key or CA file cannot be used; the message names the file."""


class TLSFailed(ConnectionLost):
    """The TLS handshake failed (a certificate problem, or a peer that does not speak TLS):
    retrying cannot help, so clients raise it at once."""


def _load(what: str, path: str, load: Any) -> None:
    try:
        load()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} {path}: no such file") from None
    except PermissionError:
        raise TLSConfigError(f"{what} {path}: permission denied") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{what} {path}: is a directory") from None
    except ssl.SSLError as e:
        raise TLSConfigError(f"{what} {path}: not usable ({e.reason or e})") from None
    except (OSError, ValueError) as e:
        raise TLSConfigError(f"{what} {path}: {getattr(e, 'strerror', None) or e}") from None


def load_chain(ctx: ssl.SSLContext, cert: str, key: str, what: str = "certificate") -> None:
    """Load ``cert`` (PEM, the chain) and ``key`` into ``ctx``; :class:`TLSConfigError` on failure."""
    _load(what, cert if not key else f"{cert} / key {key}", lambda: ctx.load_cert_chain(cert, key or None))


def load_ca(ctx: ssl.SSLContext, ca: str, what: str = "CA file") -> None:
    """Trust the certificates of ``ca`` (PEM) in ``ctx``."""
    _load(what, ca, lambda: ctx.load_verify_locations(cafile=ca))


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """The context to connect with: the server's certificate is checked against ``ca`` (the
    system's trust store when None) and its host name; ``cert``/``key`` present a client
    certificate (mutual TLS).  TLS 1.2 at least."""
    if key and not cert:
        raise TLSConfigError("a client key needs its certificate (--tls-cert)")
    if ca:  # only ``ca`` is trusted
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the certificate and the host name
        load_ca(ctx, ca)
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = MIN_VERSION
    if cert:
        load_chain(ctx, cert, key or "", "client certificate")
    return ctx


_HINTS: Final = (
    # (text in the OpenSSL reason or message, what to say)
    ("WRONG_VERSION_NUMBER", "the peer does not speak TLS (a plaintext port, or --tls against a server without it?)"),
    ("RECORD_LAYER_FAILURE", "the peer does not speak TLS (a plaintext port, or --tls against a server without it?)"),
    ("HTTP_REQUEST", "the peer sent plaintext (a client without --tls?)"),
    ("CERTIFICATE_REQUIRED", "the server requires a client certificate (--tls-cert/--tls-key)"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no client certificate was presented, and one is required"),
    ("TLSV1_ALERT_UNKNOWN_CA", "the peer does not trust this side's certificate (signed by a CA it does not know)"),
    ("SSLV3_ALERT_BAD_CERTIFICATE", "the peer rejected this side's certificate"),
    ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "the peer rejected this side's certificate: it has expired"),
    ("UNSUPPORTED_PROTOCOL", "no TLS version in common (TLS 1.2 or later is required)"),
    ("NO_SHARED_CIPHER", "no cipher in common"),
)


def describe(exc: BaseException) -> str:
    """Why a TLS handshake failed, in one line (``exc`` an :class:`ssl.SSLError`, or an error
    whose cause is one); callers say "TLS handshake failed: " or the like before it."""
    err: BaseException | None = exc
    while err is not None and not isinstance(err, ssl.SSLError):
        err = err.__cause__ or err.__context__
    if err is None:
        return str(exc) or type(exc).__name__
    if isinstance(err, ssl.SSLCertVerificationError):
        why = err.verify_message or err.reason or "verification failed"
        if "expired" in why:
            return f"certificate verify failed: the peer's certificate has expired ({why})"
        if "mismatch" in why.lower() or "hostname" in why.lower() or "IP address" in why:
            return f"certificate verify failed: the certificate is not for this host ({why})"
        if "issuer" in why or "self-signed" in why or "self signed" in why:
            return f"certificate verify failed: not signed by a trusted CA (--tls-ca?) ({why})"
        return f"certificate verify failed: {why}"
    text = f"{err.reason or ''} {err}".upper()
    for key, hint in _HINTS:
        if key in text:
            return hint
    if isinstance(err, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "the peer closed the connection (it may not trust this side's certificate)"
    return str(err.reason or err)


def subject_text(subject: Iterable[Iterable[tuple[str, str]]]) -> str:
    """A certificate subject (``SSLSocket.getpeercert()['subject']``) as ``CN=alice,O=Example``
    (OpenSSL's short names where known, in the certificate's order)."""
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
             "stateOrProvinceName": "ST", "localityName": "L", "emailAddress": "emailAddress"}
    return ",".join(f"{short.get(k, k)}={v}" for rdn in subject for k, v in rdn)
