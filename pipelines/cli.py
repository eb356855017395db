"""`tda`: run, validate and inspect pipeline specs; query the tables of a run.

    tda run SPEC [--set steps.x.field=value] [--force STEP] [--store DIR] [--ray-address ADDR]
    tda validate SPEC            tda schema [--out FILE]          tda docs OUT_DIR
    tda runs                     tda tables [RUN]                 tda show [RUN]
    tda query "SQL" [--run RUN] [--format table|csv|json] [--out FILE.parquet]
    tda verify [--run RUN]       (sha256 of every stored file against its manifest)
    tda gc [--yes]               (what no run needs: dead staging, unreferenced objects; a dry run first)
    tda ray up|down|status       (a warm local Ray that runs attach to instead of starting one)
    tda submit SPEC --address http://HEAD:8265 [--store DIR|URI] [--wait]   (a Ray cluster's Jobs API)
    tda jobs                     tda status [JOB]                 tda logs [JOB] [-f]     tda stop [JOB]
    tda report [RUN] [--out DIR]  (from the science package, through the entry-point group
                                   "pipelines.commands")

The store of the inspecting commands is `--store`, else the `run.store` of `--spec`, else $TDA_STORE,
else ./tda-store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from pipelines.errors import PipelineError
from pipelines.progress import summary_table
from pipelines.status import RunStatus, StepStatus
from pipelines.store import Store

if TYPE_CHECKING:  # imported where used: `tda --help` stays fast
    from pipelines.gc import Garbage
    from pipelines.query import Run

out = Console(soft_wrap=True)
if not out.is_terminal:  # piped or captured: no wrapping of wide tables at 80 columns
    out = Console(soft_wrap=True, width=max(out.width, 200))


def _store_for(args: argparse.Namespace) -> Store:
    if getattr(args, "store", None):
        return Store.open(args.store)
    if getattr(args, "spec", None):
        from pipelines.runner import resolve_store
        from pipelines.spec import load_spec

        return resolve_store(load_spec(args.spec), None)
    return Store.open(os.environ.get("TDA_STORE", "./tda-store"))


store_for = _store_for  # for command plugins (entry-point group "pipelines.commands")


# ---------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    from pipelines.dag import build_dag
    from pipelines.spec import load_spec

    spec = load_spec(args.spec, args.set)
    dag = build_dag(spec)
    out.print(f"{args.spec}: valid; {len(dag.steps)} steps in order: {' → '.join(dag.order)}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from pipelines.registry import installed_kinds
    from pipelines.spec import json_schema

    text = json.dumps(json_schema(installed_kinds() if args.installed else None), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import pipelines
    from pipelines.errors import RunFailed

    spec = pipelines.load_spec(args.spec, args.set)
    options = {
        "store": args.store,
        "ray_address": args.ray_address,
        "num_cpus": args.num_cpus,
        "tracking_uri": args.tracking_uri,
        "force": tuple(args.force),
        "verify": args.verify,
        "progress": not args.quiet,
        "run_id": args.run_id,
        "defer_tracking": True,  # a fully cached run's MLflow record: by a detached process
    }
    try:
        result = pipelines.run(spec, **options)
    except RunFailed as exc:
        result = exc.run
    _print_run(result)
    return 0 if result.status == RunStatus.SUCCEEDED else 1


def _print_run(result: Run) -> None:
    record = result.record
    out.print(
        summary_table(
            record.steps,
            title=f"run {record.run_id} · {record.spec_name} · {record.status} in {record.seconds:.1f}s",
        )
    )
    for name, info in record.steps.items():
        if info.status == StepStatus.FAILED:
            out.print(f"[bold red]{name} failed:[/] {info.error or ''}", highlight=False)
        if info.export_error:
            out.print(f"[red]{name}: export failed:[/] {info.export_error}", highlight=False)
    for name in record.spec.get("run", {}).get("show", []):
        if name in record.steps and record.steps[name].status.has_output:
            out.print(frame_table(result.table(name).head(100).collect(), title=name))
    store = result.store  # paths for a store folder, URIs for a store on a URI
    tables = result.table_names()
    out.print(f"\nstore:    {store.location}\nrun:      {store.locate('runs', record.run_id + '.json')}")
    out.print(f"tables:   {', '.join(tables) or 'none'}  (Parquet under {store.locate('objects')})")
    if record.driver.get("ray"):
        out.print(f"ray:      {record.driver['ray']}", highlight=False)
    later = (
        " (every step cached: recorded in MLflow by a background process)"
        if "deferred" in record.mlflow
        else ""
    )
    out.print(f"tracking: {record.mlflow.get('tracking_uri')}{later}", highlight=False)
    if tables:
        tda = "tda" if shutil.which("tda") else sys.argv[0]
        import shlex

        where = shlex.quote(store.location)
        out.print(f'query:    {tda} query "SELECT * FROM {tables[-1]} LIMIT 10" --store {where}')
    uri = record.mlflow.get("tracking_uri", "")
    # MLflow 3's UI opens an experiment on its GenAI overview unless told the workflow in the URL
    page = f"#/experiments/{record.mlflow.get('experiment_id', '')}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        out.print(f"MLflow:   {uri.rstrip('/')}/{page}", highlight=False)
    else:
        out.print(f"MLflow:   mlflow ui --backend-store-uri {uri} --host 127.0.0.1", highlight=False)
        out.print(f"          then open http://127.0.0.1:5000/{page}", highlight=False)


def frame_table(frame: Any, title: str | None = None) -> Table:
    """A Polars frame as a rich table (floats to 4 significant digits)."""
    table = Table(*frame.columns, title=title, title_justify="left")
    for row in frame.iter_rows():
        table.add_row(*("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    return table


def cmd_runs(args: argparse.Namespace) -> int:
    store = _store_for(args)
    table = Table("run", "spec", "status", "started", "seconds", "executed", "cached")
    skipped = []
    for run_id in store.run_ids():
        try:
            rec = store.read_record(run_id)
        except PipelineError as exc:  # an unreadable record: named below, the others listed
            skipped.append(str(exc))
            continue
        states = [s.status for s in rec.steps.values()]
        secs = f"{rec.seconds:.1f}" if rec.seconds is not None else ""
        table.add_row(
            rec.run_id,
            rec.spec_name,
            rec.status,
            rec.started,
            secs,
            str(states.count(StepStatus.DONE)),
            str(states.count(StepStatus.CACHED)),
        )
    out.print(table)
    for message in skipped:
        print(f"skipped {message}", file=sys.stderr)
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from pipelines.query import open_run

    run = open_run(_store_for(args), args.run)
    table = Table("table", "kind", "rows", "columns", title=f"run {run.run_id}", title_justify="left")
    for name in run.table_names():  # manifests only: nothing is fetched from a URI store
        manifest = run.store.manifest(run.steps[name].key) or {}
        cols = ", ".join(f"{c['name']}:{c['type']}" for c in manifest.get("schema", []))
        table.add_row(name, manifest["kind"], f"{manifest.get('rows') or 0:,}", cols)
    out.print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from pipelines.query import open_run

    run = open_run(_store_for(args), args.run)
    rec = run.record
    out.print(summary_table(rec.steps, title=f"run {rec.run_id} · {rec.spec_name} · {rec.status}"))
    out.print(f"spec: {rec.spec_path}  overrides: {rec.overrides or 'none'}")
    out.print(f"started {rec.started}, finished {rec.finished}")
    for name, info in rec.steps.items():
        out.print(
            f"  {name}: key {info.key[:16]}…  node {info.node or '-'}"
            + (f"\n    error: {info.error}" if info.error else ""),
            highlight=False,
        )
    uri = args.tracking_uri or rec.mlflow.get("tracking_uri")
    if "deferred" in rec.mlflow:
        out.print(f"MLflow: being recorded in {uri} by a background process", highlight=False)
    if uri and rec.mlflow.get("run_id"):
        from pipelines.tracking import read_step_metrics

        metrics = read_step_metrics(uri, rec.mlflow["run_id"])
        out.print(f"MLflow run {rec.mlflow['run_id']} at {uri}", highlight=False)
        for step, values in metrics.items():
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
            out.print(f"  {step}: {shown}", highlight=False)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from rich.progress import track

    from pipelines.errors import CorruptObject
    from pipelines.query import open_run

    store = _store_for(args)
    if args.run:
        keys = [info.key for info in open_run(store, args.run).steps.values()]
        keys = [k for k in dict.fromkeys(keys) if store.manifest(k) is not None]
    else:
        keys = store.object_keys()
    bad, size = [], 0
    for key in track(keys, description="verifying", console=Console(stderr=True), transient=True):
        if not store.has(key):
            bad.append(f"{key}: not an object (no manifest with checksums); the next run recomputes it")
            continue
        try:
            store.verify(key, hashes=True, memo=False)
        except CorruptObject as exc:
            bad.append(str(exc))
        else:
            size += sum(f["size"] for f in (store.manifest(key) or {})["files"].values())
    out.print(
        f"{len(keys) - len(bad)} of {len(keys)} objects intact ({size / 1e6:,.1f} MB hashed) in {store}"
    )
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


def cmd_gc(args: argparse.Namespace) -> int:
    from rich.progress import track

    from pipelines import gc
    from pipelines.errors import StoreError

    plan = gc.plan(_store_for(args))
    records, kept = _count(plan.runs, "run record"), _count(plan.kept, "object")
    title = f"{plan.store} · {records} · {kept} referenced"
    out.print(_gc_table(plan.items, f"garbage in {title}"))
    if plan.live:
        raise StoreError(gc.live_message(plan.store, plan.live))
    if not args.yes:
        for item in plan.items[:GC_LISTED]:
            where = item.path.relative_to(plan.store.root)
            out.print(
                f"  {item.category:<10} {_bytes(item.size):>9}  {where}  ({item.reason})", highlight=False
            )
        if len(plan.items) > GC_LISTED:
            out.print(f"  … and {len(plan.items) - GC_LISTED} more")
        out.print("nothing deleted: pass --yes to delete" if plan.items else "nothing to delete")
        return 0
    stderr = Console(stderr=True)
    removed = gc.apply(
        plan, lambda items: track(items, description="deleting", console=stderr, transient=True)
    )
    out.print(_gc_table(removed, "deleted"))
    entries = f"{len(removed)} {'entry' if len(removed) == 1 else 'entries'}"
    out.print(f"freed {_bytes(sum(g.size for g in removed))} in {entries} of {plan.store}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


GC_LISTED = 50  # entries a dry run lists one by one


def _gc_table(items: list[Garbage], title: str) -> Table:
    from pipelines.gc import summary

    table = Table("category", "entries", "bytes", title=title, title_justify="left")
    for category, (count, size) in summary(items).items():
        table.add_row(str(category), str(count), _bytes(size))
    return table


def _bytes(size: int) -> str:
    """1,234,567 → "1.2 MB"."""
    value, unit = float(size), "B"
    for bigger in ("kB", "MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{size:,} B" if unit == "B" else f"{value:,.1f} {unit}"


def cmd_query(args: argparse.Namespace) -> int:
    from pipelines.query import open_run

    frame = open_run(_store_for(args), args.run).sql(args.sql)
    if args.out:
        target = Path(args.out)
        target.parent.mkdir(parents=True, exist_ok=True)
        frame.write_csv(target) if target.suffix == ".csv" else frame.write_parquet(target)
        out.print(f"wrote {frame.height:,} rows to {target}")
    elif args.format == "csv":
        sys.stdout.write(frame.write_csv())
    elif args.format == "json":
        sys.stdout.write(json.dumps(frame.to_dicts(), default=str) + "\n")
    else:
        table = Table(*frame.columns)
        for row in frame.iter_rows():
            table.add_row(*("" if v is None else str(v) for v in row))
        out.print(table)
    return 0


# ---------------------------------------------------------------- cluster jobs


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    from pipelines.errors import ClusterError

    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClusterError(f"--env {pair!r}: give KEY=VALUE")
        env[key] = value
    return env


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines import jobs

    sub = jobs.submit(
        args.spec,
        args.address,
        overrides=args.set,
        store=args.store,
        tracking_uri=args.tracking_uri,
        force=args.force,
        env=_env_pairs(args.env),
        token_file=args.token_file,
    )
    for warning in sub.warnings:
        out.print(f"[yellow]warning:[/] {warning}", highlight=False)
    out.print(f"submitted job {sub.job_id} (run {sub.run_id}) from {sub.project}", highlight=False)
    out.print(f"  store {sub.store}   tracking {sub.tracking_uri or 'sqlite in the store'}", highlight=False)
    if not args.wait:
        out.print(f"  follow it: tda logs {sub.job_id} --follow    status: tda status {sub.job_id}")
        return 0
    client = jobs.connect(args.address, args.token_file)
    try:
        jobs.follow_logs(client, sub.job_id)
    except KeyboardInterrupt:
        out.print(f"\nstopped following; the job goes on. Stop it with: tda stop {sub.job_id}")
        return 130
    return _print_job(jobs.wait(client, sub.job_id), client)


def _print_job(state: Any, client: Any) -> int:
    from pipelines import jobs

    secs = f" after {state.seconds:.0f}s" if state.seconds is not None else ""
    colour = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow"}.get(state.status, "cyan")
    spec = state.metadata.get("tda_spec_path") or state.entrypoint
    out.print(f"job {state.job_id}: [bold {colour}]{state.status}[/]{secs} · {spec}", highlight=False)
    ended = state.status in jobs.TERMINAL
    log = jobs.job_logs(client, state.job_id) if ended and state.record is None else ""
    if state.record is not None:
        rec = state.record
        out.print(summary_table(rec.steps, title=f"run {rec.run_id} · {rec.spec_name} · {rec.status}"))
        failed = state.failed_steps()
    else:
        if state.record_error and state.metadata.get("tda_store"):
            out.print(f"run record not readable here ({state.record_error}); from the job's log:")
        failed = jobs.failed_steps_from_log(log)
    for name, error in failed.items():
        out.print(f"[bold red]{name} failed:[/] {error}", highlight=False)
    if state.status == "FAILED" and not failed:
        out.print(f"[red]{state.message}[/]", highlight=False)
        tail = (log or jobs.job_logs(client, state.job_id)).strip().splitlines()[-15:]
        if tail:
            out.print("last lines of the log:\n  " + "\n  ".join(tail), highlight=False)
    if state.metadata.get("tda_store"):
        out.print(
            f"store {state.metadata['tda_store']}   run {state.metadata.get('tda_run_id')}", highlight=False
        )
    return 1 if state.status in ("FAILED", "STOPPED") else 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from datetime import datetime

    from pipelines import jobs

    client = jobs.connect(args.address, args.token_file)
    table = Table("job", "status", "spec", "run", "started", "seconds", "message")
    for job in jobs.list_jobs(client):
        started = (
            datetime.fromtimestamp(job.start_time).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else ""
        )
        table.add_row(
            job.job_id,
            job.status,
            job.metadata.get("tda_spec_path", ""),
            job.metadata.get("tda_run_id", ""),
            started,
            f"{job.seconds:.0f}" if job.seconds is not None else "",
            job.message[:60],
        )
    out.print(table)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines import jobs

    client = jobs.connect(args.address, args.token_file)
    return _print_job(jobs.job_state(client, jobs.resolve_job(client, args.job)), client)


def cmd_logs(args: argparse.Namespace) -> int:
    from pipelines import jobs

    client = jobs.connect(args.address, args.token_file)
    job_id = jobs.resolve_job(client, args.job)
    if args.follow:
        jobs.follow_logs(client, job_id)
    else:
        sys.stdout.write(jobs.job_logs(client, job_id))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from pipelines import jobs

    client = jobs.connect(args.address, args.token_file)
    job_id = jobs.resolve_job(client, args.job)
    if not jobs.stop(client, job_id):
        out.print(f"job {job_id} had already ended")
        return 0
    out.print(f"stopping job {job_id}")
    if args.wait:
        return _print_job(jobs.wait(client, job_id), client)
    return 0


def cmd_ray(args: argparse.Namespace) -> int:
    from pipelines import local_ray

    if args.action == "up":
        warm, started = local_ray.up(args.num_cpus)
        verb = "started" if started else "already up:"
        out.print(f"warm Ray {verb} {warm.address}, {warm.num_cpus} CPUs, pid {warm.pid}", highlight=False)
        where = local_ray.record_path()
        out.print(f"  runs without --ray-address attach to it; stop it with: tda ray down ({where})")
        return 0
    if args.action == "down":
        stopped = local_ray.down()
        out.print(
            f"stopped the warm Ray at {stopped.address} (pid {stopped.pid})" if stopped else "no warm Ray"
        )
        return 0
    found, gone = local_ray.attachable()
    if found is None:
        out.print(gone or "no warm Ray (start one with: tda ray up)", highlight=False)
        return 1
    out.print(
        f"warm Ray at {found.address}, {found.num_cpus} CPUs, pid {found.pid}, since {found.started}",
        highlight=False,
    )
    out.print(f"  dashboard {found.dashboard}  token {found.token_path}", highlight=False)
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from pipelines.docs import write_step_docs
    from pipelines.registry import installed_kinds

    for path in write_step_docs(Path(args.out_dir), installed_kinds() if args.installed else None):
        out.print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- parser


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store", help="the store folder (default: the spec's run.store, $TDA_STORE or ./tda-store)"
    )
    p.add_argument("--spec", help="take the store from this spec's run.store")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the run's)")


store_options = _store_options  # for command plugins


def _cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="the Ray Jobs API, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)",
    )
    p.add_argument(
        "--token-file",
        help="the cluster's auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tda", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a spec")
    p.add_argument("spec")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a field, e.g. --set steps.subsets.n_subsets=32",
    )
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STEP",
        help="recompute STEP and everything downstream",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the sha256 of every cached step's files before trusting it (default: sizes)",
    )
    p.add_argument("--store", help="store folder or pyarrow filesystem URI (overrides run.store)")
    p.add_argument("--ray-address", help='"auto", "ray://host:10001" (default: embedded Ray)')
    p.add_argument("--tracking-uri", help="MLflow URI (default sqlite:///<store>/mlflow.db)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray")
    p.add_argument("-q", "--quiet", action="store_true", help="no live progress")
    p.set_defaults(fn=cmd_run)

    p.add_argument("--run-id", help=argparse.SUPPRESS)  # `tda submit` names the job after the run

    p = sub.add_parser("submit", help="run a spec on a Ray cluster through the Ray Jobs API")
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a field")
    p.add_argument("--force", action="append", default=[], metavar="STEP", help="recompute STEP and below")
    p.add_argument(
        "--store",
        help="a folder every node mounts, or a URI (default: $TDA_STORE, else an absolute run.store)",
    )
    p.add_argument(
        "--tracking-uri", help="the MLflow server (default: $MLFLOW_TRACKING_URI, else run.tracking_uri)"
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="an environment variable for the job"
    )
    p.add_argument(
        "--wait", action="store_true", help="stream the job's log until it ends; exit 1 if it failed"
    )
    _cluster_options(p)
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("jobs", help="list the jobs of a Ray cluster")
    _cluster_options(p)
    p.set_defaults(fn=cmd_jobs)
    for name, fn, helptext in [
        ("status", cmd_status, "a job's status, with every step's status and error from the store"),
        ("logs", cmd_logs, "a job's log"),
        ("stop", cmd_stop, "stop a job"),
    ]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("job", nargs="?", help="job id or unique prefix (default: the latest tda job)")
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
        if name == "stop":
            p.add_argument("--wait", action="store_true", help="wait until it has stopped")
        _cluster_options(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("ray", help="a warm local Ray that runs attach to: up, down, status")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--num-cpus", type=int, help="CPUs of the warm Ray (default: all)")
    p.set_defaults(fn=cmd_ray)

    p = sub.add_parser("validate", help="check a spec without running it")
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of spec files (every registered kind)")
    p.add_argument("--out", help="write it to this file")
    p.add_argument("--installed", action="store_true", help="only installed kinds (no $PIPELINES_PLUGINS)")
    p.set_defaults(fn=cmd_schema)

    p = sub.add_parser("docs", help="write a Markdown page per step kind from its Params model")
    p.add_argument("out_dir")
    p.add_argument("--installed", action="store_true", help="only installed kinds (no $PIPELINES_PLUGINS)")
    p.set_defaults(fn=cmd_docs)

    for name, fn, helptext in [
        ("runs", cmd_runs, "list the runs of a store"),
        ("tables", cmd_tables, "list the tables of a run"),
        ("show", cmd_show, "show a run: steps, keys, errors, MLflow metrics"),
    ]:
        p = sub.add_parser(name, help=helptext)
        if name != "runs":
            p.add_argument("run", nargs="?", help="run id or unique prefix (default: latest)")
        _store_options(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("verify", help="check every object's files against their sha256 in its manifest")
    p.add_argument("--run", help="only the objects of this run (id or unique prefix)")
    _store_options(p)
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser(
        "gc", help="delete what no run needs (dead staging, unreferenced objects); dry run first"
    )
    p.add_argument("--yes", action="store_true", help="delete (default: list what would go, delete nothing)")
    p.add_argument(
        "--store", help="the store folder (default: the spec's run.store, $TDA_STORE or ./tda-store)"
    )
    p.add_argument("--spec", help="take the store from this spec's run.store")
    p.set_defaults(fn=cmd_gc)

    p = sub.add_parser("query", help="SQL over a run's tables (each is a view named after its step)")
    p.add_argument("sql")
    p.add_argument("--run", help="run id or unique prefix (default: latest)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--out", help="write the result to FILE.parquet (or .csv)")
    _store_options(p)
    p.set_defaults(fn=cmd_query)
    _add_plugin_commands(sub)
    return ap


COMMANDS_GROUP = "pipelines.commands"


def _add_plugin_commands(sub: Any) -> None:
    """Subcommands of installed packages: each entry point of the group "pipelines.commands" is a
    callable `add(subparsers, store_options)` that adds its parser and sets `fn`. One that fails to
    load or clashes with a command is named on stderr and left out; the others still work."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=COMMANDS_GROUP):
        try:
            ep.load()(sub, store_options)
        except Exception as exc:  # a broken plugin must not take the whole CLI down
            print(f"tda: command {ep.name!r} ({ep.value}) left out: {exc}", file=sys.stderr)


class _Stderr(logging.Handler):
    """The engine's warnings as bare lines on the stderr of the moment (no logging set-up needed)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _show_warnings() -> None:
    engine = logging.getLogger("pipelines")
    if not any(isinstance(h, _Stderr) for h in engine.handlers):
        engine.addHandler(_Stderr(logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    _show_warnings()
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except PipelineError as exc:
        for line in str(exc).splitlines():
            print(line, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
