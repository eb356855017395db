"""Causal-LM checkpoints as users bring them: a local transformers folder with its own tokenizer.

`check_checkpoint` says, in one line each, what makes a folder unusable before anything runs:

- not a causal LM: `config.json` names an encoder (e.g. `BertModel`) or a model type that
  transformers does not map to a causal LM;
- no weights: neither `model.safetensors` nor a `model.safetensors.index.json` whose every shard is
  present (a folder with only pickled `pytorch_model.bin` weights is refused: nothing a user or a
  store provides is ever unpickled; convert it with `save_pretrained(..., safe_serialization=True)`);
- no tokenizer, or a tokenizer without an eos token;
- a tokenizer of another vocabulary: an id beyond the model's embedding rows, or more embedding rows
  than the padding checkpoints add to their vocabulary (see `check_vocabulary`);
- examples longer than the model's positions (`max_len` above `n_positions`/`max_position_embeddings`).

The weights are never copied: a step records the folder and its fingerprint (every file's name, size
and modification time) and loads it in place.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tda.errors import ModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checked checkpoint folder holds."""

    folder: Path
    tokenizer: Path
    model_type: str
    architecture: str
    embedding_rows: int
    vocabulary: int
    positions: int | None


def check_checkpoint(
    folder: str | Path, tokenizer: str | Path | None = None, max_len: int | None = None
) -> CheckpointInfo:
    """Check a causal-LM folder (and its tokenizer) without loading its weights; ModelError if unusable."""
    folder = Path(folder)
    config = _config(folder)
    model_type, architecture = _causal_lm(folder, config)
    _check_weights(folder)
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else folder
    loaded = _tokenizer(tokenizer_dir, own=tokenizer is None)
    rows = config.get("vocab_size")
    if not isinstance(rows, int):
        raise ModelError(f"{folder}/config.json: no integer vocab_size; give a causal-LM config with one")
    check_vocabulary(len(loaded), _largest_id(loaded), rows, folder, tokenizer_dir)
    positions = _positions(config)
    if max_len is not None and positions is not None and max_len > positions:
        raise ModelError(
            f"{folder}: examples of max_len={max_len} tokens exceed the model's {positions} positions; "
            f"set max_len to at most {positions}"
        )
    return CheckpointInfo(folder, tokenizer_dir, model_type, architecture, rows, len(loaded), positions)


def check_vocabulary(size: int, largest: int, rows: int, model: Path | str, tokenizer: Path | str) -> None:
    """ModelError unless a tokenizer of `size` entries (largest id `largest`) is the one of a model with
    `rows` embeddings: every id has a row, and the rows are the vocabulary itself or it padded to a
    multiple of 8 by at most 2% (Pythia: 50277 → 50304, Qwen2: 151665 → 151936, Phi-2: 50295 → 51200)."""
    padded = rows % 8 == 0 and 0 < rows - size <= rows // 50
    if largest >= rows or (rows != size and not padded):
        raise ModelError(
            f"{tokenizer}: the tokenizer has {size} tokens but the model {model} has {rows} embedding rows; "
            "give the tokenizer the model was trained with"
        )


def fingerprint(folder: str | Path) -> str:
    """sha256 of every file's relative name, size and modification time (a change re-runs the step)."""
    folder = Path(folder)
    entries = [
        f"{p.relative_to(folder).as_posix()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such folder; give a local transformers causal-LM folder")
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{folder}: no config.json; give a transformers folder (save_pretrained)") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable ({exc}); save the model again") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a JSON object; save the model again")
    return config


def _causal_lm(folder: Path, config: dict[str, Any]) -> tuple[str, str]:
    """(model_type, architecture class) of a causal LM; ModelError for an encoder or an unknown type."""
    model_type = str(config.get("model_type") or "")
    listed = config.get("architectures") or []
    architectures = [str(a) for a in listed] if isinstance(listed, list) else [str(listed)]
    causal = [a for a in architectures if a.endswith(CAUSAL_SUFFIXES)]
    if architectures and not causal:
        raise ModelError(
            f"{folder}: holds a {architectures[0]}, not a causal LM; give a folder saved from "
            "AutoModelForCausalLM (e.g. GPT2LMHeadModel, LlamaForCausalLM)"
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if causal and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return model_type, causal[0]
    if causal:  # transformers builds the model from model_type; remote code is never run
        raise ModelError(
            f"{folder}/config.json: model_type {model_type or 'missing'!r} (architecture {causal[0]}) is not "
            "a causal LM that this transformers knows; give a supported architecture (e.g. gpt2, llama), "
            "or upgrade transformers"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"{folder}: model_type {model_type or 'missing'!r} is not a causal LM that transformers knows; "
            "give a folder saved from AutoModelForCausalLM"
        )
    return model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def _check_weights(folder: Path) -> None:
    if (folder / "model.safetensors").is_file():
        check_safetensors(folder / "model.safetensors")
        return
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            if not shards or not all(isinstance(s, str) and "/" not in s for s in shards):
                raise ValueError("weight_map must map tensor names to shard file names in this folder")
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ModelError(f"{index}: unreadable index ({exc}); save the model again") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelError(
                f"{folder}: shard {missing[0]} of {len(shards)} is missing (named in {index.name}); "
                "copy the whole checkpoint"
            )
        for shard in shards:
            check_safetensors(folder / shard)
        return
    if any(folder.glob("pytorch_model*.bin")):
        raise ModelError(
            f"{folder}: only pickled pytorch_model.bin weights; convert them to safetensors "
            "(model.save_pretrained(folder, safe_serialization=True)): pickles are never loaded"
        )
    raise ModelError(f"{folder}: no weights (model.safetensors); give a complete transformers folder")


def check_safetensors(path: Path) -> None:
    """ModelError unless `path` is a whole safetensors file: an 8-byte header length, a JSON header, and
    exactly the bytes its tensors' offsets name (a truncated copy or another format fails here, in one
    line, instead of when the weights are loaded). Reads the header only."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(size - 8, 100_000_000):
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"{path}: not a safetensors file ({reason}); copy the checkpoint again or save it with "
            "save_pretrained(..., safe_serialization=True)"
        ) from None
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        raise ModelError(
            f"{path}: truncated or damaged: {size:,} bytes but its header needs {expected:,}; copy the "
            "checkpoint again"
        )


def _tokenizer(folder: Path, own: bool) -> Any:
    from tda.models.tokenizer import load_tokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        hint = (
            "save the tokenizer beside the model, or give `tokenizer:`" if own else "give a tokenizer folder"
        )
        raise ModelError(f"{folder}: no tokenizer (tokenizer.json or tokenizer_config.json); {hint}")
    return load_tokenizer(folder)


def _largest_id(tokenizer: Any) -> int:
    vocab = tokenizer.get_vocab()
    return max(vocab.values()) if vocab else -1


def _positions(config: dict[str, Any]) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None
