"""TLS on the server (server/tls.py, listener.py): handshakes, mutual TLS, each failure seen from
both sides, handshake timeouts in virtual time, and READs larger than the copy chunk."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from logd_trio.client.client import open_client
from logd_trio.core.errors import ServerRejected
from logd_trio.core.tls import TLSConfigError, TLSFailed, client_context
from logd_trio.server.config import ConfigError
from logd_trio.server.tls import CHUNK, PLAINTEXT_REFUSAL, HandshakeFailed, accept_tls, server_context

from ..harness import FAST_RETRY, make_config, start_server
from ..tlsfiles import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls_config(tmp_path: Path, certs: Certs, *, mutual: bool = False, **kw: object):  # type: ignore[no-untyped-def]
    return make_config(tmp_path / "data", fsync="never", tls_cert=certs.server.cert, tls_key=certs.server.key,
                       tls_client_ca=certs.ca if mutual else "", **kw)


def _handshake_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "TLS handshake with" in r.getMessage()]


async def test_write_and_read_over_tls(nursery: trio.Nursery, tmp_path: Path, certs: Certs) -> None:
    srv = await start_server(nursery, _tls_config(tmp_path, certs))
    async with open_client(srv.addr, ssl_context=certs.context(), retry=FAST_RETRY) as c:
        first = await c.batch("t", [b"one", b"two"])
        await c.batch("t", [b"three"])
        reply = await c.read("t", first, 10)
        assert [m.body for m in list(reply)] == [b"one", b"two", b"three"]
        assert await c.supports_extensions()  # PING and TOPICS pass through TLS as well
        assert (await c.topics())["t"][0] == first


async def test_read_larger_than_the_copy_chunk(nursery: trio.Nursery, tmp_path: Path, certs: Certs) -> None:
    srv = await start_server(nursery, _tls_config(tmp_path, certs))
    body = bytes(range(256)) * 200  # 51 200 bytes a message, one a batch
    n = CHUNK // len(body) * 3 + 1  # the READ spans more than three chunks
    async with open_client(srv.addr, ssl_context=certs.context(), retry=FAST_RETRY, max_reply=64 << 20) as c:
        for i in range(n):
            await c.batch("big", [i.to_bytes(4, "big") + body])
        reply = await c.read("big", 0, n)
        assert len(reply) == n
        assert sum(len(m.body) for m in list(reply)) > 3 * CHUNK
        assert [int.from_bytes(m.body[:4], "big") for m in list(reply)] == list(range(n))
        assert all(m.body[4:] == body for m in list(reply))


async def test_mutual_tls(nursery: trio.Nursery, tmp_path: Path, certs: Certs,
                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    srv = await start_server(nursery, _tls_config(tmp_path, certs, mutual=True))
    async with open_client(srv.addr, ssl_context=certs.context(certs.client), retry=FAST_RETRY) as c:
        assert await c.batch("m", [b"x"]) == 0
    # No client certificate: refused.  With TLS 1.3 the client learns it at its first read.
    async with open_client(srv.addr, ssl_context=certs.context(), retry=FAST_RETRY) as c:
        with pytest.raises(TLSFailed, match="client certificate"):
            await c.batch("m", [b"y"])
    await trio.sleep(0.05)  # the server task that saw the refusal logs it (real sockets: no virtual time)
    lines = _handshake_lines(caplog)
    assert len(lines) == 1 and "no client certificate" in lines[0], lines
    # A certificate from a CA the server does not trust: refused too (a second server: the log
    # line about refused handshakes is throttled per server).
    caplog.clear()
    srv2 = await start_server(nursery, _tls_config(tmp_path / "2", certs, mutual=True))
    async with open_client(srv2.addr, ssl_context=certs.context(certs.stranger), retry=FAST_RETRY) as c:
        with pytest.raises(TLSFailed, match="does not trust this one"):
            await c.batch("m", [b"z"])
    await trio.sleep(0.05)
    lines = _handshake_lines(caplog)
    assert len(lines) == 1 and "certificate verify failed" in lines[0], lines


async def test_plaintext_client_on_a_tls_port(nursery: trio.Nursery, tmp_path: Path, certs: Certs,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    srv = await start_server(nursery, _tls_config(tmp_path, certs))
    async with open_client(srv.addr, retry=FAST_RETRY) as c:
        with pytest.raises(ServerRejected, match="tls required"):
            await c.batch("t", [b"x"])
    # A Go-style client that writes a request and reads: the ERR line, then the end.
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(srv.host, srv.port)
        async with stream:
            await stream.send_all(b"CONFIG\r\n")
            got = b""
            while chunk := await stream.receive_some(4096):
                got += chunk
    assert got == PLAINTEXT_REFUSAL
    lines = _handshake_lines(caplog)
    assert lines and all("plaintext client" in line for line in lines), lines


async def test_tls_client_on_a_plaintext_port(nursery: trio.Nursery, tmp_path: Path, certs: Certs) -> None:
    srv = await start_server(nursery, make_config(tmp_path / "data", fsync="never"))
    with trio.fail_after(10):
        async with open_client(srv.addr, ssl_context=certs.context(), retry=FAST_RETRY) as c:
            with pytest.raises(TLSFailed, match="does not speak TLS"):
                await c.batch("t", [b"x"])
    # The server answered the ClientHello in plaintext, and closed: a raw look at it.
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(srv.host, srv.port)
        async with stream:
            await stream.send_all(b"\x16\x03\x01\x00\x05hello")
            got = b""
            while chunk := await stream.receive_some(4096):
                got += chunk
    assert got == b"ERR tls not enabled\r\n"


@pytest.mark.parametrize(("which", "expected"), [
    ("wrong_ca", "not signed by a trusted CA"),
    ("expired", "expired"),
    ("wrong_host", "not for this host"),
])
async def test_server_certificate_refused(nursery: trio.Nursery, tmp_path: Path, certs: Certs,
                                          caplog: pytest.LogCaptureFixture, which: str, expected: str) -> None:
    caplog.set_level(logging.WARNING)
    pair = {"wrong_ca": certs.server, "expired": certs.expired, "wrong_host": certs.wrong_host}[which]
    config = make_config(tmp_path / "data", fsync="never", tls_cert=pair.cert, tls_key=pair.key)
    srv = await start_server(nursery, config)
    ctx = certs.context(ca=certs.other_ca if which == "wrong_ca" else None)
    with trio.fail_after(10):
        async with open_client(srv.addr, ssl_context=ctx, retry=FAST_RETRY) as c:
            with pytest.raises(TLSFailed, match=expected) as info:
                await c.batch("t", [b"x"])
    assert "\n" not in str(info.value)
    await trio.sleep(0.05)  # the server task that saw the alert logs it (a real socket: no virtual time)
    lines = _handshake_lines(caplog)
    assert len(lines) == 1 and "127.0.0.1" in lines[0], lines


async def test_handshake_timeout_in_virtual_time(certs: Certs, autojump_clock: trio.testing.MockClock) -> None:
    ctx = server_context(make_config(Path("unused"), tls_cert=certs.server.cert, tls_key=certs.server.key))
    assert ctx is not None
    for opening in (b"", b"\x16\x03\x01"):  # silent; a ClientHello that stops after three bytes
        server, client = trio.socket.socketpair()
        with client:
            if opening:
                await client.send(opening)
            start = trio.current_time()
            with pytest.raises(HandshakeFailed, match="no TLS handshake within 10s"):
                await accept_tls(server, ctx, 10.0)
            assert trio.current_time() - start == pytest.approx(10.0)
            assert server.fileno() == -1  # closed


async def test_client_closing_before_the_handshake(certs: Certs) -> None:
    ctx = server_context(make_config(Path("unused"), tls_cert=certs.server.cert, tls_key=certs.server.key))
    assert ctx is not None
    server, client = trio.socket.socketpair()
    client.close()
    with pytest.raises(HandshakeFailed, match="closed before"):
        await accept_tls(server, ctx, 10.0)


def test_bad_certificate_files(tmp_path: Path, certs: Certs) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"tls_cert .*nope\.pem.*: no such file"):
        server_context(make_config(tmp_path, tls_cert=missing, tls_key=certs.server.key))
    with pytest.raises(ConfigError, match=r"tls_cert .*: not usable"):
        server_context(make_config(tmp_path, tls_cert=certs.server.cert, tls_key=certs.client.key))  # wrong key
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls_client_ca .*garbage\.pem"):
        server_context(make_config(tmp_path, tls_cert=certs.server.cert, tls_key=certs.server.key,
                                   tls_client_ca=str(garbage)))
    with pytest.raises(ConfigError, match="tls_key: needs tls_cert"):
        make_config(tmp_path, tls_key=certs.server.key)
    with pytest.raises(ConfigError, match="tls_client_ca: needs tls_cert"):
        make_config(tmp_path, tls_client_ca=certs.ca)
    with pytest.raises(TLSConfigError, match=r"CA file .*nope\.pem: no such file"):
        client_context(ca=missing)
    with pytest.raises(TLSConfigError, match="needs its certificate"):
        client_context(key=certs.client.key)


def test_server_context_settings(certs: Certs, tmp_path: Path) -> None:
    ctx = server_context(make_config(tmp_path, tls_cert=certs.server.cert, tls_key=certs.server.key,
                                     tls_client_ca=certs.ca))
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.num_tickets == 0
    assert server_context(make_config(tmp_path)) is None
