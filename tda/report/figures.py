"""The figures of an attribution study, drawn with matplotlib from plain Polars tables.

Each `*_figure` function takes the table it draws (columns named after the contract in DESIGN.md) and
returns a matplotlib Figure, or None when the table has nothing to draw. `svg` turns a figure into an
inline `<svg>` element (text kept as text, no external references) for the report page; `save_png`
writes one as an MLflow artifact. No engine, Ray or MLflow here: steps and `tda report` share it.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

DIFFERENCE = " − "  # summary rows "a − b" are paired differences, not methods
MAX_POINTS = 4000  # scatter points drawn per panel (a seeded sample beyond)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def svg(fig: Any, name: str) -> str:
    """The figure as an inline `<svg>` element; `name` salts its ids so figures on a page never clash."""
    plt = _pyplot()
    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>|<metadata>.*?</metadata>", "", text, flags=re.DOTALL)
    # HTML's parser puts an inline <svg> (and xlink:href) in their namespaces: no namespace URLs needed
    return re.sub(r'\s+xmlns(?::xlink)?="[^"]*"', "", text, count=2).strip()


def save_png(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write the figure as a PNG (an MLflow artifact when `path` is in the step's artifacts folder)."""
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def headline(summary: pl.DataFrame) -> tuple[str | None, str | None]:
    """The (targets, aggregation) a report leads with: held-out targets if there are any, else `all`,
    else the first role; the first aggregation in the table."""
    rows = methods_only(summary).drop_nulls("lds")
    if rows.is_empty():
        return None, None
    roles = rows["targets"].unique(maintain_order=True).to_list()
    role = next((r for r in ("heldout", "all") if r in roles), roles[0])
    return role, rows.filter(pl.col("targets") == role)["aggregation"][0]


def methods_only(summary: pl.DataFrame) -> pl.DataFrame:
    """The rows of a summary that are methods (not paired differences `a − b`)."""
    return summary.filter(~pl.col("method").str.contains(DIFFERENCE, literal=True))


