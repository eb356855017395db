"""The store under attack (issue 11): exports confined to exports/, checksummed objects, manifests that
heal, commits that survive racing writers, killed drivers, and one-line errors for a broken store."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
from pathlib import Path

import polars as pl
import pytest

import pipelines
from pipelines import StoreError, load_spec
from pipelines.cli import main
from pipelines.errors import CorruptObject
from pipelines.exports import MARKER, export_to_store
from pipelines.store import Store
from tests.pipelines.test_runner import CHAIN
from tests.procs import tda, wait_for


def _commit(store: Store, key: str, value: int = 1, rows: int = 3, replace: bool = False):
    staging = store.staging_dir(key)
    (staging / "data").mkdir()
    pl.DataFrame({"v": [value] * rows}).write_parquet(staging / "data" / "part-00000.parquet")
    return store.commit(key, staging, {"name": "s", "kind": "k", "schema": [{"name": "v"}]}, replace=replace)


def _data_file(store: Store, key: str) -> Path:
    return store.object_dir(key) / "data" / "part-00000.parquet"


def _flip(path: Path, offset: int, count: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def run_spec(ray_session, tracking_uri, tmp_path):
    def go(path, overrides=(), **options):
        options.setdefault("store", str(tmp_path / "store"))
        options.setdefault("tracking_uri", tracking_uri)
        options.setdefault("raise_on_failure", False)
        return pipelines.run(load_spec(path, overrides), progress=False, **options)

    return go


# ---------------------------------------------------------------- 1. exports stay inside exports/


class TestExports:
    @pytest.fixture
    def store(self, tmp_path):
        store = Store(tmp_path / "store")
        _commit(store, "k1")
        return store

    @pytest.mark.parametrize("target", [".", "a/..", "./", "../x.csv", "/etc/x.csv", ""])
    def test_a_target_that_is_not_below_exports_is_refused(self, store, target):
        (store.root / "exports" / "other").mkdir(parents=True)
        (store.root / "exports" / "other" / "keep.csv").write_text("x\n1\n")
        with pytest.raises(StoreError, match="give a relative path inside <store>/exports/"):
            export_to_store(store, store.get("k1"), target)
        assert (store.root / "exports" / "other" / "keep.csv").read_text() == "x\n1\n"

    @pytest.mark.parametrize("link", ["exports", "exports/sub"])
    def test_a_symlink_on_the_way_is_refused_not_followed(self, store, tmp_path, link):
        outside = tmp_path / "outside"
        (outside / "t").mkdir(parents=True)
        (outside / "t" / "precious.txt").write_text("keep me")
        (outside / "precious.txt").write_text("keep me too")
        if link != "exports":
            (store.root / "exports").mkdir()
        (store.root / link).symlink_to(outside, target_is_directory=True)
        target = "t" if link == "exports" else "sub/t"
        with pytest.raises(StoreError, match="is a symbolic link or not a folder"):
            export_to_store(store, store.get("k1"), target)
        assert (outside / "t" / "precious.txt").read_text() == "keep me"
        assert sorted(p.name for p in outside.rglob("*")) == ["precious.txt", "precious.txt", "t"]

    def test_a_symlinked_target_is_refused(self, store, tmp_path):
        victim = tmp_path / "victim.csv"
        victim.write_text("keep")
        (store.root / "exports").mkdir()
        (store.root / "exports" / "out.csv").symlink_to(victim)
        with pytest.raises(StoreError, match="is a symbolic link"):
            export_to_store(store, store.get("k1"), "out.csv")
        assert victim.read_text() == "keep"

    def test_a_folder_export_replaces_only_its_own_previous_version(self, store):
        _commit(store, "k2", value=2)
        exports = store.root / "exports"
        export_to_store(store, store.get("k1"), "a.csv")
        export_to_store(store, store.get("k1"), "t")
        assert (exports / "t" / MARKER).is_file()
        export_to_store(store, store.get("k2"), "t")  # replaces its own previous version
        assert pl.read_parquet(exports / "t" / "*.parquet")["v"].to_list() == [2, 2, 2]
        assert (exports / "a.csv").is_file()  # the other export is untouched
        (exports / "mine").mkdir()
        (exports / "mine" / "notes.txt").write_text("user data")
        with pytest.raises(StoreError, match="a folder that no export made"):
            export_to_store(store, store.get("k1"), "mine")
        assert (exports / "mine" / "notes.txt").read_text() == "user data"
        with pytest.raises(StoreError, match="is the folder export of another step"):
            export_to_store(store, store.get("k1"), "t/inner.csv")
        assert sorted(p.name for p in (exports / "t").iterdir()) == [MARKER, "part-00000.parquet"]


# ---------------------------------------------------------------- 2. corruption is found, named, healed


class TestChecksums:
    def test_the_manifest_lists_every_file_with_size_and_sha256(self, tmp_path):
        store = Store(tmp_path)
        obj = _commit(store, "k1")
        (entry,) = obj.manifest["files"].values()
        assert list(obj.manifest["files"]) == ["data/part-00000.parquet"]
        assert entry["size"] == _data_file(store, "k1").stat().st_size and len(entry["sha256"]) == 64

    def test_every_byte_flip_is_found_by_a_read_and_names_object_and_file(self, tmp_path):
        rng = random.Random(0)
        for trial in range(40):
            store = Store(tmp_path / f"s{trial}")
            _commit(store, "k1", rows=50)
            path = _data_file(store, "k1")
            _flip(path, rng.randrange(path.stat().st_size))
            with pytest.raises(CorruptObject) as info:
                store.get("k1")
            message = str(info.value)
            assert "object k1" in message and "data/part-00000.parquet" in message
            assert "the next run recomputes it" in message and "\n" not in message
            assert not store.has("k1") and (store.root / "quarantine").is_dir()

    def test_a_changed_size_or_a_stray_data_file_is_found_by_the_cheap_check(self, tmp_path):
        store = Store(tmp_path)
        _commit(store, "k1")
        with open(_data_file(store, "k1"), "ab") as f:
            f.write(b"x")
        assert not store.check("k1") and not store.has("k1")
        _commit(store, "k2")
        pl.DataFrame({"v": [9]}).write_parquet(store.object_dir("k2") / "data" / "part-00001.parquet")
        assert not store.check("k2")

    def test_a_run_finds_a_flipped_table_and_the_next_run_recomputes_it(self, run_spec, write_spec, capsys):
        path = write_spec(CHAIN)
        first = run_spec(path)
        store = first.store
        base_key = first.steps["base"]["key"]
        data = _data_file(store, base_key)
        _flip(data, data.stat().st_size // 3, 2)  # two bytes of a data page: the size is unchanged

        forced = run_spec(path, force=("plus",))  # a downstream step reads the damaged table
        assert forced.steps["base"]["status"] == "cached"  # same size: trusted until read
        assert forced.steps["plus"]["status"] == "failed"
        error = forced.steps["plus"]["error"]
        assert f"object {base_key[:16]}… (step 'base') is corrupt: data/part-00000.parquet" in error
        healed = run_spec(path)  # plus from the first run was made from intact data: it stays
        assert {n: i["status"] for n, i in healed.steps.items()} == {"base": "done", "plus": "cached"}
        assert healed.table("plus").collect()["x"].to_list() == [2, 3, 4, 5, 6]

        _flip(data, data.stat().st_size // 3, 2)  # again; now a query is the first to read it
        err = _one_line_error(capsys, ["query", "SELECT SUM(x) AS s FROM base", "--store", str(store.root)])
        assert "(step 'base') is corrupt: data/part-00000.parquet: its sha256 differs" in err
        again = run_spec(path)
        assert {n: i["status"] for n, i in again.steps.items()} == {"base": "done", "plus": "cached"}
        assert main(["query", "SELECT SUM(x) AS s FROM base", "--store", str(store.root)]) == 0
        assert "10" in capsys.readouterr().out
        assert run_spec(path, verify=True).steps["base"]["status"] == "cached"  # hashes agree now

    def test_tda_verify_hashes_every_object(self, tmp_path, capsys):
        store = Store(tmp_path)
        for i in range(3):
            _commit(store, f"k{i}")
        assert main(["verify", "--store", str(tmp_path)]) == 0
        assert "3 of 3 objects intact" in capsys.readouterr().out
        _flip(_data_file(store, "k1"), 40)
        assert main(["verify", "--store", str(tmp_path)]) == 1
        captured = capsys.readouterr()
        assert "2 of 3 objects intact" in captured.out
        assert "object k1 (step 's') is corrupt: data/part-00000.parquet: its sha256 differs" in captured.err
        assert main(["verify", "--store", str(tmp_path)]) == 0  # quarantined: gone from objects/


# ---------------------------------------------------------------- 5. a folder without a manifest heals


def test_a_deleted_manifest_is_recomputed_and_replaced(run_spec, write_spec, capsys):
    path = write_spec(CHAIN)
    first = run_spec(path)
    key = first.steps["plus"]["key"]
    (first.store.object_dir(key) / "manifest.json").unlink()
    again = run_spec(path)
    assert again.steps["plus"]["status"] == "done" and first.store.has(key)
    assert main(["query", "SELECT SUM(x) AS s FROM plus", "--store", str(first.store.root)]) == 0
    assert "20" in capsys.readouterr().out


def test_a_folder_without_a_manifest_is_replaced_by_a_commit(tmp_path):
    store = Store(tmp_path)
    (store.object_dir("k1") / "data").mkdir(parents=True)
    (store.object_dir("k1") / "data" / "junk.parquet").write_text("junk")
    obj = _commit(store, "k1", value=5)
    assert store.has("k1") and obj.table().collect()["v"].to_list() == [5, 5, 5]


# ---------------------------------------------------------------- 6. racing commits of one key


def _race(root: str, keys: list[str], replace: bool, barrier) -> list[str]:
    """Commit every key, all processes at the same moment (each waits with its staging ready)."""
    store = Store(root)
    errors = []
    for key in keys:
        staging = store.staging_dir(key)
        (staging / "data").mkdir()
        pl.DataFrame({"v": [os.getpid()] * 3}).write_parquet(staging / "data" / "part-00000.parquet")
        barrier.wait()
        try:
            store.commit(key, staging, {"name": "s"}, replace=replace)
        except Exception as exc:  # what the old commit raised: OSError: Directory not empty
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


@pytest.mark.parametrize("replace", [False, True])
def test_concurrent_commits_of_the_same_keys_never_fail(tmp_path, replace):
    keys = [f"k{i}" for i in range(500)]
    ctx = multiprocessing.get_context("spawn")  # forking a process that runs Ray can hang
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            results = pool.starmap(_race, [(str(tmp_path), keys, replace, barrier)] * 4)
    errors = [e for r in results for e in r]
    assert errors == [], f"{len(errors)} of 2000 commits failed, e.g. {errors[0]}"
    store = Store(tmp_path)
    for key in keys:
        assert store.get(key).table().collect().height == 3
    assert [p for p in (tmp_path / "tmp").rglob("*") if not p.is_dir()] == []


# ---------------------------------------------------------------- 8. a killed driver


SLOW = """
version: 1
name: slow
steps:
  nap:
    kind: sleepy
    seconds: 120
