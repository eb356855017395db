"""The explorer's data: for each of at most `max_targets` targets and each method, its `top` highest-
scored training examples (proponents) and its `top` lowest (opponents), with the text and metadata of
every example named. Only that is embedded in the page, never a whole score table: each score table is
scanned lazily, filtered to the chosen targets and cut per (method, target) before it is collected.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from tda.report.tables import RunTables

TEXT_CHARS = 500  # prompt and response are cut to this many characters on the page
META_COLUMNS = 8  # metadata columns shown at most
TEXT_COLUMNS = ("prompt", "response")
HIDDEN = {"example_id", "split", *TEXT_COLUMNS}


def explorer_data(
    tables: RunTables,
    scores: list[str],
    examples: str | None,
    lds: pl.DataFrame | None,
    top: int,
    max_targets: int,
) -> dict[str, Any]:
    """The JSON payload of the explorer (see page.py's script for how it is read)."""
    targets = _targets(tables, scores, lds, max_targets)
    ranked = {name: _ranked(tables, name, targets, top) for name in scores}
    methods = sorted({m for frame in ranked.values() for m in frame["method"].to_list()})
    ids = {int(t) for t in targets}
    for frame in ranked.values():
        for column in ("pro", "con"):
            ids.update(i for row in frame[column].to_list() for i in row or [])
    columns, texts = _examples(tables, examples, ids)
    return {
        "methods": methods,
        "columns": columns,
        "examples": texts,
        "targets": _target_rows(targets, lds),
        "top": _by_method(ranked),
        "opponents": {m: _has_all_pairs(tables, n) for n, f in ranked.items() for m in f["method"].unique()},
        "k": top,
        "n_targets": _n_targets(tables, scores, lds),
    }


def _all_target_ids(tables: RunTables, scores: list[str], lds: pl.DataFrame | None) -> pl.Series:
    if lds is not None:
        return lds["target_id"].unique().sort()
    if not scores:
        return pl.Series("target_id", [], dtype=pl.Int64)
    return tables.scan(scores[0]).select(pl.col("target_id").unique()).collect()["target_id"].sort()


def _n_targets(tables: RunTables, scores: list[str], lds: pl.DataFrame | None) -> int:
    return len(_all_target_ids(tables, scores, lds))


def _targets(tables: RunTables, scores: list[str], lds: pl.DataFrame | None, limit: int) -> list[int]:
    """The first `limit` target ids (by id) of the LDS table, else of the first score table."""
    return _all_target_ids(tables, scores, lds).head(limit).to_list()


def _has_all_pairs(tables: RunTables, name: str) -> bool:
    """A score step that kept only its top k per target has no opponents to show."""
    return tables.params(name).get("top_k") is None


def _ranked(tables: RunTables, name: str, targets: list[int], top: int) -> pl.DataFrame:
    """method, target_id, pro, pro_score, con, con_score: the top and bottom `top` per target."""
    by_score = pl.col("score").cast(pl.Float64)
    return (
        tables.scan(name)
        .select("method", "target_id", "example_id", by_score.alias("score"))
        .filter(pl.col("target_id").is_in(targets) & pl.col("score").is_finite())
        .sort("score", descending=True)
        .group_by("method", "target_id", maintain_order=True)
        .agg(
            pl.col("example_id").head(top).alias("pro"),
            pl.col("score").head(top).alias("pro_score"),
            pl.col("example_id").tail(top).reverse().alias("con"),
            pl.col("score").tail(top).reverse().alias("con_score"),
        )
        .collect()
    )


def _by_method(ranked: dict[str, pl.DataFrame]) -> dict[str, dict[str, list[list[Any]]]]:
    """{method: {target_id: [pro ids, pro scores, con ids, con scores]}}, scores to 4 digits."""
    out: dict[str, dict[str, list[list[Any]]]] = {}
    for frame in ranked.values():
        for row in frame.iter_rows(named=True):
            cell = [row["pro"], _round(row["pro_score"]), row["con"], _round(row["con_score"])]
            out.setdefault(row["method"], {})[str(row["target_id"])] = cell
    return out


def _round(values: list[float]) -> list[float]:
    return [float(f"{v:.4g}") for v in values]


def _examples(tables: RunTables, name: str | None, ids: set[int]) -> tuple[list[str], dict[str, list[Any]]]:
    """(metadata column names, {example_id: [prompt, response, *metadata]}) of the examples named."""
    if name is None:
        return [], {}
    schema = tables.scan(name).collect_schema()
    simple = [c for c, t in schema.items() if c not in HIDDEN and not t.is_nested() and t != pl.Binary]
    meta = simple[:META_COLUMNS]
    text = [
        pl.col(c).cast(pl.String).str.slice(0, TEXT_CHARS) if c in schema else pl.lit("")
        for c in TEXT_COLUMNS
    ]
    frame = (
        tables.scan(name)
        .filter(pl.col("example_id").is_in(sorted(ids)))
        .select("example_id", *[t.alias(c) for t, c in zip(text, TEXT_COLUMNS, strict=True)], *meta)
        .collect()
    )
    rows = {str(row[0]): [_cell(v) for v in row[1:]] for row in frame.iter_rows()}
    return meta, rows


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (int, str, bool)):
        return value
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return str(value)


def _target_rows(targets: list[int], lds: pl.DataFrame | None) -> list[dict[str, Any]]:
    """[{id, role, lds: {method: per-target LDS of the first aggregation}}] in target order."""
    if lds is None or lds.is_empty():
        return [{"id": t, "role": None, "lds": {}} for t in targets]
    first = lds["aggregation"][0]
    cells = lds.filter(pl.col("aggregation") == first, pl.col("target_id").is_in(targets))
    per: dict[int, dict[str, Any]] = {t: {"id": t, "role": None, "lds": {}} for t in targets}
    for row in cells.iter_rows(named=True):
        entry = per[row["target_id"]]
        entry["role"] = row["targets"]
        value = row["spearman"]
        entry["lds"][row["method"]] = None if value is None or value != value else round(value, 3)
    return list(per.values())
