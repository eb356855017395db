"""How AirRep's held-out LDS grows with the experiments it learns from.

Takes a finished run that has a `train_airrep` step (default: the latest run of specs/quickstart.yaml
in the repository's tda-store), keeps its data, subsets, effects, target roles and recipe, and retrains
AirRep (in process, same recipe) on a fraction of the fit subsets and of the fit targets. Each model is
judged like the pipeline judges it: LDS over the held-out `eval` subsets on the held-out targets (never
trained on, never used for model selection), attention and sum aggregation; RepSim is the reference.

    .venv/bin/python benchmarks/airrep_scaling.py [--store tda-store] [--run RUN_ID]

Writes benchmarks/results/airrep_scaling.json and prints a table. It predates `labels: all` and keeps
the own-split labels of its time; `benchmarks/airrep_study.py` is the current study.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipelines import open_run
from tda.airrep import experiments as E
from tda.airrep import train as T
from tda.airrep.model import AirRep
from tda.airrep.score import score_frame
from tda.evaluation.lds import lds

ROOT = Path(__file__).resolve().parents[1]


def restrict(exp: E.Experiments, subset_share: float, target_share: float, seed: int) -> E.Experiments:
    """The same experiments with only a share of the train subsets and of the fit targets used."""
    rng = np.random.default_rng(seed)
    subset_role, target_role = exp.subset_role.copy(), exp.target_role.copy()
    for roles, name, share in ((subset_role, "train", subset_share), (target_role, "fit", target_share)):
        where = np.flatnonzero(roles == name)
        drop = rng.permutation(where)[: len(where) - int(round(share * len(where)))]
        roles[drop] = "unused"
    losses = -exp.measured.astype(np.float64)
    losses[exp.subset_split[:, None] != exp.target_split[None, :]] = np.nan
    labels = E.normalised_labels(losses, subset_role == "train")
    return E.Experiments(
        exp.example_ids, exp.target_ids, exp.texts, exp.subset_ids, exp.members, exp.subset_split,
        subset_role, exp.target_split, target_role, labels, exp.measured,
    )  # fmt: skip


def heldout_lds(
    frame: pl.DataFrame, subsets: pl.DataFrame, effects: pl.DataFrame, heldout: np.ndarray
) -> dict:
    out = {}
    for aggregation in ("attention", "sum"):
        table = lds(frame, subsets, effects, aggregation).filter(pl.col("target_id").is_in(heldout))
        out[aggregation] = float(table["spearman"].drop_nans().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=str(ROOT / "tda-store"))
    parser.add_argument("--run", default=None)
    parser.add_argument("--shares", default="0.25,0.5,1.0")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "airrep_scaling.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = open_run(args.store, args.run)
    step = next(n for n, s in run.record.steps.items() if s["kind"] == "train_airrep")
    params = run.output(step).manifest["params"]
    subsets, effects = run.table(params["subsets"]).collect(), run.table(params["effects"]).collect()
    exp = E.build_experiments(
        run.table(params["data"]).collect(),
        subsets,
        effects,
        heldout_targets=params["heldout_targets"],
        val_fraction=params["val_fraction"],
        seed=params["seed"] or 0,
    )
    config = T.TrainConfig(**{k: params[k] for k in T.TrainConfig.__dataclass_fields__ if k in params})
    config = T.TrainConfig(**{**config.__dict__, "seed": params["seed"] or 0})
    if config.trainable != "projection":
        raise SystemExit("this study retrains projection-only models (trainable: projection)")
    model = AirRep.from_encoder(params["encoder"], params["max_tokens"])
    t0 = time.perf_counter()
    features = model.embed(exp.texts, 128, project=False)  # the frozen encoder, once
    embed_seconds = time.perf_counter() - t0

    class Cached(T.Featurizer):
        def __init__(self, model, texts, config, device=None):  # noqa: ANN001
            self.model, self.config, self.mode = model, config, "projection"
            self.features, self.device = features, torch.device("cpu")

    T.Featurizer = Cached  # type: ignore[misc]
    heldout = exp.target_ids[exp.target_role == "heldout"]
    train_ids, target_ids = exp.example_ids, exp.target_ids

    def scores(method: str, project: bool, cosine: bool) -> pl.DataFrame:
        with torch.no_grad():
            emb = model.projection(features) if project else features
        return score_frame(method, target_ids, emb[exp.n :], train_ids, emb[: exp.n], cosine=cosine)

    rows = []
    reference = heldout_lds(scores("repsim", False, True), subsets, effects, heldout)
    rows.append({"model": "repsim", "subset_share": 0.0, "target_share": 0.0, **reference})
    with torch.no_grad():
        model.projection.weight.copy_(torch.eye(model.dim))
        model.projection.bias.zero_()
    untrained = heldout_lds(scores("airrep", True, False), subsets, effects, heldout)
    rows.append({"model": "airrep untrained", "subset_share": 0.0, "target_share": 0.0, **untrained})
    shares = [float(s) for s in args.shares.split(",")]
    grid = [(s, 1.0) for s in shares] + [(1.0, s) for s in shares if s < 1.0]
    for subset_share, target_share in grid:
        part = restrict(exp, subset_share, target_share, seed=1)
        with torch.no_grad():
            model.projection.weight.copy_(torch.eye(model.dim))
            model.projection.bias.zero_()
        t0 = time.perf_counter()
        state = T.train(model, part, config)
        seconds = time.perf_counter() - t0
        result = heldout_lds(scores("airrep", True, False), subsets, effects, heldout)
        row = {
            "model": "airrep",
            "subset_share": subset_share,
            "target_share": target_share,
            "train_subsets": int((part.subset_role == "train").sum()),
            "fit_targets": int((part.target_role == "fit").sum()),
            "best_step": state.best_step,
            "best_val_lds": state.best_lds,
            "train_seconds": seconds,
            **result,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = pl.DataFrame(rows)
    print(table)
    out = {
        "run": run.record.run_id,
        "store": args.store,
        "recipe": config.__dict__,
        "heldout_targets": len(heldout),
        "eval_subsets": int(subsets.filter(pl.col("purpose") == "eval")["subset_id"].n_unique()),
        "embed_seconds": embed_seconds,
        "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version()},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
