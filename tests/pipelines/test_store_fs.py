"""The store on a filesystem URI: real runs on embedded Ray into file:// and into S3 (a moto server).

Steps run in Ray workers, which take their environment from the embedded Ray's start (tests/conftest.py
`ray_session`); pytest imports every test module before the first test starts it, so the credentials
and the cache folder are set here at import, and `s3_uri` checks that the workers see them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pytest

import pipelines
from pipelines import SpecError, StoreError, load_spec
from pipelines.cli import main
from pipelines.params import is_uri
from pipelines.runner import resolve_store
from pipelines.store import RunRecord, Store
from pipelines.store_fs import FsStore

os.environ.update(
    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
)
_OURS = os.path.join(tempfile.gettempdir(), "tda-test-cache-")
if not os.environ.get("TDA_CACHE", "").startswith(_OURS):  # a Ray worker importing this keeps its own
    os.environ["TDA_CACHE"] = tempfile.mkdtemp(prefix=os.path.basename(_OURS))
CACHE = os.environ["TDA_CACHE"]

SPEC = """
version: 1
name: fsstore
steps:
  base:
    kind: numbers
    n: 5
  plus:
    kind: add
    data: base
    amount: 2
    export: out/plus.csv
  sq:
    kind: fanout
    n: 3
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    """A moto S3 server on a free local port, with a bucket `tda`; yields HOST:PORT."""
    server = Path(sys.executable).with_name("moto_server")
    if not server.exists():
        pytest.skip("moto is not installed (pip install -e '.[dev]')")
    port = _free_port()
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        endpoint = f"127.0.0.1:{port}"
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(
            "tda"
        )
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module", autouse=True)
def _remove_cache():
    yield
    shutil.rmtree(CACHE, ignore_errors=True)


def _worker_env(name: str) -> str | None:
    return os.environ.get(name)


@pytest.fixture(scope="module")
def s3_uri(moto_endpoint, ray_session) -> str:
    remote = ray_session.remote(_worker_env)
    seen = ray_session.get([remote.remote("AWS_ACCESS_KEY_ID"), remote.remote("TDA_CACHE")])
    assert seen == ["testing", CACHE], "Ray workers do not see the driver's environment"
    return f"s3://tda/study?endpoint_override={moto_endpoint}&scheme=http"


@pytest.fixture(params=["file", "s3"])
def store_uri(request, tmp_path) -> str:
    """A fresh store URI of each kind (a new prefix per test)."""
    if request.param == "file":
        return (tmp_path / "remote").as_uri()
    base = request.getfixturevalue("s3_uri")
    return base.replace("s3://tda/study", f"s3://tda/{tmp_path.name}")


def remote_files(store: FsStore, *parts: str) -> list[str]:
    """Every file under `<store>/<parts>`, relative to the store."""
    selector = pafs.FileSelector(store._path(*parts), recursive=True, allow_not_found=True)
    infos = store.fs.get_file_info(selector)
    return sorted(i.path[len(store.base) + 1 :] for i in infos if i.type == pafs.FileType.File)


def statuses(run) -> dict[str, str]:
    return {name: info["status"] for name, info in run.steps.items()}


