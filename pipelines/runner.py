"""Runs a validated spec: plan cache keys, execute what is missing as Ray tasks, record and track.

The only module of `pipelines` that imports ray. Independent steps run concurrently; each step is
one Ray task with the step's `resources` and `retries`, and may fan out further through its context.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import local_ray, registry
from pipelines.context import Executor, Reporter, StepJob, StepOutcome, execute_step
from pipelines.dag import Dag, build_dag, find_refs
from pipelines.errors import (
    DiskFull,
    PipelineError,
    RayUnavailable,
    RunFailed,
    SpecError,
    StoreError,
    disk_full,
    disk_full_line,
    disk_full_message,
)
from pipelines.exports import export_to_store
from pipelines.fingerprint import input_fingerprint
from pipelines.gc import run_lock
from pipelines.housekeeping import (
    HEARTBEAT_S,
    clean_store,
    driver_info,
    ray_temp_dir,
    remove_ray_temp_dir,
    sweep_ray_temp_dirs,
)
from pipelines.params import StepParams, is_uri
from pipelines.progress import Progress
from pipelines.query import Run
from pipelines.spec import SpecBase
from pipelines.status import RunStatus, StepRecord, StepStatus
from pipelines.store import RunRecord, Store, cache_key, new_run_id, now_iso
from pipelines.tracking import Tracker, TrackingJournal, default_tracking_uri, replay, sqlite_path

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- Ray


def _apply(fn: Any, item: Any) -> Any:
    return fn(item)


class RayExecutor(Executor):
    """Fan-out inside a step: one Ray task per item. `fn` (any callable, e.g. a functools.partial
    carrying the step's data) is put in the object store once and shared by all its tasks."""

    @staticmethod
    def _task(fn: Any, options: dict[str, Any]) -> Any:
        """A function that submits one item as a Ray task of `fn` (named after it; `fn` put once)."""
        import ray

        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "task")
        remote = ray.remote(_apply).options(name=name, **options)
        shared = ray.put(fn)
        return lambda item: remote.remote(shared, item)

    def _submit(self, fn: Any, items: Any, options: dict[str, Any]) -> list[Any]:
        submit = self._task(fn, options)
        return [submit(item) for item in items]

    def map(self, fn: Any, items: Any, **options: Any) -> list[Any]:
        import ray

        return ray.get(self._submit(fn, items, options))

    def imap_unordered(self, fn: Any, items: Any, **options: Any) -> Any:
        """Results as tasks finish, with at most twice as many tasks in flight as the cluster can run at
        once (by CPUs, or GPUs when the tasks reserve some): the items not yet submitted and the
        results not yet consumed stay out of the object store, so its use is bounded by that window,
        not by the number of items."""
        import ray

        submit, following = self._task(fn, options), iter(items)
        pending = [submit(item) for item in itertools.islice(following, _window(options))]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            pending.extend(submit(item) for item in itertools.islice(following, 1))
            yield ray.get(done[0])

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def _window(options: dict[str, Any]) -> int:
    """Tasks kept in flight by `imap_unordered`: twice the tasks the cluster fits at once, at least 2."""
    import ray

    total = ray.cluster_resources()
    gpus = float(options.get("num_gpus") or 0)
    fits = (
        total.get("GPU", 0) / gpus
        if gpus
        else total.get("CPU", 1) / max(float(options.get("num_cpus", 1)), 1e-3)
    )
    return max(2, 2 * int(fits))


def _execute_on_ray(job: StepJob) -> StepOutcome:
    return execute_step(job, RayExecutor())


