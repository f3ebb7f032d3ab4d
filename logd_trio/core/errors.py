"""One error family for the whole library.

Server side, a request that breaks the protocol raises :class:`RequestError`,
which carries the exact ``ERR`` reason to send and whether the connection must
close afterwards (because the request's end cannot be known).  Client side,
each ``ERR`` reason a server can send maps to one subclass of
:class:`LogdError`, so callers catch what they mean.
"""

from __future__ import annotations

from typing import ClassVar


class LogdError(Exception):
    """Base class of every error this library raises."""


class RequestError(LogdError):
    """The peer sent a request that breaks the protocol (server side).

    ``reason`` is the text sent after ``ERR ``; ``close`` says whether the
    server must close the connection after replying, because the request's
    extent is unknown and the byte stream cannot be resynchronised.
    """

    def __init__(self, reason: str, *, close: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close = close


class InvalidBatchError(LogdError):
    """A batch body is not exact ``MSG <len>\\r\\n<bytes>\\r\\n`` framing."""


class StorageError(LogdError):
    """The storage layer could not do what was asked (disk full, I/O error)."""


class NotFound(LogdError):
    """The offset is not the start of a retained batch, or the topic is unknown."""


# ---------------------------------------------------------------- client side
#
# Every ``ERR <reason>`` a server can send maps to one class below (see
# ``logd_trio.core.replies.error_for_reason``); transport failures become
# :class:`ConnectionLost` and request deadlines :class:`Timeout`.


class ClientError(LogdError):
    """Base of the errors the client raises.  ``reason`` is the server's text, if any.

    ``permanent`` errors say that sending the same request again cannot succeed
    (a refused topic, a request the server will never accept): a writer stops at
    the first one instead of queueing more messages behind it.
    """

    permanent: ClassVar[bool] = False

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        super().__init__(message or (reason or ""))
        self.reason = reason


class InvalidPosition(ClientError, ValueError):
    """A position (a checkpoint's ``OFFSET:DELTA``) whose delta is not where a message starts
    in the batch at that offset: reading on from it would skip or split messages."""

    permanent = True


class ServerRejected(ClientError):
    """The server answered ``ERR <reason>`` (base of the reason-specific classes)."""


class InvalidRequest(ServerRejected):
    """``ERR invalid request`` (or ``invalid protocol``)."""

    permanent = True


class ChecksumMismatch(ServerRejected):
    """``ERR checksum mismatch``, or a batch read from the server failed its CRC check."""


class InvalidBatch(ServerRejected):
    """``ERR invalid batch``: the server rejected the MSG framing or count."""

    permanent = True


class InvalidTopic(ServerRejected):
    """``ERR invalid topic`` / ``request missing topic``, or a topic name the client refuses to send."""

    permanent = True


class TopicNotAllowed(ServerRejected):
    """``ERR topic not allowed``."""

    permanent = True


class NotAllowed(ServerRejected):
    """``ERR not allowed``: the server's auth file does not give this client that right (or
    the token given to AUTH is not one it knows)."""

    permanent = True


class MaxTopics(ServerRejected):
    """``ERR maximum topics allowed``."""

    permanent = True


class ServerError(ServerRejected):
    """Any other ``ERR`` reason (Go clients read these as internal errors)."""


class CorruptDataReply(ServerError):
    """``ERR corrupt data``: the batch at the offset failed the server's CRC
    check (disk damage); the server withholds it.  Read past it from a later
    offset, or restore the data."""


class NotFoundReply(NotFound, ServerRejected):
    """``ERR not found`` as received by the client (also a :class:`NotFound`)."""


class OffsetRemoved(NotFound, ClientError):
    """The requested offset lies before the oldest batch retention kept."""


class ConnectionLost(ClientError):
    """No server reachable, or the connection broke before a reply arrived."""


class BadReply(ConnectionLost):
    """The server sent bytes that are not a valid reply; the connection was dropped."""


class Timeout(ClientError):
    """A request did not complete within the client's request timeout."""


class Unsupported(ClientError):
    """The server does not implement a protocol extension this call needs (e.g. TOPICS on Go logd)."""


class MessageTooLarge(ClientError):
    """A single message cannot fit in one batch of the server's maximum batch size."""

    permanent = True


class WriterClosed(ClientError):
    """``write`` was called on a writer that has been closed."""


class WriteFailed(ClientError):
    """A writer closed with failed batches left; ``failed`` holds them (nothing was dropped)."""

    def __init__(self, message: str, failed: list[object]) -> None:
        super().__init__(message)
        self.failed = failed


class CheckpointError(ClientError):
    """A checkpoint file is unreadable or belongs to another topic."""


def unwrap_group(exc: BaseException, *, skip: tuple[type[BaseException], ...] = ()) -> BaseException:
    """The one exception to show for ``exc``, never a group (the one rule for every caller).

    A group gives its first leaf that is not an instance of ``skip`` (e.g. the
    event loop's cancellation class), or its first leaf if all are; the other
    real leaves are added to it as notes ("also raised: ...").
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves: list[BaseException] = []
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if isinstance(e, BaseExceptionGroup):
            stack.extend(reversed(e.exceptions))
        else:
            leaves.append(e)
    real = [e for e in leaves if not isinstance(e, skip)] or leaves
    first = real[0]
    for other in real[1:]:
        first.add_note(f"also raised: {other!r}")
    return first
