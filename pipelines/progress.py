"""Live progress of a run (step states, elapsed) and the summary table at its end."""

from __future__ import annotations

import dataclasses
import sys
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipelines.status import StepRecord, StepStatus

PROGRESS_LINE_S = 10.0  # a non-interactive run prints a step's progress at most this often

STYLES = {
    StepStatus.PENDING: "dim",
    StepStatus.RUNNING: "yellow",
    StepStatus.DONE: "green",
    StepStatus.CACHED: "cyan",
    StepStatus.FAILED: "bold red",
    StepStatus.SKIPPED: "magenta",
    StepStatus.INTERRUPTED: "bold magenta",
}


def summary_table(steps: dict[str, StepRecord], title: str = "") -> Table:
    """step, kind, status, cached, rows, seconds: one row per step."""
    table = Table(title=title or None, title_justify="left")
    for col in ("step", "kind", "status", "cached"):
        table.add_column(col, justify="left")
    for col in ("rows", "seconds"):
        table.add_column(col, justify="right")
    for name, info in steps.items():
        if info.status == StepStatus.RUNNING and info.progress:
            done, total = info.progress
            shown = f"{done:,}/{total:,}"
        else:
            shown = "" if info.rows is None else f"{info.rows:,}"
        table.add_row(
            name,
            info.kind,
            f"[{STYLES[info.status]}]{info.status}[/]",
            "yes" if info.cached else "no",
            shown,
            "" if info.seconds is None else f"{info.seconds:.2f}",
        )
    return table


def _so_far(info: StepRecord, now: float) -> StepRecord:
    """A running step with its seconds so far; any other as it is."""
    if info.status != StepStatus.RUNNING or info.t_start is None:
        return info
    return dataclasses.replace(info, seconds=now - info.t_start)


class Progress:
    """Shows step states while a run goes on: a live table on a terminal, else one line per change."""

    def __init__(
        self, steps: dict[str, StepRecord], enabled: bool = True, console: Console | None = None
    ) -> None:
        self.steps = steps
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.live_mode = enabled and self.console.is_terminal
        self.t0 = time.perf_counter()
        self.phase = "running"
        self._live: Live | None = None
        self._said: dict[str, float] = {}  # step -> when its last progress line was printed

    def _render(self) -> Table:
        now = time.perf_counter()
        shown = {name: _so_far(info, now) for name, info in self.steps.items()}
        return summary_table(shown, title=f"{self.phase}… {now - self.t0:.1f}s")

    def __enter__(self) -> Progress:
        if self.live_mode:
            self._live = Live(
                self._render(),
                console=self.console,
                refresh_per_second=4,
                transient=True,
                get_renderable=self._render,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def set_phase(self, phase: str) -> None:
        """Say what the run is doing besides steps (e.g. starting Ray)."""
        self.phase = phase
        if self.enabled and not self.live_mode:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {phase}", file=sys.stderr, flush=True)

    def changed(self, name: str) -> None:
        """Note a state change of `name` (the live table redraws by itself)."""
        if not self.enabled or self.live_mode:
            return
        info = self.steps[name]
        detail = ""
        if info.status.has_output and info.rows is not None:
            detail = f" ({info.rows:,} rows)"
        if info.status == StepStatus.FAILED:
            detail = f": {info.error or ''}"
        elapsed = time.perf_counter() - self.t0
        print(f"[{elapsed:7.1f}s] {name}: {info.status}{detail}", file=sys.stderr, flush=True)

    def advanced(self, name: str, every: float = PROGRESS_LINE_S) -> None:
        """Note new progress of a running step: the live table shows it; without a terminal, a line
        `name: done/total` when the first units are done, then at most once per `every` seconds."""
        if not self.enabled or self.live_mode:
            return
        progress = self.steps[name].progress
        if progress is None:
            return
        done, total = progress
        now = time.perf_counter()
        last = self._said.get(name)
        if done == 0 or (last is not None and now - last < every):
            return
        self._said[name] = now
        print(f"[{now - self.t0:7.1f}s] {name}: {done:,}/{total:,}", file=sys.stderr, flush=True)
