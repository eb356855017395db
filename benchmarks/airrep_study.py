"""The AirRep study of docs/airrep.md, on the experiments of a finished run of specs/airrep.yaml.

Takes the run's data, subsets, effects and target roles (its `train_airrep` step's role_seed,
heldout_targets and val_fraction) and trains AirRep variants in process with the run's recipe, each
changed in one respect: the attention temperature, the labels (all pairs or own split), the share of
fit targets and of train subsets, and what is trained (projection, last layers, all). Every model and
every baseline is judged the same way: the LDS over the run's `eval` subsets on the held-out targets
(never trained on, never used for selection), per target, with a 95% bootstrap interval over targets
and paired intervals of differences. Choices (the temperature, the step) are made on validation
targets and validation subsets only.

Baselines through the same LDS: RepSim (cosine of MiniLM's pooled features), the untrained AirRep
(the same encoder, the identity projection: plain dot products), word TF-IDF cosine, the same-task
indicator (1 when the example's task family is the target's), and the gradient methods the run
scored (read from its score tables).

    .venv/bin/python benchmarks/airrep_study.py [--run RUN_ID] [--parts temperature,labels,...]

Writes benchmarks/results/airrep_study.json (merged with what earlier parts wrote) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
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
from tda.steps.attribution_summary import bootstrap_interval

ROOT = Path(__file__).resolve().parents[1]
PARTS = (
    "baselines",
    "temperature",
    "labels",
    "targets",
    "subsets",
    "trainable",
    "last_layer",
    "steps",
    "cost",
)


def labels_used(exp: E.Experiments) -> int:
    """How many (train subset, fit target) labels the experiments hold."""
    train, fit = exp.subset_role == "train", exp.target_role == "fit"
    return int(np.isfinite(exp.labels[train][:, fit]).sum())


class Study:
    def __init__(self, store: str, run_id: str | None, threads: int) -> None:
        torch.set_num_threads(threads)
        self.run = open_run(store, run_id)
        steps = self.run.record.steps
        self.step = next(n for n, s in steps.items() if s["kind"] == "train_airrep")
        self.params = self.run.output(self.step).manifest["params"]
        p = self.params
        self.data = self.run.table(p["data"]).collect()
        self.subsets = self.run.table(p["subsets"]).collect()
        self.effects = self.run.table(p["effects"]).collect()
        role_seed = p.get("role_seed", p["seed"])
        self.exp = E.build_experiments(
            self.data,
            self.subsets,
            self.effects,
            heldout_targets=p["heldout_targets"],
            val_fraction=p["val_fraction"],
            seed=role_seed if role_seed is not None else 0,
            labels=p.get("labels", "all"),
        )
        fields = T.TrainConfig.__dataclass_fields__
        self.config = T.TrainConfig(**{k: p[k] for k in fields if k in p and p[k] is not None})
        self.heldout = self.exp.target_ids[self.exp.target_role == "heldout"]
        self.base = AirRep.from_encoder(p["encoder"], p["max_tokens"])
        self.caches: dict[tuple[str, int], T.Featurizer] = {}
        self.per_target: dict[str, dict[str, np.ndarray]] = {}  # name -> aggregation -> (heldout,) LDS

    # ------------------------------------------------------------------ judging

    def judge(self, name: str, frame: pl.DataFrame) -> dict[str, float]:
        """Held-out LDS of a score frame (attention and sum), kept per target for paired intervals."""
        frame = frame.filter(pl.col("target_id").is_in(self.heldout))
        out: dict[str, float] = {}
        self.per_target[name] = {}
        for aggregation in ("attention", "sum"):
            table = lds(frame, self.subsets, self.effects, aggregation).sort("target_id")
            values = table["spearman"].to_numpy()
            self.per_target[name][aggregation] = values
            low, high = bootstrap_interval(values, 2000)
            out[aggregation] = float(np.nanmean(values))
            out[f"{aggregation}_low"], out[f"{aggregation}_high"] = low, high
        return out

    def paired(self, a: str, b: str, aggregation: str = "attention") -> dict[str, float]:
        x, y = self.per_target[a][aggregation], self.per_target[b][aggregation]
        diff = x - y
        low, high = bootstrap_interval(diff, 2000)
        return {"a": a, "b": b, "aggregation": aggregation, "difference": float(np.nanmean(diff)),
                "low": low, "high": high}  # fmt: skip

    def embedding_frame(self, method: str, emb: torch.Tensor, cosine: bool = False) -> pl.DataFrame:
        n = self.exp.n
        return score_frame(method, self.exp.target_ids, emb[n:], self.exp.example_ids, emb[:n], cosine=cosine)

    # ------------------------------------------------------------------ models

    def featurizer(self, model: AirRep, config: T.TrainConfig) -> T.Featurizer:
        """A featurizer on `model` whose frozen part is computed once per (mode, n_layers)."""
        key = (config.trainable, config.n_layers if config.trainable == "last_n_layers" else 0)
        if key not in self.caches:
            t0 = time.perf_counter()
            self.caches[key] = T.Featurizer(model, self.exp.texts, config)
            print(f"cached {key} features in {time.perf_counter() - t0:.0f}s", flush=True)
        cached = copy.copy(self.caches[key])
        cached.model, cached.config = model, config
        return cached

    def train(self, name: str, exp: E.Experiments | None = None, **changes: object) -> dict:
        """Train a fresh AirRep with the run's recipe changed by `changes`; judge it."""
        exp = exp or self.exp
        config = T.TrainConfig(**{**self.config.__dict__, **changes})
        model = copy.deepcopy(self.base)
        features = self.featurizer(model, config)
        model.set_temperature(config.temperature, config.normalize)
        with torch.no_grad():  # the recipe's own start: the untrained model it is compared with
            start_emb = features(np.arange(len(exp.texts)))
        start = self.judge(f"{name} @ step 0", self.embedding_frame("airrep", start_emb))
        original, T.Featurizer = T.Featurizer, lambda *a, **k: features  # noqa: E731  (train builds one)
        try:
            t0 = time.perf_counter()
            state = T.train(model, exp, config)
            seconds = time.perf_counter() - t0
        finally:
            T.Featurizer = original
        with torch.no_grad():
            emb = features(np.arange(len(exp.texts)))
        row = {
            "model": name,
            **{k: v for k, v in changes.items()},
            "fit_targets": int((exp.target_role == "fit").sum()),
            "train_subsets": int((exp.subset_role == "train").sum()),
            "labels_used": labels_used(exp),
            "best_step": state.best_step,
            "val_lds": state.best_lds,
            "val_lds_step0": state.history[0].get("val_lds") if state.history else None,
            "temperature_final": model.temperature,
            "train_seconds": seconds,
            **self.judge(name, self.embedding_frame("airrep", emb)),
            "step0_attention": start["attention"],
            "step0_sum": start["sum"],
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        return row

    def restrict(self, subset_share: float = 1.0, target_share: float = 1.0, seed: int = 1) -> E.Experiments:
        """The experiments with only a share of the train subsets and of the fit targets used."""
        rng = np.random.default_rng(seed)
        exp = self.exp
        subset_role, target_role = exp.subset_role.copy(), exp.target_role.copy()
        for roles, name, share in ((subset_role, "train", subset_share), (target_role, "fit", target_share)):
            where = np.flatnonzero(roles == name)
            drop = rng.permutation(where)[: len(where) - int(round(share * len(where)))]
            roles[drop] = "unused"
        losses = -exp.measured.astype(np.float64)
        labels = E.normalised_labels(losses, subset_role == "train")
        return E.Experiments(
            exp.example_ids, exp.target_ids, exp.texts, exp.subset_ids, exp.members, exp.subset_split,
            subset_role, exp.target_split, target_role, labels, exp.measured,
        )  # fmt: skip

    # ------------------------------------------------------------------ parts

    def baselines(self) -> list[dict]:
        from sklearn.feature_extraction.text import TfidfVectorizer

        rows = []
        pooled = self.base.embed(self.exp.texts, 128, project=False)
        rows.append({"model": "repsim", **self.judge("repsim", self.embedding_frame("repsim", pooled, True))})
        rows.append(
            {"model": "airrep untrained (τ=1)", **self.judge("untrained", self.embedding_frame("u", pooled))}
        )
        for tau in (10.0, 30.0):
            name = f"untrained τ={tau:g}"
            rows.append(
                {"model": f"airrep {name}", **self.judge(name, self.embedding_frame("u", pooled / tau**0.5))}
            )
        tfidf = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b").fit_transform(self.exp.texts)
        dense = torch.as_tensor(tfidf.toarray(), dtype=torch.float32)  # rows are L2-normalised
        rows.append(
            {"model": "word tf-idf cosine", **self.judge("tfidf", self.embedding_frame("tfidf", dense))}
        )
        groups = dict(zip(self.data["example_id"].to_list(), self.data["group"].to_list(), strict=True))
        names = sorted(set(groups.values()))
        ids = np.concatenate([self.exp.example_ids, self.exp.target_ids])
        onehot = torch.zeros(len(ids), len(names))
        onehot[np.arange(len(ids)), [names.index(groups[int(i)]) for i in ids]] = 1.0
        rows.append(
            {
                "model": "same task (indicator)",
                **self.judge("same task", self.embedding_frame("task", onehot)),
            }
        )
        for step, status in self.run.record.steps.items():
            manifest = self.run.output(step).manifest
            if status["kind"] != "influence_scores" or manifest["params"]["method"] in ("airrep", "repsim"):
                continue
            frame = self.run.table(step).collect()
            label = frame["method"][0]
            metrics = manifest.get("metrics", {})
            rows.append(
                {"model": label, "examples_per_second": metrics.get("examples_per_second"),
                 "seconds": metrics.get("seconds"), **self.judge(label, frame)}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        return rows

    def temperature(self) -> list[dict]:
        normalised = {"normalize": True}
        variants = {
            "τ=0.3": {"temperature": 0.3},
            "τ=1 (reference)": {"temperature": 1.0},
            "τ=10": {"temperature": 10.0},
            "τ=30": {"temperature": 30.0},
            "τ learned from 1": {"temperature": 1.0, "learn_temperature": True},
            "τ learned from 10": {"temperature": 10.0, "learn_temperature": True},
            "normalised, τ=0.05": {**normalised, "temperature": 0.05},
            "normalised, τ=0.02": {**normalised, "temperature": 0.02},
            "normalised, τ learned from 0.05": {**normalised, "temperature": 0.05, "learn_temperature": True},
        }
        return [self.train(f"airrep {name}", **changes) for name, changes in variants.items()]

    def labels(self, chosen: dict) -> list[dict]:
        own = E.build_experiments(
            self.data, self.subsets, self.effects,
            heldout_targets=self.params["heldout_targets"], val_fraction=self.params["val_fraction"],
            seed=self.params.get("role_seed", self.params["seed"]) or 0, labels="own_split",
        )  # fmt: skip
        return [
            self.train("airrep labels own_split", own, labels="own_split", **chosen),
            self.train("airrep labels all", labels="all", **chosen),
        ]

    def targets(self, chosen: dict) -> list[dict]:
        return [
            self.train(f"airrep {share:.0%} fit targets", self.restrict(target_share=share), **chosen)
            for share in (0.25, 0.5, 1.0)
        ]

    def subsets_part(self, chosen: dict) -> list[dict]:
        return [
            self.train(f"airrep {share:.0%} train subsets", self.restrict(subset_share=share), **chosen)
            for share in (0.25, 0.5)
        ]

    def trainable(self, chosen: dict, steps: int) -> list[dict]:
        """The last layer, then the whole encoder, trained with the projection: on 2 cores a step of
        the tail costs seconds (hundreds of member texts per episode through the layers), so these runs
        use smaller episodes (4 subsets) and fewer steps than the frozen encoder's; the full encoder
        gets a fifth of the last layer's steps. The GPU spec trains the whole encoder properly."""
        small = {"subsets_per_episode": 4, "lr": 2e-5, "warmup_steps": 5, "eval_every": max(5, steps // 10)}
        return [
            self.train(f"airrep last layer ({steps} steps, 4 subsets/episode)", trainable="last_n_layers",
                       n_layers=1, steps=steps, **small, **chosen),
            self.train(f"airrep frozen ({steps} steps, 4 subsets/episode)", trainable="projection",
                       steps=steps, **small, **chosen),
            self.train(f"airrep all layers ({steps // 5} steps, 4 subsets/episode)", trainable="all",
                       steps=steps // 5, **small, **chosen),
        ]  # fmt: skip

    def last_layer(self, chosen: dict) -> list[dict]:
        """The last layer trained with exactly the frozen recipe's steps and episodes."""
        return [
            self.train("airrep last layer (300 steps, 8 subsets/episode)", trainable="last_n_layers",
                       n_layers=1, lr=2e-5, **chosen)
        ]  # fmt: skip

    def cost(self, rows: int = 512) -> list[dict]:
        """Inference cost per example at matched dimension, in this process on the same rows and threads:
        AirRep's embedding (MiniLM forward + projection: 384-d) against LoGra features of the scored LM
        (8×6 per layer = 384-d, and 16×16 = 2048-d) and TRAK (k = 384), then the same gradient features
        for wider GPT-2s of the same vocabulary (random weights: speed does not depend on them). AirRep's
        cost does not depend on the LM; a gradient feature's grows with it."""
        from tda.influence.features import Projection, featurize
        from tda.models import load_model
        from tda.models.causal_lm import CausalLM
        from tda.steps.common import text_encoder

        family, theta, meta = load_model(self.run.output("model").model_dir)
        train = self.data.filter(pl.col("split") == "train").head(rows)
        X, y = text_encoder(meta["tokenizer"], meta["max_len"])(
            train["prompt"].to_list(), train["response"].to_list()
        )
        texts = self.exp.texts[:rows]
        self.base.embed(texts[:64], 128)  # warm
        t0 = time.perf_counter()
        self.base.embed(texts, 128)
        out = [
            {
                "model": "airrep (MiniLM 22.7M, 384-d)",
                "lm_parameters": None,
                "examples_per_second": rows / (time.perf_counter() - t0),
            }
        ]
        lms = [("scored GPT-2", family, theta)]
        for n_layer, n_embd in ((4, 256), (8, 512)):
            wide = CausalLM(
                vocab_size=family.vocab_size,
                pad_id=family.pad_id,
                eos_id=family.eos_id,
                n_layer=n_layer,
                n_embd=n_embd,
                n_head=8,
                n_positions=64,
            )
            lms.append((f"GPT-2 {n_layer}×{n_embd}", wide, wide.init_params(0)))
        for name, lm, params in lms:
            n_linear = 4 * lm.model.config.n_layer
            for label, projection in (
                (
                    "logra 8×6 (384-d)" if n_linear == 8 else f"logra (384-d: {n_linear} layers × 4×3)",
                    Projection("logra", k_in=8, k_out=6)
                    if n_linear == 8
                    else Projection("logra", k_in=4, k_out=3),
                ),
                ("logra 16×16", Projection("logra", k_in=16, k_out=16)),
                ("trak k=384", Projection("trak", k=384)),
            ):
                if label.startswith("trak") and lm.n_params > 5_000_000:
                    continue  # a dense projection of a 27M gradient: slower still, not needed here
                featurize(lm, params, X[:32], y[:32], projection, 32)  # warm
                t0 = time.perf_counter()
                featurize(lm, params, X, y, projection, 32)
                out.append(
                    {
                        "model": f"{label}, {name}",
                        "lm_parameters": lm.n_params,
                        "examples_per_second": rows / (time.perf_counter() - t0),
                    }
                )
                print(json.dumps(out[-1]), flush=True)
        return out

    def steps(self, chosen: dict) -> list[dict]:
        """Longer training and larger episodes (projection training is cheap: ~10 s per 300 steps)."""
        rows = [self.train(f"airrep {n} steps", steps=n, **chosen) for n in (1000, 3000)]
        rows.append(
            self.train("airrep 1000 steps, episodes 64 targets × 16 subsets", steps=1000,
                       targets_per_episode=64, subsets_per_episode=16, **chosen)
        )  # fmt: skip
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=str(ROOT / "tda-store"))
    parser.add_argument("--run", default=None)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--chosen", default="{}", help="JSON of the chosen recipe changes (temperature, ...)")
    parser.add_argument(
        "--layer-steps", type=int, default=60, help="steps of the last-layer / all-layer runs"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "airrep_study.json"))
    args = parser.parse_args()
    study = Study(args.store, args.run, args.threads)
    chosen = json.loads(args.chosen)
    out_file = Path(args.out)
    result = json.loads(out_file.read_text()) if out_file.is_file() else {}
    if result.get("run") != study.run.record.run_id:
        result = {}
    parts = [p for p in args.parts.split(",") if p]
    for part in parts:
        if part not in PARTS:
            raise SystemExit(f"--parts: unknown part {part!r}; choose from {', '.join(PARTS)}")
    baseline_names = ["untrained", "repsim"]
    if "baselines" in parts or any(p != "baselines" for p in parts):
        rows = study.baselines()  # the reference per-target values the paired intervals need
        if "baselines" in parts:
            result["baselines"] = rows
    for part in parts:
        if part == "baselines":
            continue
        if part == "temperature":
            rows = study.temperature()
        elif part == "labels":
            rows = study.labels(chosen)
        elif part == "targets":
            rows = study.targets(chosen)
        elif part == "subsets":
            rows = study.subsets_part(chosen)
        elif part == "trainable":
            rows = study.trainable(chosen, args.layer_steps)
        elif part == "last_layer":
            rows = study.last_layer(chosen)
        elif part == "cost":
            result[part] = study.cost()
            continue
        else:
            rows = study.steps(chosen)
        for row in rows:
            names = [f"{row['model']} @ step 0", *baseline_names]
            row["paired"] = [study.paired(row["model"], b) for b in names]
            best_gradient = max(
                (r for r in result.get("baselines", []) if "examples_per_second" in r),
                key=lambda r: r["attention"],
                default=None,
            )
            if best_gradient is not None and best_gradient["model"] in study.per_target:
                row["paired"].append(study.paired(row["model"], best_gradient["model"]))
        result[part] = rows
    result |= {
        "run": study.run.record.run_id,
        "store": args.store,
        "recipe": study.config.__dict__,
        "chosen": chosen,
        "heldout_targets": len(study.heldout),
        "fit_targets": int((study.exp.target_role == "fit").sum()),
        "val_targets": int((study.exp.target_role == "val").sum()),
        "eval_subsets": int(study.subsets.filter(pl.col("purpose") == "eval")["subset_id"].n_unique()),
        "machine": {"threads": torch.get_num_threads(), "python": platform.python_version()},
    }
    out_file.write_text(json.dumps(result, indent=2, default=float) + "\n")
    table = [
        {"part": part, "model": r["model"], "lds_attention": r.get("attention"),
         "low": r.get("attention_low"), "high": r.get("attention_high"), "lds_sum": r.get("sum"),
         "val": r.get("val_lds")}
        for part in PARTS if part in result for r in result[part]
    ]  # fmt: skip
    with pl.Config(tbl_rows=100, fmt_str_lengths=60):
        print(pl.DataFrame(table))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
