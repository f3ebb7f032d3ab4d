"""A follower copies its leader over TLS (``replicate_ca``), presenting its certificate when the
leader requires one, and says in one line why when the leader's certificate is not trusted."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from logd_trio.client.client import open_client
from logd_trio.server.config import ConfigError
from logd_trio.server.replica.link import leader_context

from ...harness import FAST_RETRY, make_config, start_server
from ...tlsfiles import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


async def test_follower_over_mutual_tls(nursery: trio.Nursery, tmp_path: Path, certs: Certs) -> None:
    leader = await start_server(nursery, make_config(
        tmp_path / "a", node_id="a", tls_cert=certs.server.cert, tls_key=certs.server.key, tls_client_ca=certs.ca))
    # The follower's own certificate (for 127.0.0.1) is its client certificate at the leader.
    follower = await start_server(nursery, make_config(
        tmp_path / "b", node_id="b", replicate_from=leader.addr, replicate_ca=certs.ca,
        tls_cert=certs.server.cert, tls_key=certs.server.key))
    async with open_client(leader.addr, ssl_context=certs.context(certs.client), retry=FAST_RETRY) as c:
        await c.batch("r", [b"one"])
        head = await c.batch("r", [b"two"]) + 1
    async with open_client(follower.addr, ssl_context=certs.context(certs.client), retry=FAST_RETRY) as c:
        with trio.fail_after(20):
            while True:
                if (await c.topics()).get("r", (0, 0))[1] >= head:
                    break
                await trio.sleep(0.05)
        assert [m.body for m in await c.read("r", 0, 10)] == [b"one", b"two"]


async def test_untrusted_leader_is_logged_and_retried(nursery: trio.Nursery, tmp_path: Path, certs: Certs,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    leader = await start_server(nursery, make_config(tmp_path / "a", node_id="a", tls_cert=certs.server.cert,
                                                     tls_key=certs.server.key))
    await start_server(nursery, make_config(tmp_path / "b", node_id="b", replicate_from=leader.addr,
                                            replicate_ca=certs.other_ca))
    with trio.fail_after(10):
        while True:
            if any("cannot list topics" in r.getMessage() for r in caplog.records):
                break
            await trio.sleep(0.05)
    line = next(r.getMessage() for r in caplog.records if "cannot list topics" in r.getMessage())
    assert "not signed by a trusted CA" in line and "\n" not in line, line


def test_bad_replicate_ca_is_a_config_error(tmp_path: Path) -> None:
    config = make_config(tmp_path, node_id="b", replicate_from="127.0.0.1:7000",
                         replicate_ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"replicate_ca: CA file .*missing\.pem: no such file"):
        leader_context(config)
    assert leader_context(make_config(tmp_path)) is None
