"""The client's public value classes are frozen dataclasses: ``dataclasses.replace``,
``fields``, ``asdict`` and ``is_dataclass`` work on them, and a token never shows in a repr."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from logd_trio.client.batches import Ack
from logd_trio.client.client import ServerInfo
from logd_trio.client.failover import Secure
from logd_trio.client.positions import Last
from logd_trio.client.transport import RetryPolicy


@pytest.mark.parametrize("value", [RetryPolicy(), Secure(token="t0ken"), ServerInfo({"Host": "h"}), Last(3), Ack(1, 2)],
                         ids=lambda v: type(v).__name__)
def test_public_value_classes_are_frozen_dataclasses(value: Any) -> None:
    assert dataclasses.is_dataclass(value) and not isinstance(value, type)
    names = [f.name for f in dataclasses.fields(value)]
    assert names and dataclasses.replace(value) == value
    assert list(dataclasses.asdict(value)) == names
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, names[0], None)


def test_replace_keeps_the_checks() -> None:
    policy = dataclasses.replace(RetryPolicy(), attempts=1)
    assert policy.attempts == 1 and policy.initial == RetryPolicy().initial
    with pytest.raises(ValueError, match="attempts"):
        dataclasses.replace(policy, attempts=0)


def test_the_token_is_not_in_the_repr() -> None:
    secure = Secure(token="s3cret-token", tls_hostname="node1")
    assert "s3cret-token" not in repr(secure) and "node1" in repr(secure)
    assert secure.token == "s3cret-token" and secure == Secure(token="s3cret-token", tls_hostname="node1")