def ensure_ray(address: str | None, num_cpus: int | None, dashboard: bool = True) -> str:
    """Connect to `address`; without one, attach to the warm local Ray of `tda ray up` if there is one,
    else start an embedded Ray (see `_start_embedded_ray`), with its dashboard only if `dashboard`.
    Returns what it did, in words (for the run's output and record)."""
    import ray

    if ray.is_initialized():
        return "Ray already connected in this process"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address in (None, "", "local"):
        warm = _attach_warm_ray()
        if warm is not None:
            return f"attached to the warm Ray at {warm.address} ({warm.num_cpus} CPUs, `tda ray up`)"
        _start_embedded_ray(num_cpus, dashboard)
        return "started an embedded Ray" + (" with its dashboard" if dashboard else "")
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as exc:
        raise RayUnavailable(
            f"cannot connect to Ray at {address}: {str(exc).splitlines()[0]}; check the address "
            "(`ray status` on the head node) or leave --ray-address out for an embedded Ray"
        ) from None
    return f"connected to Ray at {address}"


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Let ray.init keep 127.0.0.1 as this node's IP: Ray binds its GCS, raylet, workers, agents and
    Prometheus metrics servers to 127.0.0.1 only when that is the node IP, but ray.init turns a
    127.0.0.1 node IP into the routable one (services.resolve_ip_for_localhost) unless multi-node
    clusters are off, as on macOS/Windows; off for this call only (read when the node starts)."""
    from ray._private import ray_constants

    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters


def _attach_warm_ray() -> local_ray.WarmRay | None:
    """Attach this driver to the recorded warm Ray; None (with a warning saying why, if one was
    recorded) when there is none or it does not answer."""
    import ray

    warm, gone = local_ray.attachable()
    if warm is None:
        if gone:
            log.warning("%s; starting an embedded Ray (`tda ray up` starts a new warm one)", gone)
        return None
    saved = {name: os.environ.get(name) for name in warm.auth_env()}
    _set_auth_env(warm.auth_env())  # its own token
    try:
        with _loopback_node():
            ray.init(address=warm.address, _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as exc:
        _set_auth_env(saved)
        log.warning(
            "the warm Ray at %s (pid %d) does not answer (%s); starting an embedded Ray",
            warm.address,
            warm.pid,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return None
    return warm


def _set_auth_env(values: Mapping[str, str | None]) -> None:
    """Set (None: unset) Ray's auth variables, and have Ray read them again: it reads its config once,
    when imported, as its own `ray get-auth-token` path does (`_enable_token_auth`)."""
    from ray._raylet import Config  # type: ignore[attr-defined]  # compiled; not in Ray's _raylet.pyi

    for name, value in values.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    Config.initialize("")


def _start_embedded_ray(num_cpus: int | None, dashboard: bool = True) -> str:
    """A Ray of this process: loopback only, its own temp dir (removed at exit, or by a later run if
    this driver is killed), the dashboard on 127.0.0.1 if `dashboard` (Ray Train queries its state
    API; it adds about 4 s to the start). Returns the temp dir."""
    import ray

    # token auth stays on (Ray's default); only its "enabled by default" notice is hushed
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # steps share the embedded cluster: a Ray Train step may wait for CPUs that other steps hold,
    # so its worker group must not give up after Ray Train's default 60 s (the raylet and every
    # worker inherit this process's environment)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "86400")
    temp_dir = ray_temp_dir()
    atexit.register(_stop_embedded_ray, temp_dir)
    # nothing of an embedded run listens beyond loopback (see _loopback_node)
    with _loopback_node():
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=dashboard,  # Ray Train's placement-group cleaner queries the state API
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
            logging_level=logging.WARNING,
        )
    return temp_dir


def serve_warm_ray(num_cpus: int) -> None:
    """The process `tda ray up` starts (pipelines.local_ray): an embedded Ray with its dashboard,
    recorded for runs to attach to, held until SIGTERM (then shut down, its temp folder removed)."""
    import signal
    import sys

    import ray

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # atexit stops Ray and removes its folder
    temp_dir = _start_embedded_ray(num_cpus, dashboard=True)
    me = driver_info()
    dashboard = ray._private.worker.get_dashboard_url() or ""
    warm = local_ray.WarmRay(
        address=ray.get_runtime_context().gcs_address,
        pid=me["pid"],
        pid_start=me["pid_start"],
        temp_dir=temp_dir,
        token_path=os.environ.get("RAY_AUTH_TOKEN_PATH", ""),
        dashboard=dashboard,
        num_cpus=int(ray.cluster_resources().get("CPU", num_cpus)),
        started=now_iso(),
    )
    local_ray.write_record(warm)
    print(f"warm Ray up at {warm.address} (dashboard {dashboard}), pid {warm.pid}", flush=True)
    while True:
        signal.pause()


def _stop_embedded_ray(temp_dir: str) -> None:
    import ray

    ray.shutdown()
    remove_ray_temp_dir(temp_dir)


def _ray_options(job: StepJob) -> dict[str, Any]:
    res = job.params.resources
    options: dict[str, Any] = {
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
        "name": f"step:{job.name}",
        "max_retries": job.params.retries,
        "retry_exceptions": job.params.retries > 0,
    }
    if res.memory:
        options["memory"] = res.memory
    if res.custom:
        options["resources"] = dict(res.custom)
    return options


def _error_line(exc: BaseException, output: str = "the step's output") -> tuple[str, str]:
    """(one-line error, full text) of a failed task, unwrapping Ray's task error; a full disk is
    one line naming the file (else `output`) and saying to free space."""
    full = disk_full_message(exc, output)
    if full is not None:
        return full, str(exc)
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".splitlines()[0], str(exc)
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[-1]}", text


# ---------------------------------------------------------------- planning


@dataclass
class PlannedStep:
    name: str
    job: StepJob
    cached: bool
    upstream: tuple[str, ...]


def _keyed_params(params: StepParams, keys: dict[str, str]) -> dict[str, Any]:
    """Semantic params with every step reference replaced by that step's cache key."""
    data = params.semantic_params()
    for loc, ref in find_refs(params):
        node: Any = data  # the dicts and lists down the reference's field path
        for part in loc[:-1]:
            node = node[part]
        if isinstance(node, dict) and loc[-1] not in node:
            continue  # in a field left out of the semantic params
        node[loc[-1]] = f"key:{keys[ref]}"
    return data


