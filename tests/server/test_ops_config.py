"""Settings a Go logd user carries over: decimal modes, repeated whitelists, an empty
--http-host; and what the configuration sources must not ignore silently."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import trio
from logd_trio_cli.main import app
from typer.testing import CliRunner

from logd_trio.server.config import ConfigError, Notes, ServerConfig, load_config, parse_mode

from ..harness import spawn, start_server
from ..wire import Wire, batch_request


@pytest.mark.parametrize(
    ("value", "mode", "reading"),
    [
        ("420", 0o644, "decimal"),  # how Go logd prints 0644
        ("384", 0o600, "decimal"),
        ("0644", 0o644, "octal"),
        ("0o644", 0o644, "octal"),
        ("0O750", 0o750, "octal"),
        (420, 0o644, "integer"),  # a TOML integer is the number it is (0o644 in TOML is 420 too)
        ("0", 0, "decimal"),
    ],
)
def test_modes_read_as_go_reads_integer_flags(value: object, mode: int, reading: str) -> None:
    got, how = parse_mode(value, key="file_mode")
    assert got == mode and reading in how


@pytest.mark.parametrize(("value", "message"), [
    ("644", r"644 read as a decimal integer .* is 0o1204, not a permission mode .* such as 0644"),
    ("0999", "not an octal number"),
    ("0o1777", "at most 0777"),
    ("rw-r--r--", "expected a permission mode"),
    (True, "expected a permission mode"),
])
def test_a_mode_that_is_no_mode_is_refused_with_its_octal_spelling(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(flags={"file_mode": value}, env={})


def test_the_reading_of_a_mode_is_noted() -> None:
    notes: Notes = []
    c = load_config(flags={"file_mode": "420", "dir_mode": "0750"}, env={}, notes=notes)
    assert (c.file_mode, c.dir_mode) == (0o644, 0o750)
    text = [t for _, t in notes]
    assert any("file_mode" in t and "decimal" in t and "0644" in t for t in text), text
    assert any("dir_mode" in t and "octal" in t and "0750" in t for t in text), text


def test_a_repeated_whitelist_keeps_every_value() -> None:
    c = load_config(flags={"topics_whitelist": ["a", "b,c", "a"]}, env={})
    assert c.topics_whitelist == ("a", "b", "c")
    assert load_config(env={"LOGD_TOPICS_WHITELIST": "x,y"}).topics_whitelist == ("x", "y")


def test_cli_whitelist_flag_repeats_and_empty_http_host_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ServerConfig] = []

    async def fake_run(config: ServerConfig) -> None:  # the CLI's handover, not the server under test
        seen.append(config)

    monkeypatch.setattr("logd_trio_cli.serve_cmd.run", fake_run)
    result = CliRunner().invoke(app, ["serve", "--topics-whitelist", "a", "--topics-whitelist", "b",
                                      "--http-host", "", "--file-mode", "420"], env={})
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.topics_whitelist == ("a", "b")
    assert config.http_host == "" and config.http_address is None
    assert config.file_mode == 0o644


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^LOGD_PARTITIONS \(environment\): expected an integer"):
        load_config(env={"LOGD_PARTITIONS": "many"})
    with pytest.raises(ConfigError, match=r"^LOGD_FILE_MODE \(environment\)"):
        load_config(env={"LOGD_FILE_MODE": "644"})


def test_unknown_logd_variable_is_reported() -> None:
    notes: Notes = []
    load_config(env={"LOGD_PARTITONS": "4", "LOGD_TOPICS": "5", "OTHER": "x"}, notes=notes)
    assert [(lvl, "LOGD_PARTITONS" in t) for lvl, t in notes] == [(logging.WARNING, True)]


def test_top_level_keys_beside_serve_are_not_ignored(tmp_path: Path) -> None:
    f = tmp_path / "logd.toml"
    f.write_text("partitions = 3\n[serve]\ntopics = 20\n")
    with pytest.raises(ConfigError, match="'partitions' is outside \\[serve\\]"):
        load_config(file=f, env={})
    f.write_text("[serve]\ntopics = 20\n[client]\nhost = 'x:1'\n")
    notes: Notes = []
    assert load_config(file=f, env={}, notes=notes).topics == 20
    assert any(lvl == logging.WARNING and "[client]" in t for lvl, t in notes), notes
    f.write_text("[serve]\npartitions = 3\nbogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(file=f, env={})


async def test_file_mode_420_gives_0644_files(tmp_path: Path, nursery: trio.Nursery) -> None:
    old = os.umask(0o022)
    try:
        config = load_config(flags={"host": "127.0.0.1:0", "workdir": tmp_path / "d", "file_mode": "420",
                                    "fsync": "never"}, env={})
        srv = await start_server(nursery, config)
        w = await Wire.connect(srv.host, srv.port)
        await w.send(batch_request("t", [b"hello"]))
        assert (await w.line()).startswith(b"OK ")
        await srv.stop()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d" / "t" / "0.log").stat().st_mode) == 0o644


async def test_serve_process_logs_the_mode_reading(tmp_path: Path, nursery: trio.Nursery) -> None:
    proc = await spawn(nursery, tmp_path / "d", "--file-mode", "420", "--fsync", "never")
    assert b"'420' read as a decimal integer (Go's spelling): mode 0644" in proc.log
    proc.proc.terminate()
    with trio.fail_after(10):
        await proc.proc.wait()


def test_default_topics_is_1024_and_a_short_fd_limit_says_what_it_needs(caplog: pytest.LogCaptureFixture) -> None:
    from logd_trio.server.app import _fd_budget

    config = ServerConfig()
    assert config.topics == 1024 and load_config(flags={"topics": 8}, env={}).topics == 8  # Go's 8 by flag
    with caplog.at_level(logging.INFO, logger="logd_trio.server.app"):
        budget = _fd_budget(config, 20000, existing=3)
    assert budget.max_connections == 1024  # a quarter of 20000 still covers --max-connections
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    text = record.getMessage()
    # 1024 topics x 41 descriptors (8 partitions); (20000 - 1024 x 2 - 81 fixed) // 41 = 435 topics fit
    assert "1024 topics of 8 partitions could need 41984 descriptors (41 each" in text, text
    assert "about 435 topics fit (3 exist)" in text and "to 44145" in text, text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="logd_trio.server.app"):
        _fd_budget(config, 20000, existing=436)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="logd_trio.server.app"):
        assert _fd_budget(config, 65536, existing=3).max_connections == 1024
    assert caplog.records == []  # the systemd unit's LimitNOFILE=65536 affords the defaults
