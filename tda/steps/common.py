"""What several step kinds share: loading a split tabular table as tensors, a trained model, fields."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
from pydantic import Field

from pipelines import StepContext
from tda.errors import DataError, ModelError

if TYPE_CHECKING:
    import torch


Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16"]


def device_field(what: str = "the step's task") -> Any:
    return Field(
        "auto",
        description=f"Where the model computes: auto = cuda when {what} reserves a GPU and one is visible, "
        "else cpu; cuda = a GPU or a one-line error; cpu.",
    )


def precision_field() -> Any:
    return Field(
        "fp32",
        description="bf16 = bfloat16 autocast of the forward passes on cuda (weights, gradients and "
        "optimizer stay float32); fp32 everywhere else.",
    )


def check_protocol(protocol: str, base: object, what: str) -> None:
    """Spec-time: protocol paper needs `base` (what `what` starts from); protocol local takes none."""
    if protocol == "paper" and base is None:
        raise ValueError(f"protocol paper needs `base:` (the model every {what} starts from)")
    if protocol == "local" and base is not None:
        raise ValueError("`base:` is for protocol paper; set protocol: paper or drop base")


def check_device(device: str, precision: str, gpus: float, where: str) -> None:
    """Spec-time: `device: cuda` needs GPUs reserved (`where` names the field); bf16 needs cuda."""
    if device == "cuda" and gpus <= 0:
        raise ValueError(
            f"device cuda needs {where} > 0 (a fraction such as 0.25 lets several tasks share one GPU)"
        )
    if precision == "bf16" and device == "cpu":
        raise ValueError("precision bf16 is an autocast on cuda; use device cuda (or auto) or fp32")


def resolve_device(device: str, gpus: float) -> torch.device:
    """The torch device of a task that reserved `gpus` GPUs; ModelError if cuda is asked and absent."""
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise ModelError(
            "device cuda: no CUDA device is visible to this task (torch.cuda.is_available() is False); "
            "run it on a GPU node with GPUs reserved, or set device: auto or cpu"
        )
    use_cuda = device == "cuda" or (device == "auto" and gpus > 0 and available)
    return torch.device("cuda" if use_cuda else "cpu")


def on_device(family: Any, device: str, precision: str, gpus: float) -> Any:
    """`family` moved to the task's device (a causal LM; other families stay on the CPU)."""
    if hasattr(family, "to") and hasattr(family, "bf16"):
        where = resolve_device(device, gpus)
        family.to(where, bf16=precision == "bf16" and where.type == "cuda")
    return family


def l2_field(default: float = 1e-2) -> Any:
    return Field(default, ge=0, description="L2 strength per example: λ_sum = n_train · l2 (see the docs).")


def damping_field() -> Any:
    return Field(0.0, ge=0, description="δ added to the mean Hessian (H̄ + δI) before inverting.")


@dataclass(frozen=True)
class Split:
    """The train and target rows of a split tabular table, as float64/int64 tensors."""

    train_ids: np.ndarray  # (n,)
    X_train: torch.Tensor  # (n, d)
    y_train: torch.Tensor  # (n,)
    target_ids: np.ndarray  # (m,)
    X_target: torch.Tensor  # (m, d)
    y_target: torch.Tensor  # (m,)

    @property
    def n(self) -> int:
        return len(self.train_ids)


Encoder = Callable[[list[str], list[str]], tuple["torch.Tensor", "torch.Tensor"]]


def load_split(ctx: StepContext, data: str, encode: Encoder | None = None) -> Split:
    """The split table of step `data` as tensors: tabular features and labels, or, for a text corpus
    (prompt/response columns), the token ids and response-only labels that `encode` makes."""
    table = ctx.table(data).collect()
    if "split" not in table.columns:
        raise DataError(
            f"step {data!r}: its table has no `split` column; "
            "put a `split` step between the data and this step"
        )
    train = table.filter(pl.col("split") == "train").sort("example_id")
    target = table.filter(pl.col("split") == "target").sort("example_id")
    if "prompt" in table.columns:
        if encode is None:
            raise DataError(
                f"step {data!r} is a text corpus; train a `causal_lm` model (with a tokenizer) on it"
            )
        X_train, y_train = encode(train["prompt"].to_list(), train["response"].to_list())
        X_target, y_target = encode(target["prompt"].to_list(), target["response"].to_list())
        train_ids, target_ids = train["example_id"].to_numpy(), target["example_id"].to_numpy()
        return Split(train_ids, X_train, y_train, target_ids, X_target, y_target)
    from tda.data.tabular import tabular_tensors

    train_ids, X_train, y_train = tabular_tensors(train)
    target_ids, X_target, y_target = tabular_tensors(target)
    return Split(train_ids.numpy(), X_train, y_train, target_ids.numpy(), X_target, y_target)


def text_encoder(tokenizer_dir: Path, max_len: int) -> Encoder:
    """Prompt/response pairs → (input ids, response-only labels) with a saved tokenizer."""
    from tda.models.tokenizer import encode_examples, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    return lambda prompts, responses: encode_examples(tokenizer, prompts, responses, max_len)