def plan(
    spec: SpecBase, store: Store, force: tuple[str, ...] = (), verify: bool = False
) -> tuple[Dag, dict[str, PlannedStep]]:
    """Cache keys of every step (upstream keys first), and which are already in the store (their files
    checked by size, or by sha256 with `verify`)."""
    dag = build_dag(spec)
    unknown = [f for f in force if f not in spec.steps]
    if unknown:
        raise SpecError(
            f"{spec.source.path}: --force: no step {unknown[0]!r}; steps: {', '.join(spec.steps)}"
        )
    forced = dag.descendants(set(force))
    keys: dict[str, str] = {}
    planned: dict[str, PlannedStep] = {}
    for name in dag.order:
        params = spec.steps[name]
        kind = registry.get(params.kind)
        fingerprint = input_fingerprint(params, spec.source, ("steps", name))
        if kind.fingerprint is not None:
            fingerprint = f"{fingerprint}|{kind.fingerprint(params)}"
        keys[name] = cache_key(kind.name, kind.version, _keyed_params(params, keys), fingerprint or None)
        job = StepJob(
            name,
            kind.name,
            keys[name],
            kind.version,
            kind.fn,
            params,
            {up: keys[up] for up in dag.upstream[name]},
            store.location,
            replace=name in forced,
        )
        cached = name not in forced and store.check(keys[name], hashes=verify)  # damaged: recomputed
        planned[name] = PlannedStep(name, job, cached, dag.upstream[name])
    return dag, {name: planned[name] for name in dag.steps}


# ---------------------------------------------------------------- running


@dataclass
class RunOptions:
    store: str | None = None
    ray_address: str | None = None
    tracking_uri: str | None = None
    num_cpus: int | None = None
    force: tuple[str, ...] = ()
    verify: bool = False  # hash the files of cached steps before trusting them
    progress: bool = True
    raise_on_failure: bool = True
    run_id: str | None = None  # chosen by the caller (`tda submit` names the job after it)
    # a run whose every step is cached, tracked in SQLite: its MLflow run is recorded by a detached
    # process after this returns (`tda run` sets it; see docs/startup.md)
    defer_tracking: bool = False


@dataclass
class _State:
    record: RunRecord
    store: Store
    tracker: Tracker | TrackingJournal
    progress: Progress
    planned: dict[str, PlannedStep]
    t_start: dict[str, float] = field(default_factory=dict)


def resolve_store(spec: SpecBase, override: str | None) -> Store:
    """The override, else run.store: a URI as is, a relative folder against the spec's folder."""
    if override:
        return Store.open(override)
    if is_uri(spec.run.store):
        return Store.open(spec.run.store)
    root = Path(spec.run.store).expanduser()
    return Store.open(root if root.is_absolute() else spec.source.folder / root)


