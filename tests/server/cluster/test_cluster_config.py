"""``--etcd --cluster --lease-ttl --advertise``: what is refused, with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from logd_trio.server.config import ConfigError, ServerConfig, load_config


def cfg(**kw: object) -> ServerConfig:
    base: dict[str, object] = {"workdir": Path("/tmp/x"), "node_id": "a", "etcd": "http://127.0.0.1:2379",
                               "cluster": "c1"}
    base.update(kw)
    return ServerConfig(**base)  # type: ignore[arg-type]


def test_a_cluster_node_config() -> None:
    c = load_config(flags={"etcd": "http://127.0.0.1:2379,http://127.0.0.1:2380", "cluster": "c1",
                           "node_id": "a", "lease_ttl": "3s", "advertise": "10.0.0.1:1774"}, env={})
    assert c.lease_ttl == 3.0 and c.advertise == "10.0.0.1:1774" and c.etcd.count(",") == 1


@pytest.mark.parametrize(("kw", "message"), [
    ({"cluster": ""}, "each needs the other"),
    ({"etcd": ""}, "each needs the other"),
    ({"node_id": ""}, "needs node_id"),
    ({"replicate_from": "127.0.0.1:1775"}, "not with etcd"),
    ({"fsync": "never"}, "needs fsync=always"),
    ({"etcd": "127.0.0.1:2379"}, "expected http://HOST:PORT"),
    ({"cluster": "bad name"}, "not a valid name"),
    ({"lease_ttl": 1.5}, "whole seconds"),
    ({"lease_ttl": 0.0}, "whole seconds"),
    ({"advertise": "nowhere"}, "advertise: expected HOST:PORT"),
])
def test_bad_cluster_settings_are_refused(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg(**kw)
