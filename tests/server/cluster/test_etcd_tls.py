"""etcd over TLS: https endpoints checked against ``--etcd-ca``, a client certificate presented
with ``--etcd-cert/--etcd-key`` (etcd's ``--client-cert-auth``): the client alone, then a real
``logd serve`` node; and the settings that are refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from logd_trio.server.cluster.etcd import EtcdClient
from logd_trio.server.cluster.etcd_wire import EtcdUnavailable
from logd_trio.server.cluster.tls import etcd_context
from logd_trio.server.config import ConfigError, ServerConfig

from ...etcd_harness import EtcdCluster, etcd_cluster
from ...tlsfiles import Certs, make_certs
from .nodes import Node, cluster_view, wait_leader, write_some


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


@pytest.fixture
def etcd_tls(tmp_path: Path, certs: Certs) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path / "etcd", 1, tls=certs) as cluster:
        yield cluster


def _config(certs: Certs, endpoints: list[str], **kw: str) -> ServerConfig:
    options = {"node_id": "a", "cluster": "c1", "etcd": ",".join(endpoints), "etcd_ca": certs.ca,
               "etcd_cert": certs.client.cert, "etcd_key": certs.client.key, **kw}
    return ServerConfig(workdir=Path("/tmp/unused"), **options)  # type: ignore[arg-type]


async def test_the_client_over_tls_and_what_it_refuses(etcd_tls: EtcdCluster, certs: Certs) -> None:
    assert etcd_tls.endpoints[0].startswith("https://")
    context = etcd_context(_config(certs, etcd_tls.endpoints))
    async with EtcdClient(etcd_tls.endpoints, ssl_context=context) as etcd:
        with trio.fail_after(10):
            await etcd.put("tls/k", b"v")
            kv = await etcd.get("tls/k")
    assert kv is not None and kv.value == b"v"
    strangers = {  # a CA that did not sign etcd's certificate; plaintext; no client certificate
        "TLS: certificate verify failed: not signed by a trusted CA": certs.context(certs.client, ca=certs.other_ca),
        "TLS: |ReadError": certs.context(None),  # etcd (Go) may just close the connection
    }
    for expected, ctx in strangers.items():
        async with EtcdClient(etcd_tls.endpoints, timeout=1.0, ssl_context=ctx) as etcd:
            with trio.fail_after(5), pytest.raises(EtcdUnavailable, match=expected) as info:
                await etcd.get("tls/k")
        assert "\n" not in str(info.value)
    plain = [u.replace("https://", "http://") for u in etcd_tls.endpoints]
    async with EtcdClient(plain, timeout=1.0) as etcd:
        with trio.fail_after(5), pytest.raises(EtcdUnavailable):
            await etcd.get("tls/k")


async def test_a_node_leads_through_a_tls_etcd(nursery: trio.Nursery, tmp_path: Path, etcd_tls: EtcdCluster,
                                              certs: Certs) -> None:
    tls = ("--min-insync", "1", "--etcd-ca", certs.ca, "--etcd-cert", certs.client.cert,
           "--etcd-key", certs.client.key)
    good = await Node("a", tmp_path / "a", etcd_tls, tls).start(nursery)
    try:
        leader = await wait_leader([good], in_sync=1)
        replies = await write_some(leader, "t", [b"over-tls"])
        assert all(reply.startswith(b"OK ") for _, reply in replies), replies
    finally:
        await good.stop()
    # A node that does not trust etcd's certificate never leads, and its log says why.
    wrong = ("--min-insync", "1", "--etcd-ca", certs.other_ca, "--etcd-cert", certs.client.cert,
             "--etcd-key", certs.client.key)
    lost = await Node("b", tmp_path / "b", etcd_tls, wrong).start(nursery)
    try:
        with trio.fail_after(15):
            while "TLS: certificate verify failed" not in lost.log_tail(20000):  # noqa: ASYNC110 -- a process log
                await trio.sleep(0.05)
        assert (await cluster_view(lost))["role"] != "leader"
    finally:
        await lost.stop()


@pytest.mark.parametrize(("kw", "message"), [
    ({"etcd": "http://127.0.0.1:2379"}, "etcd_ca needs https:// endpoints"),
    ({"etcd": "http://127.0.0.1:2379", "etcd_ca": ""}, "etcd_cert needs https:// endpoints"),
    ({"etcd_cert": ""}, "etcd_key: needs etcd_cert"),
    ({"etcd": "", "cluster": ""}, "only with etcd"),
])
def test_bad_etcd_tls_settings_are_refused(certs: Certs, kw: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(certs, ["https://127.0.0.1:2379"], **kw)


def test_unreadable_etcd_tls_files_are_one_line_errors(certs: Certs, tmp_path: Path) -> None:
    for kw in ({"etcd_ca": str(tmp_path / "nope.pem")}, {"etcd_cert": certs.ca}):
        with pytest.raises(ConfigError, match=r"^etcd TLS: ") as info:
            etcd_context(_config(certs, ["https://127.0.0.1:2379"], **kw))
        assert "\n" not in str(info.value)
