"""The runner on a real embedded Ray, with a real SQLite MLflow store and real Parquet files."""

from __future__ import annotations

import polars as pl
import pytest

import pipelines
from pipelines import RunFailed, load_spec

CHAIN = """
version: 1
name: chain
steps:
  base:
    kind: numbers
    n: 5
  plus:
    kind: add
    data: base
    amount: 2
"""


@pytest.fixture
def run_spec(ray_session, tracking_uri, tmp_path):
    """run_spec(path, **options) -> Run, in a store of this test."""

    def go(path, overrides=(), **options):
        options.setdefault("store", str(tmp_path / "store"))
        options.setdefault("tracking_uri", tracking_uri)
        return pipelines.run(load_spec(path, overrides), progress=False, **options)

    return go


def statuses(run) -> dict[str, str]:
    return {name: info["status"] for name, info in run.steps.items()}


class TestCaching:
    def test_first_run_executes_then_rerun_executes_nothing(self, run_spec, write_spec):
        path = write_spec(CHAIN)
        first = run_spec(path)
        assert statuses(first) == {"base": "done", "plus": "done"}
        assert first.table("plus").collect()["x"].to_list() == [2, 3, 4, 5, 6]
        again = run_spec(path)
        assert statuses(again) == {"base": "cached", "plus": "cached"}
        assert again.steps["plus"]["key"] == first.steps["plus"]["key"]

    def test_changed_params_recompute_the_step_and_its_descendants_only(self, run_spec, write_spec):
        path = write_spec(CHAIN)
        run_spec(path)
        assert statuses(run_spec(path, ["steps.plus.amount=3"])) == {"base": "cached", "plus": "done"}
        assert statuses(run_spec(path, ["steps.base.n=6"])) == {"base": "done", "plus": "done"}

    def test_non_semantic_fields_and_renames_keep_the_cache(self, run_spec, write_spec):
        run_spec(write_spec(CHAIN))
        renamed = CHAIN.replace("base", "origin") + "    retries: 3\n    description: renamed\n"
        assert statuses(run_spec(write_spec(renamed, "renamed.yaml"))) == {
            "origin": "cached",
            "plus": "cached",
        }

    def test_force_recomputes_a_step_and_everything_downstream(self, run_spec, write_spec):
        path = write_spec(CHAIN)
        run_spec(path)
        assert statuses(run_spec(path, force=("base",))) == {"base": "done", "plus": "done"}
        assert statuses(run_spec(path, force=("plus",))) == {"base": "cached", "plus": "done"}

    def test_an_edited_input_file_reruns_the_reading_step(self, run_spec, write_spec, tmp_path):
        data = tmp_path / "d.csv"
        data.write_text("x\n1\n2\n")
        path = write_spec("version: 1\nname: r\nsteps:\n  raw:\n    kind: read\n    path: d.csv\n")
        assert run_spec(path).table("raw").collect().height == 2
        assert statuses(run_spec(path)) == {"raw": "cached"}
        data.write_text("x\n1\n2\n3\n")
        rerun = run_spec(path)
        assert statuses(rerun) == {"raw": "done"} and rerun.table("raw").collect().height == 3