"""


def _ray_dirs(pid: int) -> list[Path]:
    import tempfile

    return list(Path(tempfile.gettempdir()).glob(f"tda-ray-{pid}-*"))


def _pids_using(path: Path) -> list[int]:
    from pipelines.housekeeping import _processes_using

    return _processes_using(str(path))


def test_a_killed_driver_reads_interrupted_and_the_next_run_cleans_up(write_spec, tmp_path):
    spec = write_spec(SLOW)
    store_dir = tmp_path / "store"
    driver = tda("run", str(spec), "-q", "--num-cpus", "1", "--store", str(store_dir))
    store = Store(store_dir)

    def step_running() -> bool:
        ids = store.run_ids()
        return bool(ids) and store.read_run(ids[-1]).steps["nap"]["status"] == "running"

    wait_for(step_running)
    wait_for(lambda: any((store_dir / "tmp").rglob("*.*")))  # the step's staging folder
    (ray_dir,) = _ray_dirs(driver.pid)
    driver.send_signal(signal.SIGKILL)
    driver.wait()

    record = store.read_run()
    assert record.status == "interrupted" and record.steps["nap"]["status"] == "interrupted"
    assert f"pid {driver.pid}" in record.steps["nap"]["error"]
    assert main(["runs", "--store", str(store_dir)]) == 0

    after = tda("run", str(spec), "-q", "--store", str(store_dir), "--set", "steps.nap.seconds=0")
    assert after.wait(timeout=300) == 0, after.stderr.read()
    old = json.loads(store.run_path(record.run_id).read_text())
    assert old["status"] == "interrupted" and old["finished"]  # written back
    assert not (store_dir / "tmp" / record.run_id).exists()  # its staging is gone
    assert not ray_dir.exists() and _pids_using(ray_dir) == []  # its embedded Ray is gone
    assert _ray_dirs(after.pid) == []  # a driver that exits normally removes its own


# ---------------------------------------------------------------- 11. one line, not a traceback


def _one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_store_path_that_is_a_file(tmp_path, capsys, write_spec):
    (tmp_path / "afile").write_text("x")
    err = _one_line_error(capsys, ["run", str(write_spec(CHAIN)), "--store", str(tmp_path / "afile")])
    assert "is a file, not a folder" in err
    err = _one_line_error(capsys, ["runs", "--store", str(tmp_path / "afile")])
    assert "is a file, not a folder" in err


def test_a_new_store_under_a_folder_that_cannot_be_written(tmp_path, capsys, write_spec):
    if os.geteuid() == 0:  # root writes anywhere: take a folder the kernel refuses (sysfs)
        where = Path("/sys/tda-store")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        where = locked / "store"
    err = _one_line_error(capsys, ["run", str(write_spec(CHAIN)), "--store", str(where)])
    assert f"store {where}: cannot write runs/" in err and "choose a folder you can write" in err


def test_a_truncated_run_record_is_named_and_skipped(tmp_path, capsys):
    store = Store(tmp_path)
    _commit(store, "k1")
    from pipelines.status import RunStatus, StepRecord, StepStatus
    from pipelines.store import RunRecord

    good = RunRecord("20260101-000000-aaaaaa", "s", "p", str(tmp_path), {}, status=RunStatus.SUCCEEDED)
    good.steps = {"t": StepRecord("k", "k1", status=StepStatus.DONE)}
    store.write_run(good)
    bad = store.run_path("20260102-000000-bbbbbb")
    bad.write_text(json.dumps({"run_id": "x", "steps": {}})[:20])
    assert main(["runs", "--store", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert good.run_id in captured.out
    assert f"skipped {bad}: unreadable run record" in captured.err
    assert main(["query", "SELECT COUNT(*) AS n FROM t", "--store", str(tmp_path), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "n\n3\n" and f"{bad}: unreadable run record" in captured.err
    err = _one_line_error(capsys, ["show", "20260102", "--store", str(tmp_path)])
    assert "unreadable run record" in err and "delete it, or restore it" in err


def test_a_malformed_yaml_value_in_set_is_one_line(tmp_path, capsys, write_spec):
    err = _one_line_error(capsys, ["validate", str(write_spec(CHAIN)), "--set", "steps.plus.amount=[1, 2"])
    assert "the value is not valid YAML" in err
