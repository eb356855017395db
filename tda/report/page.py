"""The report as one HTML page: inline CSS, inline SVG figures, the explorer's data as inline JSON and
vanilla JavaScript to browse it. No external URL anywhere, so the page opens offline, from a mail
attachment as well as from a disk.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from tda.report.figures import DIFFERENCE, headline, methods_only

ASSETS = "report.css", "explorer.js"


@dataclass
class Section:
    """A titled part of the page: its HTML body (already escaped) and its anchor."""

    anchor: str
    title: str
    body: str


@dataclass
class Page:
    title: str
    facts: dict[str, str]
    sections: list[Section] = field(default_factory=list)
    explorer: dict[str, Any] | None = None


def figure(svg: str, name: str, caption: str) -> str:
    """An inline figure; `data-figure` names it for tests and readers of the HTML."""
    return (
        f'<figure class="fig" data-figure="{_e(name)}">{svg}<figcaption>{_e(caption)}</figcaption></figure>'
    )


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def _interval(row: dict[str, Any]) -> str:
    if row.get("lds") is None:
        return "–"
    low, high = row.get("lds_low"), row.get("lds_high")
    ci = f" <small>[{_num(low)}, {_num(high)}]</small>" if low is not None and high is not None else ""
    return f"{_num(row['lds'])}{ci}"


def methods_table(summary: pl.DataFrame) -> str:
    """One row per method: LDS [95% interval] per target role and aggregation, then Type@1 and cost."""
    rows = methods_only(summary)
    role, aggregation = headline(rows)
    cells = rows.select("targets", "aggregation").unique(maintain_order=True).drop_nulls().rows()
    extra = [c for c in ("type_at_1", "seconds", "examples_per_second", "protocol") if c in rows.columns]
    names = {"type_at_1": f"Type@1 ({role})", "examples_per_second": "examples / s"}
    head = "".join(f"<th>LDS {_e(r)} · {_e(a)}</th>" for r, a in cells) + "".join(
        f"<th>{_e(names.get(c, c))}</th>" for c in extra
    )
    lead = rows.filter((pl.col("targets") == role) & (pl.col("aggregation") == aggregation))
    order = lead.sort("lds", descending=True, nulls_last=True)["method"].to_list()
    order += [m for m in rows["method"].unique(maintain_order=True).to_list() if m not in order]
    body = "".join(_method_row(rows, m, cells, extra, role) for m in order)
    head = f"<thead><tr><th>method</th>{head}</tr></thead>"
    return f'<table class="methods" id="methods-table">{head}<tbody>{body}</tbody></table>'


def _method_row(
    rows: pl.DataFrame, method: str, cells: list[tuple], extra: list[str], role: str | None
) -> str:
    mine = rows.filter(pl.col("method") == method)
    lookup = {(r["targets"], r["aggregation"]): r for r in mine.iter_rows(named=True)}
    lds = "".join(f"<td>{_interval(lookup.get(c, {}))}</td>" for c in cells)
    lead = next((r for (t, _), r in lookup.items() if t == role), mine.row(0, named=True))
    more = "".join(f"<td>{_extra(c, lead.get(c))}</td>" for c in extra)
    return f'<tr data-method="{_e(method)}"><th>{_e(method)}</th>{lds}{more}</tr>'


def _extra(column: str, value: Any) -> str:
    if column == "protocol":
        return _e(value or "–")
    if column == "examples_per_second":
        return "–" if value is None else f"{value:,.0f}"
    return _num(value, 3 if column == "type_at_1" else 1)


def differences_table(summary: pl.DataFrame) -> str:
    """The paired differences `a − b` of a summary, if it has any."""
    rows = summary.filter(pl.col("method").str.contains(DIFFERENCE, literal=True))
    if rows.is_empty():
        return ""
    body = "".join(
        f"<tr><th>{_e(r['method'])}</th><td>{_e(r['targets'])}</td><td>{_e(r['aggregation'])}</td>"
        f"<td>{_interval(r)}</td></tr>"
        for r in rows.sort("targets", "method", "aggregation").iter_rows(named=True)
    )
    return (
        "<h3>Paired differences</h3><p>Mean per-target difference of LDS with a paired 95% bootstrap "
        "interval (the targets resampled together).</p>"
        f'<table class="differences"><thead><tr><th>a − b</th><th>targets</th><th>aggregation</th>'
        f"<th>Δ LDS [95%]</th></tr></thead><tbody>{body}</tbody></table>"
    )


def explorer_section(limits: str) -> Section:
    body = f"""<p class="limits">{_e(limits)}</p>
<div class="controls"><label>method <select id="method"></select></label>
<label>find <input id="filter" type="search" placeholder="target id or words of its prompt"></label></div>
<div class="explorer"><div class="target-list"><table id="targets"><thead><tr><th>target</th><th>role</th>
<th>LDS</th><th>prompt</th></tr></thead><tbody></tbody></table></div>
<div id="detail"><p class="hint">Pick a target on the left to see its top proponents and opponents.</p>
</div></div>"""
    return Section("explorer", "Explorer", body)


def render(page: Page, css: str, script: str) -> str:
    """The whole page as one string."""
    nav = "".join(f'<a href="#{s.anchor}">{_e(s.title)}</a>' for s in page.sections)
    facts = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in page.facts.items())
    sections = "".join(
        f'<section id="{s.anchor}"><h2>{_e(s.title)}</h2>{s.body}</section>' for s in page.sections
    )
    data = json.dumps(page.explorer or {}, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(page.title)}</title><style>{css}</style></head>
<body><header><h1>{_e(page.title)}</h1><dl class="facts">{facts}</dl><nav>{nav}</nav></header>
<main>{sections}</main>
<script type="application/json" id="explorer-data">{data}</script>
<script>{script}</script></body></html>
"""
