"""`tda query | tables | runs | show` over a real run, in every output format; `tda run` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest

import pipelines
from pipelines import load_spec
from pipelines.cli import main

SPEC = """
version: 1
name: q
steps:
  base:
    kind: numbers
    n: 4
  plus:
    kind: add
    data: base
    amount: 10
"""


@pytest.fixture(scope="module")
def store(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    spec = root / "spec.yaml"
    spec.write_text(SPEC)
    pipelines.run(load_spec(spec), store=str(root / "store"), progress=False)
    return str(root / "store")


QUERY = "SELECT b.x AS x, p.x AS y FROM base b JOIN plus p ON p.x = b.x + 10 ORDER BY x"


def test_query_formats(store, capsys, tmp_path):
    assert main(["query", QUERY, "--store", store, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"x": i, "y": i + 10} for i in range(4)]
    assert main(["query", QUERY, "--store", store, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["x,y", "0,10", "1,11", "2,12", "3,13"]
    assert main(["query", QUERY, "--store", store]) == 0
    table = capsys.readouterr().out
    assert "┃ x ┃ y" in table.replace("  ", " ") or ("x" in table and "13" in table)
    out = tmp_path / "res.parquet"
    assert main(["query", QUERY, "--store", store, "--out", str(out)]) == 0
    assert pl.read_parquet(out)["y"].to_list() == [10, 11, 12, 13]


def test_query_is_read_only_and_errors_are_one_line(store, capsys):
    for query in [
        "DROP TABLE base",
        "CREATE TABLE z AS SELECT 1",
        "INSERT INTO base VALUES (9)",
        "COPY base TO 'x'",
    ]:
        assert main(["query", query, "--store", store]) == 2
        assert "only reading queries" in capsys.readouterr().err
    assert main(["query", "SELECT * FROM nope", "--store", store]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "(tables: base, plus)" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "template",
    [
        "SELECT * FROM read_csv('{p}')",
        "SELECT * FROM \"READ_CSV\"('{p}')",
        "SELECT * FROM base, Read_Csv /* x */ ('{p}')",
        "(SELECT * FROM read_csv('{p}'))",
    ],
)
def test_query_cannot_read_a_file_outside_the_store(store, capsys, tmp_path, template):
    secret = tmp_path / "secret.csv"
    secret.write_text("token\nhunter2\n")
    assert main(["query", template.format(p=secret), "--store", store]) == 2
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err and len(captured.err.strip().splitlines()) == 1
    assert "(...) is not allowed: a query sees only the run's tables (tables: base, plus)" in captured.err


def test_query_of_proc_self_environ_is_one_line(store, capsys):
    assert main(["query", "SELECT * FROM read_csv('/proc/self/environ')", "--store", store]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "read_csv(...) is not allowed" in err


def test_query_parentheses_comments_string_literals_describe(store, capsys):
    def rows(query: str) -> list[dict]:
        assert main(["query", query, "--store", store, "--format", "json"]) == 0
        return json.loads(capsys.readouterr().out)

    assert rows("(SELECT x FROM base ORDER BY x LIMIT 1)") == [{"x": 0}]
    union = "-- two parts\n( SELECT x FROM base WHERE x = 0) UNION ALL (SELECT x FROM plus WHERE x = 10)"
    assert sorted(r["x"] for r in rows(union)) == [0, 10]
    assert rows("SELECT 'read_csv(x)' AS s FROM base LIMIT 1") == [{"s": "read_csv(x)"}]
    assert rows("DESCRIBE plus") == [{"column": "x", "type": "Int64"}]
    assert rows("SHOW TABLES") == [{"name": "base"}, {"name": "plus"}]


def test_runs_tables_show(store, capsys):
    run_id = pipelines.open_run(store).run_id
    assert main(["runs", "--store", store]) == 0
    assert run_id in capsys.readouterr().out
    assert main(["tables", run_id[:15], "--store", store]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "plus" in out and "x:int64" in out
    assert main(["show", "--store", store]) == 0
    out = capsys.readouterr().out
    assert run_id in out and "wall_seconds=" in out
    assert main(["show", "nosuchrun", "--store", store]) == 2
    assert "no run matching 'nosuchrun'" in capsys.readouterr().err


def test_tda_run_cli_end_to_end(tmp_path):
    """The console script in a fresh process: embedded Ray, summary, exit codes."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    tda = [sys.executable, "-m", "pipelines.cli"]
    done = subprocess.run(
        [*tda, "run", str(spec), "-q", "--num-cpus", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout and f"store:    {tmp_path / 'tda-store'}" in done.stdout
    again = subprocess.run(
        [*tda, "run", str(spec), "-q", "--set", "steps.plus.amount=0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert pipelines.open_run(tmp_path / "tda-store").steps["base"]["status"] == "cached"
    bad = subprocess.run(
        [*tda, "run", str(spec), "--set", "steps.base.n=0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().endswith("steps.base.n: Input should be greater than 0")
