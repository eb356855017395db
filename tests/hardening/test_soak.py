"""The soak (issue 16, point 4): 1,000 subsets of a small model in one run, the driver's memory bounded,
and the run record, the objects and MLflow consistent at the end.

The fault tests' study (`tests/hardening/faults.py`: synthetic corpus → split → tokenizer → a
one-layer GPT-2 of width 32 → subsets → `subset_effects`, two subsets per Ray task), with
`n_subsets: 1000` given by `--set`, fine-tuned and measured in one `tda run` (a subprocess: its own
embedded Ray, a fresh store, its default SQLite tracking). The same study with 100 subsets runs
first, for the memory comparison. Each fine-tune is kept cheap (32 rows: two AdamW steps of 16; 20
targets) so the 1,000 take 80–140 s of two cores; the number of subsets is not cut.

Memory. The driver (the `tda` process) is sampled every 0.2 s (VmRSS, and VmHWM, its high-water mark,
at the last sample before exit); the process running the `effects` step (titled `ray::step:effects`:
it submits the 500 fine-tune tasks, writes each finished batch and reads them all back) is sampled the
same way. Measured on 2 shared cores (benchmarks/results/soak.json), six runs: the driver peaks at
324–327 MB for 100 and for 1,000 subsets alike (spread ~2 MB), the effects step's process at 565–597 MB
for both. The driver schedules one Ray task per step and takes in progress at most once a second,
so nothing it holds should scale with the subsets. The effects step's process, sampled over a
1,000-subset run, holds 555 MB through the fine-tunes (+2.5 MB over 500 tasks) and rises by ~30 MB
only at the end, when it reads the batches back and computes the same-group signal. Bounds:

- the driver's peak at 1,000 subsets exceeds its peak at 100 by less than 40 MB: ~20× the noise,
  and it catches anything the driver keeps per subset from ~45 KB up (which would be 4.5 GB at 100,000
  subsets); a smaller per-subset leak is below what RSS can tell apart at this size;
- the driver's peak stays under 600 MB (~1.8× measured): the whole driver of a 1,000-subset run is a
  small process;
- the effects step's process at 1,000 exceeds its 100-subset peak by less than 150 MB (a reused Ray
  worker carries what its earlier tasks allocated, so this one is noisier) and stays under 1,024 MB.

Consistency at the end: the run record says succeeded, every step done with a key; each object it
names passes `Store.verify(hashes=True)` and its manifest agrees with the record; the effects table
has exactly 1,000 subsets × 20 targets, no null or NaN; no staging or scratch is left; MLflow has the
parent run FINISHED with the record's run id and one FINISHED nested run per step (and no other runs),
each with the record's key, kind, rows, seconds and the manifest's metrics; the SQLite file passes
`PRAGMA integrity_check`.

Marked `hardening`: `make test-hardening`. 2.5–4 minutes on 2 cores, depending on what else runs (the
100-subset run takes 40–65 s, the 1,000-subset run 100–180 s, of which the fine-tunes 80–140 s).
"""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from pipelines.status import RunStatus, StepStatus
from pipelines.store import Store
from pipelines.tracking import sqlite_path
from tests.hardening.faults import ROOT, descendants, keys_of, spec_text, table, tda, title

pytestmark = pytest.mark.hardening

SUBSETS, BASELINE_SUBSETS = 1000, 100
TARGETS, SUBSET_SIZE, SUBSETS_PER_TASK = 20, 32, 2  # SUBSETS_PER_TASK: the study's own (faults.STAGES)
STEP_TITLE = "ray::step:effects"
DRIVER_GROWTH_MB, DRIVER_CAP_MB = 40.0, 600.0
STEP_GROWTH_MB, STEP_CAP_MB = 150.0, 1024.0
RESULTS = ROOT / "benchmarks" / "results" / "soak.json"


@dataclass
class Soak:
    """One `tda run` of the study: its store, wall time and the sampled memory (MB)."""

    n_subsets: int
    store: Path
    wall_seconds: float = 0.0
    driver_rss_mb: float = 0.0  # the largest VmRSS sampled
    driver_hwm_mb: float = 0.0  # VmHWM at the last sample before the driver exited
    step_rss_mb: float = 0.0  # the largest VmRSS of the process running the effects step
    samples: int = 0

    @property
    def driver_peak_mb(self) -> float:
        return max(self.driver_rss_mb, self.driver_hwm_mb)


