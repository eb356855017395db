"""Model families (least squares, logistic regression, MLP, causal LM) and their on-disk form.

A saved model is a folder. The small families keep their flat parameter vector:

    params.safetensors   one float64 tensor "theta" (d,)
    config.json          {"family": family.config(), "meta": {...}}   (meta: anything JSON-ready)

A causal LM is an ordinary transformers folder that any tool loads (`AutoModelForCausalLM` and
`AutoTokenizer.from_pretrained(folder)`), plus this project's record of how it was made:

    config.json, model.safetensors          the model (save_pretrained)
    tokenizer.json, tokenizer_config.json…  its tokenizer, saved beside it by the step
    tda_model.json                          {"family": family.config(), "meta": {...}, "weights": "."}

A checkpoint used as it is holds only `tda_model.json`, whose "weights" and "tokenizer" name the
user's folders (never copied) and whose "fingerprint" must still match them when it is loaded. The flat
θ of an LM is an internal representation for the exact methods, made from the weights when loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from tda.errors import ModelError
from tda.models.base import FitResult, ModelFamily
from tda.models.causal_lm import CausalLM
from tda.models.least_squares import LeastSquares
from tda.models.logistic import LogisticRegression
from tda.models.mlp import MLP

__all__ = [
    "FAMILIES",
    "CausalLM",
    "MLP",
    "FitResult",
    "LeastSquares",
    "LogisticRegression",
    "ModelFamily",
    "family_from_config",
    "load_model",
    "save_model",
    "save_reference",
]

FAMILIES: dict[str, type[ModelFamily]] = {
    "causal_lm": CausalLM,
    "least_squares": LeastSquares,
    "logistic_regression": LogisticRegression,
    "mlp": MLP,
}
PARAMS_FILE, CONFIG_FILE, LM_FILE = "params.safetensors", "config.json", "tda_model.json"


def family_from_config(config: dict[str, Any]) -> ModelFamily:
    """The family a `family.config()` dict describes; ModelError for an unknown family or missing field."""
    name = config.get("family") if isinstance(config, dict) else None
    if name not in FAMILIES:
        raise ModelError(f"family {name!r} is unknown; known: {', '.join(sorted(FAMILIES))}")
    try:
        return FAMILIES[name].from_config(config)
    except KeyError as exc:
        raise ModelError(f"family {name!r}: config lacks field {exc.args[0]!r}; add it") from exc
    except TypeError as exc:
        raise ModelError(
            f"family {name!r}: config does not fit its constructor ({exc}); fix the fields"
        ) from exc


def save_model(folder: Path, family: ModelFamily, theta: Tensor, meta: dict[str, Any]) -> None:
    """Write a model folder: a causal LM as a transformers folder (weights in the family's dtype) and
    `tda_model.json`, another family as `params.safetensors` (key "theta", float64) and `config.json`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(family, CausalLM):
        family.save_pretrained(theta, folder)
        _write_json(
            folder / LM_FILE,
            {"family": {**family.config(), "pretrained": None}, "meta": meta, "weights": "."},
        )
        return
    save_file({"theta": theta.detach().to(torch.float64).cpu().contiguous()}, str(folder / PARAMS_FILE))
    _write_json(folder / CONFIG_FILE, {"family": family.config(), "meta": meta})


def save_reference(
    folder: Path, family: CausalLM, meta: dict[str, Any], weights: Path, tokenizer: Path, print_: str
) -> None:
    """Record a causal LM used in place: `folder/tda_model.json` names its weights and tokenizer
    folders and their fingerprint; nothing is copied."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "family": {**family.config(), "pretrained": None},
        "meta": {**meta, "tokenizer": str(tokenizer)},
        "weights": str(weights),
        "fingerprint": print_,
    }
    _write_json(folder / LM_FILE, document)


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def load_model(folder: Path) -> tuple[ModelFamily, Tensor, dict[str, Any]]:
    """Read a folder written by `save_model`: (family, θ (d,) float64, meta).

    Raises:
        ModelError: the folder or a file is missing or unreadable, the family is unknown, or θ does
            not have the length the family expects.
    """
    folder = Path(folder)
    config_path, params_path = folder / CONFIG_FILE, folder / PARAMS_FILE
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such model folder; check the path or train the model first")
    if (folder / LM_FILE).is_file():
        return _load_lm(folder)
    for path in (config_path, params_path):
        if not path.is_file():
            raise ModelError(f"{path}: missing; the folder is not a saved model (see tda.models.save_model)")
    document = _read_config(config_path)
    try:
        family = family_from_config(document["family"])
    except ModelError as exc:
        raise ModelError(f"{config_path}: {exc}") from exc
    theta = _read_theta(params_path)
    expected = family.init_params(0).numel()
    if theta.shape != (expected,):
        raise ModelError(
            f"{params_path}: theta has shape {tuple(theta.shape)} but family {family.name!r} with this "
            f"config has {expected} parameters; save the model again"
        )
    return family, theta, document.get("meta", {})


def _load_lm(folder: Path) -> tuple[ModelFamily, Tensor, dict[str, Any]]:
    """A causal LM folder (or a record of one used in place): (family, θ (d,) float64, meta); meta's
    "tokenizer" becomes an absolute folder."""
    from tda.models.checkpoint import fingerprint

    document = _read_config(folder / LM_FILE)
    weights = folder / document.get("weights", ".")  # an absolute path stays as it is
    recorded = document.get("fingerprint")
    if recorded is not None and fingerprint(weights) != recorded:
        raise ModelError(
            f"{weights}: the checkpoint changed after it was recorded in {folder / LM_FILE}; "
            "run the spec again so that every step uses the same weights"
        )
    try:
        family = family_from_config({**document["family"], "pretrained": str(weights)})
    except ModelError as exc:
        raise ModelError(f"{folder / LM_FILE}: {exc}") from exc
    meta = dict(document.get("meta", {}))
    if "tokenizer" in meta:
        meta["tokenizer"] = str(folder / meta["tokenizer"])
    return family, family.init_params(0).to(torch.float64), meta


def _read_config(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable JSON ({exc}); save the model again") from exc
    if not isinstance(document, dict) or not isinstance(document.get("family"), dict):
        raise ModelError(f"{path}: no 'family' object; expected {{'family': {{...}}, 'meta': {{...}}}}")
    return document


def _read_theta(path: Path) -> Tensor:
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"{path}: unreadable safetensors file ({exc}); save the model again") from exc
    if "theta" not in tensors:
        raise ModelError(f"{path}: no tensor 'theta' (found {sorted(tensors)}); save the model again")
    return tensors["theta"].to(torch.float64)
