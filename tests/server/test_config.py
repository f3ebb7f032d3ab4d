"""Configuration: precedence flags > env > file > defaults, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from logd_trio_cli.main import app
from typer.testing import CliRunner

from logd_trio.server.config import ConfigError, ServerConfig, format_duration, load_config, parse_duration


def test_defaults_match_go_and_the_contract() -> None:
    c = ServerConfig()
    assert c.host == "127.0.0.1:1774" and c.address == ("127.0.0.1", 1774)
    assert c.batch_size == 65536 and c.max_messages == 50000
    assert c.fsync == "always"
    assert (c.timeout, c.idle_timeout, c.max_wait) == (15.0, 30.0, 30.0)


def test_precedence(tmp_path: Path) -> None:
    f = tmp_path / "logd.toml"
    f.write_text('[serve]\nbatch-size = 1000\npartitions = 3\nfsync = "never"\ntimeout = "2s"\n')
    env = {"LOGD_PARTITIONS": "4", "LOGD_FSYNC": "interval", "UNRELATED": "x"}
    c = load_config(flags={"fsync": "always", "partitions": None}, env=env, file=f)
    assert c.batch_size == 1000  # file
    assert c.partitions == 4  # env beats file
    assert c.fsync == "always"  # flag beats env
    assert c.timeout == 2.0
    # a file without a [serve] table works too
    f.write_text("topics = 20\ntopics-whitelist = ['a', 'b']\nfile-mode = '0640'\n")
    c = load_config(file=f, env={})
    assert (c.topics, c.topics_whitelist, c.file_mode) == (20, ("a", "b"), 0o640)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"fsync": "sometimes"}, "fsync"),
        ({"batch_size": "lots"}, "batch_size"),
        ({"partitions": 0}, "partitions"),
        ({"timeout": "15 parsecs"}, "timeout"),
        ({"timeout": "nan"}, "timeout"),
        ({"idle_timeout": "inf"}, "idle_timeout"),
        ({"host": "localhost"}, "host"),
        ({"topics_whitelist": "ok,../bad"}, "topics_whitelist"),
        ({"file_mode": "rw"}, "file_mode"),
        ({"no_such_key": 1}, "no_such_key"),
    ],
)
def test_bad_values_name_the_key(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(flags=flags, env={})


def test_unknown_file_key_and_bad_toml(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="colour"):
        load_config(file=f, env={})
    f.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match=r"c\.toml"):
        load_config(file=f, env={})
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(file=tmp_path / "missing.toml", env={})


def test_sizes_and_durations() -> None:
    assert load_config(flags={"partition_size": "256MiB", "batch_size": "64k"}, env={}).partition_size == 256 << 20
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("200ms") == pytest.approx(0.2)
    assert parse_duration(3) == 3.0
    assert [format_duration(s) for s in (15, 30, 60, 0.2, 90)] == ["15s", "30s", "1m0s", "200ms", "1m30s"]


def test_cli_serve_rejects_bad_config_with_one_line() -> None:
    result = CliRunner().invoke(app, ["serve", "--fsync", "sometimes"])
    assert result.exit_code == 2
    assert "fsync" in result.output and "Traceback" not in result.output


def test_cli_serve_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--host", f"127.0.0.1:{port}", "--workdir", str(tmp_path)])
    assert result.exit_code == 1
    assert "Address already in use" in result.output and "Traceback" not in result.output


def test_max_connections_per_ip() -> None:
    assert ServerConfig().max_connections_per_ip == 256
    assert load_config(env={"LOGD_MAX_CONNECTIONS_PER_IP": "0"}).max_connections_per_ip == 0  # 0: no cap
    assert load_config(flags={"max_connections_per_ip": 3}, env={}).max_connections_per_ip == 3
    with pytest.raises(ConfigError, match="max_connections_per_ip"):
        load_config(flags={"max_connections_per_ip": -1}, env={})
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert "--max-connections-per-ip" in result.output


def test_retention_time_from_flag_env_and_file(tmp_path: Path) -> None:
    assert ServerConfig().retention_time == 0.0  # off by default
    cfg_file = tmp_path / "logd.toml"
    cfg_file.write_text('retention-time = "7d"\n')
    assert load_config(file=cfg_file, env={}).retention_time == 7 * 86400
    assert load_config(file=cfg_file, env={"LOGD_RETENTION_TIME": "12h"}).retention_time == 12 * 3600
    assert load_config(flags={"retention_time": "1d12h"}, env={"LOGD_RETENTION_TIME": "12h"}).retention_time == 129600
    with pytest.raises(ConfigError, match="LOGD_RETENTION_TIME"):
        load_config(env={"LOGD_RETENTION_TIME": "a week"})
    with pytest.raises(ConfigError, match="retention_time"):
        load_config(flags={"retention_time": "-1d"}, env={})
    result = CliRunner().invoke(app, ["serve", "--retention-time", "soon"])
    assert result.exit_code != 0 and "retention_time" in result.output
