"""Step and run states as typed values: the moves between them, and run records on disk unchanged."""

from __future__ import annotations

import json

import pytest

from pipelines.errors import IllegalTransition
from pipelines.status import RUN_MOVES, STEP_MOVES, RunStatus, StepRecord, StepStatus
from pipelines.store import RunRecord, Store

# a run record as the engine wrote it before steps were typed (one of each kind of step entry)
OLD_RECORD = {
    "run_id": "20261202-170604-76ddbb",
    "spec_name": "quickstart",
    "spec_path": "specs/quickstart.yaml",
    "store": "/tmp/store",
    "spec": {"version": 1, "name": "quickstart", "steps": {}},
    "status": "failed",
    "started": "2026-12-02T17:06:04.120+00:00",
    "finished": "2026-12-02T17:06:40.512+00:00",
    "seconds": 36.4,
    "steps": {
        "data": {
            "kind": "tabular_dataset",
            "key": "0529945c",
            "status": "done",
            "cached": False,
            "rows": 3000,
            "seconds": 0.256,
            "node": "e866ef32",
        },
        "split": {
            "kind": "split",
            "key": "69ccee1a",
            "status": "cached",
            "cached": True,
            "rows": 3000,
            "seconds": None,
            "node": "e866ef32",
        },
        "train": {
            "kind": "train_model",
            "key": "9f86d081",
            "status": "failed",
            "cached": False,
            "rows": None,
            "seconds": 2.5,
            "error": "RuntimeError: diverged",
            "traceback": "Traceback …\nRuntimeError: diverged",
            "some_future_field": [1, 2],
        },
        "scores": {
            "kind": "influence_scores",
            "key": "2c26b46b",
            "status": "skipped",
            "cached": False,
            "rows": None,
            "seconds": None,
            "error": "an upstream step failed",
        },
    },
    "mlflow": {"tracking_uri": "sqlite:////tmp/store/mlflow.db", "experiment_id": "1", "run_id": "ab"},
    "timings": {"ray_start": 6.1, "execute": 28.0},
    "overrides": [],
    "driver": {"host": "h", "pid": 1, "pid_start": "2"},
    "heartbeat": "2026-12-02T17:06:34.120+00:00",
}


class TestMoves:
    def test_every_state_has_its_moves_stated(self):
        assert set(STEP_MOVES) == set(StepStatus) and set(RUN_MOVES) == set(RunStatus)

    def test_terminal_states(self):
        live = {s for s in StepStatus if not s.is_terminal}
        assert live == {StepStatus.PENDING, StepStatus.RUNNING}
        assert [s for s in RunStatus if not s.is_terminal] == [RunStatus.RUNNING]

    def test_a_step_runs_to_done(self):
        step = StepRecord("k", "key")
        step.move_to(StepStatus.RUNNING)
        step.move_to(StepStatus.DONE)
        assert step.status is StepStatus.DONE and step.status.has_output

    @pytest.mark.parametrize(
        ("start", "new"),
        [
            (StepStatus.DONE, StepStatus.RUNNING),
            (StepStatus.CACHED, StepStatus.FAILED),
            (StepStatus.PENDING, StepStatus.DONE),
            (StepStatus.FAILED, StepStatus.FAILED),
        ],
    )
    def test_an_illegal_step_move_is_refused(self, start, new):
        step = StepRecord("k", "key", status=start)
        with pytest.raises(IllegalTransition, match=f"a step cannot move from {start} to {new}"):
            step.move_to(new)
        assert step.status is start

    def test_an_illegal_run_move_is_refused(self):
        record = RunRecord("20260101-000000-aaaaaa", "s", "p", "", {}, status=RunStatus.SUCCEEDED)
        with pytest.raises(IllegalTransition, match="succeeded is terminal"):
            record.move_to(RunStatus.FAILED)

    def test_states_compare_and_print_as_their_strings(self):
        assert StepStatus.CACHED == "cached" and {StepStatus.DONE} == {"done"}
        assert f"{StepStatus.FAILED}" == "failed" and json.dumps(RunStatus.RUNNING) == '"running"'


class TestRecordOnDisk:
    def test_an_old_format_record_reads_typed_and_writes_back_unchanged(self, tmp_path):
        store = Store(tmp_path)
        path = store.run_path(OLD_RECORD["run_id"])
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(OLD_RECORD, indent=2))
        record = store.read_run()
        assert record.status is RunStatus.FAILED
        steps = record.steps
        assert {n: s.status for n, s in steps.items()} == {
            "data": StepStatus.DONE,
            "split": StepStatus.CACHED,
            "train": StepStatus.FAILED,
            "scores": StepStatus.SKIPPED,
        }
        assert steps["data"].node == "e866ef32" and steps["split"].seconds is None
        assert steps["train"].error == "RuntimeError: diverged"
        assert steps["train"].extra == {"some_future_field": [1, 2]}  # kept, not dropped
        store.write_run(record)
        assert json.loads(path.read_text()) == OLD_RECORD

    def test_steps_read_like_the_dicts_they_were(self):
        step = StepRecord.from_json(OLD_RECORD["steps"]["train"])
        assert step["status"] == "failed" and step["error"] == "RuntimeError: diverged"
        assert step.get("node") is None and step.get("some_future_field") == [1, 2]
        with pytest.raises(KeyError):
            step["node"]  # not set: absent from the JSON, as before

    def test_an_unknown_state_makes_the_record_unreadable(self, tmp_path):
        from pipelines.errors import StoreError

        store = Store(tmp_path)
        bad = {**OLD_RECORD, "steps": {"x": {**OLD_RECORD["steps"]["data"], "status": "finished"}}}
        store.run_path(OLD_RECORD["run_id"]).parent.mkdir(parents=True)
        store.run_path(OLD_RECORD["run_id"]).write_text(json.dumps(bad))
        with pytest.raises(StoreError, match="unreadable run record .*'finished' is not a valid StepStatus"):
            store.read_run(OLD_RECORD["run_id"])

    def test_a_running_step_writes_its_progress_as_a_list(self):
        step = StepRecord("k", "key")
        step.move_to(StepStatus.RUNNING)
        step.progress = (3, 10)
        data = step.to_json()
        assert data["progress"] == [3, 10] and data["status"] == "running"
        assert StepRecord.from_json(json.loads(json.dumps(data))) == step