def resolve_tracking_uri(spec: SpecBase, override: str | None, store: Store) -> str:
    """The override, else run.tracking_uri, else SQLite inside a store folder (a URI store has none)."""
    uri = override or spec.run.tracking_uri
    if uri:
        return uri
    if store.is_local:
        return default_tracking_uri(store.root)
    raise SpecError(
        spec.source.error(
            ("run", "tracking_uri"),
            f"the store {store.location} is a URI, which cannot hold the default SQLite tracking "
            "database; set run.tracking_uri to an MLflow server (http://…) when run.store is a URI "
            "(or pass --tracking-uri)",
        )
    )


def _artifact_root(tracking_uri: str, store: Store) -> Path | None:
    """Where SQLite tracking keeps MLflow artifacts: the store's mlartifacts/, or beside the database
    when the store is a URI (MLflow would otherwise pick ./mlruns); a server keeps its own."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    if store.is_local:
        return store.root / "mlartifacts"
    return Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"


def run(spec: SpecBase, **options: Any) -> Run:
    """Run a spec; returns the Run (its tables, statuses). See RunOptions for the options.

    The run holds the store's gc lock (shared) from before it plans until its record is final, so
    `tda gc` deletes nothing while it runs (pipelines/gc.py)."""
    opts = RunOptions(**options)
    store = resolve_store(spec, opts.store)
    tracking_uri = resolve_tracking_uri(spec, opts.tracking_uri, store)
    store.prepare()  # before MLflow opens a default SQLite database in it
    with run_lock(store):
        return _run_locked(spec, opts, store, tracking_uri)


def _run_locked(spec: SpecBase, opts: RunOptions, store: Store, tracking_uri: str) -> Run:
    records = clean_store(store)
    sweep_ray_temp_dirs()
    if store.is_local:  # a store folder (the recorder's lock is a file of it)
        resume_deferred_tracking(store, records)
    dag, planned = plan(spec, store, tuple(opts.force), opts.verify)
    record = RunRecord(
        run_id=opts.run_id or new_run_id(),
        spec_name=spec.name,
        spec_path=spec.source.path,
        store=store.location,
        spec=spec.model_dump(mode="json"),
        overrides=list(spec.source.overrides),
        driver=driver_info(),
        heartbeat=now_iso(),
    )
    for name, step in planned.items():
        record.steps[name] = StepRecord(step.job.kind, step.job.key, cached=step.cached)
    for step in planned.values():
        step.job = dataclasses.replace(step.job, tracking_uri=tracking_uri, run_id=record.run_id)
    todo = any(not s.cached for s in planned.values())
    deferred = opts.defer_tracking and not todo and sqlite_path(tracking_uri) is not None
    tracker: Tracker | TrackingJournal = (
        TrackingJournal(tracking_uri, spec.name)
        if deferred
        else Tracker(tracking_uri, spec.name, _artifact_root(tracking_uri, store))
    )
    tracker.start(
        record.run_id,
        {"spec": spec.name, "run_id": record.run_id, "store": store.location},
        {"seed": spec.seed, "steps": len(planned)},
    )
    record.mlflow = {"tracking_uri": tracking_uri}
    _save_record(store, record)
    state = _State(record, store, tracker, Progress(record.steps, opts.progress), planned)
    t0 = time.perf_counter()
    try:
        with state.progress:
            _run_cached(state)
            if todo:
                address, cpus = opts.ray_address or spec.run.ray_address, opts.num_cpus or spec.run.num_cpus
                state.progress.set_phase(f"connecting to Ray at {address}" if address else "starting Ray")
                t_ray = time.perf_counter()
                record.driver["ray"] = ensure_ray(address, cpus, needs_dashboard(planned))
                record.timings["ray_start"] = time.perf_counter() - t_ray
                state.progress.set_phase(record.driver["ray"])
                check_demands(spec, planned)
            if sqlite_path(tracking_uri) is None:
                tracker.ready()  # a server connected while Ray started; a bad URI stops the run here
            if todo:
                state.progress.set_phase("running")
                record.timings["execute"] = _timed(_schedule, state)
            # a SQLite database (checked with the stdlib when the tracker was made) is opened while
            # the first steps run: importing MLflow takes seconds (docs/startup.md)
            tracker.ready()
    finally:
        _finish(state, time.perf_counter() - t0)
    if isinstance(tracker, TrackingJournal):
        _record_tracking_later(store, record.run_id)
    result = Run(store, record)
    failed = {n: s.error or "" for n, s in record.steps.items() if s.status == StepStatus.FAILED}
    if failed and opts.raise_on_failure:
        raise RunFailed(result, failed)
    return result


def needs_dashboard(planned: dict[str, PlannedStep]) -> bool:
    """Does a step to execute declare that it needs the Ray dashboard (`needs_ray_dashboard`)?"""
    return any(not s.cached and type(s.job.params).needs_ray_dashboard for s in planned.values())


def _record_tracking_later(store: Store, run_id: str) -> None:
    """Start the detached process that records the MLflow run of `run_id` (`record_deferred_tracking`)."""
    import subprocess
    import sys

    code = "import sys; from pipelines.runner import record_deferred_tracking as r; r(*sys.argv[1:])"
    subprocess.Popen(
        [sys.executable, "-c", code, store.location, run_id],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives this process and its terminal's Ctrl-C
    )


def resume_deferred_tracking(store: Store, records: list[RunRecord]) -> list[str]:
    """Start the recording of every finished run of `records` whose MLflow record is still deferred
    (its recording process was killed, or has not finished yet: then the new one finds its lock held
    and leaves); returns their ids."""
    waiting = [r.run_id for r in records if "deferred" in r.mlflow and r.status.is_terminal]
    for run_id in waiting:
        _record_tracking_later(store, run_id)
    return waiting


def record_deferred_tracking(store_location: str, run_id: str) -> None:
    """Record in MLflow the run whose calls a TrackingJournal kept in its run record
    (`mlflow.deferred`), then write the MLflow ids (or the errors) into the record.

    One process at a time per run (an exclusive flock on `runs/.<run_id>.mlflow.lock`, not waited
    for); the record, read under the lock, says whether the work is still to do."""
    import fcntl

    store = Store.open(store_location)
    if not store.is_local:  # a store on a URI: no lock file there, so no retry (run() starts none)
        _replay_deferred(store, run_id)
        return
    lock_path = store.root / "runs" / f".{run_id}.mlflow.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is recording it
            return
        if "deferred" in store.read_run(run_id).mlflow:
            _replay_deferred(store, run_id)
        lock_path.unlink(missing_ok=True)  # a process that opened it before reads the record: done


def _replay_deferred(store: Store, run_id: str) -> None:
    record = store.read_run(run_id)
    entries = record.mlflow.get("deferred") or []
    uri = record.mlflow["tracking_uri"]
    try:
        tracker = Tracker(uri, record.spec_name, _artifact_root(uri, store))
        errors = replay(tracker, entries)
        ids = {"experiment_id": tracker.experiment_id, "run_id": tracker.parent_id}
    except Exception as exc:  # kept in the record: nobody watches this process's output
        errors, ids = [f"{type(exc).__name__}: {exc}"], {}
    record = store.read_run(run_id)
    record.mlflow.pop("deferred", None)
    record.mlflow.update(ids, **({"errors": errors[:20]} if errors else {}))
    store.write_run(record)


def check_demands(spec: SpecBase, planned: dict[str, PlannedStep]) -> None:
    """SpecError (one line per problem, at the spec field) for steps that need more of a resource than
    the connected cluster has in total: such a task would wait forever."""
    import ray

    cluster = ray.cluster_resources()
    problems = []
    for name, step in planned.items():
        if step.cached:
            continue
        for resource, (amount, where) in step.job.params.demands().items():
            have = float(cluster.get(resource, 0.0))
            if amount > have:
                loc = ("steps", name, *where.split("."))
                problems.append(
                    spec.source.error(
                        loc,
                        f"the step needs {amount:g} {resource} but the Ray cluster has {have:g}; "
                        f"lower it or run on a cluster with more {resource}",
                    )
                )
    if problems:
        raise SpecError(problems)


def _timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _run_cached(state: _State) -> None:
    for name, step in state.planned.items():
        if step.cached:
            manifest = state.store.manifest(step.job.key) or {}  # the object itself is not fetched
            info = state.record.steps[name]
            info.move_to(StepStatus.CACHED)
            info.rows, info.node = manifest.get("rows"), manifest.get("node")
            _track(state, name, manifest.get("metrics", {}).items(), 0.0, "FINISHED", cached=True)
            state.progress.changed(name)


POLL_S = 1.0  # how often the driver takes in the steps' progress and live metrics


def _event_channel() -> Any:
    """A Ray queue the running steps send progress and metrics through (an actor that holds no CPU)."""
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


def _take_events(state: _State, channel: Any) -> None:
    """Show the steps' progress; stream their metrics into their MLflow runs."""
    try:
        events = channel.get_nowait_batch(channel.qsize())
    except Exception:  # progress is best effort; the step's outcome carries its metrics anyway
        return
    for event in events:
        name = event.get("step")
        if name not in state.record.steps or state.record.steps[name].status != StepStatus.RUNNING:
            continue
        if event["type"] == "progress":
            state.record.steps[name].progress = (event["done"], event["total"])
            state.progress.advanced(name)
        elif event["type"] == "metrics":
            state.tracker.log_live(
                name,
                tags=_step_tags(state, name, cached=False),
                params=state.planned[name].job.params.model_dump(mode="json"),
                start=state.t_start.get(name, time.time()),
                metrics=[tuple(m) for m in event["values"]],
                stamp=event["time"],
            )


