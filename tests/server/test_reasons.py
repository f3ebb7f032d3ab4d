"""ERR replies never carry the server's directory names (the log keeps them)."""

from __future__ import annotations

from logd_trio.core.errors import NotFound, StorageError
from logd_trio.server.reasons import error_reply, public_reason, strip_paths


def test_storage_error_replies_go_through_public_reason() -> None:
    """The reply mapping itself, with errors that still carry paths (storage drops most of them
    before they get here, so a server-level test could no longer fail)."""
    cause = OSError(13, "Permission denied", "/srv/logd/data/t/1200.log")
    err = StorageError(f"topic t: cannot open {cause.filename}: {cause.strerror}")
    err.__cause__ = cause
    assert error_reply(err) == b"ERR storage error: topic t: cannot open 1200.log: Permission denied\r\n"
    bare = StorageError("topic t: cannot rotate")  # the paths only in the cause's filename
    bare.__cause__ = cause
    assert error_reply(bare) == b"ERR storage error: topic t: cannot rotate\r\n"
    chained = StorageError(f"recovering: {cause}")
    chained.__cause__ = cause
    reply = error_reply(chained)
    assert b"/srv" not in reply and b"1200.log" in reply and reply.startswith(b"ERR storage error: recovering: ")
    assert error_reply(NotFound("/srv/logd/data/t")) == b"ERR not found\r\n"  # never the detail


def test_public_reason_cuts_paths_to_their_last_component() -> None:
    try:
        open("/nonexistent-dir/sub/12.log")  # noqa: SIM115
    except OSError as e:
        err = e
    assert public_reason(err) == "[Errno 2] No such file or directory: '12.log'"
    chained = RuntimeError(f"topic t: recovering /srv/data/t/0.log: {err}")
    chained.__cause__ = err
    assert "/srv" not in public_reason(chained) and "0.log" in public_reason(chained)
    rel = OSError(13, "Permission denied", "logs/t/5.index")  # a relative data directory too
    assert public_reason(rel) == "[Errno 13] Permission denied: '5.index'"
    assert strip_paths("read-only after an I/O error (fsync failed: Input/output error)") == (
        "read-only after an I/O error (fsync failed: Input/output error)")
