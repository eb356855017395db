"""The store without Ray: keys, atomic commits, run records; the DAG helpers; a step run in-process."""

from __future__ import annotations

import json

import polars as pl
import pytest

from pipelines import StoreError, load_spec
from pipelines.context import StepJob, execute_step
from pipelines.dag import build_dag
from pipelines.runner import plan
from pipelines.store import RunRecord, Store, cache_key
from tests.pipelines import toy_steps


def test_cache_key_is_canonical_and_sensitive():
    a = cache_key("k", "1", {"x": 1, "y": [1, 2]})
    assert a == cache_key("k", "1", {"y": [1, 2], "x": 1})  # key order does not matter
    assert (
        len(
            {
                a,
                cache_key("k", "2", {"x": 1, "y": [1, 2]}),
                cache_key("k", "1", {"x": 2, "y": [1, 2]}),
                cache_key("j", "1", {"x": 1, "y": [1, 2]}),
                cache_key("k", "1", {"x": 1, "y": [1, 2]}, "f"),
            }
        )
        == 5
    )


def _commit(store: Store, key: str, value: int, replace: bool = False):
    staging = store.staging_dir(key)
    (staging / "data").mkdir()
    pl.DataFrame({"v": [value]}).write_parquet(staging / "data" / "part-00000.parquet")
    return store.commit(key, staging, {"name": "s", "value": value}, replace=replace)


def test_commit_is_atomic_and_keeps_an_existing_object_unless_replacing(tmp_path):
    store = Store(tmp_path)
    assert not store.has("k1")
    obj = _commit(store, "k1", 1)
    assert store.has("k1") and obj.table().collect()["v"].to_list() == [1]
    _commit(store, "k1", 2)  # another run committed the same key: the first object stays
    assert store.get("k1").manifest["value"] == 1
    _commit(store, "k1", 3, replace=True)  # a forced re-run swaps it
    assert store.get("k1").manifest["value"] == 3
    assert [p for p in (tmp_path / "tmp").rglob("*") if not p.is_dir()] == []  # staging gone


def test_run_records_by_id_prefix_and_latest(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="no runs in this store"):
        store.read_run()
    for run_id in ["20260101-000000-aaaaaa", "20260102-000000-bbbbbb"]:
        store.write_run(RunRecord(run_id=run_id, spec_name="s", spec_path="p", store=str(tmp_path), spec={}))
    assert store.read_run().run_id == "20260102-000000-bbbbbb"
    assert store.read_run("20260101").run_id == "20260101-000000-aaaaaa"
    with pytest.raises(StoreError, match="several runs matching '2026'"):
        store.read_run("2026")
    assert json.loads(store.run_path("20260101-000000-aaaaaa").read_text())["spec_name"] == "s"


SPEC = """
version: 1
name: t
steps:
  a:
    kind: numbers
    n: 3
  b:
    kind: add
    data: a
  c:
    kind: add
    data: b
  d:
    kind: numbers
    n: 1
"""


def test_dag_order_descendants_ancestors(write_spec):
    dag = build_dag(load_spec(write_spec(SPEC)))
    assert dag.order == ("a", "b", "c", "d")
    assert dag.descendants({"b"}) == {"b", "c"}
    assert dag.ancestors("c") == {"a", "b"}
    assert dag.downstream("a") == ("b",)


def test_keys_carry_upstream_keys_not_names(write_spec, tmp_path):
    store = Store(tmp_path / "s")
    _, one = plan(load_spec(write_spec(SPEC)), store)
    _, two = plan(load_spec(write_spec(SPEC.replace("n: 3", "n: 4"), "two.yaml")), store)
    assert one["d"].job.key == two["d"].job.key  # independent of a
    assert all(one[s].job.key != two[s].job.key for s in "abc")


def test_the_latest_run_is_the_last_started_even_within_one_second(tmp_path):
    store = Store(tmp_path)
    # the same start second; the random suffixes sort against the start order
    for run_id, started in [
        ("20261128-140755-ffffff", "10:00:00.100"),
        ("20261128-140755-000000", "10:00:00.900"),
    ]:
        store.write_run(
            RunRecord(
                run_id=run_id, spec_name="s", spec_path="p", store=str(tmp_path), spec={}, started=started
            )
        )
    store.write_run(
        RunRecord(run_id="20261128-140754-zzzzzz", spec_name="s", spec_path="p", store="", spec={})
    )
    assert store.read_run().run_id == "20261128-140755-000000"


def test_a_step_runs_in_process_without_ray(tmp_path):
    """Step functions are plain functions: the serial executor runs one straight into the store."""
    store = Store(tmp_path)
    params = toy_steps.FanoutParams(kind="fanout", n=3)
    outcome = execute_step(
        StepJob("sq", "fanout", "key1", "1", toy_steps.fanout, params, {}, str(store.root))
    )
    assert outcome.ok and outcome.rows == 3
    assert store.get("key1").table().collect()["square"].to_list() == [0, 1, 4]
    assert (store.get("key1").dir / "artifacts" / "note.txt").is_file()


def test_a_failing_step_leaves_nothing_behind(tmp_path):
    store = Store(tmp_path)
    params = toy_steps.FailWhileParams(kind="fail_while", data="x", flag=str(tmp_path))  # the flag exists
    with pytest.raises(RuntimeError):
        execute_step(
            StepJob("f", "fail_while", "key2", "1", toy_steps.fail_while, params, {}, str(store.root))
        )
    assert not store.has("key2") and [p for p in (tmp_path / "tmp").rglob("*") if not p.is_dir()] == []


def test_the_python_3_10_tree_removal_of_exports_never_follows_links(tmp_path):
    """exports._remove_tree_at stands in for shutil.rmtree(dir_fd=…) (Python 3.11+) on Python 3.10."""
    import os

    from pipelines.exports import _remove_tree_at

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("kept")
    old = tmp_path / "exports" / "old"
    (old / "a" / "b").mkdir(parents=True)
    (old / "a" / "b" / "part.parquet").write_text("x")
    (old / "a" / "link").symlink_to(outside)
    (old / "file-link").symlink_to(outside / "keep.txt")
    folder = os.open(tmp_path / "exports", os.O_RDONLY | os.O_DIRECTORY)
    try:
        _remove_tree_at("old", folder)
    finally:
        os.close(folder)
    assert not old.exists() and (outside / "keep.txt").read_text() == "kept"
