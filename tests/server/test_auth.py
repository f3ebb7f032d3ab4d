"""--auth-file (server/auth.py): each right and each refusal on the wire, anonymous rules, a Go-style
client that never sends AUTH, tokens through the client library, certificate subjects, the counter
and the log line (never the token), and bad auth files as one-line errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from logd_trio.client.client import open_client
from logd_trio.core.errors import NotAllowed
from logd_trio.core.fetch import encode_fetch
from logd_trio.server.auth import hash_token, load_policy
from logd_trio.server.config import ConfigError

from ..harness import FAST_RETRY, RunningServer, make_config, start_server
from ..tlsfiles import Certs, make_certs
from ..wire import Wire, batch_request

ALICE, OPS, NODE = "alice-token-1", "ops-token-2", "node-token-3"

AUTH_FILE = f"""
[anonymous]
read = ["public.*"]

[principals.alice]
token = "{hash_token(ALICE)}"
read = ["*"]
write = ["app.*"]

[principals.ops]
token = "{hash_token(OPS)}"
admin = ["*"]

[principals.node-b]
token = "{hash_token(NODE)}"
node = true
read = ["*"]

[principals.cert-alice]
subject = "CN=alice"
write = ["cert.*"]
"""


def _auth_file(tmp_path: Path, text: str = AUTH_FILE) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "auth.toml"
    path.write_text(text)
    return str(path)


async def _server(nursery: trio.Nursery, tmp_path: Path, text: str = AUTH_FILE, **kw: object) -> RunningServer:
    options: dict[str, object] = {"fsync": "never", **kw}
    return await start_server(nursery, make_config(tmp_path / "data", auth_file=_auth_file(tmp_path, text),
                                                   **options))


async def _ask(w: Wire, request: bytes) -> bytes:
    await w.send(request)
    return await w.reply()


async def _stats(w: Wire) -> dict[str, str]:
    body = (await _ask(w, b"STATS\r\n")).split(b"\r\n", 1)[1]
    return dict(line.decode().split(": ", 1) for line in body.split(b"\r\n") if b": " in line)


async def test_go_style_client_gets_the_anonymous_rights(nursery: trio.Nursery, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    srv = await _server(nursery, tmp_path)
    w = await Wire.connect(srv.host, srv.port)
    with trio.fail_after(10):
        assert (await _ask(w, b"CONFIG\r\n")).startswith(b"MOK ")  # always: Go clients ask first
        assert await _ask(w, b"PING\r\n") == b"PONG\r\n"
        assert await _ask(w, batch_request("public.x", [b"m"])) == b"ERR not allowed\r\n"  # no write right
        assert await _ask(w, b"READ public.x 0 10\r\n") == b"ERR not found\r\n"  # read: served
        assert await _ask(w, b"READ private 0 10\r\n") == b"ERR not allowed\r\n"
        assert await _ask(w, b"TAIL private 10\r\n") == b"ERR not allowed\r\n"
        stats = await _stats(w)  # some right: STATS and TOPICS are served
        assert stats["auth.refused"] == "3"  # errors.read also counts the not found
        assert stats["errors.batch"] == "1" and stats["errors.read"] == "2" and stats["errors.tail"] == "1"
        assert (await _ask(w, b"TOPICS\r\n")).startswith(b"MOK ")
    lines = [r.getMessage() for r in caplog.records if "not allowed" in r.getMessage()]
    assert lines and "127.0.0.1" in lines[0] and "BATCH public.x by anonymous" in lines[0], lines


async def test_each_right_of_a_token(nursery: trio.Nursery, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    srv = await _server(nursery, tmp_path)
    w = await Wire.connect(srv.host, srv.port)
    with trio.fail_after(10):
        assert await _ask(w, b"AUTH wrong-token\r\n") == b"ERR not allowed\r\n"
        assert await _ask(w, b"PING\r\n") == b"PONG\r\n"  # the connection stays, as anonymous
        assert await _ask(w, b"AUTH " + ALICE.encode() + b"\r\n") == b"OK\r\n"
        assert await _ask(w, batch_request("app.1", [b"a"])) == b"OK 0 1\r\n"  # write app.*
        assert await _ask(w, batch_request("other", [b"a"])) == b"ERR not allowed\r\n"
        await w.send(b"READ app.1 0 10\r\n")
        head, frames = await w.read_reply()
        assert head == b"OK 0 1\r\n" and len(frames) == 1  # read *
        assert await _ask(w, encode_fetch("b", 0, "app.1", 0, 1 << 20, 0)) == b"ERR not allowed\r\n"  # not a node
        assert await _ask(w, b"AUTH " + OPS.encode() + b"\r\n") == b"OK\r\n"  # admin: read and write anything
        assert await _ask(w, batch_request("other", [b"o"])) == b"OK 0 1\r\n"
        await w.send(b"READ other 0 10\r\n")
        head, _ = await w.read_reply()
        assert head == b"OK 0 1\r\n"
        assert await _ask(w, b"AUTH " + NODE.encode() + b"\r\n") == b"OK\r\n"
        assert await _ask(w, batch_request("app.1", [b"n"])) == b"ERR not allowed\r\n"  # a node: no write
        assert await _ask(w, b"AUTH\r\n") == b"ERR invalid request\r\n"
        reply = await _ask(w, encode_fetch("b", 0, "app.1", 0, 1 << 20, 0))  # last: its frames follow
        assert reply.startswith(b"FETCHED ")  # a node may FETCH what it may read
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "wrong-token" not in text and ALICE not in text and OPS not in text
    assert "AUTH with a token the auth file does not know" in text


QUOTA_FILE = f"""
[anonymous]
write = ["anon.*"]
max_topics = 1

