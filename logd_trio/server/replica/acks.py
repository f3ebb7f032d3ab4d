"""``--acks all``: a BATCH's reply waits until the batch is durable on ``--min-insync`` nodes.

The connection's writer gets an :class:`AwaitReplicas` in place of the
:class:`~logd_trio.server.topic.Append` and sends what :meth:`AwaitReplicas.answer`
returns, in reply order.  The leader's group commit is unchanged (the
batch is fsynced here first); the followers' next fetch offsets are their
acknowledgements (:meth:`ReplicaState.wait_acks`).  No thread hop and no
per-batch work beyond one comparison per in-sync follower.
"""

from __future__ import annotations

from collections.abc import Callable

from logd_trio.core.errors import LogdError, RequestError, StorageError
from logd_trio.server.replica.state import ReplicaState
from logd_trio.server.topic import Append

__all__ = ["AwaitReplicas"]


class AwaitReplicas:
    """One BATCH under ``--acks all``: its local append, and where to wait for the followers."""

    __slots__ = ("append", "generation", "state", "topic")

    def __init__(self, append: Append, topic: str, state: ReplicaState) -> None:
        self.append = append
        self.topic = topic
        self.state = state
        self.generation = state.generation  # the leadership the batch is stored in (created as it is queued)

    @property
    def ready(self) -> bool:
        return self.append.done.is_set()

    async def answer(self, error_reply: Callable[[LogdError], bytes]) -> bytes:
        """The reply line: ``OK <offset> 1`` once durable on enough nodes, else the ``ERR``."""
        item = self.append
        await item.done.wait()
        if item.error is not None:
            if self.state.clustered and isinstance(item.error, StorageError) and not self.state.leading:
                return error_reply(RequestError(self.state.refusal() or "not leader"))  # deposed while queued
            return error_reply(item.error)
        try:
            if self.state.config.acks == "all":
                await self.state.wait_acks(self.topic, item.end, self.generation)
            self.state.check_generation(self.generation)
            why = self.state.refusal()  # a cluster leader deposed meanwhile (or its lease unconfirmed) never says OK
            if why is not None:
                raise RequestError(why)
        except RequestError as e:  # stored on the leader, not acknowledged: the outcome is unknown to the client
            return error_reply(e)
        return b"OK %d 1\r\n" % item.offset