def status_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of `pid` in MB ({} once it has gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {
        line.split(":")[0]: int(line.split()[1]) / 1024
        for line in lines
        if line.startswith(("VmRSS", "VmHWM"))
    }


def sample(soak: Soak, driver: int) -> None:
    mem = status_mb(driver)
    if not mem:
        return
    soak.samples += 1
    soak.driver_rss_mb = max(soak.driver_rss_mb, mem.get("VmRSS", 0.0))
    soak.driver_hwm_mb = max(soak.driver_hwm_mb, mem.get("VmHWM", 0.0))
    for pid in descendants(driver):
        if title(pid) == STEP_TITLE:
            soak.step_rss_mb = max(soak.step_rss_mb, status_mb(pid).get("VmRSS", 0.0))


def soak_run(root: Path, n_subsets: int, timeout: float = 1200.0) -> Soak:
    """`tda run` of the study with `n_subsets`, its memory sampled every 0.2 s until it exits."""
    root.mkdir(parents=True)
    spec = root / "spec.yaml"
    spec.write_text(spec_text(["effects"], root))  # the effects stage has no {airrep} to fill
    overrides = [
        "name=soak",
        f"steps.subsets.n_subsets={n_subsets}",
        f"steps.subsets.subset_size={SUBSET_SIZE}",
        f"steps.data.n_targets={TARGETS}",
        f"steps.effects.subsets_per_task={SUBSETS_PER_TASK}",
    ]
    soak = Soak(n_subsets, root / "store")
    args = ["run", str(spec), "-q", "--num-cpus", "2", "--store", str(soak.store)]
    t0 = time.perf_counter()
    driver = tda(*args, *(arg for o in overrides for arg in ("--set", o)))
    while True:
        try:
            out, err = driver.communicate(timeout=0.2)  # reads the pipes while it waits
            break
        except subprocess.TimeoutExpired:
            sample(soak, driver.pid)
            if time.perf_counter() - t0 > timeout:
                driver.kill()
                raise
    soak.wall_seconds = time.perf_counter() - t0
    assert driver.returncode == 0, out + err
    return soak


def fine_tune_tasks(n_subsets: int) -> int:
    return math.ceil(n_subsets / SUBSETS_PER_TASK)


def summary(soak: Soak) -> dict[str, float | int]:
    record = Store(soak.store).read_run()
    effects_seconds = record.steps["effects"].seconds or float("nan")
    return {
        "subsets": soak.n_subsets,
        "wall_seconds": round(soak.wall_seconds, 1),
        "effects_seconds": round(effects_seconds, 1),
        "subsets_per_second": round(soak.n_subsets / effects_seconds, 2),
        "ray_tasks": len(record.steps) + fine_tune_tasks(soak.n_subsets),  # a task per step + fine-tunes
        "fine_tune_tasks": fine_tune_tasks(soak.n_subsets),
        "driver_peak_rss_mb": round(soak.driver_peak_mb, 1),
        "effects_step_peak_rss_mb": round(soak.step_rss_mb, 1),
        "memory_samples": soak.samples,
    }


@pytest.fixture(scope="module")
def soaks(tmp_path_factory) -> dict[int, Soak]:
    """The 100-subset run, then the 1,000-subset run (one after the other: they share two cores);
    their numbers written to benchmarks/results/soak.json and printed."""
    root = tmp_path_factory.mktemp("soak")
    runs = {n: soak_run(root / f"n{n}", n) for n in (BASELINE_SUBSETS, SUBSETS)}
    results = {
        "study": {"targets": TARGETS, "subset_size": SUBSET_SIZE, "subsets_per_task": SUBSETS_PER_TASK},
        "runs": {str(n): summary(s) for n, s in runs.items()},
        "bounds_mb": {
            "driver_growth": DRIVER_GROWTH_MB,
            "driver_cap": DRIVER_CAP_MB,
            "effects_step_growth": STEP_GROWTH_MB,
            "effects_step_cap": STEP_CAP_MB,
        },
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return runs


def test_the_driver_does_not_grow_with_the_subsets(soaks):
    small, big = soaks[BASELINE_SUBSETS], soaks[SUBSETS]
    assert small.samples > 10 and big.samples > 10, "the driver's memory was hardly sampled"
    assert big.driver_peak_mb - small.driver_peak_mb < DRIVER_GROWTH_MB, (
        f"the driver's peak RSS grew from {small.driver_peak_mb:.0f} MB ({BASELINE_SUBSETS} subsets) "
        f"to {big.driver_peak_mb:.0f} MB ({SUBSETS})"
    )
    assert big.driver_peak_mb < DRIVER_CAP_MB


def test_the_effects_step_does_not_grow_with_the_subsets(soaks):
    small, big = soaks[BASELINE_SUBSETS], soaks[SUBSETS]
    assert small.step_rss_mb > 0 and big.step_rss_mb > 0, f"no process titled {STEP_TITLE} was seen"
    assert big.step_rss_mb - small.step_rss_mb < STEP_GROWTH_MB, (
        f"the effects step's RSS grew from {small.step_rss_mb:.0f} MB ({BASELINE_SUBSETS} subsets) "
        f"to {big.step_rss_mb:.0f} MB ({SUBSETS})"
    )
    assert big.step_rss_mb < STEP_CAP_MB


def test_the_run_record_and_every_object_it_names_agree(soaks):
    store = Store(soaks[SUBSETS].store)
    record = store.read_run()
    assert record.status == RunStatus.SUCCEEDED
    assert list(record.steps) == list(record.spec["steps"]) and "effects" in record.steps
    for name, info in record.steps.items():
        assert info.status == StepStatus.DONE and info.key and info.error is None, (name, info)
        manifest = store.verify(info.key, hashes=True, memo=False)  # every file's size and sha256
        assert (manifest["name"], manifest["kind"], manifest["key"]) == (name, info.kind, info.key)
        assert manifest["rows"] == info.rows
    assert "errors" not in record.mlflow
    assert not any((store.root / "tmp").glob("*/*")), "staging left behind"
    assert not (store.root / "scratch" / record.steps["effects"].key).exists(), "scratch left behind"


def test_the_effects_table_has_every_subset_and_target_once(soaks):
    store = soaks[SUBSETS].store
    keys = keys_of(store)
    effects = table(store, keys["effects"])
    assert effects.height == SUBSETS * TARGETS
    assert effects.null_count().sum_horizontal().item() == 0
    assert effects["loss"].is_finite().all()
    assert effects["subset_id"].n_unique() == SUBSETS and effects["target_id"].n_unique() == TARGETS
    assert effects.select("subset_id", "target_id").is_unique().all()
    subsets = table(store, keys["subsets"])["subset_id"].unique().sort()
    assert effects["subset_id"].unique().sort().equals(subsets.cast(pl.Int32))
    targets = table(store, keys["data"]).filter(pl.col("split") == "target")["example_id"].sort()
    assert effects["target_id"].unique().sort().equals(targets)
    manifest = Store(store).manifest(keys["effects"]) or {}
    assert manifest["metrics"]["subsets_trained"] == SUBSETS and manifest["metrics"]["subsets_resumed"] == 0


def test_mlflow_agrees_with_the_run_record(soaks):
    from mlflow.tracking import MlflowClient

    store = Store(soaks[SUBSETS].store)
    record = store.read_run()
    uri = record.mlflow["tracking_uri"]
    db = sqlite_path(uri)
    assert db is not None and db.resolve().parent == store.root.resolve()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(record.mlflow["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.experiment_id == record.mlflow["experiment_id"]
    assert {k: parent.data.tags[k] for k in ("run_id", "spec", "store")} == {
        "run_id": record.run_id,
        "spec": record.spec_name,
        "store": record.store,
    }
    assert parent.data.metrics["steps_executed"] == len(record.steps)
    assert parent.data.metrics["steps_cached"] == 0
    runs = client.search_runs([parent.info.experiment_id], max_results=1000)
    children = {r.info.run_name: r for r in runs if r.info.run_id != parent.info.run_id}
    assert len(runs) == len(record.steps) + 1, "MLflow holds runs the record does not name"
    assert sorted(children) == sorted(record.steps)
    for name, info in record.steps.items():
        run = children[name]
        assert run.info.status == "FINISHED", name
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tags["run_id"], tags["step"], tags["kind"]) == (record.run_id, name, info.kind)
        assert (tags["cache_key"], tags["cached"]) == (info.key, "false")
        metrics = run.data.metrics
        assert metrics["wall_seconds"] == pytest.approx(info.seconds)
        if info.rows is not None:
            assert metrics["rows"] == info.rows
        manifest = store.manifest(info.key) or {}
        assert {k: metrics.get(k) for k in manifest["metrics"]} == pytest.approx(
            manifest["metrics"], nan_ok=True
        )
