"""Run a spec from Python and read its results with Polars: the path a notebook user takes.

    python examples/top_proponents.py                       # specs/quickstart.yaml (~4 min on 2 cores)
    python examples/top_proponents.py SPEC --store DIR --set steps.x.field=value --targets 2 --top 3

It runs the spec (a cached re-run takes seconds), prints the held-out LDS of each method when the run
has one, and, for the first few targets, each method's top proponents joined to the corpus text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

import pipelines

HERE = Path(__file__).resolve().parent


def lds_by_method(run: pipelines.Run) -> pl.DataFrame | None:
    """Mean LDS per method and aggregation (over the held-out targets when AirRep assigned roles)."""
    names = run.table_names()
    if "lds" not in names:
        return None
    lds = run.table("lds")
    roles = [n for n, s in run.steps.items() if s["kind"] == "train_airrep"]
    if roles:  # AirRep fitted on some targets: judge every method on the ones it never saw
        held = run.table(roles[0]).filter(pl.col("role") == "heldout").select("target_id")
        lds = lds.join(held, on="target_id")
    return (
        lds.group_by("method", "aggregation")
        .agg(pl.col("spearman").mean().alias("lds"), pl.len().alias("targets"))
        .sort("lds", descending=True)
        .collect()
    )


def top_proponents(run: pipelines.Run, targets: int, top: int) -> pl.DataFrame:
    """Each method's `top` highest-scored training examples for the first `targets` targets, with the
    target's and the example's text."""
    spec_steps = run.record.spec["steps"]
    scored = [n for n, s in run.steps.items() if s["kind"] == "influence_scores" and s["status"] != "failed"]
    frames = []
    for name in scored:
        data = run.table(spec_steps[name]["data"]).select("example_id", "prompt", "response")
        scores = run.table(name)
        chosen = scores.select("target_id").unique().sort("target_id").head(targets)
        best = (
            scores.join(chosen, on="target_id")
            .sort("score", descending=True)
            .group_by("method", "target_id", maintain_order=True)
            .head(top)
        )
        frames.append(
            best.join(
                data.rename({"example_id": "target_id", "prompt": "target_prompt"}).drop("response"),
                on="target_id",
            )
            .join(data, on="example_id")
            .select("method", "target_id", "target_prompt", "example_id", "score", "prompt", "response")
        )
    return pl.concat(frames).sort("method", "target_id", "score", descending=[False, False, True]).collect()


def main(argv: list[str] | None = None) -> pipelines.Run:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(HERE.parent / "specs" / "quickstart.yaml"))
    parser.add_argument("--store", help="the store folder (default: the spec's run.store)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="steps.x.field=value")
    parser.add_argument("--targets", type=int, default=2, help="targets to show")
    parser.add_argument("--top", type=int, default=3, help="proponents per target and method")
    args = parser.parse_args(argv)

    spec = pipelines.load_spec(args.spec, args.overrides)
    run = pipelines.run(spec, store=args.store)
    with pl.Config(tbl_rows=100, fmt_str_lengths=60, tbl_width_chars=200):
        if (lds := lds_by_method(run)) is not None:
            print(lds)
        print(top_proponents(run, args.targets, args.top))
    return run


if __name__ == "__main__":
    main()
