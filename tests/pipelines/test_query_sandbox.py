"""`run_sql` sees the tables it is given and nothing else: no file reads, no statement that writes."""

from __future__ import annotations

import polars as pl
import pytest

from pipelines.errors import QueryError
from pipelines.query import run_sql

SECRET = "hunter2"


@pytest.fixture
def secret(tmp_path) -> str:
    """A CSV file outside any store, as a path a query could name."""
    path = tmp_path / "secret.csv"
    path.write_text(f"token\n{SECRET}\n")
    return str(path)


@pytest.fixture
def frames() -> dict[str, pl.LazyFrame]:
    return {"t": pl.LazyFrame({"a": [1, 2], "b": ["x", "y"]})}


def refused(query: str, frames: dict[str, pl.LazyFrame]) -> str:
    """The one-line message of the QueryError that `query` raises."""
    with pytest.raises(QueryError) as info:
        run_sql(query, frames)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and SECRET not in message
    return message


@pytest.mark.parametrize(
    "template",
    [
        "SELECT * FROM read_csv('{p}')",
        "SELECT * FROM READ_CSV ('{p}')",
        "SELECT * FROM Read_Csv\n('{p}')",
        "SELECT * FROM \"read_csv\"('{p}')",
        "SELECT * FROM `rEAD_csv`('{p}')",
        "SELECT * FROM 'read_csv'('{p}')",
        "SELECT * FROM read_csv /* ( */ ('{p}')",
        "SELECT * FROM read_csv -- (\n ('{p}')",
        "SELECT * FROM read_csv\u00a0('{p}')",
        "SELECT * FROM read_csv('{p}') LIMIT 0",
        "SELECT * FROM t, read_csv('{p}') AS s",
        "SELECT * FROM (read_csv('{p}'))",
        "SELECT (SELECT COUNT(*) FROM read_csv('{p}')) AS n FROM t",
        "WITH s AS (SELECT * FROM read_csv('{p}')) SELECT * FROM s",
        "EXPLAIN SELECT * FROM read_csv('{p}')",
        "(SELECT * FROM read_csv('{p}'))",
        "SELECT * FROM read_parquet('{p}')",
        "SELECT * FROM read_parquet(['{p}'])",
        "SELECT * FROM read_ipc('{p}')",
        "SELECT * FROM read_json('{p}')",
        "SELECT * FROM read_ndjson('{p}')",
        "SELECT * FROM read_csv('file://{p}')",
    ],
)
def test_file_functions_are_refused(frames, secret, template):
    message = refused(template.format(p=secret), frames)
    assert "(...) is not allowed: a query sees only the run's tables (tables: t)" in message


@pytest.mark.parametrize(
    ("template", "why"),
    [
        # Each would hide the call from a tokenizer that knows only '…' strings and flat comments.
        ("SELECT E'\\'' AS s FROM read_csv('{p}') --'", "a quote right after a name"),
        ("SELECT q'[']' AS s FROM read_csv('{p}') --'", "a quote right after a name"),
        ("SELECT R\"'\" AS s FROM read_csv('{p}') --'", "a quote right after a name"),
        ("SELECT $$'$$ AS s FROM read_csv('{p}') --'", "`$`"),
        ("/* /* */ ' */ SELECT * FROM read_csv('{p}') --'", "is not allowed"),
        ("SELECT * FROM read_csv('{p}') WHERE 'x", "not closed"),
        ("SELECT 'x FROM read_csv('{p}')", "not closed"),
        ("SELECT 1 /* SELECT * FROM read_csv('{p}')", "not closed"),
    ],
)
def test_what_polars_could_read_differently_is_refused(frames, secret, template, why):
    assert why in refused(template.format(p=secret), frames)


def test_proc_self_environ_is_one_line(frames):
    assert "is not allowed" in refused("SELECT * FROM read_csv('/proc/self/environ')", frames)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT 'read_csv(x)' AS s FROM t LIMIT 1", {"s": ["read_csv(x)"]}),
        ("SELECT 'it''s read_csv(''/etc/passwd'')' AS s", {"s": ["it's read_csv('/etc/passwd')"]}),
        ('SELECT a AS "read_csv" FROM t ORDER BY a', {"read_csv": [1, 2]}),
        ("SELECT read_count FROM (SELECT a AS read_count FROM t) ORDER BY 1", {"read_count": [1, 2]}),
        ("SELECT a FROM t WHERE b = 'x' /* it's read_csv('/etc/passwd') */", {"a": [1]}),
        ("SELECT a FROM t -- read_csv('/etc/passwd')\nWHERE b = 'y'", {"a": [2]}),
        ("SELECT n FROM generate_series(1, 2) AS g(n)", {"n": [1, 2]}),
    ],
)
def test_mentions_of_read_csv_that_read_nothing_run(frames, query, expected):
    assert run_sql(query, frames).to_dict(as_series=False) == expected


@pytest.mark.parametrize(
    "query",
    [
        "(SELECT 1 AS a)",
        "( SELECT a FROM t WHERE a = 1) UNION (SELECT 1 AS a)",
        "((SELECT 1 AS a))",
        "-- first a comment\nSELECT 1 AS a",
        "/* a comment */ (SELECT 1 AS a)",
        "VALUES (1)",
    ],
)
def test_parenthesized_and_commented_queries_run(frames, query):
    assert run_sql(query, frames).to_series().to_list() == [1]


@pytest.mark.parametrize(
    "query",
    [
        "DROP TABLE t",
        "CREATE TABLE z AS SELECT 1",
        "(CREATE TABLE z AS SELECT 1)",
        "/* SELECT */ INSERT INTO t VALUES (3, 'z')",
        "COPY t TO 'out.csv'",
        "DELETE FROM t",
        "TRUNCATE TABLE t",
        "EXPLAIN DROP TABLE t",
        "",
        "-- nothing",
    ],
)
def test_statements_that_do_not_read_are_refused(frames, query):
    assert "only reading queries" in refused(query, frames)


def test_describe_lists_columns_and_types(frames):
    expected = {"column": ["a", "b"], "type": ["Int64", "String"]}
    assert run_sql("DESCRIBE t", frames).to_dict(as_series=False) == expected
    assert run_sql('desc TABLE "T";', frames).to_dict(as_series=False) == expected
    assert "there is no table 'nope' (tables: t)" in refused("DESCRIBE nope", frames)
    assert "DESCRIBE takes one table name, as in DESCRIBE t" in refused("DESCRIBE t, t", frames)


def test_show_tables_still_runs(frames):
    assert run_sql("SHOW TABLES", frames).to_series().to_list() == ["t"]


@pytest.mark.parametrize(
    "error",
    [pl.exceptions.PanicException("boom\nat src/lib.rs"), OSError(19, "No such device"), RuntimeError()],
)
def test_any_failure_is_one_line(frames, monkeypatch, error):
    def fail(self, query, eager=None):
        raise error

    monkeypatch.setattr(pl.SQLContext, "execute", fail)
    message = refused("SELECT * FROM t", frames)
    assert message.endswith("(tables: t)")