def lds_figure(summary: pl.DataFrame) -> Any | None:
    """LDS per method with its 95% interval: a panel per target role, a marker per aggregation."""
    rows = methods_only(summary).drop_nulls("lds")
    if rows.is_empty():
        return None
    role, aggregation = headline(rows)
    order = _method_order(rows, role, aggregation)
    roles = rows["targets"].unique(maintain_order=True).to_list()
    aggregations = rows["aggregation"].unique(maintain_order=True).to_list()
    plt = _pyplot()
    height = 1.2 + 0.28 * len(order) * max(1, len(aggregations)) ** 0.5
    fig, axes = plt.subplots(
        1, len(roles), figsize=(3.6 * len(roles) + 1.6, height), sharey=True, squeeze=False
    )
    for ax, target_role in zip(axes[0], roles, strict=True):
        for j, agg in enumerate(aggregations):
            cell = rows.filter((pl.col("targets") == target_role) & (pl.col("aggregation") == agg))
            y = np.array([order.index(m) for m in cell["method"]]) + (j - (len(aggregations) - 1) / 2) * 0.22
            _interval_points(ax, cell, "lds", y, label=agg, horizontal=True)
        ax.axvline(0, color="grey", linewidth=0.6)
        ax.set(title=f"{target_role} targets", xlabel="LDS (mean Spearman ρ)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(order)), order)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(title="aggregation", fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _method_order(rows: pl.DataFrame, role: str | None, aggregation: str | None) -> list[str]:
    """Methods by their headline LDS, best first; methods without one after them."""
    lead = rows.filter((pl.col("targets") == role) & (pl.col("aggregation") == aggregation))
    ranked = lead.sort("lds", descending=True)["method"].to_list()
    rest = [m for m in rows["method"].unique(maintain_order=True).to_list() if m not in ranked]
    return ranked + rest


def _interval_points(
    ax: Any, cell: pl.DataFrame, column: str, pos: np.ndarray, label: str | None = None, **kw: Any
) -> None:
    """Points of `column` at positions `pos` with error bars from `{column}_low` / `{column}_high`;
    `horizontal=True` puts the values on x; `fmt` as in `errorbar` (default: points joined by lines)."""
    value = cell[column].cast(pl.Float64).to_numpy()
    low = cell[f"{column}_low"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    high = cell[f"{column}_high"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    err = np.nan_to_num(np.vstack([value - low, high - value]), nan=0.0).clip(min=0)
    style = {"fmt": kw.get("fmt", "o-"), "capsize": 3, "markersize": 4, "label": label}
    if kw.get("horizontal", False):
        ax.errorbar(value, pos, xerr=err, **(style | {"fmt": "o"}))
    else:
        ax.errorbar(pos, value, yerr=err, **style)


def lds_distribution_figure(lds: pl.DataFrame, aggregation: str | None = None, title: str = "") -> Any | None:
    """The per-target LDS (Spearman ρ) of each method as box plots, best median first."""
    if aggregation is not None:
        lds = lds.filter(pl.col("aggregation") == aggregation)
    lds = lds.filter(pl.col("spearman").is_finite())
    if lds.is_empty():
        return None
    medians = lds.group_by("method").agg(pl.col("spearman").median()).sort("spearman", descending=True)
    order = medians["method"].to_list()
    values = [lds.filter(pl.col("method") == m)["spearman"].to_numpy() for m in order]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * len(order)))
    ax.boxplot(values, vert=False, showmeans=True, flierprops={"markersize": 2})
    ax.set_yticks(range(1, len(order) + 1), order)
    ax.invert_yaxis()
    ax.axvline(0, color="grey", linewidth=0.6)
    what = f" ({aggregation})" if aggregation else ""
    ax.set(
        xlabel="per-target Spearman ρ",
        title=title or f"per-target LDS{what}, {lds['target_id'].n_unique()} targets",
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def cost_figure(summary: pl.DataFrame) -> Any | None:
    """Scoring cost (seconds, log scale) against the headline LDS with its interval, one point per method."""
    role, aggregation = headline(summary)
    rows = methods_only(summary).drop_nulls("seconds")
    rows = rows.filter(pl.col("seconds") > 0)
    if role is not None:
        rows = rows.filter((pl.col("targets") == role) & (pl.col("aggregation") == aggregation))
    rows = rows.drop_nulls("lds").unique("method", maintain_order=True)
    if rows.is_empty():
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    seconds = rows["seconds"].to_numpy()
    _interval_points(ax, rows, "lds", seconds, fmt="o")
    for method, x, y in zip(rows["method"], seconds, rows["lds"], strict=True):
        ax.annotate(method, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set(
        xlabel="scoring time, seconds (log)",
        ylabel="LDS",
        title=f"cost against LDS ({role} targets, {aggregation})",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def group_effects_figure(joined: pl.DataFrame, title: str = "") -> Any | None:
    """Predicted against actual (retrained) group effects, a panel per method (and order), with the
    identity line and Pearson r. `joined`: method, target_id, group_id, score, actual (+ fraction)."""
    joined = joined.filter(pl.col("score").is_finite() & pl.col("actual").is_finite())
    if joined.is_empty():
        return None
    labels = _group_method_labels(joined)
    plt = _pyplot()
    cols = min(3, len(labels))
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (label, cell) in zip(axes.flat, labels.items(), strict=False):
        _group_panel(ax, cell, label)
    for ax in list(axes.flat)[len(labels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _group_method_labels(joined: pl.DataFrame) -> dict[str, pl.DataFrame]:
    keys = ["method", "order"] if "order" in joined.columns else ["method"]
    out = {}
    for key, cell in joined.sort(keys).group_by(keys, maintain_order=True):
        label = str(key[0]) + (f" (order {key[1]})" if len(key) > 1 and key[1] else "")
        out[label] = cell
    return out


def _group_panel(ax: Any, cell: pl.DataFrame, label: str) -> None:
    r = float(np.corrcoef(cell["score"], cell["actual"])[0, 1]) if cell.height > 2 else float("nan")
    shown = cell.sample(MAX_POINTS, seed=0) if cell.height > MAX_POINTS else cell
    colour = shown["fraction"].to_numpy() if "fraction" in shown.columns else None
    ax.scatter(shown["score"], shown["actual"], c=colour, s=6, alpha=0.6, cmap="viridis", rasterized=True)
    lo = min(cell["score"].min(), cell["actual"].min())
    hi = max(cell["score"].max(), cell["actual"].max())
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
    ax.set(title=f"{label} · r = {r:.3f}", xlabel="predicted Δ loss", ylabel="actual Δ loss (retrained)")


CURVE_X = ("budget", "k")  # selection budgets; removal sizes
CURVE_Y = ("gain", "rise")  # gain over random (selection, removal); rise of the loss (removal)


def curve_axes(columns: list[str]) -> tuple[str, list[str]] | None:
    """(x, ys) when a table with these columns holds curves per method: an x in CURVE_X and at least
    one y in CURVE_Y (its interval from `{y}_low`/`{y}_high` where present); None otherwise."""
    if "method" not in columns:
        return None
    x = next((c for c in CURVE_X if c in columns), None)
    ys = [y for y in CURVE_Y if y in columns]
    return (x, ys) if x and ys else None


def curves_figure(table: pl.DataFrame, title: str = "") -> Any | None:
    """Selection or removal curves: each y of `curve_axes` against x per method, with intervals."""
    axes_of = curve_axes(table.columns)
    if axes_of is None or table.is_empty():
        return None
    x, ys = axes_of
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ys), figsize=(5.4 * len(ys), 4), squeeze=False)
    for ax, y in zip(axes[0], ys, strict=True):
        cells = table.drop_nulls(y).sort(x)
        for (method,), cell in cells.group_by("method", maintain_order=True):
            if f"{y}_low" in cell.columns and f"{y}_high" in cell.columns:
                _interval_points(ax, cell, y, cell[x].to_numpy(), label=method)
            else:
                ax.plot(cell[x], cell[y], "o-", markersize=4, label=method)
        ax.axhline(0, color="grey", linewidth=0.6)
        ylabel = "loss gain over random" if y == "gain" else "rise of the target's loss"
        ax.set(xlabel=x, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