def _schedule(state: _State) -> None:
    """Submit ready steps, collect finished ones, until nothing can run any more."""
    import ray

    remote = ray.remote(_execute_on_ray)
    steps = state.record.steps
    pending: dict[Any, str] = {}
    channel = _event_channel()
    beat = 0.0
    while True:
        for name, step in state.planned.items():
            info = steps[name]
            if info.status != StepStatus.PENDING:
                continue
            ups = [steps[u].status for u in step.upstream]
            if any(s in (StepStatus.FAILED, StepStatus.SKIPPED) for s in ups):
                info.move_to(StepStatus.SKIPPED)
                info.error = "an upstream step failed"
                state.progress.changed(name)
            elif all(s.has_output for s in ups):
                job = dataclasses.replace(step.job, reporter=Reporter(name, channel))
                ref = remote.options(**_ray_options(step.job)).remote(job)
                pending[ref] = name
                state.t_start[name] = time.time()
                info.move_to(StepStatus.RUNNING)
                info.t_start, info.started = time.perf_counter(), now_iso()
                state.progress.changed(name)
        if not pending:
            break
        if time.monotonic() - beat >= HEARTBEAT_S:
            state.record.heartbeat, beat = now_iso(), time.monotonic()
            with contextlib.suppress(PipelineError):  # a full disk: the steps say so, and _finish
                _save_record(state.store, state.record)
        done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
        _take_events(state, channel)  # before collecting: a step's live metrics precede its outcome
        for ref in done:
            _collect(state, pending.pop(ref), ref)
    with contextlib.suppress(Exception):
        channel.shutdown()


