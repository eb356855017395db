"""AirRep training checkpoints as data only: a safetensors file for the tensors, JSON for the rest.

Nothing here unpickles: the checkpoint folder lies in a shared store under a key anyone can compute
from a spec, so whatever it holds is read as numbers and text, never as code.

Layout, one folder per checkpoint (`checkpoints/step-0000020/`):

    state.json           {"format", "names", "state", "best_params", "optimizer", "tensors"}
    tensors.safetensors  params/<name>, best_params/<name>, optimizer/<i>  (<i>: a running number)

`state` holds the training state's fields (step, history, best_lds, …; JSON as Python writes it, so
NaN and -Infinity survive), `names` the trained parameters in order, `optimizer` the optimizer's
state_dict with every tensor replaced by {"tensor": "optimizer/<i>"}, every tuple by {"tuple": […]}
and every dict by {"dict": [[key, value], …]} (keys stay ints), so `load_state_dict` gets back exactly
what `state_dict` gave. `tensors.sha256` is the tensors file's digest.

Writing is atomic: both files go into a hidden `.step-….tmp` folder that is renamed into place, so a
`step-*` folder is always a complete pair; only the last two are kept. A checkpoint that cannot be
read, does not match its digest or is not of this format is a `DataError` naming it and saying to
delete it. Pickle checkpoints of earlier versions (`step-*.pt`) are never loaded: `legacy_checkpoints`
lists them so the caller can say they were skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from tda.errors import DataError

FORMAT = "tda.airrep.checkpoint/1"
STATE_FILE, TENSORS_FILE = "state.json", "tensors.safetensors"
NAME = re.compile(r"step-(\d+)")
KEEP = 2


@dataclass
class Checkpoint:
    """What a checkpoint holds; `state` is JSON-able (the training state's fields)."""

    names: list[str]
    state: dict[str, Any]
    params: dict[str, Tensor]
    best_params: dict[str, Tensor] | None
    optimizer: dict[str, Any]  # an optimizer's state_dict()


def checkpoints(folder: Path | None) -> list[Path]:
    """The `step-<n>` entries of `folder`, oldest first (by step, not by name)."""
    if folder is None or not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path | None) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def legacy_checkpoints(folder: Path | None) -> list[Path]:
    """Pickle checkpoints of earlier versions: never loaded (unpickling runs code)."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(folder.glob("step-*.pt"))


# --------------------------------------------------------------------------- writing


def write_checkpoint(folder: Path, step: int, checkpoint: Checkpoint) -> Path:
    """Write `step-<step>` atomically into `folder` and keep only the last two checkpoints."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"params/{k}": v for k, v in checkpoint.params.items()}
    tensors |= {f"best_params/{k}": v for k, v in (checkpoint.best_params or {}).items()}
    optimizer = _encode(checkpoint.optimizer, tensors)
    copies = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}  # none shared
    save_file(copies, str(tmp / TENSORS_FILE))
    meta = {
        "format": FORMAT,
        "names": checkpoint.names,
        "state": checkpoint.state,
        "best_params": checkpoint.best_params is not None,
        "optimizer": optimizer,
        "tensors": {"file": TENSORS_FILE, "sha256": _sha256(tmp / TENSORS_FILE)},
    }
    (tmp / STATE_FILE).write_text(json.dumps(meta), encoding="utf-8")
    if path.is_dir():  # the same step written again: replace it
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    tmp.rename(path)
    for old in checkpoints(folder)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _encode(value: Any, tensors: dict[str, Tensor]) -> Any:
    """JSON for a state_dict-like value; its tensors are added to `tensors` as optimizer/<i>."""
    if isinstance(value, Tensor):
        key = f"optimizer/{len(tensors)}"  # unique: every tensor added makes the dict longer
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        return {"dict": [[_key(k), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint: cannot store a {type(value).__name__} in JSON")


def _key(key: Any) -> str | int:
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    raise TypeError(f"checkpoint: cannot store a dict key of type {type(key).__name__} in JSON")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in folder `path`; DataError (one line, naming it) if it is not a sound one."""
    meta = _read_meta(path)
    tensors = _read_tensors(path, meta)
    try:
        names = [str(n) for n in meta["names"]]
        best = {k: tensors[f"best_params/{k}"] for k in names} if meta["best_params"] else None
        return Checkpoint(
            names=names,
            state=dict(meta["state"]),
            params={k: tensors[f"params/{k}"] for k in names},
            best_params=best,
            optimizer=_decode(meta["optimizer"], tensors),
        )
    except (KeyError, TypeError, ValueError, IndexError, RecursionError) as exc:
        raise unreadable(path, f"malformed {STATE_FILE} ({_reason(exc)})") from None


def unreadable(path: Path, reason: str) -> DataError:
    return DataError(
        f"checkpoint {path}: {reason}; delete {path} to resume from an earlier checkpoint (or from the start)"
    )


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise unreadable(path, "not a checkpoint folder")
    try:
        meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise unreadable(path, f"unreadable {STATE_FILE} ({_reason(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise unreadable(path, f"{STATE_FILE} is not of format {FORMAT} (found {found!r})")
    return meta


def _read_tensors(path: Path, meta: dict[str, Any]) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / TENSORS_FILE
    expected = meta["tensors"].get("sha256") if isinstance(meta.get("tensors"), dict) else None
    try:
        digest = _sha256(file)
    except OSError as exc:
        raise unreadable(path, f"unreadable {TENSORS_FILE} ({_reason(exc)})") from None
    if digest != expected:
        raise unreadable(path, f"{TENSORS_FILE} does not match the sha256 in {STATE_FILE}")
    try:
        return load_file(str(file), device="cpu")
    except (OSError, SafetensorError, ValueError) as exc:
        raise unreadable(path, f"unreadable {TENSORS_FILE} ({_reason(exc)})") from None


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if value.keys() == {"tensor"}:
        return tensors[value["tensor"]]
    if value.keys() == {"tuple"}:
        return tuple(_decode(v, tensors) for v in value["tuple"])
    if value.keys() == {"dict"}:
        return {_key(k): _decode(v, tensors) for k, v in value["dict"]}
    raise ValueError(f"unknown JSON object with keys {sorted(value)}")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
