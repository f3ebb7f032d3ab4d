"""Fixtures: real etcd clusters (see tests/etcd_harness.py) and clients of them."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from logd_trio.server.cluster.etcd import EtcdClient

from ...etcd_harness import EtcdCluster, etcd_cluster

_names = itertools.count()


@pytest.fixture(scope="session")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member shared by the tests that do not harm it (each uses its own keys)."""
    with etcd_cluster(tmp_path_factory.mktemp("etcd-shared"), 1) as cluster:
        yield cluster


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A 1-member cluster of this test's own (to kill or pause)."""
    with etcd_cluster(tmp_path, 1) as cluster:
        yield cluster


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A 3-member cluster of this test's own."""
    with etcd_cluster(tmp_path, 3) as cluster:
        yield cluster


@pytest.fixture
async def etcd(shared_etcd: EtcdCluster) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(shared_etcd.endpoints, timeout=2) as client:
        yield client


@pytest.fixture
def prefix() -> str:
    """Keys of this test only, on the shared member."""
    return f"/test/{next(_names)}/"


@pytest.fixture
def cluster_name() -> str:
    return f"c{next(_names)}"
