"""The engine's error family.

Every error a user can cause (a bad spec, a missing run, a failing step) is one of these; the CLI prints
its message as one line and exits with `exit_code`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.query import Run


class PipelineError(Exception):
    """Base of the engine's errors: `str(err)` is the complete one-line message."""

    exit_code = 1


class SpecError(PipelineError):
    """A spec file (or a `--set` override) is invalid; the message is `FILE:LINE:COL: PATH: what`."""

    exit_code = 2

    def __init__(self, messages: list[str] | str) -> None:
        raw = [messages] if isinstance(messages, str) else list(messages)
        self.messages = [one_line(m) for m in raw]
        super().__init__("\n".join(self.messages))


def one_line(text: str) -> str:
    """`text` with every character that is not printable (a newline, a line separator, a control
    character a spec's key or value may hold) written as its escape: a message stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class RegistryError(PipelineError):
    """A step-kind plugin could not be loaded, or two plugins claim the same kind."""

    exit_code = 2


class StoreError(PipelineError):
    """The store does not hold what was asked for (a run id, a step's table)."""

    exit_code = 2


class QueryError(PipelineError):
    """A SQL query over a run's tables failed to parse or to execute."""

    exit_code = 2


class StepFailed(PipelineError):
    """A step raised (after its retries); carries the step's name and the error's last line."""

    def __init__(self, step: str, error: str) -> None:
        self.step, self.error = step, error
        super().__init__(f"step {step!r} failed: {error}")


class RunFailed(PipelineError):
    """A pipeline run finished with failed steps; `run` holds what completed."""

    def __init__(self, run: Run, failed: dict[str, str]) -> None:
        self.run, self.failed = run, failed
        lines = "; ".join(f"{name}: {err}" for name, err in failed.items())
        super().__init__(f"run failed in {len(failed)} step(s): {lines}")


class CorruptObject(StoreError):
    """A stored object does not match its manifest (a file changed, vanished or was added)."""

    def __init__(self, message: str, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(message)


class RayUnavailable(PipelineError):
    """The Ray cluster named by --ray-address / run.ray_address could not be reached."""

    exit_code = 2


class ClusterError(PipelineError):
    """The cluster could not be reached, refused us, or has no such job (`tda submit`, `tda jobs`…)."""

    exit_code = 2


class TrackingError(PipelineError):
    """The tracking server could not be reached or refused a request."""

    exit_code = 2


class DatabaseBusy(TrackingError):
    """Another process held a SQLite tracking database's lock for longer than we waited."""


class IllegalTransition(RuntimeError):
    """The engine moved a step or a run to a state its current one does not lead to
    (pipelines/status.py). A bug in the engine, not the user's doing: not a PipelineError, so the
    CLI shows its traceback."""


# ---------------------------------------------------------------- a full disk

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "database or disk is full")
FREE_SPACE = "free space there (or move the store to a larger disk) and run again: finished work is kept"


def disk_full(exc: BaseException | str) -> bool:
    """Is `exc` (an exception, with its causes and a Ray task's `cause`, or an error's text) a full
    disk or an exceeded quota?"""
    return disk_full_message(exc, "") is not None


def disk_full_message(exc: BaseException | str, what: str) -> str | None:
    """One line for a full disk: naming the file the failed write was for (else `what`) and saying to
    free space; None if `exc` is not a full disk."""
    if isinstance(exc, str):
        return disk_full_line(what) if any(t in exc.lower() for t in _FULL_TEXTS) else None
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return disk_full_line(str(e.filename) if e.filename else what)
        cause = getattr(e, "cause", None)
        todo += [e.__cause__, e.__context__, cause if isinstance(cause, BaseException) else None]
    return disk_full_message(str(exc), what)


def disk_full_line(what: str) -> str:
    """The one line that says a write of `what` found no space, and what to do."""
    return f"no space left on device writing {what}: {FREE_SPACE}"


class DiskFull(PipelineError):
    """The store's disk (or quota) filled up while the engine wrote its own files (a run record)."""