def trained_split(
    ctx: StepContext, model: str, data: str, same_rows: bool = True
) -> tuple[Split, Any, torch.Tensor, dict[str, Any]]:
    """(split, family, θ, meta): a `train_model` step's model and the data it was trained on, encoded the
    way it was trained (its tokenizer for a language model); checks the training rows match unless
    `same_rows` is False (a model featurising rows it was not trained on)."""
    from tda.models import load_model

    folder = ctx.input(model).model_dir
    family, theta, meta = load_model(folder)
    encode = text_encoder(folder / meta["tokenizer"], meta["max_len"]) if meta.get("tokenizer") else None
    split = load_split(ctx, data, encode)
    if same_rows and "n_train" in meta and meta["n_train"] != split.n:  # a checkpoint has no n_train
        raise ModelError(
            f"step {model!r} was trained on {meta.get('n_train')} rows "
            f"but the data has {split.n} train rows; "
            "give both steps the same `data`"
        )
    return split, family, theta, meta


@dataclass(frozen=True)
class Retraining:
    """What a retraining task needs: the family, the θ each fit starts from (θ*, a base's, or None for
    the family's initialisation), the encoded split, the objective's λ_sum, the training-row index of
    each group or subset and, per subset, the seed of its data order (None: the family's seed). Put in
    the object store once per step."""

    family: Any
    theta: torch.Tensor | None
    data: Split
    l2_sum: float
    index: list[torch.Tensor]
    seeds: list[int] | None = None

    def rows(self, batch: list[int]) -> list[torch.Tensor]:
        return [self.index[i] for i in batch]

    def batch_seeds(self, batch: list[int]) -> list[int] | None:
        return None if self.seeds is None else [self.seeds[i] for i in batch]


def batches(count: int, size: int) -> list[list[int]]:
    """0..count-1 in consecutive batches of `size`."""
    return [list(range(i, min(i + size, count))) for i in range(0, count, size)]


def set_threads(num_cpus: float) -> None:
    """Torch threads of a task = the CPUs it reserved (no oversubscription of cores)."""
    import torch

    threads = max(1, int(num_cpus))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def index_members(
    table: pl.DataFrame, key: str, train_ids: np.ndarray, what: str
) -> tuple[list[Any], list[torch.Tensor]]:
    """Values of `key` (sorted) and, per value, the row positions of its `example_id`s in the training
    split: for groups (key group_id) and subsets (key subset_id)."""
    import torch

    positions = pl.DataFrame({"example_id": train_ids.astype(np.int64), "_row": np.arange(len(train_ids))})
    joined = table.select(key, "example_id").join(positions, on="example_id", how="left")
    missing = joined.filter(pl.col("_row").is_null())
    if missing.height:
        first = missing.row(0, named=True)
        raise DataError(
            f"{what} {first[key]!r}: example_id {first['example_id']} (and {missing.height - 1} more) is not "
            f"in the training split; build the {what}s from the same `data` step"
        )
    members = joined.group_by(key, maintain_order=True).agg(pl.col("_row")).sort(key)
    return members[key].to_list(), [torch.tensor(rows, dtype=torch.long) for rows in members["_row"]]


Problems = list[tuple[tuple[str | int, ...], str]]


def check_features_ref(
    steps: Any, features: str | None, model: str | None, data: str | None, method: str | None = None
) -> Problems:
    """Spec-time (`StepParams.check_references`): `features` names a gradient_features step made from
    this step's `model` and `data`, with a projection `method` can use; (field, message) per problem."""
    if features is None or features not in steps:
        return []
    step = steps[features]
    if step.kind != "gradient_features":
        return [
            (
                ("features",),
                f"step {features!r} is a {step.kind} step, not gradient_features; name a gradient_features "
                "step",
            )
        ]
    for field, ours in (("model", model), ("data", data)):
        theirs = getattr(step, field, None)
        if ours is not None and theirs != ours:
            return [
                (
                    ("features",),
                    f"features {features!r} are made from {field} {theirs!r}, not from {ours!r} (this step's "
                    f"{field}); featurise {ours!r} (a gradient_features step with {field}: {ours})",
                )
            ]
    from tda.influence.feature_scores import FEATURE_METHODS

    needs = FEATURE_METHODS.get(method or "", (None, None))[1]
    kind = getattr(step, "projection", None)
    if needs is not None and kind not in needs:
        return [
            (
                ("method",),
                f"method {method} needs features with projection {' or '.join(needs)}, but step "
                f"{features!r} makes {kind} features; featurise with projection: {needs[0]}",
            )
        ]
    return []


def check_effects_ref(steps: Any, effects: str, subsets: str) -> Problems:
    """Spec-time: a subset_effects step named by `effects` measured the subsets this step reads."""
    step = steps.get(effects)
    theirs = getattr(step, "subsets", None)
    if step is None or step.kind != "subset_effects" or theirs == subsets:
        return []
    return [
        (
            ("effects",),
            f"effects {effects!r} measured the subsets of {theirs!r}, not {subsets!r} (this step's subsets); "
            f"name the same subsets step in both",
        )
    ]
