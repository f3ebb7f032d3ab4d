"""`logd auth hash-token`, `logd serve --auth-file` with a bad file, and `--token` on the client commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from cli import auth_cmd, info_cmds, write_cmd
from logd_trio.server.auth import hash_token, load_policy

from .test_cli_client import server_thread

EXIT = 7  # WriteFailed: the writer reports the refused batch

app = typer.Typer()
for _module in (auth_cmd, info_cmds, write_cmd):
    _module.register(app)


def test_hash_token_from_stdin_and_generated(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["auth", "hash-token"], input="my-token\n")
    assert result.exit_code == 0
    assert result.stdout == f'token = "{hash_token("my-token")}"\n'
    result = CliRunner().invoke(app, ["auth", "hash-token", "--generate"])
    assert result.exit_code == 0
    token_line, hash_line = result.stdout.splitlines()
    token = token_line.removeprefix("token: ")
    assert len(token) >= 40 and hash_line == f'token = "{hash_token(token)}"'
    # What it prints is an auth file line as it stands.
    (tmp_path / "auth.toml").write_text(f"[principals.x]\n{hash_line}\nread = [\"*\"]\n")
    assert load_policy(str(tmp_path / "auth.toml")).by_token(token) is not None
    result = CliRunner().invoke(app, ["auth", "hash-token"], input="\n")
    assert result.exit_code == 2 and "no token" in result.stderr


def test_serve_with_a_bad_auth_file_says_so_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "auth.toml"
    bad.write_text('[principals.a]\ntoken = "plaintext"\n')
    p = subprocess.run([sys.executable, "-m", "logd_trio_cli.main", "serve", "--host", "127.0.0.1:0", "--workdir",
                        str(tmp_path / "data"), "--auth-file", str(bad)], capture_output=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.count(b"\n") == 1 and b"[principals.a].token" in p.stderr, p.stderr


def test_token_flag(tmp_path: Path) -> None:
    auth = tmp_path / "auth.toml"
    auth.write_text(f'[principals.w]\ntoken = "{hash_token("tok-1")}"\nwrite = ["t"]\nread = ["t"]\n')
    with server_thread(tmp_path / "data", auth_file=str(auth)) as addr:
        result = CliRunner().invoke(app, ["write", "--host", addr, "--topic", "t", "--token", "tok-1", "x"])
        assert result.exit_code == 0 and result.stdout == "0\n", result.stderr
        result = CliRunner().invoke(app, ["write", "--host", addr, "--topic", "t", "x"])  # anonymous: nothing
        assert result.exit_code == EXIT, (result.exit_code, result.stderr)
        assert result.stderr.count("\n") == 1 and "not allowed" in result.stderr, result.stderr
        result = CliRunner().invoke(app, ["stats", "--host", addr], env={"LOGD_TOKEN": "tok-1"})
        assert result.exit_code == 0 and "auth.refused: 1" in result.stdout, result.stdout