def _collect(state: _State, name: str, ref: Any) -> None:
    import ray

    info = state.record.steps[name]
    info.t_start = info.progress = None
    try:
        outcome: StepOutcome = ray.get(ref)
    except Exception as exc:
        info.move_to(StepStatus.FAILED)
        output = f"the output of step {name!r} in {state.store.location}"
        info.error, info.traceback = _error_line(exc, output)
        info.seconds = time.time() - state.t_start[name]
        _track(state, name, [], info.seconds, "FAILED", cached=False)
    else:
        info.move_to(StepStatus.DONE)
        info.rows, info.seconds, info.node = outcome.rows, outcome.seconds, outcome.node
        _track(
            state,
            name,
            [(k, v) for k, v, _ in outcome.metrics],
            outcome.seconds,
            "FINISHED",
            cached=False,
            history=outcome.metrics,
            artifacts=_local_artifacts(state, outcome),
        )
    state.progress.changed(name)


def _local_artifacts(state: _State, outcome: StepOutcome) -> str | None:
    """The step's artifacts folder on this machine: for a URI store, the worker's is in the cache of its
    own node, so the object is fetched into this one's (a failure costs the MLflow artifacts only)."""
    if not outcome.artifacts or state.store.is_local:
        return outcome.artifacts
    try:
        return str(state.store.get(outcome.key).dir / "artifacts")
    except PipelineError as exc:
        log.warning("MLflow artifacts of step %s not logged: %s", outcome.name, exc)
        return None


