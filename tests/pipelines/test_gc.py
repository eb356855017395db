"""`tda gc` (pipelines/gc.py) on stores filled by real runs: what the dry run lists, what --yes deletes,
what it keeps (objects any record names, resumable scratch) and when it refuses (a live run, an
unreadable record, a URI store)."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path

import pytest

from pipelines import gc
from pipelines.cli import main
from pipelines.errors import StoreError
from pipelines.housekeeping import driver_info
from pipelines.store import Store
from pipelines.store_fs import FsStore
from tests.pipelines import test_runner
from tests.pipelines.test_runner import CHAIN, statuses
from tests.pipelines.test_store_integrity import _data_file, _flip

DAY = 86400.0
run_spec = test_runner.run_spec  # the fixture: run_spec(path, overrides, **options) in tmp_path/store


def tree(store: Store) -> dict[str, int]:
    """Every file of the store (but the gc lock) -> its size: what must not change when gc deletes nothing."""
    return {
        p.relative_to(store.root).as_posix(): p.stat().st_size
        for p in store.root.rglob("*")
        if p.is_file() and p.name != gc.LOCK_NAME
    }


def size_of(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def planned(store: Store) -> set[tuple[str, str]]:
    return {(str(g.category), g.path.relative_to(store.root).as_posix()) for g in gc.plan(store).items}


def plant(folder: Path, age: float = 0.0) -> Path:
    """A folder holding one file of 1,000 bytes, its mtime `age` seconds ago."""
    (folder / "part").mkdir(parents=True)
    (folder / "part" / "blob.bin").write_bytes(b"x" * 1000)
    then = time.time() - age
    os.utime(folder, (then, then))
    return folder


def edit_record(store: Store, run_id: str, **changes: object) -> None:
    path = store.run_path(run_id)
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def filled(run_spec, write_spec, store):
    """CHAIN run twice; the second run's record deleted (its two objects are garbage); staging of the
    finished first run, an orphan tmp entry two days old, and a fresh one. Returns (spec, kept run,
    the expected plan)."""
    path = write_spec(CHAIN)
    kept = run_spec(path)
    dropped = run_spec(path, ["steps.base.n=6"])
    store.run_path(dropped.run_id).unlink()
    plant(store.root / "tmp" / kept.run_id / "abc.123456")
    plant(store.root / "tmp" / "old-download", age=2 * DAY)
    plant(store.root / "tmp" / "fresh-download")
    expected = {
        *{("object", f"objects/{info.key}") for info in dropped.steps.values()},
        ("staging", f"tmp/{kept.run_id}"),
        ("staging", "tmp/old-download"),
    }
    return path, kept, expected


class TestDryRunThenYes:
    def test_the_dry_run_lists_exactly_the_garbage_and_deletes_nothing(self, filled, store, capsys):
        _, kept, expected = filled
        before = tree(store)
        assert planned(store) == expected
        assert main(["gc", "--store", str(store.root)]) == 0
        shown = capsys.readouterr().out
        assert "nothing deleted: pass --yes to delete" in shown
        assert all(where in shown for _, where in expected) and "fresh-download" not in shown
        assert tree(store) == before
        assert not any(info.key in shown for info in kept.steps.values())

    def test_yes_deletes_it_and_the_store_verifies_and_a_rerun_is_cached(
        self, filled, store, capsys, run_spec
    ):
        path, kept, expected = filled
        sizes = {where: size_of(store.root / where) for _, where in expected}
        assert main(["gc", "--store", str(store.root), "--yes"]) == 0
        total = sum(sizes.values())
        assert (
            1e3 < total < 1e6
            and f"freed {total / 1e3:,.1f} kB in {len(sizes)} entries" in capsys.readouterr().out
        )
        assert gc.plan(store).size == 0 and planned(store) == set()
        assert not any((store.root / where).exists() for where in sizes)
        assert (store.root / "tmp" / "fresh-download").is_dir()
        assert all(store.has(info.key) for info in kept.steps.values())
        assert main(["verify", "--store", str(store.root)]) == 0
        assert statuses(run_spec(path)) == {"base": "cached", "plus": "cached"}

    def test_the_bytes_freed_are_the_bytes_listed(self, filled, store):
        _, _, expected = filled
        plan = gc.plan(store)
        listed = {g.path.relative_to(store.root).as_posix(): g.size for g in plan.items}
        assert listed == {where: size_of(store.root / where) for _, where in expected}
        removed = gc.apply(plan)
        assert sum(g.size for g in removed) == plan.size > 2000


class TestKept:
    def test_objects_named_only_by_a_failed_or_an_interrupted_run_are_kept(
        self,
        run_spec,
        write_spec,
        store,
        tmp_path,
    ):
        flag = tmp_path / "flag"
        flag.touch()
        failing = write_spec(
            CHAIN + f"  gate:\n    kind: fail_while\n    data: plus\n    flag: {flag}\n", "failing.yaml"
        )
        failed = run_spec(failing, raise_on_failure=False)
        assert statuses(failed) == {"base": "done", "plus": "done", "gate": "failed"}
        other = run_spec(write_spec(CHAIN, "other.yaml"), ["steps.base.n=7"])
        me = driver_info()  # this process, with a start time that is not its own: a dead driver
        edit_record(store, other.run_id, status="running", finished=None, driver={**me, "pid_start": "0"})
        assert store.read_run(other.run_id).status == "interrupted"
        keys = {info.key for run in (failed, other) for info in run.steps.values() if store.has(info.key)}
        assert len(keys) == 4
        assert planned(store) == set()
        assert main(["gc", "--store", str(store.root), "--yes"]) == 0
        assert all(store.has(key) for key in keys)

    def test_an_object_a_kept_objects_manifest_names_as_input_is_kept(self, run_spec, write_spec, store):
        run = run_spec(write_spec(CHAIN))
        path = store.run_path(run.run_id)
        record = json.loads(path.read_text())
        del record["steps"]["base"]  # only plus's manifest names base's object now
        path.write_text(json.dumps(record))
        assert planned(store) == set()
        edit_record(store, run.run_id, steps={})
        assert planned(store) == {("object", f"objects/{info.key}") for info in run.steps.values()}

    def test_scratch_of_a_committed_or_unnamed_key_goes_and_of_an_unfinished_step_stays(
        self,
        run_spec,
        write_spec,
        store,
        tmp_path,
    ):
        flag = tmp_path / "flag"
        flag.touch()
        spec = write_spec(CHAIN + f"  gate:\n    kind: fail_while\n    data: plus\n    flag: {flag}\n")
        run = run_spec(spec, raise_on_failure=False)
        committed, unfinished = run.steps["base"].key, run.steps["gate"].key
        for key in (committed, unfinished, "f" * 64):
            plant(store.root / "scratch" / key)
        assert planned(store) == {("scratch", f"scratch/{committed}"), ("scratch", f"scratch/{'f' * 64}")}
        gc.apply(gc.plan(store))
        assert sorted(p.name for p in (store.root / "scratch").iterdir()) == [unfinished]


class TestRefusals:
    def test_a_run_holding_the_lock_makes_gc_refuse_and_delete_nothing(self, filled, store, capsys):
        before = tree(store)
        with gc.run_lock(store):
            plan = gc.plan(store)
            assert plan.live and plan.items  # the dry run still says what would go
            for args in ([], ["--yes"]):
                assert main(["gc", "--store", str(store.root), *args]) == 2
                err = capsys.readouterr().err.strip()
                assert err.startswith(f"a run is live in {store.root} (") and "\n" not in err
                assert err.endswith("run tda gc when it ends")
            with pytest.raises(StoreError, match="a run is live"):
                gc.apply(plan)
        assert tree(store) == before
        assert main(["gc", "--store", str(store.root), "--yes"]) == 0  # the run has ended
        assert planned(store) == set()

    def test_a_running_record_with_a_live_driver_makes_gc_refuse(self, filled, store, capsys):
        _, kept, _ = filled
        edit_record(store, kept.run_id, status="running", finished=None, driver=driver_info())
        before = tree(store)
        assert main(["gc", "--store", str(store.root), "--yes"]) == 2
        err = capsys.readouterr().err
        assert f"run {kept.run_id}, pid {os.getpid()}" in err and "run tda gc when it ends" in err
        assert tree(store) == before

    def test_staging_of_a_dead_run_goes_but_not_of_a_live_one(self, filled, store):
        _, kept, _ = filled
        live_id = "20990101-000000-live00"
        edit_record(store, kept.run_id, status="failed")
        store.run_path(live_id).write_text(
            json.dumps({**json.loads(store.run_path(kept.run_id).read_text()), "run_id": live_id})
        )
        edit_record(store, live_id, status="running", finished=None, driver=driver_info())
        plant(store.root / "tmp" / live_id / "k.1")
        plan = gc.plan(store)
        where = {g.path.name for g in plan.items if g.category == gc.Category.STAGING}
        assert where == {kept.run_id, "old-download"} and plan.live
        with pytest.raises(StoreError, match=f"run {live_id}"):
            gc.apply(plan)
        assert (store.root / "tmp" / kept.run_id).is_dir()
        edit_record(store, live_id, driver={**driver_info(), "pid_start": "0"})  # its driver died
        gc.apply(gc.plan(store))
        assert sorted(p.name for p in (store.root / "tmp").iterdir()) == ["fresh-download"]

    def test_a_real_run_holds_the_lock_until_it_ends(self, run_spec, write_spec, store, capsys):
        run_spec(write_spec(CHAIN))
        spec = write_spec(
            "version: 1\nname: slow\nsteps:\n  nap:\n    kind: sleepy\n    seconds: 2\n", "s.yaml"
        )
        thread = threading.Thread(target=run_spec, args=(spec,))
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not _lock_held(store) and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _lock_held(store)
            assert main(["gc", "--store", str(store.root), "--yes"]) == 2
            assert "a run is live in" in capsys.readouterr().err
        finally:
            thread.join()
        assert not _lock_held(store)
        assert main(["gc", "--store", str(store.root), "--yes"]) == 0

    def test_a_run_that_starts_while_gc_deletes_waits_for_it(self, run_spec, write_spec, store, caplog):
        path = write_spec(CHAIN)
        run_spec(path)
        done = []
        with gc.gc_lock(store):
            thread = threading.Thread(target=lambda: done.append(run_spec(path)))
            thread.start()
            time.sleep(0.5)
            assert not done and thread.is_alive()
        thread.join(timeout=30)
        assert statuses(done[0]) == {"base": "cached", "plus": "cached"}
        assert "waiting for `tda gc` to finish deleting" in caplog.text

    def test_an_unreadable_run_record_makes_gc_refuse(self, filled, store, capsys):
        _, kept, _ = filled
        record = store.run_path(kept.run_id)
        record.write_text(record.read_text()[:40])
        before = tree(store)
        for args in ([], ["--yes"]):
            assert main(["gc", "--store", str(store.root), *args]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"{record}: unreadable run record (") and "\n" not in err
            assert "tda gc deletes nothing while a record it cannot read might name any object" in err
        assert tree(store) == before

    def test_a_store_at_a_uri_or_no_store_is_refused(self, filled, store, capsys):
        before = tree(store)
        for args in ([], ["--yes"]):
            assert main(["gc", "--store", f"file://{store.root}", *args]) == 2
            assert "tda gc works on store folders only" in capsys.readouterr().err
        assert tree(store) == before
        with pytest.raises(StoreError, match="tda gc works on store folders only"):
            gc.plan(FsStore(f"file://{store.root}"))
        assert main(["gc", "--store", str(store.root / "nothing-here")]) == 2
        assert "no store folder here" in capsys.readouterr().err
        assert not (store.root / "nothing-here").exists()


def _lock_held(store: Store) -> bool:
    fd = os.open(gc.lock_path(store), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class TestDeleting:
    def test_an_object_leaves_objects_at_once_and_an_interrupted_gc_is_finished_by_the_next(
        self,
        run_spec,
        write_spec,
        store,
        monkeypatch,
    ):
        run = run_spec(write_spec(CHAIN))
        store.run_path(run.run_id).unlink()
        keys = [info.key for info in run.steps.values()]

        def killed(path, **_):
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(gc.shutil, "rmtree", killed)
            with pytest.raises(KeyboardInterrupt):
                gc.apply(gc.plan(store))
        gone = [k for k in keys if not store.object_dir(k).exists()]
        assert len(gone) == 1 and store.has(next(k for k in keys if k not in gone))
        (trash,) = (store.root / "tmp").glob(f"{gc.TRASH_PREFIX}*")
        assert (trash / f"object.{gone[0]}" / "manifest.json").is_file()  # whole, out of objects/
        assert planned(store) == {
            ("staging", f"tmp/{trash.name}"),
            *{("object", f"objects/{k}") for k in keys if k not in gone},
        }
        gc.apply(gc.plan(store))
        assert store.object_keys() == [] and list((store.root / "tmp").iterdir()) == []

    def test_what_a_run_records_between_plan_and_apply_is_kept(self, filled, store):
        _, kept, expected = filled
        plan = gc.plan(store)
        keys = sorted(where.split("/")[1] for category, where in expected if category == "object")
        later = json.loads(store.run_path(kept.run_id).read_text())  # a run that named them meanwhile
        later.update(run_id="20990101-000000-later0")
        later["steps"] = {f"s{i}": {**later["steps"]["base"], "key": key} for i, key in enumerate(keys)}
        store.run_path(later["run_id"]).write_text(json.dumps(later))
        removed = gc.apply(plan)
        assert all(store.has(key) for key in keys)
        assert {g.category for g in removed} == {gc.Category.STAGING}

    def test_quarantined_copies_go_and_the_next_run_recomputes_the_step(self, run_spec, write_spec, store):
        path = write_spec(CHAIN)
        key = run_spec(path).steps["base"].key
        _flip(_data_file(store, key), 10)
        assert not store.check(key, hashes=True)
        (entry,) = (store.root / "quarantine").iterdir()
        assert planned(store) == {("quarantine", f"quarantine/{entry.name}")}
        assert main(["gc", "--store", str(store.root), "--yes"]) == 0
        assert list((store.root / "quarantine").iterdir()) == []
        assert main(["verify", "--store", str(store.root)]) == 0
        assert statuses(run_spec(path)) == {"base": "done", "plus": "cached"}
