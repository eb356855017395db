"""Build the report page of a run: read its tables (tables.py), draw the figures (figures.py), cut the
explorer's data (explorer.py) and render one HTML file (page.py)."""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import polars as pl

from pipelines import PipelineError, Run
from tda.report import figures
from tda.report.explorer import TEXT_CHARS, explorer_data
from tda.report.page import Page, Section, differences_table, explorer_section, figure, methods_table, render
from tda.report.tables import (
    RunTables,
    curve_tables,
    examples_table,
    group_effects,
    lds_table,
    score_tables,
    summary,
)

TOP = 5  # proponents and opponents per target and method
MAX_TARGETS = 200  # targets in the explorer


class ReportError(PipelineError):
    """The report cannot be written where asked (`--out` is a file, or not writable)."""

    exit_code = 2


def build_report(run: Run, top: int = TOP, max_targets: int = MAX_TARGETS) -> str:
    """The report page of `run` as one self-contained HTML string."""
    tables = RunTables.of(run)
    lds = lds_table(tables)
    sections = [_methods_section(summary(tables), lds)]
    sections += [s for s in (_groups_section(tables), _curves_section(tables)) if s is not None]
    scores = score_tables(tables)
    data = explorer_data(tables, scores, examples_table(tables, scores), lds, top, max_targets)
    sections.append(explorer_section(_limits(data, top)))
    record = run.record
    page = Page(f"Attribution report · {record.spec_name}", _facts(run, tables), sections, data)
    asset = files("tda.report")
    return render(
        page,
        asset.joinpath("report.css").read_text("utf-8"),
        asset.joinpath("explorer.js").read_text("utf-8"),
    )


def write_report(run: Run, out_dir: str | Path, **options: Any) -> Path:
    """Write `<out_dir>/<run id>.html` (the folder is made if needed) and return its path."""
    text = build_report(run, **options)
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ReportError(f"--out {folder}: is a file; give a folder for the report")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{run.run_id}.html"
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"--out {folder}: cannot write the report there ({exc.strerror})") from exc
    return path


def _facts(run: Run, tables: RunTables) -> dict[str, str]:
    record = run.record
    return {
        "run": record.run_id,
        "spec": f"{record.spec_name} ({record.spec_path})",
        "status": f"{record.status}, started {record.started}"
        + (f", {record.seconds:.0f} s" if record.seconds else ""),
        "store": run.store.location,
        "tables": ", ".join(f"{n} ({k})" for n, k in tables.kinds.items()) or "none",
    }


def _draw(make: Callable[..., Any], name: str, caption: str, *args: Any) -> str:
    fig = make(*args)
    return "" if fig is None else figure(figures.svg(fig, name), name, caption)


def _methods_section(table: pl.DataFrame | None, lds: pl.DataFrame | None) -> Section:
    if table is None or table.is_empty():
        return Section("methods", "Methods", '<p class="empty">This run has no LDS or summary table.</p>')
    role, aggregation = figures.headline(table)
    parts = [
        "<p>LDS is the mean over targets of the Spearman ρ between predicted and actual subset effects; "
        "the interval is a 95% bootstrap over targets. Rows are ordered by the LDS of "
        f"{role} targets with {aggregation} aggregation.</p>",
        methods_table(table),
        _draw(figures.lds_figure, "lds", "LDS per method with 95% intervals, per target role.", table),
    ]
    if lds is not None:
        caption = f"Distribution of the per-target LDS ({role} targets; box: quartiles, triangle: mean)."
        per_target = lds.filter(pl.col("targets") == role) if role else lds
        parts.append(
            _draw(figures.lds_distribution_figure, "lds-distribution", caption, per_target, aggregation)
        )
    if "seconds" in table.columns:
        parts.append(
            _draw(figures.cost_figure, "cost", "Scoring time against LDS (headline targets).", table)
        )
    parts.append(differences_table(table))
    return Section("methods", "Methods", "".join(parts))


def _groups_section(tables: RunTables) -> Section | None:
    pairs = group_effects(tables)
    if not pairs:
        return None
    body = (
        "<p>Predicted change of each target's loss when a group is removed, against the change "
        "measured by retraining without it; grey: y = x.</p>"
    )
    for i, (title, joined) in enumerate(pairs):
        body += _draw(figures.group_effects_figure, f"groups-{i}", title, joined, title)
    return Section("groups", "Group effects", body)


def _curves_section(tables: RunTables) -> Section | None:
    curves = curve_tables(tables)
    if not curves:
        return None
    body = (
        "<p>Data selection and removal: gain over random choices of the same size (higher is better) "
        "with paired 95% intervals.</p>"
    )
    for i, (title, table) in enumerate(curves):
        body += _draw(figures.curves_figure, f"curves-{i}", title, table, title)
    return Section("curves", "Selection and removal", body)


def _limits(data: dict[str, Any], top: int) -> str:
    shown, total = len(data["targets"]), data["n_targets"]
    which = f"all {total} targets" if shown == total else f"the first {shown} of {total} targets (by id)"
    return (
        f"Embedded: {which}; per target and method the top {top} proponents and opponents; prompts and "
        f"responses cut to {TEXT_CHARS} characters. `tda report --top K --max-targets N` changes the limits."
    )
