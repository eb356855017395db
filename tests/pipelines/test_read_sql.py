"""The built-in `read` and `sql` kinds on CSV, JSONL, JSON and Parquet, files, folders and URIs."""

from __future__ import annotations

import json

import polars as pl
import pytest

import pipelines
from pipelines import load_spec

ROWS = {"id": [1, 2, 3, 4], "group": ["a", "b", "a", "b"], "score": [0.5, 0.25, 1.0, 2.0]}


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    frame = pl.DataFrame(ROWS)
    frame.write_csv(folder / "t.csv")
    frame.write_ndjson(folder / "t.jsonl")
    (folder / "t.json").write_text(json.dumps(frame.to_dicts()))
    frame.write_parquet(folder / "t.parquet")
    shards = folder / "shards"
    shards.mkdir()
    frame[:2].write_parquet(shards / "part-0.parquet")
    frame[2:].write_parquet(shards / "part-1.parquet")
    return folder


def run_read_sql(write_spec, tmp_path, tracking_uri, path: str, fmt: str | None = None):
    fmt_line = f"\n    format: {fmt}" if fmt else ""
    spec = write_spec(f"""
version: 1
name: readsql
steps:
  t:
    kind: read
    path: {path}{fmt_line}
  totals:
    kind: sql
    inputs: [t]
    query: SELECT "group", SUM(score) AS total, COUNT(*) AS n FROM t GROUP BY "group" ORDER BY "group"
""")
    return pipelines.run(
        load_spec(spec), store=str(tmp_path / "store"), tracking_uri=tracking_uri, progress=False
    )


@pytest.mark.parametrize(
    "name", ["data/t.csv", "data/t.jsonl", "data/t.json", "data/t.parquet", "data/shards"]
)
def test_read_then_sql(ray_session, write_spec, tmp_path, tracking_uri, data_dir, name):
    result = run_read_sql(write_spec, tmp_path, tracking_uri, name)
    assert result.table("t").collect().sort("id").to_dict(as_series=False) == ROWS
    totals = result.table("totals").collect()
    assert totals.to_dict(as_series=False) == {"group": ["a", "b"], "total": [1.5, 2.25], "n": [2, 2]}


def test_read_a_pyarrow_filesystem_uri(ray_session, write_spec, tmp_path, tracking_uri, data_dir):
    result = run_read_sql(write_spec, tmp_path, tracking_uri, (data_dir / "t.parquet").as_uri())
    assert result.table("t").collect().height == 4


def test_explicit_format_wins_over_the_suffix(ray_session, write_spec, tmp_path, tracking_uri, data_dir):
    (data_dir / "t.txt").write_text((data_dir / "t.csv").read_text())
    result = run_read_sql(write_spec, tmp_path, tracking_uri, "data/t.txt", fmt="csv")
    assert result.table("t").collect().height == 4


def test_unknown_suffix_without_format_fails_with_the_fix(
    ray_session, write_spec, tmp_path, tracking_uri, data_dir
):
    (data_dir / "t.txt").write_text("x")
    result = pytest.raises(
        pipelines.RunFailed, run_read_sql, write_spec, tmp_path, tracking_uri, "data/t.txt"
    )
    assert (
        "cannot infer the format" in result.value.failed["t"] and "set `format:`" in result.value.failed["t"]
    )


def test_a_sql_step_cannot_copy_a_file_into_the_store(
    ray_session, write_spec, tmp_path, tracking_uri, data_dir
):
    secret = tmp_path / "secret.csv"
    secret.write_text("token\nhunter2\n")
    query = json.dumps(f"SELECT * FROM t, \"read_csv\"('{secret}') AS s")
    spec = write_spec(f"""
version: 1
name: leak
steps:
  t:
    kind: read
    path: data/t.csv
  leak:
    kind: sql
    inputs: [t]
    query: {query}
""")
    with pytest.raises(pipelines.RunFailed) as failed:
        pipelines.run(
            load_spec(spec), store=str(tmp_path / "store"), tracking_uri=tracking_uri, progress=False
        )
    assert (
        "read_csv(...) is not allowed: a query sees only the run's tables (tables: t)"
        in failed.value.failed["leak"]
    )
