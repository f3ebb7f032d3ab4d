"""Certificates for the TLS tests, made with trustme into a test's directory: a CA and a server
certificate for 127.0.0.1, a client certificate, and the bad ones (another CA, expired, another host)."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from logd_trio.core.tls import client_context


@dataclass(frozen=True)
class Pair:
    cert: str
    key: str


@dataclass(frozen=True)
class Certs:
    ca: str  # the CA of the server and of the good client certificate
    server: Pair  # for 127.0.0.1 and localhost
    client: Pair  # CN=alice (O=logd tests)
    node: Pair  # CN=node-2: a replication peer
    other_ca: str  # a CA that signed nothing here
    stranger: Pair  # a client certificate signed by other_ca
    expired: Pair  # for 127.0.0.1, expired yesterday
    wrong_host: Pair  # for another.example only

    def context(self, client: Pair | None = None, ca: str | None = None) -> ssl.SSLContext:
        """A client context trusting ``ca`` (default: the good CA), presenting ``client``."""
        return client_context(ca or self.ca, client.cert if client else None, client.key if client else None)


def _write(directory: Path, name: str, leaf: trustme.LeafCert) -> Pair:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return Pair(str(cert), str(key))


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(organization_name="logd tests"), trustme.CA(organization_name="elsewhere")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    now = datetime.datetime.now(datetime.UTC)
    return Certs(
        ca=str(directory / "ca.pem"),
        server=_write(directory, "server", ca.issue_cert("127.0.0.1", "localhost")),
        client=_write(directory, "client", ca.issue_cert("alice@example.org", common_name="alice",
                                                         organization_name="logd tests")),
        node=_write(directory, "node", ca.issue_cert("node-2.example", common_name="node-2")),
        other_ca=str(directory / "other-ca.pem"),
        stranger=_write(directory, "stranger", other.issue_cert("mallory.example", common_name="alice")),
        expired=_write(directory, "expired", ca.issue_cert("127.0.0.1", not_before=now - datetime.timedelta(days=3),
                                                           not_after=now - datetime.timedelta(days=1))),
        wrong_host=_write(directory, "wrong-host", ca.issue_cert("another.example")),
    )
