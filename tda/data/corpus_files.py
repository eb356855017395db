"""Finding and reading a corpus's files: one file, a folder of shards, or a `save_to_disk` folder.

Each file is read whole into a `Shard` (its raw frame, no column mapping yet); what cannot be read is
a one-line `DataError` at the file and line (JSONL, CSV: 1-based) that says how to fix it. `where`
names a row of a shard for the messages of `tda.data.corpus`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from tda.data.saved_datasets import is_saved_dataset, read_arrow, saved_dataset_files
from tda.errors import DataError

SUFFIXES = {
    "jsonl": (".jsonl", ".ndjson"),
    "parquet": (".parquet", ".pq"),
    "csv": (".csv",),
    "arrow": (".arrow",),
}
FORMAT_ALIASES = {
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "json": "jsonl",
    "parquet": "parquet",
    "pq": "parquet",
    "csv": "csv",
    "arrow": "arrow",
}
SUPPORTED = ".jsonl/.ndjson, .parquet, .csv or .arrow"
BOM = b"\xef\xbb\xbf"
JSON_TYPES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


@dataclass(frozen=True)
class Shard:
    """One file as read: its raw frame, before any column mapping or checks."""

    path: Path
    format: str
    frame: pl.DataFrame
    dict_split: str | None = None  # the DatasetDict split the file belongs to


# --- finding and reading files ----------------------------------------------------------------
def format_name(format: str | None) -> str | None:
    if format is None:
        return None
    name = FORMAT_ALIASES.get(format.strip().lower())
    if name is None:
        raise DataError(f"format {format!r} is not supported; use jsonl, parquet or csv (or leave it unset)")
    return name


def _format_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return next((fmt for fmt, suffixes in SUFFIXES.items() if suffix in suffixes), None)


def shard_files(root: Path, chosen: str | None) -> list[tuple[Path, str, str | None]]:
    """(file, format, DatasetDict split) of a single file, a save_to_disk folder's Arrow files, or a
    folder's shards in sorted name order."""
    if root.is_dir() and chosen in (None, "arrow") and is_saved_dataset(root):
        return [(file, "arrow", split) for file, split in saved_dataset_files(root)]
    if root.is_file():
        fmt = chosen or _format_of(root)
        if fmt is None:
            raise DataError(
                f"{root}: file type {root.suffix or '(none)'!r} is not supported; "
                f"use a {SUPPORTED} file, or set format"
            )
        return [(root, fmt, None)]
    if not root.is_dir():
        raise DataError(f"{root}: no such file or folder; check the path")
    visible = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    found = [(p, _format_of(p)) for p in visible]
    found = [(p, fmt) for p, fmt in found if fmt is not None and fmt == (chosen or fmt)]
    if not found:
        wanted = ", ".join(SUFFIXES[chosen]) if chosen else SUPPORTED
        raise DataError(f"{root}: the folder holds no {wanted} files; add shards or point path at a file")
    formats = sorted({fmt for _, fmt in found})
    if len(formats) > 1:
        raise DataError(
            f"{root}: the folder mixes formats ({', '.join(formats)}); keep shards of one format, "
            "or set format to read only one of them"
        )
    return [(p, fmt, None) for p, fmt in found]


def read_shard(path: Path, fmt: str, dict_split: str | None) -> Shard:
    if fmt == "parquet":
        try:
            return Shard(path, fmt, pl.read_parquet(path))
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise DataError(f"{path}: unreadable parquet file ({_reason(exc)}); fix or re-export it") from exc
    if fmt == "arrow":
        return Shard(path, fmt, read_arrow(path), dict_split)
    data = _utf8_bytes(path)
    frame = _read_jsonl(path, data) if fmt == "jsonl" else _read_csv(path, data)
    return Shard(path, fmt, frame)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _utf8_bytes(path: Path) -> bytes:
    """The file's bytes without a UTF-8 byte-order mark; DataError at the line of the first bad byte."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: unreadable file ({_reason(exc)}); check its permissions") from exc
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: byte 0x{data[exc.start]:02x} is not valid UTF-8; "
            "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from exc
    return data.removeprefix(BOM)


def _read_jsonl(path: Path, data: bytes) -> pl.DataFrame:
    """Polars' fast reader; on failure a line-by-line scan names the first bad line."""
    if not data.strip():
        return pl.DataFrame()
    try:
        return pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
    except pl.exceptions.PolarsError as exc:
        records = _json_records(path, data.decode("utf-8"))
        try:
            return pl.from_dicts(records, infer_schema_length=None, strict=False)
        except (pl.exceptions.PolarsError, TypeError, ValueError) as again:
            raise DataError(
                f"{path}: unreadable JSONL ({_reason(exc)}); give each field one type on every line"
            ) from again


def _json_records(path: Path, text: str) -> list[dict]:
    """Every non-blank line parsed as a JSON object; DataError at the first line that is not one."""
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno}); "
                "write one JSON object per line"
            ) from exc
        if not isinstance(record, dict):
            kind = JSON_TYPES.get(type(record), "value")
            raise DataError(
                f"{path}:{number}: the line holds a JSON {kind}, not an object; "
                'write one object per line, e.g. {"prompt": "…", "response": "…"}'
            )
        records.append(record)
    return records


def _read_csv(path: Path, data: bytes) -> pl.DataFrame:
    """Every column as strings (a numeric-looking response stays text)."""
    if not data.strip():
        return pl.DataFrame()
    try:
        return pl.read_csv(io.BytesIO(data), infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        line, fields, expected = _ragged_csv_line(data.decode("utf-8"))
        if line is not None:
            raise DataError(
                f"{path}:{line}: {fields} fields but the header has {expected}; "
                'quote fields that contain commas ("a, b")'
            ) from exc
        raise DataError(f"{path}: unreadable CSV ({_reason(exc)}); fix or re-export it") from exc


def _ragged_csv_line(text: str) -> tuple[int | None, int, int]:
    """(line, fields, header fields) of the first CSV record whose width differs from the header's."""
    records = _csv_records(text)
    header = next(records, (1, []))[1]
    for line, record in records:
        if record and len(record) != len(header):
            return line, len(record), len(header)
    return None, 0, len(header)


def _csv_records(text: str):
    """(first line, fields) of every CSV record, the header included; blank lines are empty records."""
    reader = csv.reader(io.StringIO(text, newline=""))
    previous = 0
    for record in reader:
        yield previous + 1, record
        previous = reader.line_num


# --- locations for messages -------------------------------------------------------------------
def where(shard: Shard, row: int) -> str:
    """`file:line` (1-based, JSONL/CSV) or `file: row r` (0-based, Parquet/Arrow) of a shard's row."""
    if shard.format in ("parquet", "arrow"):
        return f"{shard.path}: row {row}"
    text = shard.path.read_bytes().removeprefix(BOM).decode("utf-8")
    if shard.format == "jsonl":
        lines = (n for n, line in enumerate(text.split("\n"), start=1) if line.strip())
    else:
        lines = (line for line, _ in list(_csv_records(text))[1:])
    return f"{shard.path}:{next(n for i, n in enumerate(lines) if i == row)}"


def listing(frame: pl.DataFrame) -> str:
    return ", ".join(map(repr, frame.columns)) or "(none)"
