"""The `tda report` command, added to the CLI through the entry-point group `pipelines.commands`.

    tda report [RUN] [--out DIR] [--top K] [--max-targets N] [--store DIR | --spec SPEC]

Imports nothing heavy until the command runs: every `tda` invocation loads this module.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_report(sub: Any, store_options: Any) -> None:
    """Add `report` to the CLI's subparsers (`store_options` adds --store/--spec/--tracking-uri)."""
    p = sub.add_parser("report", help="write one self-contained HTML page of a run's results")
    p.add_argument("run", nargs="?", help="run id or unique prefix (default: latest)")
    p.add_argument(
        "--out", default="reports", help="folder of the page, <out>/<run id>.html (default: reports)"
    )
    p.add_argument("--top", type=_positive, default=5, help="proponents and opponents per target and method")
    p.add_argument(
        "--max-targets", type=_positive, default=200, help="targets in the explorer (the first by id)"
    )
    store_options(p)
    p.set_defaults(fn=cmd_report)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number of at least 1")
    return value


def cmd_report(args: argparse.Namespace) -> int:
    from pipelines.cli import out, store_for
    from pipelines.query import open_run
    from tda.report.build import write_report

    run = open_run(store_for(args), args.run)
    path = write_report(run, args.out, top=args.top, max_targets=args.max_targets)
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) for run {run.run_id}", highlight=False)
    return 0


COMMAND = add_report
