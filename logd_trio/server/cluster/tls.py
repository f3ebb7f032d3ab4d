"""The TLS context a cluster node talks to etcd with (``--etcd-ca``, ``--etcd-cert``, ``--etcd-key``)."""

from __future__ import annotations

import ssl

from logd_trio.core.tls import TLSConfigError, client_context
from logd_trio.server.config import ConfigError, ServerConfig

__all__ = ["etcd_context"]


def etcd_context(config: ServerConfig) -> ssl.SSLContext | None:
    """How this node checks etcd's certificates (``etcd_ca``, else the system's trust store) and
    the client certificate it presents (``etcd_cert``); None without either (https:// endpoints
    are then checked against the system's store).  :class:`ConfigError` naming the file."""
    if not (config.etcd_ca or config.etcd_cert):
        return None
    try:
        return client_context(config.etcd_ca or None, config.etcd_cert or None, config.etcd_key or None)
    except TLSConfigError as e:
        raise ConfigError(f"etcd TLS: {e}") from None
