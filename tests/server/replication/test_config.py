"""Replication settings that would acknowledge data before it is durable are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from logd_trio_cli.main import app
from typer.testing import CliRunner

from logd_trio.server.config import ConfigError, ServerConfig


@pytest.mark.parametrize("fsync", ["interval", "never"])
def test_acks_all_needs_fsync_always(fsync: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^acks: all needs fsync=always \(with fsync={fsync}"):
        ServerConfig(workdir=tmp_path, acks="all", min_insync=2, fsync=fsync)
    result = CliRunner().invoke(app, ["serve", "--workdir", str(tmp_path), "--acks", "all", "--fsync", fsync])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("logd serve: acks: all needs fsync=always")


@pytest.mark.parametrize("fsync", ["interval", "never"])
def test_a_follower_needs_fsync_always(fsync: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^replicate_from: needs fsync=always"):
        ServerConfig(workdir=tmp_path, replicate_from="127.0.0.1:7000", node_id="b", fsync=fsync)
    result = CliRunner().invoke(app, ["serve", "--workdir", str(tmp_path), "--node-id", "b",
                                      "--replicate-from", "127.0.0.1:7000", "--fsync", fsync])
    assert result.exit_code == 2
    assert result.output.startswith("logd serve: replicate_from: needs fsync=always")


def test_fsync_always_is_accepted(tmp_path: Path) -> None:
    ServerConfig(workdir=tmp_path, acks="all", min_insync=2)
    ServerConfig(workdir=tmp_path, replicate_from="127.0.0.1:7000", node_id="b")
