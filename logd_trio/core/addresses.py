"""``HOST:PORT`` parsing, one grammar for the server, the client, the CLI and the bench.

Accepted: ``host:port``, ``host`` (the default port), ``:port`` (the default
host), ``[v6]:port``, ``[v6]`` and a bare IPv6 address such as ``::1``.
"""

from __future__ import annotations

import ipaddress

from logd_trio.core.defaults import DEFAULT_HOST, DEFAULT_PORT

__all__ = ["AddressError", "format_address", "parse_address"]


class AddressError(ValueError):
    """The text is not a ``HOST:PORT`` address; the message says why."""


def parse_address(
    address: str, *, default_port: int | None = DEFAULT_PORT, default_host: str = DEFAULT_HOST, allow_zero: bool = False
) -> tuple[str, int]:
    """``address`` -> ``(host, port)``.

    ``default_port=None`` makes the port required.  ``allow_zero`` accepts port 0
    (a listener asking the kernel for a free port).  Raises :class:`AddressError`.
    """
    text = address.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise AddressError(f"invalid address {address!r}: expected [IPv6]:PORT")
        port_s = rest[1:]
        if rest and not port_s:
            raise AddressError(f"invalid address {address!r}: empty port")
        if not _is_ipv6(host):
            raise AddressError(f"invalid address {address!r}: expected an IPv6 address in the brackets")
    elif text.count(":") == 1:
        host, _, port_s = text.partition(":")
        if not port_s:
            raise AddressError(f"invalid address {address!r}: empty port")
    else:
        host, port_s = text, ""  # a name, or a bare IPv6 address
        if ":" in host and not _is_ipv6(host):
            raise AddressError(f"invalid address {address!r}: expected HOST:PORT, or [IPv6]:PORT")
    if any(c.isspace() for c in host):
        raise AddressError(f"invalid address {address!r}: spaces in the host")
    host = host or default_host
    if not port_s:
        if default_port is None:
            raise AddressError(f"invalid address {address!r}: expected HOST:PORT")
        return host, default_port
    low = 0 if allow_zero else 1
    if not (port_s.isascii() and port_s.isdigit()) or not low <= int(port_s) <= 65535:
        raise AddressError(f"invalid port in address {address!r}: expected {low}..65535")
    return host, int(port_s)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address` (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