[principals.alice]
token = "{hash_token(ALICE)}"
write = ["app.*"]
max_topics = 2

[principals.ops]
token = "{hash_token(OPS)}"
admin = ["*"]
"""


async def test_max_topics_per_principal(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A principal creates at most ``max_topics`` topics; writing to existing ones (its own or
    others') stays allowed, a deletion gives the topic back, other principals are not counted."""
    srv = await _server(nursery, tmp_path, QUOTA_FILE)
    alice, anon, ops = [await Wire.connect(srv.host, srv.port) for _ in range(3)]
    with trio.fail_after(10):
        assert await _ask(alice, b"AUTH " + ALICE.encode() + b"\r\n") == b"OK\r\n"
        assert await _ask(ops, b"AUTH " + OPS.encode() + b"\r\n") == b"OK\r\n"
        assert await _ask(ops, batch_request("app.ops", [b"o"])) == b"OK 0 1\r\n"  # ops: no quota
        assert await _ask(alice, batch_request("app.1", [b"a"])) == b"OK 0 1\r\n"
        assert await _ask(alice, batch_request("app.2", [b"a"])) == b"OK 0 1\r\n"
        assert await _ask(alice, batch_request("app.3", [b"a"])) == b"ERR maximum topics allowed for alice (2)\r\n"
        assert (await _ask(alice, batch_request("app.ops", [b"a"]))).startswith(b"OK ")  # exists: no new topic
        assert (await _ask(alice, batch_request("app.1", [b"b"]))).startswith(b"OK ")
        assert await _ask(anon, batch_request("anon.1", [b"x"])) == b"OK 0 1\r\n"
        assert await _ask(anon, batch_request("anon.2", [b"x"])) == b"ERR maximum topics allowed for anonymous (1)\r\n"
        assert await _ask(ops, b"DELETE app.2\r\n") == b"OK\r\n"
        assert await _ask(alice, batch_request("app.3", [b"a"])) == b"OK 0 1\r\n"  # app.2's place
        stats = await _stats(alice)
    assert stats["topics.disallowed"] == "2"