class TestRuns:
    def test_run_cache_query_layout_and_forced_rerun(
        self, ray_session, store_uri, tracking_uri, write_spec, tmp_path
    ):
        path = write_spec(SPEC)

        def run(**options):
            return pipelines.run(
                load_spec(path), store=store_uri, tracking_uri=tracking_uri, progress=False, **options
            )

        first = run()
        assert statuses(first) == {"base": "done", "plus": "done", "sq": "done"}
        assert first.record.store == store_uri and isinstance(first.store, FsStore)
        assert first.table("plus").collect()["x"].to_list() == [2, 3, 4, 5, 6]

        store = FsStore(store_uri, cache=tmp_path / "other-node")  # a node that has seen nothing yet
        key = first.steps["plus"]["key"]
        files = remote_files(store)
        assert f"objects/{key}/manifest.json" in files and f"objects/{key}/data/part-00000.parquet" in files
        assert f"runs/{first.run_id}.json" in files and "exports/out/plus.csv" in files
        assert {f.split("/")[0] for f in files} == {"objects", "runs", "exports"}  # staging stays local
        assert list(store.manifest(key)["files"]) == ["data/part-00000.parquet"]
        assert "artifacts/note.txt" in store.manifest(first.steps["sq"]["key"])["files"]
        csv = store.fs.open_input_stream(store._path("exports", "out", "plus.csv")).read()
        assert csv.decode().split() == ["x", "2", "3", "4", "5", "6"]

        again = run()
        assert statuses(again) == {"base": "cached", "plus": "cached", "sq": "cached"}
        read = pipelines.open_run(store)
        assert read.run_id == again.run_id and read.table_names() == ["base", "plus", "sq"]
        assert read.sql("SELECT sum(x) AS s FROM plus")["s"].to_list() == [20]
        assert (tmp_path / "other-node" / "objects" / key / "data" / "part-00000.parquet").is_file()
        before = store.get(key).manifest

        forced = run(force=("plus",))
        assert statuses(forced) == {"base": "cached", "plus": "done", "sq": "cached"}
        assert forced.steps["plus"]["key"] == key
        after = store.get(key).manifest  # the cached copy is stale: fetched again
        assert after == store.manifest(key) and after["timings"] != before["timings"]
        assert remote_files(store, "objects", key) == [
            f"objects/{key}/data/part-00000.parquet",
            f"objects/{key}/manifest.json",
        ]

    def test_cli_reads_the_store_by_uri(self, ray_session, store_uri, tracking_uri, write_spec, capsys):
        path = write_spec(SPEC)
        args = ["--store", store_uri, "--tracking-uri", tracking_uri, "-q"]
        assert main(["run", str(path), *args]) == 0
        capsys.readouterr()
        assert main(["run", str(path), *args]) == 0  # fully cached: prints where things are
        printed = capsys.readouterr().out
        head = store_uri.partition("?")[0]
        assert f"run:      {head}/runs/" in printed and f"Parquet under {head}/objects" in printed
        sql = "SELECT x FROM plus ORDER BY x"
        assert main(["query", sql, "--store", store_uri, "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out) == [{"x": x} for x in range(2, 7)]
        assert main(["runs", "--store", store_uri]) == 0
        assert capsys.readouterr().out.count("fsstore") == 2


class TestCommit:
    def test_manifest_goes_last_and_lists_the_files(self, store_uri, tmp_path, monkeypatch):
        store = FsStore(store_uri, cache=tmp_path / "cache")

        def stage(*names: str) -> Path:
            staging = store.staging_dir("k1")
            (staging / "data").mkdir()
            for name in names:
                pl.DataFrame({"v": [1]}).write_parquet(staging / "data" / name)
            return staging

        def interrupted(self, key, data):
            raise ConnectionError("connection lost before the manifest")

        with monkeypatch.context() as patch:
            patch.setattr(FsStore, "_put_manifest", interrupted)
            staging = stage("a.parquet", "stray.parquet")
            with pytest.raises(ConnectionError):
                store.commit("k1", staging, {"name": "s"})
            store.discard(staging)  # as execute_step does
        assert "objects/k1/data/stray.parquet" in remote_files(store)  # the data went up …
        assert not store.has("k1") and store.manifest("k1") is None  # … but there is no object
        with pytest.raises(StoreError, match="no object k1"):
            store.get("k1")

        store.commit("k1", stage("a.parquet"), {"name": "s"})  # the retry
        fresh = FsStore(store_uri, cache=tmp_path / "fresh")
        assert fresh.has("k1") and fresh.get("k1").table().collect().height == 1  # the stray is not read
        assert [p for p in (store.root / "tmp").rglob("*") if not p.is_dir()] == []

    def test_a_folder_store_copied_up_is_read_by_its_file_list(self, store_uri, tmp_path):
        """E.g. `aws s3 sync tda-store s3://bucket/prefix`: both layouts write the same manifest."""
        local = Store(tmp_path / "local")
        staging = local.staging_dir("k2")
        (staging / "data").mkdir()
        pl.DataFrame({"v": [7]}).write_parquet(staging / "data" / "part-00000.parquet")
        local.commit("k2", staging, {"name": "s"})
        store = FsStore(store_uri, cache=tmp_path / "cache")
        store.upload(local.object_dir("k2"), "objects", "k2")
        assert list(store.manifest("k2")["files"]) == ["data/part-00000.parquet"]
        assert store.get("k2").table().collect()["v"].to_list() == [7]
        # a manifest without checksums (an older version's) is not an object: its step is recomputed
        legacy = {k: v for k, v in store.manifest("k2").items() if k != "files"}
        store._put_manifest("k2", json.dumps(legacy).encode())
        assert not store.has("k2")


class TestErrors:
    def test_a_uri_store_needs_a_tracking_server(self, write_spec, tmp_path, capsys):
        uri = (tmp_path / "remote").as_uri()
        path = write_spec(SPEC.replace("steps:", f"run:\n  store: {uri}\nsteps:", 1))
        with pytest.raises(
            SpecError, match=r"run\.tracking_uri: .*set run\.tracking_uri to an MLflow server"
        ):
            pipelines.run(load_spec(path), progress=False)
        assert main(["run", str(path), "-q"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1

    def test_unknown_scheme_and_missing_bucket_are_one_line(self, moto_endpoint, capsys):
        with pytest.raises(StoreError, match=r"store nope://x/y: .*give a folder or a URI"):
            Store.open("nope://x/y")
        assert main(["runs", "--store", "nope://x/y"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        uri = f"s3://no-such-bucket/p?endpoint_override={moto_endpoint}&scheme=http"
        record = RunRecord(run_id="20260101-000000-aaaaaa", spec_name="s", spec_path="p", store=uri, spec={})
        with pytest.raises(
            StoreError, match=r"store s3://no-such-bucket/p\?.*cannot write run .*bucket exists"
        ):
            Store.open(uri).write_run(record)


def test_plain_paths_stay_local_stores(write_spec, tmp_path):
    assert (
        is_uri("s3://b/p") and is_uri("file:///tmp/x") and not is_uri("./tda-store") and not is_uri("C:\\x")
    )
    spec = load_spec(write_spec(SPEC.replace("steps:", "run:\n  store: rel/store\nsteps:", 1)))
    local = resolve_store(spec, None)
    assert type(local) is Store and local.root == tmp_path / "rel" / "store"
    assert local.locate("runs", "r.json") == str(tmp_path / "rel" / "store" / "runs" / "r.json")
    remote = resolve_store(spec, "file:///tmp/elsewhere")
    assert isinstance(remote, FsStore) and remote.location == "file:///tmp/elsewhere"
    assert remote.locate("runs") == "file:///tmp/elsewhere/runs"
