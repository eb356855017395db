"""Model families (least squares, logistic regression, MLP, causal LM) and their on-disk form.

A saved model is a folder:

    params.safetensors   one float64 tensor "theta" (d,)
    config.json          {"family": family.config(), "meta": {...}}   (meta: anything JSON-ready)
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
]

FAMILIES: dict[str, type[ModelFamily]] = {
    "causal_lm": CausalLM,
    "least_squares": LeastSquares,
    "logistic_regression": LogisticRegression,
    "mlp": MLP,
}
PARAMS_FILE, CONFIG_FILE = "params.safetensors", "config.json"


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
    """Write `folder/params.safetensors` (key "theta", float64) and `folder/config.json`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"theta": theta.detach().to(torch.float64).cpu().contiguous()}, str(folder / PARAMS_FILE))
    document = {"family": family.config(), "meta": meta}
    (folder / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


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
