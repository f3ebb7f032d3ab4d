"""The cluster flags of the client commands: --retries bounds how long they look for a node."""

from __future__ import annotations

from cli.options import cluster_give_up, connect_client
from logd_trio.client.cluster_client import ClusterClient


async def test_retries_bound_how_long_the_cluster_clients_look_for_a_node() -> None:
    async with connect_client("127.0.0.1:1,127.0.0.1:2", retries=1, timeout=None) as client:
        assert isinstance(client, ClusterClient)
        assert client.give_up == cluster_give_up(1) == 10.0
    assert cluster_give_up(3) == 30.0  # the default --retries: as long as before