async def test_no_anonymous_table_means_no_anonymous_rights(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await _server(nursery, tmp_path, f'[principals.alice]\ntoken = "{hash_token(ALICE)}"\nread = ["*"]\n')
    w = await Wire.connect(srv.host, srv.port)
    with trio.fail_after(10):
        assert (await _ask(w, b"CONFIG\r\n")).startswith(b"MOK ")
        for request in (b"STATS\r\n", b"TOPICS\r\n", b"READ t 0 1\r\n", batch_request("t", [b"x"])):
            assert await _ask(w, request) == b"ERR not allowed\r\n", request
        assert await _ask(w, b"AUTH " + ALICE.encode() + b"\r\n") == b"OK\r\n"
        assert (await _ask(w, b"STATS\r\n")).startswith(b"MOK ")


async def test_client_library_token(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await _server(nursery, tmp_path)
    async with open_client(srv.addr, retry=FAST_RETRY, token=ALICE) as c:
        offset = await c.batch("app.lib", [b"x", b"y"])
        assert [m.body for m in await c.read("app.lib", offset, 10)] == [b"x", b"y"]
        async with c.writer("app.lib") as writer:  # writers open connections of their own: AUTH too
            await writer.write(b"z")
        with pytest.raises(NotAllowed, match="not allowed"):
            await c.batch("elsewhere", [b"x"])
    async with open_client(srv.addr, retry=FAST_RETRY, token="not-a-known-token") as c:
        with pytest.raises(NotAllowed):
            await c.config()
    async with open_client(srv.addr, retry=FAST_RETRY, token="") as c:  # no token: anonymous
        with pytest.raises(NotAllowed):
            await c.batch("app.lib", [b"x"])


async def test_auth_without_an_auth_file_is_answered_ok(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, make_config(tmp_path, fsync="never"))
    async with open_client(srv.addr, retry=FAST_RETRY, token="anything") as c:
        assert await c.batch("t", [b"x"]) == 0


async def test_certificate_subject_principal(nursery: trio.Nursery, tmp_path: Path) -> None:
    certs: Certs = make_certs(tmp_path / "certs")
    srv = await _server(nursery, tmp_path, tls_cert=certs.server.cert, tls_key=certs.server.key,
                        tls_client_ca=certs.ca)
    async with open_client(srv.addr, retry=FAST_RETRY, ssl_context=certs.context(certs.client)) as c:
        assert await c.batch("cert.1", [b"x"]) == 0  # CN=alice: the cert-alice principal, no AUTH
        with pytest.raises(NotAllowed):
            await c.batch("app.1", [b"x"])
    # The node certificate (CN=node-2) matches no subject: anonymous, until it authenticates.
    async with open_client(srv.addr, retry=FAST_RETRY, ssl_context=certs.context(certs.node)) as c:
        with pytest.raises(NotAllowed):
            await c.batch("cert.1", [b"x"])
    async with open_client(srv.addr, retry=FAST_RETRY, ssl_context=certs.context(certs.node), token=ALICE) as c:
        assert await c.batch("app.1", [b"x"]) == 0


async def test_follower_authenticates_as_a_node(nursery: trio.Nursery, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    leader = await _server(nursery, tmp_path / "a", node_id="a", fsync="always")
    follower = await start_server(nursery, make_config(tmp_path / "b", node_id="b", replicate_from=leader.addr,
                                                       replicate_token=NODE))
    async with open_client(leader.addr, retry=FAST_RETRY, token=ALICE) as c:
        head = await c.batch("app.r", [b"one"]) + 1
    async with open_client(follower.addr, retry=FAST_RETRY) as c:
        with trio.fail_after(20):
            while True:
                if (await c.topics()).get("app.r", (0, 0))[1] >= head:
                    break
                await trio.sleep(0.05)
    # A follower with alice's token (no node right) is refused, and says so.
    await start_server(nursery, make_config(tmp_path / "c", node_id="c", replicate_from=leader.addr,
                                            replicate_token=ALICE))
    with trio.fail_after(20):
        while True:
            if any("refused FETCH" in r.getMessage() and "not allowed" in r.getMessage() for r in caplog.records):
                break
            await trio.sleep(0.05)


@pytest.mark.parametrize(("text", "expected"), [
    ("[anonymous]\nread = \"*\"\n", r"\[anonymous\]\.read: expected a list of topic patterns"),
    ("[anonymous]\ntoken = \"x\"\n", r"\[anonymous\]: unknown key 'token'"),
    ("[principals.a]\nread = [\"*\"]\n", r"\[principals\.a\]: needs a token or a subject"),
    ("[principals.a]\ntoken = \"secret\"\n", r"\[principals\.a\]\.token: expected \"sha256:<64 hex digits>\""),
    (f"[principals.a]\ntoken = \"{hash_token('t')}\"\n[principals.b]\ntoken = \"{hash_token('t')}\"\n",
     r"\[principals\.b\] has the token of \[principals\.a\]"),
    ("[principals.a]\nsubject = \"alice\"\n", r"\[principals\.a\]\.subject: expected KEY=VALUE"),
    ("[principals.a]\nsubject = \"CN=a\"\nnode = \"yes\"\n", r"\[principals\.a\]\.node: expected true or false"),
    ("[principals.a]\nsubject = \"CN=a\"\nrigths = []\n", r"unknown key 'rigths'"),
    ("[principals.anonymous]\nsubject = \"CN=a\"\n", r"use the top-level \[anonymous\] table"),
    ("[users]\n", r"unknown key 'users'"),
    ("[anonymous]\nmax_topics = -1\n", r"\[anonymous\]\.max_topics: expected a whole number >= 0, got -1"),
    ("[anonymous]\nmax_topics = \"5\"\n", r"\[anonymous\]\.max_topics: expected a whole number >= 0"),
    ("[anonymous]\nmax_topics = true\n", r"\[anonymous\]\.max_topics: expected a whole number >= 0"),
    ("[anonymous\n", r"auth file .*auth\.toml: "),
])
def test_bad_auth_files(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        load_policy(_auth_file(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_auth_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth file .*nope\.toml: No such file"):
        load_policy(str(tmp_path / "nope.toml"))


def test_patterns_and_subjects(tmp_path: Path) -> None:
    policy = load_policy(_auth_file(tmp_path))
    alice = policy.by_token(ALICE)
    assert alice is not None and alice.name == "alice"
    assert alice.may("read", "anything") and alice.may("write", "app.x") and not alice.may("write", "appx")
    assert policy.by_token("nope") is None
    assert policy.by_subject("O=logd tests,CN=alice").name == "cert-alice"
    assert policy.by_subject("CN=bob").name == "anonymous"
    assert policy.by_subject("").name == "anonymous"
    assert "token" not in repr(policy.by_token(OPS)).replace("token_digest", "")  # no digest in a repr
    assert NODE not in repr(make_config(tmp_path, replicate_token=NODE))  # nor a follower's token
