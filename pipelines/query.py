"""Reading a run back: its record, its tables as Polars LazyFrames, and SQL over them (read-only).

Each table of a run is a view named after its step; queries go through Polars' SQLContext over lazy
Parquet scans, so only the columns and row groups a query touches are read.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from pipelines.errors import QueryError, StoreError
from pipelines.store import RunRecord, Store, StoredObject


class Run:
    """A pipeline run as recorded in the store."""

    def __init__(self, store: Store, record: RunRecord) -> None:
        self.store = store
        self.record = record

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, status={self.status!r}, steps={len(self.steps)})"

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        return self.record.steps

    def output(self, step: str) -> StoredObject:
        """The stored output of `step` in this run."""
        info = self.steps.get(step)
        if info is None:
            raise StoreError(f"run {self.run_id} has no step {step!r}; steps: {', '.join(self.steps)}")
        if not self.store.has(info["key"]):
            raise StoreError(f"run {self.run_id}: step {step!r} has no output ({info['status']})")
        return self.store.get(info["key"])

    def table(self, step: str) -> pl.LazyFrame:
        """The table of `step` as a lazy Parquet scan."""
        return self.output(step).table()

    def table_names(self) -> list[str]:
        """The steps of the run that have a table (from their manifests: nothing is fetched)."""
        names = []
        for name, info in self.steps.items():
            manifest = self.store.manifest(info["key"])
            if manifest is not None and manifest.get("schema"):
                names.append(name)
        return names

    def tables(self) -> dict[str, StoredObject]:
        """Every step of the run that has a table, name → stored object."""
        out = {}
        for name in self.table_names():
            obj = self.store.get(self.steps[name]["key"])
            if obj.has_table:
                out[name] = obj
        return out

    def sql(self, query: str) -> pl.DataFrame:
        """Run a SQL query where each table of the run is a view named after its step."""
        return run_sql(query, {name: obj.table() for name, obj in self.tables().items()})


def open_run(store: Store | str, run_id: str | None = None) -> Run:
    """The run `run_id` (a unique prefix works) of a store (a folder, a URI or a Store), or its latest run."""
    store = store if isinstance(store, Store) else Store.open(store)
    return Run(store, store.read_run(run_id))


def run_sql(query: str, frames: dict[str, pl.LazyFrame]) -> pl.DataFrame:
    """Polars SQL over named LazyFrames; only reading statements are accepted."""
    head = query.lstrip().split(None, 1)[0].upper() if query.strip() else ""
    if head not in ("SELECT", "WITH", "SHOW", "EXPLAIN", "DESCRIBE", "("):
        raise QueryError(f"only reading queries (SELECT/WITH) are allowed, not {head or 'nothing'}")
    try:
        with pl.SQLContext(frames=frames) as ctx:
            return ctx.execute(query, eager=True)
    except (pl.exceptions.PolarsError, ValueError) as exc:
        views = ", ".join(frames) or "none"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QueryError(f"{first} (tables: {views})") from None
