"""Folders written by Hugging Face `datasets`' `save_to_disk`, read with pyarrow alone.

A `Dataset` folder holds `state.json`, `dataset_info.json` and its rows in Arrow IPC *stream* files
(`data-00000-of-0000N.arrow`, or `dataset.arrow` from old versions), listed in order under
`state.json`'s `_data_files`. A `DatasetDict` folder holds `dataset_dict.json` (`{"splits": [...]}`)
and one `Dataset` folder per split, named after it. The rows are read as stored: a format set with
`set_format`/`with_format` changes only how `datasets` hands values out, so it is ignored, and
`ClassLabel` columns stay the integers they are stored as. The `datasets` package is not needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa

from tda.errors import DataError

STATE = "state.json"
DATASET_DICT = "dataset_dict.json"
RESAVE = "re-save it with datasets' save_to_disk"


def is_saved_dataset(folder: Path) -> bool:
    """Whether `folder` is a `save_to_disk` folder (a `Dataset` or a `DatasetDict`)."""
    return (folder / STATE).is_file() or (folder / DATASET_DICT).is_file()


def saved_dataset_files(folder: Path) -> list[tuple[Path, str | None]]:
    """(Arrow file, the `DatasetDict` split it belongs to or None) in the order `datasets` reads them."""
    if (folder / STATE).is_file():
        return [(file, None) for file in _dataset_files(folder)]
    splits = _json(folder / DATASET_DICT).get("splits")
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) and s for s in splits):
        raise DataError(f"{folder / DATASET_DICT}: `splits` is not a list of split names; {RESAVE}")
    files = []
    for split in splits:
        part = folder / split
        if not (part / STATE).is_file():
            raise DataError(
                f"{part}: split {split!r} of {folder / DATASET_DICT} has no {STATE}; {RESAVE}, "
                "or point path at one split's folder"
            )
        files += [(file, split) for file in _dataset_files(part)]
    return files


def read_arrow(path: Path) -> pl.DataFrame:
    """One Arrow IPC file (stream format, as `datasets` writes it, or file format) as a Polars frame."""
    try:
        with pa.memory_map(str(path)) as source:
            table = _ipc_table(source)
        return pl.from_arrow(table.replace_schema_metadata(None))  # type: ignore[return-value]
    except (OSError, pa.ArrowException, pl.exceptions.PolarsError, TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{path}: unreadable Arrow file ({reason}); {RESAVE} or export it to Parquet"
        ) from exc


def _ipc_table(source: pa.NativeFile) -> pa.Table:
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def _dataset_files(folder: Path) -> list[Path]:
    """The Arrow files that `state.json` lists, checked to be plain names of files that exist."""
    state_path = folder / STATE
    state = _json(state_path)
    if state.get("_indices_data_files"):
        raise DataError(
            f"{state_path}: the dataset was saved with an indices mapping (old datasets versions); "
            "re-save it after dataset.flatten_indices()"
        )
    listed = state.get("_data_files")
    if not isinstance(listed, list) or not listed:
        raise DataError(f"{state_path}: `_data_files` lists no Arrow files; {RESAVE}")
    files = []
    for entry in listed:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise DataError(f"{state_path}: `_data_files` entry {entry!r} is not a plain file name; {RESAVE}")
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: listed in {state_path} but missing; {RESAVE}")
        files.append(folder / name)
    return files


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable JSON ({exc}); {RESAVE}") from exc
    if not isinstance(value, dict):
        raise DataError(f"{path}: holds a JSON {type(value).__name__}, not an object; {RESAVE}")
    return value
