"""What a report reads from a run: its tables found by their columns (the contract in DESIGN.md), so
any step kind that writes those columns shows up, and a table a run lacks only leaves its section out.

Nothing here reads more than the report shows: tables are Polars lazy scans, filtered before collect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from pipelines import Run
from tda.report.figures import curve_axes

LDS_COLUMNS = {"method", "aggregation", "target_id", "spearman"}
SCORE_COLUMNS = {"method", "target_id", "example_id", "score"}
GROUP_SCORE_COLUMNS = {"method", "target_id", "group_id", "score"}
GROUP_TRUTH_COLUMNS = {"target_id", "group_id", "actual"}
GROUP_META_COLUMNS = {"group_id", "strategy", "fraction"}
SUMMARY_KIND = "attribution_summary"


@dataclass
class RunTables:
    """The tables of a run by name, with their step kind, columns and spec params (no data read)."""

    run: Run
    kinds: dict[str, str] = field(default_factory=dict)
    columns: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, run: Run) -> RunTables:
        tables = cls(run)
        for name in run.table_names():
            manifest = run.store.manifest(run.steps[name]["key"]) or {}
            tables.kinds[name] = manifest.get("kind", "")
            tables.columns[name] = [c["name"] for c in manifest.get("schema", [])]
        return tables

    def having(self, columns: set[str], without: set[str] = frozenset()) -> list[str]:
        """Tables with every one of `columns` and none of `without`, in the run's step order."""
        return [n for n, cols in self.columns.items() if columns <= set(cols) and not without & set(cols)]

    def params(self, name: str) -> dict[str, Any]:
        return self.run.record.spec.get("steps", {}).get(name, {})

    def scan(self, name: str) -> pl.LazyFrame:
        return self.run.table(name)


def summary(tables: RunTables) -> pl.DataFrame | None:
    """The first attribution_summary table; else one made from the LDS tables (95% bootstrap
    intervals over targets, the way attribution_summary makes them); None without either."""
    for name, kind in tables.kinds.items():
        if kind == SUMMARY_KIND:
            return tables.scan(name).collect()
    lds = lds_table(tables)
    return None if lds is None else summary_from_lds(lds)


def summary_from_lds(lds: pl.DataFrame) -> pl.DataFrame:
    """method, aggregation, targets, n_targets, lds, lds_low, lds_high per method, aggregation, role."""
    from tda.steps.attribution_summary import bootstrap_interval

    rows = []
    for (method, aggregation, role), cell in lds.group_by(
        "method", "aggregation", "targets", maintain_order=True
    ):
        values = cell["spearman"].cast(pl.Float64).to_numpy()
        finite = values[np.isfinite(values)]
        low, high = bootstrap_interval(values, 1000)
        rows.append(
            {"method": method, "aggregation": aggregation, "targets": role, "n_targets": cell.height}
            | {"lds": float(finite.mean()) if len(finite) else None, "lds_low": low, "lds_high": high}
        )
    return pl.DataFrame(rows).with_columns(pl.col("lds_low", "lds_high").fill_nan(None))


def lds_table(tables: RunTables) -> pl.DataFrame | None:
    """Every LDS table of the run (method, aggregation, target_id, spearman, targets = the role)."""
    names = tables.having(LDS_COLUMNS)
    if not names:
        return None
    frames = [tables.scan(n).select(*sorted(LDS_COLUMNS)).cast({"spearman": pl.Float64}) for n in names]
    lds = pl.concat(frames).collect()
    roles = target_roles(tables)
    if roles is None:
        return lds.with_columns(pl.lit("all").alias("targets"))
    return lds.join(roles, on="target_id", how="left").with_columns(pl.col("targets").fill_null("other"))


def target_roles(tables: RunTables) -> pl.DataFrame | None:
    """target_id, targets (heldout / fit / val): the `roles` step of the run's attribution_summary."""
    for name, kind in tables.kinds.items():
        roles = tables.params(name).get("roles") if kind == SUMMARY_KIND else None
        if roles in tables.columns and {"target_id", "role"} <= set(tables.columns[roles]):
            return tables.scan(roles).select("target_id", pl.col("role").alias("targets")).unique().collect()
    return None


def score_tables(tables: RunTables) -> list[str]:
    """Tables of per-example scores (method, target_id, example_id, score)."""
    return tables.having(SCORE_COLUMNS, without={"group_id"})


def examples_table(tables: RunTables, scores: list[str]) -> str | None:
    """The table holding the scored examples' text: the `data` of the first score step, else the first
    table with example_id and prompt (one with a split column first)."""
    for name in scores:
        data = tables.params(name).get("data")
        if isinstance(data, str) and "example_id" in tables.columns.get(data, []):
            return data
    texts = tables.having({"example_id", "prompt"})
    split = [n for n in texts if "split" in tables.columns[n]]
    return (split or texts or [None])[0]


def group_effects(tables: RunTables) -> list[tuple[str, pl.DataFrame]]:
    """(title, predicted ⋈ actual) for every pair of a group-score and a group-truth table that share
    (target, group) pairs; with each group's strategy and fraction where a groups table has them."""
    meta = _group_meta(tables)
    out = []
    for truth in tables.having(GROUP_TRUTH_COLUMNS):
        actual = (
            tables.scan(truth).select("target_id", "group_id", pl.col("actual").cast(pl.Float64)).collect()
        )
        for predicted in tables.having(GROUP_SCORE_COLUMNS, without={"actual"}):
            keep = [
                c
                for c in ("method", "order", "target_id", "group_id", "score")
                if c in tables.columns[predicted]
            ]
            scores = (
                tables.scan(predicted).select(keep).with_columns(pl.col("score").cast(pl.Float64)).collect()
            )
            joined = scores.join(actual, on=["target_id", "group_id"])
            if meta is not None:
                joined = joined.join(meta, on="group_id", how="left")
            if joined.height:
                out.append((f"{predicted} against {truth}", joined))
    return out


def _group_meta(tables: RunTables) -> pl.DataFrame | None:
    names = tables.having(GROUP_META_COLUMNS)
    if not names:
        return None
    frames = [tables.scan(n).select("group_id", "strategy", "fraction") for n in names]
    return pl.concat(frames).unique("group_id").collect()


def curve_tables(tables: RunTables) -> list[tuple[str, pl.DataFrame]]:
    """(title, table) of every table with selection or removal curves (see figures.curve_axes)."""
    out = []
    for name, columns in tables.columns.items():
        if curve_axes(columns) is not None:
            out.append((f"{name} ({tables.kinds[name]})", tables.scan(name).collect()))
    return out