def _track(
    state: _State,
    name: str,
    metrics: Any,
    seconds: float,
    status: str,
    *,
    cached: bool,
    history: list[tuple[str, float, int | None]] | None = None,
    artifacts: str | None = None,
) -> None:
    step = state.planned[name]
    info = state.record.steps[name]
    series: list[tuple[str, float, int | None]] = (
        history if history is not None else [(k, float(v), None) for k, v in metrics]
    )
    if info.rows is not None:
        series = [*series, ("rows", float(info.rows), None)]
    series = [*series, ("wall_seconds", float(seconds), None)]
    end = time.time()
    state.tracker.log_step(
        name,
        tags=_step_tags(state, name, cached),
        params=step.job.params.model_dump(mode="json"),
        metrics=series,
        start=state.t_start.get(name, end),
        end=end,
        status=status,
        artifacts=artifacts,
    )


def _step_tags(state: _State, name: str, cached: bool) -> dict[str, str]:
    job = state.planned[name].job
    return {
        "kind": job.kind,
        "cache_key": job.key,
        "run_id": state.record.run_id,
        "cached": str(cached).lower(),
        "step": name,
    }


def _finish(state: _State, seconds: float) -> None:
    record = state.record
    for info in record.steps.values():
        info.t_start = None
        if not info.status.is_terminal:  # pending: never started; running: its outcome never came
            info.move_to(StepStatus.SKIPPED if info.status == StepStatus.PENDING else StepStatus.FAILED)
            info.error = info.error or "the run was interrupted"
    _export(state)
    shutil.rmtree(state.store.root / "tmp" / record.run_id, ignore_errors=True)  # staging of failed tries
    failed = any(i.status in (StepStatus.FAILED, StepStatus.SKIPPED) for i in record.steps.values())
    record.move_to(RunStatus.FAILED if failed else RunStatus.SUCCEEDED)
    record.finished, record.seconds = now_iso(), seconds
    state.tracker.finish(
        "FAILED" if failed else "FINISHED",
        {
            "wall_seconds": seconds,
            "steps_executed": sum(i.status == StepStatus.DONE for i in record.steps.values()),
            "steps_cached": sum(i.status == StepStatus.CACHED for i in record.steps.values()),
        },
    )
    errors = state.tracker.close()
    if isinstance(state.tracker, TrackingJournal):  # recorded by another process (_record_tracking_later)
        record.mlflow["deferred"] = state.tracker.entries
    else:
        record.mlflow.update(experiment_id=state.tracker.experiment_id, run_id=state.tracker.parent_id)
    if errors:
        record.mlflow["errors"] = errors[:20]
    if errors and state.tracker.connect_error is None:  # a connect error is raised by ready(), not warned
        log.warning("MLflow logging failed %d time(s); first: %s", len(errors), errors[0])
    try:
        _save_record(state.store, record)
    except PipelineError as exc:
        if record.status == RunStatus.SUCCEEDED:
            raise
        log.warning("%s", exc)  # and the failed steps (printed next) say why they failed


def _save_record(store: Store, record: RunRecord) -> None:
    """Write the run record; DiskFull or StoreError, one line naming the file, if it cannot be."""
    try:
        store.write_run(record)
    except OSError as exc:
        where = store.locate("runs", f"{record.run_id}.json")
        if disk_full(exc):
            raise DiskFull(f"run {record.run_id}: {disk_full_line(where)}") from None
        raise StoreError(f"{where}: cannot write the run record ({exc.strerror or exc})") from None


def _export(state: _State) -> None:
    for name, step in state.planned.items():
        target = step.job.params.export
        info = state.record.steps[name]
        if target and info.status.has_output:
            try:
                export_to_store(state.store, state.store.get(step.job.key), target)
            except (PipelineError, OSError) as exc:
                info.export_error = f"{type(exc).__name__}: {exc}"
            except Exception:  # an export must not lose the run record
                info.export_error = traceback.format_exc(limit=1)
