"""A follower's fetcher tasks meeting refusals and faults of this node (virtual time, no leader)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from logd_trio.core.errors import RequestError, StorageError
from logd_trio.server.replica import fetcher
from logd_trio.server.replica.state import ReplicaState

from ...harness import make_config


def _registry(tmp_path: Path) -> SimpleNamespace:
    config = make_config(tmp_path, node_id="b", replicate_from="127.0.0.1:1")
    return SimpleNamespace(config=config, replica=ReplicaState(config))


async def test_a_topic_this_node_may_not_create_is_refused_once(tmp_path: Path, autojump_clock: object,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    async def get_or_create(name: str) -> object:
        calls.append(name)
        raise RequestError("topic not allowed")

    reg = _registry(tmp_path)
    reg.get_or_create = get_or_create
    target = fetcher.Target("127.0.0.1", 1, "127.0.0.1:1")
    with trio.fail_after(600):  # virtual: the old code retried forever
        await fetcher._follow_topic(reg, "secret", target)  # type: ignore[arg-type]
    assert calls == ["secret"]
    assert [r.getMessage() for r in caplog.records if "secret" in r.getMessage()] == [
        "topic secret: not replicated here: topic not allowed"]


async def test_a_history_id_that_cannot_be_stored_is_retried(tmp_path: Path, autojump_clock: object,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    listed = trio.Event()
    attempts = []

    async def leader_topics(state: ReplicaState, target: fetcher.Target, limit: float) -> list[str]:
        attempts.append(trio.current_time())
        if len(attempts) == 1:
            raise StorageError("cannot write history-id: No space left on device")
        listed.set()
        return []

    monkeypatch.setattr(fetcher, "_leader_topics", leader_topics)
    reg = _registry(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetcher.follow, reg)  # type: ignore[arg-type]
        with trio.fail_after(60):
            await listed.wait()
        nursery.cancel_scope.cancel()
    assert len(attempts) == 2 and reg.replica.halted is None
