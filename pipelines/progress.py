"""Live progress of a run (step states, elapsed) and the summary table at its end."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

PROGRESS_LINE_S = 10.0  # a non-interactive run prints a step's progress at most this often

STYLES = {
    "pending": "dim",
    "waiting": "dim",
    "running": "yellow",
    "done": "green",
    "cached": "cyan",
    "failed": "bold red",
    "skipped": "magenta",
    "interrupted": "bold magenta",
}


def summary_table(steps: dict[str, dict[str, Any]], title: str = "") -> Table:
    """step, kind, status, cached, rows, seconds: one row per step."""
    table = Table(title=title or None, title_justify="left")
    for col, justify in [
        ("step", "left"),
        ("kind", "left"),
        ("status", "left"),
        ("cached", "left"),
        ("rows", "right"),
        ("seconds", "right"),
    ]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, info in steps.items():
        status = info.get("status", "pending")
        rows = info.get("rows")
        secs = info.get("seconds")
        if status == "running" and info.get("progress"):
            done, total = info["progress"]
            shown = f"{done:,}/{total:,}"
        else:
            shown = "" if rows is None else f"{rows:,}"
        table.add_row(
            name,
            info.get("kind", ""),
            f"[{STYLES.get(status, '')}]{status}[/]",
            "yes" if info.get("cached") else "no",
            shown,
            "" if secs is None else f"{secs:.2f}",
        )
    return table


class Progress:
    """Shows step states while a run goes on: a live table on a terminal, else one line per change."""

    def __init__(
        self, steps: dict[str, dict[str, Any]], enabled: bool = True, console: Console | None = None
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
        shown = {
            name: {**info, "seconds": now - info["t_start"]} if info.get("status") == "running" else info
            for name, info in self.steps.items()
        }
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
        if info.get("status") in ("done", "cached") and info.get("rows") is not None:
            detail = f" ({info['rows']:,} rows)"
        if info.get("status") == "failed":
            detail = f": {info.get('error', '')}"
        elapsed = time.perf_counter() - self.t0
        print(f"[{elapsed:7.1f}s] {name}: {info['status']}{detail}", file=sys.stderr, flush=True)

    def advanced(self, name: str, every: float = PROGRESS_LINE_S) -> None:
        """Note new progress of a running step: the live table shows it; without a terminal, a line
        `name: done/total` when the first units are done, then at most once per `every` seconds."""
        if not self.enabled or self.live_mode:
            return
        done, total = self.steps[name]["progress"]
        now = time.perf_counter()
        last = self._said.get(name)
        if done == 0 or (last is not None and now - last < every):
            return
        self._said[name] = now
        print(f"[{now - self.t0:7.1f}s] {name}: {done:,}/{total:,}", file=sys.stderr, flush=True)
