"""The states of a step and of a run, the moves allowed between them, and the record of one step.

    pending ──► running ──► done
       │           ├──────► failed
       │           └──────► interrupted   (its driver died: set when the record is read back)
       ├──► cached                        (its output was in the store when the run was planned)
       ├──► skipped                       (an upstream step failed, or the run stopped first)
       └──► interrupted

    run: running ──► succeeded | failed | interrupted

`STEP_MOVES` and `RUN_MOVES` are the only statement of these arrows; `StepRecord.move_to` and
`RunStatus.check_move` refuse any other (an engine bug, raised as IllegalTransition).
The JSON of a run record (`runs/<id>.json`) holds the states as their plain string values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, TypeVar

from pipelines.errors import IllegalTransition


class StepStatus(str, Enum):
    """Where a step of a run stands; the value is what the run record and the CLI show."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    CACHED = "cached"
    FAILED = "failed"
    SKIPPED = "skipped"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:  # as StrEnum (Python 3.11+) does: "done", not "StepStatus.DONE"
        return self.value

    @property
    def is_terminal(self) -> bool:
        """No move leads out of this state."""
        return not STEP_MOVES[self]

    @property
    def has_output(self) -> bool:
        """The step's output is in the store (computed by this run, or found there)."""
        return self in (StepStatus.DONE, StepStatus.CACHED)


class RunStatus(str, Enum):
    """Where a run stands."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # its driver stopped without finishing the record

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        return not RUN_MOVES[self]

    def check_move(self, new: RunStatus) -> RunStatus:
        """`new`, if a run may move there from this state; IllegalTransition if not."""
        return _checked("run", self, new, RUN_MOVES)


STEP_MOVES: dict[StepStatus, frozenset[StepStatus]] = {
    StepStatus.PENDING: frozenset(
        {StepStatus.RUNNING, StepStatus.CACHED, StepStatus.SKIPPED, StepStatus.INTERRUPTED}
    ),
    StepStatus.RUNNING: frozenset({StepStatus.DONE, StepStatus.FAILED, StepStatus.INTERRUPTED}),
    StepStatus.DONE: frozenset(),
    StepStatus.CACHED: frozenset(),
    StepStatus.FAILED: frozenset(),
    StepStatus.SKIPPED: frozenset(),
    StepStatus.INTERRUPTED: frozenset(),
}

RUN_MOVES: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.RUNNING: frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.INTERRUPTED}),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.INTERRUPTED: frozenset(),
}


S = TypeVar("S", StepStatus, RunStatus)


def _checked(what: str, old: S, new: S, moves: dict[S, frozenset[S]]) -> S:
    if new not in moves[old]:
        allowed = ", ".join(sorted(str(s) for s in moves[old]))
        why = f"from {old} it may move to {allowed}" if allowed else f"{old} is terminal"
        raise IllegalTransition(f"a {what} cannot move from {old} to {new}: {why}")
    return new


@dataclass
class StepRecord:
    """One step of a run record: `steps.<name>` in `runs/<run_id>.json`.

    The JSON always holds kind, key, status, cached, rows and seconds; the optional fields only once
    set. Keys this version does not know are kept in `extra` and written back as they were.
    `record["status"]` reads like the dict it is on disk (attributes are the typed way).
    """

    kind: str
    key: str  # the cache key of the step's output
    status: StepStatus = StepStatus.PENDING
    cached: bool = False  # its output was in the store when the run was planned
    rows: int | None = None
    seconds: float | None = None
    node: str | None = None  # the Ray node that computed (or first computed) the output
    error: str | None = None  # one line: why it failed, was skipped or interrupted
    traceback: str | None = None  # the failed task's full error text
    export_error: str | None = None  # its `export` failed (the step itself did not)
    progress: tuple[int, int] | None = None  # (done, total) units reported by a running step
    t_start: float | None = None  # the driver's perf_counter when it started running
    started: str | None = None  # when it started running (ISO 8601, UTC)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = StepStatus(self.status)

    def move_to(self, new: StepStatus) -> None:
        """Change the status; IllegalTransition if STEP_MOVES has no such arrow."""
        self.status = _checked("step", self.status, StepStatus(new), STEP_MOVES)

    def to_json(self) -> dict[str, Any]:
        """The dict written into the run record, as before the record was typed."""
        data: dict[str, Any] = {**self.extra}
        data.update(
            kind=self.kind,
            key=self.key,
            status=self.status.value,
            cached=self.cached,
            rows=self.rows,
            seconds=self.seconds,
        )
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                data[name] = list(value) if name == "progress" else value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepRecord:
        """A step as a run record holds it; ValueError/TypeError if it cannot be one."""
        if not isinstance(data, dict):
            raise TypeError(f"a step record is an object, not {type(data).__name__}")
        known = {k: v for k, v in data.items() if k in _FIELDS}
        if known.get("progress") is not None:
            done, total = known["progress"]
            known["progress"] = (int(done), int(total))
        extra = {k: v for k, v in data.items() if k not in _FIELDS}
        return cls(**known, extra=extra)

    def __getitem__(self, name: str) -> Any:
        """`record["status"]`, as when steps were plain dicts; KeyError for a field not set."""
        data = self.to_json()
        if name not in data:
            raise KeyError(name)
        return getattr(self, name) if name in _FIELDS else data[name]

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default


_FIELDS = frozenset(f.name for f in fields(StepRecord)) - {"extra"}
_OPTIONAL = ("node", "error", "traceback", "export_error", "progress", "t_start", "started")
