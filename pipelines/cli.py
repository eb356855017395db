"""`tda`: run, validate and inspect pipeline specs; query the tables of a run.

    tda run SPEC [--set steps.x.field=value] [--force STEP] [--store DIR] [--ray-address ADDR]
    tda validate SPEC            tda schema [--out FILE]          tda docs OUT_DIR
    tda runs                     tda tables [RUN]                 tda show [RUN]
    tda query "SQL" [--run RUN] [--format table|csv|json] [--out FILE.parquet]

The store of the inspecting commands is `--store`, else the `run.store` of `--spec`, else $TDA_STORE,
else ./tda-store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.errors import PipelineError
from pipelines.progress import summary_table
from pipelines.store import Store

out = Console(soft_wrap=True)
if not out.is_terminal:  # piped or captured: no wrapping of wide tables at 80 columns
    out = Console(soft_wrap=True, width=max(out.width, 200))


def _store_for(args: argparse.Namespace) -> Store:
    if getattr(args, "store", None):
        return Store(args.store)
    if getattr(args, "spec", None):
        from pipelines.runner import resolve_store
        from pipelines.spec import load_spec

        return resolve_store(load_spec(args.spec), None)
    return Store(os.environ.get("TDA_STORE", "./tda-store"))


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
        "progress": not args.quiet,
    }
    try:
        result = pipelines.run(spec, **options)
    except RunFailed as exc:
        result = exc.run
    _print_run(result)
    return 0 if result.status == "succeeded" else 1


def _print_run(result: Any) -> None:
    record = result.record
    out.print(
        summary_table(
            record.steps,
            title=f"run {record.run_id} · {record.spec_name} · {record.status} in {record.seconds:.1f}s",
        )
    )
    for name, info in record.steps.items():
        if info["status"] == "failed":
            out.print(f"[bold red]{name} failed:[/] {info.get('error', '')}", highlight=False)
        if info.get("export_error"):
            out.print(f"[red]{name}: export failed:[/] {info['export_error']}", highlight=False)
    for name in record.spec.get("run", {}).get("show", []):
        if record.steps.get(name, {}).get("status") in ("done", "cached"):
            out.print(frame_table(result.table(name).head(100).collect(), title=name))
    store = result.store.root
    tables = list(result.tables())
    out.print(f"\nstore:    {store}\nrun:      {store / 'runs' / (record.run_id + '.json')}")
    out.print(f"tables:   {', '.join(tables) or 'none'}  (Parquet under {store / 'objects'})")
    out.print(f"tracking: {record.mlflow.get('tracking_uri')}")
    if tables:
        tda = "tda" if shutil.which("tda") else sys.argv[0]
        out.print(f'query:    {tda} query "SELECT * FROM {tables[-1]} LIMIT 10" --store {store}')
    uri = record.mlflow.get("tracking_uri", "")
    out.print(f"MLflow:   mlflow ui --backend-store-uri {uri} --host 127.0.0.1", highlight=False)


def frame_table(frame: Any, title: str | None = None) -> Table:
    """A Polars frame as a rich table (floats to 4 significant digits)."""
    table = Table(*frame.columns, title=title, title_justify="left")
    for row in frame.iter_rows():
        table.add_row(*("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    return table


def cmd_runs(args: argparse.Namespace) -> int:
    store = _store_for(args)
    table = Table("run", "spec", "status", "started", "seconds", "executed", "cached")
    for run_id in store.run_ids():
        rec = store.read_run(run_id)
        states = [s["status"] for s in rec.steps.values()]
        secs = f"{rec.seconds:.1f}" if rec.seconds is not None else ""
        table.add_row(
            rec.run_id,
            rec.spec_name,
            rec.status,
            rec.started,
            secs,
            str(states.count("done")),
            str(states.count("cached")),
        )
    out.print(table)
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from pipelines.query import open_run

    run = open_run(_store_for(args), args.run)
    table = Table("table", "kind", "rows", "columns", title=f"run {run.run_id}", title_justify="left")
    for name, obj in run.tables().items():
        manifest = obj.manifest
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
            f"  {name}: key {info['key'][:16]}…  node {info.get('node') or '-'}"
            + (f"\n    error: {info['error']}" if info.get("error") else ""),
            highlight=False,
        )
    uri = args.tracking_uri or rec.mlflow.get("tracking_uri")
    if uri and rec.mlflow.get("run_id"):
        from pipelines.tracking import read_step_metrics

        metrics = read_step_metrics(uri, rec.mlflow["run_id"])
        out.print(f"MLflow run {rec.mlflow['run_id']} at {uri}", highlight=False)
        for step, values in metrics.items():
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
            out.print(f"  {step}: {shown}", highlight=False)
    return 0


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
    p.add_argument("--store", help="store folder (overrides run.store)")
    p.add_argument("--ray-address", help='"auto", "ray://host:10001" (default: embedded Ray)')
    p.add_argument("--tracking-uri", help="MLflow URI (default sqlite:///<store>/mlflow.db)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray")
    p.add_argument("-q", "--quiet", action="store_true", help="no live progress")
    p.set_defaults(fn=cmd_run)

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

    p = sub.add_parser("query", help="SQL over a run's tables (each is a view named after its step)")
    p.add_argument("sql")
    p.add_argument("--run", help="run id or unique prefix (default: latest)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--out", help="write the result to FILE.parquet (or .csv)")
    _store_options(p)
    p.set_defaults(fn=cmd_query)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except PipelineError as exc:
        for line in str(exc).splitlines():
            print(line, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