class TestFailures:
    def test_failing_step_keeps_completed_outputs_and_the_next_run_resumes(
        self, run_spec, write_spec, tmp_path
    ):
        flag = tmp_path / "flag"
        flag.touch()
        path = write_spec(f"""
        version: 1
        name: resume
        steps:
          base:
            kind: numbers
            n: 4
          plus:
            kind: add
            data: base
          gate:
            kind: fail_while
            data: plus
            flag: {flag}
          after:
            kind: add
            data: gate
          other:
            kind: numbers
            n: 2
            start: 100
        """)
        with pytest.raises(RunFailed) as info:
            run_spec(path)
        failed = info.value.run
        assert statuses(failed) == {
            "base": "done",
            "plus": "done",
            "gate": "failed",
            "after": "skipped",
            "other": "done",
        }
        assert "RuntimeError: flag" in failed.steps["gate"]["error"]
        assert failed.record.status == "failed"
        store = failed.store
        assert store.has(failed.steps["plus"]["key"]) and not store.has(failed.steps["gate"]["key"])
        assert list((store.root / "tmp").iterdir()) == []  # nothing half-written is left
        # the persisted record says the same
        assert store.read_run(failed.run_id).steps["gate"]["status"] == "failed"

        flag.unlink()
        resumed = run_spec(path)
        assert statuses(resumed) == {
            "base": "cached",
            "plus": "cached",
            "gate": "done",
            "after": "done",
            "other": "cached",
        }
        assert resumed.table("after").collect()["x"].to_list() == [2, 3, 4, 5]

    def test_worker_killed_on_first_attempt_completes_on_retry(self, run_spec, write_spec, tmp_path):
        marker = tmp_path / "crashed-once"
        path = write_spec(f"""
        version: 1
        name: crash
        steps:
          flaky:
            kind: crash_once
            marker: {marker}
            retries: 1
        """)
        result = run_spec(path)
        assert statuses(result) == {"flaky": "done"}
        row = result.table("flaky").collect().row(0, named=True)
        assert marker.exists() and row["first_pid"] != row["pid"]  # a new worker did the retry

    def test_worker_killed_without_retries_fails_the_step(self, run_spec, write_spec, tmp_path):
        path = write_spec(
            f"version: 1\nname: c\nsteps:\n  flaky:\n    kind: crash_once\n    marker: {tmp_path / 'm'}\n"
        )
        result = run_spec(path, raise_on_failure=False)
        assert statuses(result) == {"flaky": "failed"}
        assert result.steps["flaky"]["error"]


class TestConcurrency:
    def test_independent_steps_overlap_in_time(self, run_spec, write_spec):
        path = write_spec("""
        version: 1
        name: overlap
        steps:
          left:
            kind: sleepy
            seconds: 2
            tag: left
          right:
            kind: sleepy
            seconds: 2
            tag: right
        """)
        result = run_spec(path)
        left = result.table("left").collect().row(0, named=True)
        right = result.table("right").collect().row(0, named=True)
        overlap = min(left["end"], right["end"]) - max(left["start"], right["start"])
        assert overlap > 1.0, f"steps ran one after the other: overlap {overlap:.2f}s"

    def test_a_step_fans_out_into_ray_tasks(self, run_spec, write_spec):
        result = run_spec(write_spec("version: 1\nname: fan\nsteps:\n  sq:\n    kind: fanout\n    n: 6\n"))
        table = result.table("sq").collect()
        assert table["square"].to_list() == [0, 1, 4, 9, 16, 25]
        assert result.output("sq").manifest["node"] == result.steps["sq"]["node"]

    def test_a_step_uses_ray_data_and_writes_sharded_parquet(self, run_spec, write_spec):
        result = run_spec(write_spec("version: 1\nname: rd\nsteps:\n  sq:\n    kind: shards\n    n: 100\n"))
        files = list(result.output("sq").data_dir.glob("*.parquet"))
        table = result.table("sq").collect().sort("id")
        assert len(files) >= 2 and table.height == 100 and result.steps["sq"]["rows"] == 100
        assert table["square"].to_list() == [i * i for i in range(100)]


class TestOutputs:
    def test_manifest_run_record_and_lazy_tables(self, run_spec, write_spec):
        result = run_spec(write_spec(CHAIN))
        manifest = result.output("plus").manifest
        assert manifest["kind"] == "add" and manifest["rows"] == 5
        assert manifest["inputs"] == {"base": result.steps["base"]["key"]}
        assert manifest["schema"] == [{"name": "x", "type": "int64"}]
        assert {"started", "finished", "seconds"} <= set(manifest["timings"])
        assert {"python", "polars", "ray"} <= set(manifest["versions"])
        assert isinstance(result.table("plus"), pl.LazyFrame)
        latest = pipelines.open_run(result.store)
        assert latest.run_id == result.run_id and latest.status == "succeeded"
        assert latest.record.spec["steps"]["plus"]["amount"] == 2

    def test_export_writes_a_named_copy_inside_the_store(self, run_spec, write_spec):
        result = run_spec(write_spec(CHAIN + "    export: out/plus.csv\n"))
        exported = result.store.root / "exports" / "out" / "plus.csv"
        assert pl.read_csv(exported)["x"].to_list() == [2, 3, 4, 5, 6]
