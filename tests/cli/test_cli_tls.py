"""The client commands' TLS flags against a real TLS server (in its own thread, as the CLI runs
trio itself): write, read, the info commands and bench; bad flags and refusals in one line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli import bench_cmd, info_cmds, read_cmd, write_cmd

from ..tlsfiles import Certs, make_certs
from .test_cli_client import server_thread

app = typer.Typer()
for _module in (write_cmd, read_cmd, info_cmds, bench_cmd):
    _module.register(app)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_addr(tmp_path: Path, certs: Certs) -> Iterator[str]:
    with server_thread(tmp_path / "data", tls_cert=certs.server.cert, tls_key=certs.server.key,
                       tls_client_ca=certs.ca) as address:
        yield address


def invoke(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def test_write_read_and_info_over_mutual_tls(tls_addr: str, certs: Certs) -> None:
    flags = ("--host", tls_addr, "--tls-ca", certs.ca, "--tls-cert", certs.client.cert, "--tls-key", certs.client.key)
    code, out, err = invoke("write", *flags, "--topic", "t", "one", "two")
    assert (code, out) == (0, "0\n"), err
    code, out, err = invoke("read", *flags, "--topic", "t")
    assert (code, out) == (0, "one\ntwo\n"), err
    for command, expected in (("stats", "requests.total:"), ("config", "MaxBatchSize:"), ("topics", "t: 0 "),
                              ("ping", "PONG from")):
        code, out, err = invoke(command, *flags)
        assert code == 0 and expected in out, (command, out, err)
    code, out, err = invoke("bench", *flags, "--duration", "200ms", "--size", "4096", "--json")
    assert code == 0, err
    assert '"write"' in out and '"read"' in out


def test_refusals_are_one_line(tls_addr: str, certs: Certs) -> None:
    # No client certificate for a server that requires one.
    code, _, err = invoke("write", "--host", tls_addr, "--tls-ca", certs.ca, "--retries", "1", "x")
    assert code == 3 and err.count("\n") == 1 and "client certificate" in err, err
    # The wrong CA.
    code, _, err = invoke("ping", "--host", tls_addr, "--tls-ca", certs.other_ca, "--tls-cert", certs.client.cert,
                          "--tls-key", certs.client.key, "--retries", "1")
    assert code == 3 and err.count("\n") == 1 and "not signed by a trusted CA" in err, err
    # Plaintext to the TLS port.
    code, _, err = invoke("config", "--host", tls_addr, "--retries", "1")
    assert code == 6 and err.count("\n") == 1 and "tls required" in err, err
    # A bench without TLS, and one with a file that does not exist.
    code, _, err = invoke("bench", "--host", tls_addr, "--duration", "100ms", "--only-write")
    assert code != 0 and err.count("\n") == 1, err
    code, _, err = invoke("stats", "--host", tls_addr, "--tls-ca", "/nonexistent/ca.pem")
    assert code == 2 and "no such file" in err, err
