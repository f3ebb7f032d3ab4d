"""The one place where an error becomes a line on stderr and an exit code, for every command."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

import trio
import typer

from logd_trio.core.errors import (
    CheckpointError,
    ConnectionLost,
    LogdError,
    MessageTooLarge,
    NotFound,
    ServerRejected,
    Timeout,
    Unsupported,
    WriteFailed,
    unwrap_group,
)

# Exit codes, most specific first.  2 is click's usage error: a bad value (ValueError,
# the server's ConfigError included) found after parsing is one too.
EXIT_CODES: Final[tuple[tuple[type[BaseException], int], ...]] = (
    (ConnectionLost, 3),
    (Timeout, 4),
    (NotFound, 5),
    (ServerRejected, 6),
    (WriteFailed, 7),
    (CheckpointError, 8),
    (MessageTooLarge, 9),
    (Unsupported, 10),
    (ValueError, 2),
    (LogdError, 1),
    (OSError, 1),
)
INTERRUPTED: Final = 130


def exit_code(exc: BaseException) -> int | None:
    """The exit code for ``exc`` (``None``: not an error the CLI reports, e.g. a bug).

    A ``WriteFailed`` whose batches all timed out is a ``Timeout``.
    """
    if isinstance(exc, WriteFailed) and exc.failed and all(
        isinstance(getattr(b, "error", None), Timeout) for b in exc.failed
    ):
        return 4
    return next((c for cls, c in EXIT_CODES if isinstance(exc, cls)), None)


def describe(exc: BaseException) -> str:
    """One line for ``exc``: an OSError says what failed on which file."""
    if isinstance(exc, OSError):
        text = exc.strerror or str(exc)
        cause = exc.__cause__  # a failed connect: the attempts' errors
        if isinstance(cause, BaseExceptionGroup):
            cause = next((e for e in cause.exceptions if isinstance(e, OSError)), None)
        if isinstance(cause, OSError) and cause.strerror and cause.strerror not in text:
            text += f": {cause.strerror}"
        return f"{text} ({exc.filename})" if exc.filename else text
    return str(exc) or type(exc).__name__


def fail(command: str, exc: BaseException, *, verbose: bool = False, where: str = "") -> NoReturn:
    """Report ``exc`` on stderr (with the traceback when ``verbose``) and exit with its code."""
    code = exit_code(exc)
    if code is None:
        raise exc
    if verbose:
        traceback.print_exception(exc)
    typer.echo(f"logd {command}: {describe(exc)}{where}", err=True)
    raise typer.Exit(code) from None


def run(command: str, main: Callable[[], Awaitable[None]], *, verbose: bool = False,
        where: Callable[[BaseException], str] | None = None) -> None:
    """``trio.run(main)``; every error it raises becomes one line and an exit code here."""
    try:
        trio.run(main)
    except KeyboardInterrupt:
        typer.echo(f"logd {command}: interrupted", err=True)
        raise typer.Exit(INTERRUPTED) from None
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- keep interpreter exit quiet
        raise typer.Exit(0) from None
    except (LogdError, OSError, ValueError, BaseExceptionGroup) as exc:
        err = unwrap_group(exc, skip=(trio.Cancelled,))
        if isinstance(err, KeyboardInterrupt):
            typer.echo(f"logd {command}: interrupted", err=True)
            raise typer.Exit(INTERRUPTED) from None
        fail(command, err, verbose=verbose, where=where(err) if where else "")
