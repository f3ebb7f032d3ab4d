"""A client of a logd cluster that follows a failover: :class:`ClusterClient`.

Its connections go to one node: the leader when there is one, else any member that answers
(reads work on followers).  Before it opens a new connection to that node again (the old one
broke, timed out or went idle) it asks the node ``CLUSTER``: a node that does not answer (dead,
paused, partitioned: the kernel may still accept its connections) is left for another one.
Every request has a deadline (``request_timeout``, by default :data:`REQUEST_TIMEOUT`, plus the
wait of a long-poll ``READ``), so a reader never hangs on a node that stopped.

A *following* reader (a :class:`~logd_trio.client.scanner.Scanner` with ``follow=True``) reads from
the leader only (:meth:`ClusterClient.following_session`): a follower may show batches the
cluster has not acknowledged, which a new leader may not have.  Without a leader it waits for
one; it asks its node ``CLUSTER`` at least every ``leader_check`` seconds (before a request) and
moves to the new leader when that node no longer leads.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from logd_trio.client.client import Client
from logd_trio.client.failover import _UNREACHABLE, PLAIN, Secure, ask_cluster, find_leader, find_member
from logd_trio.client.transport import Connection, RetryPolicy, Session, TLSTimeout
from logd_trio.core.defaults import DEFAULT_MAX_REPLY
from logd_trio.core.errors import BadReply, ConnectionLost
from logd_trio.core.replies import ErrorReply, MokReply, Reply, ReplyKind
from logd_trio.core.tls import TLSFailed

__all__ = ["REQUEST_TIMEOUT", "ClusterClient"]

REQUEST_TIMEOUT = 15.0  # seconds: a request's deadline when the caller gives none (an --acks all batch waits <= 10 s)


class ClusterClient(Client):
    """A client of a cluster: see the module docstring.  ``give_up``: how long one connect looks
    for a node (then :class:`ConnectionLost`); ``leader_wait``: after a broken connection, how long
    it waits for a leader before it settles for any member (not for a following reader: that one
    waits for a leader); ``settle``: how long a following
    :class:`~logd_trio.client.scanner.Scanner` waits for a position the leader it moved to does not
    serve yet (its high watermark behind, just after a takeover) before it says ``NotFound``;
    ``leader_check``: see the module docstring."""

    def __init__(self, addresses: Sequence[str], *, give_up: float = 30.0, leader_wait: float = 5.0,
                 settle: float = 10.0, leader_check: float = 1.0, secure: Secure = PLAIN,
                 retry: RetryPolicy | None = None, request_timeout: float | None = None,
                 max_reply: int = DEFAULT_MAX_REPLY, extensions: bool | None = None) -> None:
        if not addresses:
            raise ValueError("at least one address")
        super().__init__(addresses[0], retry=retry,
                         request_timeout=REQUEST_TIMEOUT if request_timeout is None else request_timeout,
                         max_reply=max_reply, extensions=extensions, ssl_context=secure.ssl_context,
                         tls_hostname=secure.tls_hostname, token=secure.token)
        self.addresses = list(addresses)
        self.secure = secure
        self.give_up = give_up
        self.leader_wait = leader_wait
        self.settle = settle  # a following Scanner waits this long for a position a new node does not serve yet
        self.leader_check = leader_check
        self.chosen: str | None = None  # the node connections go to (None: find one)
        self.switches = 0  # how many times the node changed

    def _retry_once(self) -> RetryPolicy:
        return RetryPolicy(attempts=1, initial=0.05, maximum=0.05, connect_timeout=min(self.retry.connect_timeout, 2.0))

    async def connect(self) -> Connection:
        """A connection to the chosen node if it still answers, else to another one (see the class)."""
        retry = self._retry_once()
        lost = self.chosen
        if lost is not None:
            try:
                await ask_cluster(lost, retry.connect_timeout, self.secure)  # it answers (a paused node does not)
                return await self._open(lost, retry)
            except _UNREACHABLE:  # a TLS refusal too: only the survey says every node refused
                self.chosen = None
        return await self._find(lost, retry, leader_only=False)

    async def connect_leader(self) -> Connection:
        """A connection to the node that leads (a server without the CLUSTER extension counts as
        its own leader), waiting up to ``give_up`` for one; :class:`ConnectionLost` then."""
        return await self._find(self.chosen, self._retry_once(), leader_only=True)

    def following_session(self) -> Session:
        """The session of a following reader: to the leader only (see the module docstring)."""
        return _Following(self)

    async def head_on(self, session: Session, topic: str) -> int:
        """``topic``'s head (TOPICS; 0 if unknown) on the node of ``session``: a following reader
        compares its position with the node it reads from."""
        reply = await session.request(b"TOPICS\r\n", ReplyKind.MOK)
        if isinstance(reply, ErrorReply):
            raise reply.exception()
        if not isinstance(reply, MokReply):
            raise BadReply(f"unexpected reply to TOPICS: {reply!r}")
        words = reply.fields().get(topic, "0 0").split()
        return int(words[1]) if len(words) == 2 and words[1].isdigit() else 0

    async def _find(self, lost: str | None, retry: RetryPolicy, *, leader_only: bool) -> Connection:
        started = anyio.current_time()
        delay = 0.05
        why = "no leader found" if leader_only else "no node answered"
        while True:
            now = anyio.current_time()
            wait_for_leader = leader_only or (lost is not None and now - started < self.leader_wait)
            found = (find_leader if wait_for_leader else find_member)
            address = await found(self.addresses, per_node=retry.connect_timeout, secure=self.secure)
            if address is not None:
                try:
                    conn = await self._open(address, retry)
                except TLSTimeout as exc:
                    why = str(exc)
                except TLSFailed:
                    raise
                except _UNREACHABLE as exc:
                    why = str(exc)
                else:
                    if address != lost:
                        self.switches += lost is not None
                    self.chosen = self.address = address
                    return conn
            if anyio.current_time() + delay - started > self.give_up:
                what = "led" if leader_only else "answered"
                raise ConnectionLost(f"no node of {', '.join(self.addresses)} {what} within "
                                     f"{self.give_up:g} s (last: {why})")
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _open(self, address: str, retry: RetryPolicy) -> Connection:
        with anyio.fail_after(2 * retry.connect_timeout):
            return await self.secure.connect(address, retry, self.max_reply)


class _ToLeader:
    """The connector of a following reader's session: the leader only; remembers which node and when
    it last said it leads."""

    def __init__(self, client: ClusterClient) -> None:
        self.client = client
        self.node: str | None = None
        self.checked = 0.0

    @property
    def request_timeout(self) -> float | None:
        return self.client.request_timeout

    async def connect(self) -> Connection:
        conn = await self.client.connect_leader()
        self.node, self.checked = self.client.chosen, anyio.current_time()
        return conn

    async def still_leads(self) -> bool:
        """Asked at most every ``leader_check`` seconds: does the node still lead?"""
        if anyio.current_time() - self.checked < self.client.leader_check:
            return True
        if self.node is None:
            return False
        try:
            view = await ask_cluster(self.node, self.client._retry_once().connect_timeout, self.client.secure)
        except _UNREACHABLE:
            return False
        self.checked = anyio.current_time()
        return view is None or view.get("role") == "leader"


class _Following(Session):
    """A session to the leader only: before a request it checks (:meth:`_ToLeader.still_leads`) that
    its node still leads, else reconnects to the leader, waiting for one."""

    def __init__(self, client: ClusterClient) -> None:
        self._leader = _ToLeader(client)
        super().__init__(self._leader)

    async def _request(self, data: bytes, kind: ReplyKind, idempotent: bool) -> Reply:
        if self._conn is not None and not await self._leader.still_leads():
            await self.aclose()
        return await super()._request(data, kind, idempotent)
