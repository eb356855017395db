"""Instruction corpora read into the project's *corpus* layout.

    example_id int64 | prompt str | response str | group str (may be null)

A source is one JSONL (`.jsonl`/`.ndjson`), Parquet (`.parquet`/`.pq`) or CSV file, or a folder of
such shards, all of one format, read in sorted file-name order (plain string order: name shards
`part-00000…` so that it is also the numeric order; names starting with `.` or `_` are skipped, and
so are files of other types, such as a `manifest.json`).

Two layouts are understood. Prompt/response: columns `prompt`, `response` and optionally `group`.
Alpaca: `instruction`, optional `input`, `output`; the prompt is the instruction followed by
"\\n\\n" + input when the input is not blank, the response is the output. `columns` maps corpus
fields to a file's own column names; a field it leaves out keeps its default name. Texts are kept
exactly as written (no stripping); a prompt or response that is null, empty or only whitespace is
an error. Numbers and booleans in text columns become strings; `group` may be of any scalar type.

Ids are `0..N-1` in file order (sorted shards, then rows), or the integers of `id_column`, which must
be unique. Every problem a user can cause raises `DataError` with one line naming the file, the line
(1-based, JSONL and CSV) or row (0-based, Parquet), the column and the fix; nothing is returned
partially.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import polars as pl

from tda.errors import DataError

SUFFIXES = {"jsonl": (".jsonl", ".ndjson"), "parquet": (".parquet", ".pq"), "csv": (".csv",)}
FORMAT_ALIASES = {
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "json": "jsonl",
    "parquet": "parquet",
    "pq": "parquet",
    "csv": "csv",
}
PROMPT_RESPONSE = ("prompt", "response", "group")
ALPACA = ("instruction", "input", "output")
FIELD_KEYS = PROMPT_RESPONSE + ALPACA
SUPPORTED = ".jsonl/.ndjson, .parquet or .csv"
CASTABLE_TEXT = (pl.Categorical, pl.Enum, pl.Boolean)
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


@dataclass(frozen=True)
class Layout:
    """Which file column feeds which field (`prompt`/`response` or `instruction`/`input`/`output`,
    and `group`), only for columns the file has."""

    columns: dict[str, str]

    @property
    def alpaca(self) -> bool:
        return "instruction" in self.columns


def load_corpus(
    path: str | Path,
    columns: dict[str, str] | None = None,
    format: str | None = None,
    id_column: str | None = None,
) -> pl.DataFrame:
    """Read an instruction corpus into the corpus layout.

    Args:
        path: a .jsonl/.ndjson, .parquet or .csv file, or a folder of shards of one of these formats.
        columns: corpus field -> the file's column, with keys `prompt`, `response`, `group` or, for the
            Alpaca layout, `instruction`, `input`, `output` (and `group`). None = `prompt`/`response`
            if the file has either, else `instruction`/`input`/`output`; `group` when present.
        format: `jsonl` (alias `ndjson`, `json`), `parquet` or `csv`; None = from the file suffix. With a
            folder, only that format's files are read.
        id_column: a column of unique integers to use as `example_id`; None = 0..N-1 in file order.

    Returns:
        The corpus: example_id int64, prompt str, response str, group str (null where there is none).

    Raises:
        DataError: a missing path or column, no supported files, an empty corpus, a null or blank
            prompt or response, non-integer or duplicate ids, undecodable bytes, invalid JSON.
    """
    root = Path(path)
    chosen = _format_name(format)
    _check_columns_argument(columns)
    read = [_read_shard(file, fmt) for file, fmt in _shard_files(root, chosen)]
    shards = [shard for shard in read if shard.frame.height > 0]
    if not shards:
        _raise_empty(root, read)
    parts = [_corpus_part(shard, _layout(shard, columns)) for shard in shards]
    table = pl.concat(parts, how="vertical")
    if id_column is None:
        ids = pl.int_range(0, table.height, dtype=pl.Int64, eager=True)
    else:
        ids = _ids_from_column(shards, id_column)
    return table.select(ids.alias("example_id"), "prompt", "response", "group")


# --- finding and reading files ----------------------------------------------------------------
def _format_name(format: str | None) -> str | None:
    if format is None:
        return None
    name = FORMAT_ALIASES.get(format.strip().lower())
    if name is None:
        raise DataError(f"format {format!r} is not supported; use jsonl, parquet or csv (or leave it unset)")
    return name


def _format_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return next((fmt for fmt, suffixes in SUFFIXES.items() if suffix in suffixes), None)


def _shard_files(root: Path, chosen: str | None) -> list[tuple[Path, str]]:
    """(file, format) of a single file, or of a folder's shards in sorted name order."""
    if root.is_file():
        fmt = chosen or _format_of(root)
        if fmt is None:
            raise DataError(
                f"{root}: file type {root.suffix or '(none)'!r} is not supported; "
                f"use a {SUPPORTED} file, or set format"
            )
        return [(root, fmt)]
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
    return found


def _read_shard(path: Path, fmt: str) -> Shard:
    if fmt == "parquet":
        try:
            return Shard(path, fmt, pl.read_parquet(path))
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise DataError(f"{path}: unreadable parquet file ({_reason(exc)}); fix or re-export it") from exc
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
def _where(shard: Shard, row: int) -> str:
    """`file:line` (1-based, JSONL/CSV) or `file: row r` (0-based, Parquet) of a shard's row."""
    if shard.format == "parquet":
        return f"{shard.path}: row {row}"
    text = shard.path.read_bytes().removeprefix(BOM).decode("utf-8")
    if shard.format == "jsonl":
        lines = (n for n, line in enumerate(text.split("\n"), start=1) if line.strip())
    else:
        lines = (line for line, _ in list(_csv_records(text))[1:])
    return f"{shard.path}:{next(n for i, n in enumerate(lines) if i == row)}"


def _listing(frame: pl.DataFrame) -> str:
    return ", ".join(map(repr, frame.columns)) or "(none)"


# --- column mapping and checks ----------------------------------------------------------------
def _check_columns_argument(columns: dict[str, str] | None) -> None:
    if columns is None:
        return
    unknown = sorted(set(columns) - set(FIELD_KEYS))
    if unknown:
        raise DataError(
            f"columns: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"use {', '.join(PROMPT_RESPONSE)} or, for the Alpaca layout, {', '.join(ALPACA)}"
        )
    if {"prompt", "response"} & set(columns) and set(ALPACA) & set(columns):
        raise DataError("columns: mixes prompt/response with instruction/input/output; map one layout only")
    bad = [key for key, value in columns.items() if not isinstance(value, str) or not value]
    if bad:
        raise DataError(f"columns.{bad[0]}: expected a column name, got {columns[bad[0]]!r}")


def _layout(shard: Shard, columns: dict[str, str] | None) -> Layout:
    """The shard's layout, every required column checked to exist."""
    given = dict(columns or {})
    names = set(shard.frame.columns)
    alpaca = bool(set(ALPACA) & set(given)) or (
        not given.keys() & {"prompt", "response"}
        and not {"prompt", "response"} & names
        and "instruction" in names
    )
    fields = ("instruction", "input", "output") if alpaca else ("prompt", "response")
    mapping = {field: given.get(field, field) for field in (*fields, "group")}
    optional = frozenset({"group", "input"} - set(given))
    for field, column in mapping.items():
        if column not in names and field not in optional:
            raise DataError(
                f"{shard.path}: no column {column!r} for the {field}; columns are {_listing(shard.frame)}; "
                f"set columns.{field} to one of them"
            )
    kept = {field: column for field, column in mapping.items() if column in names}
    return Layout(kept)


def _text_column(shard: Shard, column: str) -> pl.Series:
    """A column as strings: numbers and booleans are converted, nested values are an error."""
    series = shard.frame[column]
    if series.dtype == pl.String:
        return series
    if series.dtype.is_numeric() or isinstance(series.dtype, CASTABLE_TEXT) or series.dtype == pl.Null:
        return series.cast(pl.String)
    raise DataError(
        f"{shard.path}: column {column!r} holds {series.dtype} values, not text; "
        "store plain strings there or map another column"
    )


def _required_text(shard: Shard, field: str, column: str) -> pl.Series:
    """A prompt/response source column; DataError at the first null, empty or whitespace-only value."""
    series = _text_column(shard, column)
    blank = series.is_null() | (series.str.strip_chars() == "")
    if blank.any():
        row = int(blank.arg_true()[0])
        state = "null" if series[row] is None else "empty"
        source = field if field == column else f"{field} (column {column!r})"
        raise DataError(f"{_where(shard, row)}: the {source} is {state}; write one or drop that line")
    return series


def _corpus_part(shard: Shard, layout: Layout) -> pl.DataFrame:
    """prompt, response, group (str) of one shard, checked."""
    mapping = layout.columns
    if layout.alpaca:
        prompt = _required_text(shard, "instruction", mapping["instruction"])
        response = _required_text(shard, "output", mapping["output"])
        if "input" in mapping:
            extra = _text_column(shard, mapping["input"])
            both = pl.DataFrame({"instruction": prompt, "input": extra})
            prompt = both.select(
                pl.when(pl.col("input").str.strip_chars() != "")
                .then(pl.col("instruction") + "\n\n" + pl.col("input"))
                .otherwise(pl.col("instruction"))
            ).to_series()
    else:
        prompt = _required_text(shard, "prompt", mapping["prompt"])
        response = _required_text(shard, "response", mapping["response"])
    if "group" in mapping:
        group = _group_column(shard, mapping["group"])
    else:
        group = pl.Series([None] * shard.frame.height, dtype=pl.String)
    return pl.DataFrame([prompt.alias("prompt"), response.alias("response"), group.alias("group")])


def _group_column(shard: Shard, column: str) -> pl.Series:
    series = shard.frame[column]
    try:
        return series.cast(pl.String)
    except pl.exceptions.PolarsError as exc:
        raise DataError(
            f"{shard.path}: group column {column!r} holds {series.dtype} values; "
            "use strings or numbers, or set columns.group to another column"
        ) from exc


# --- ids --------------------------------------------------------------------------------------
def _ids_from_column(shards: list[Shard], column: str) -> pl.Series:
    """The id column of every shard as int64, checked to be integers and unique across shards."""
    parts = [_shard_ids(shard, column) for shard in shards]
    ids = pl.concat(parts)
    duplicated = ids.is_duplicated()
    if duplicated.any():
        first = int(duplicated.arg_true()[0])
        second = int((ids == ids[first]).arg_true()[1])
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + len(part))
        where = [_locate(shards, offsets, row) for row in (first, second)]
        raise DataError(
            f"id column {column!r}: example_id {ids[first]} is repeated, at {where[0]} and at {where[1]}; "
            "make the ids unique or leave id_column unset to number rows 0..N-1"
        )
    return ids


def _locate(shards: list[Shard], offsets: list[int], row: int) -> str:
    index = max(i for i, start in enumerate(offsets[:-1]) if start <= row)
    return _where(shards[index], row - offsets[index])


def _shard_ids(shard: Shard, column: str) -> pl.Series:
    if column not in shard.frame.columns:
        raise DataError(
            f"{shard.path}: no id column {column!r}; columns are {_listing(shard.frame)}; "
            "set id_column to one of them or leave it unset"
        )
    raw = shard.frame[column]
    if raw.dtype.is_integer():
        ids = raw.cast(pl.Int64)
    elif raw.dtype.is_float():
        ids = raw.cast(pl.Int64, strict=False).set(raw != raw.round(0), None)
    elif raw.dtype == pl.String:
        ids = raw.str.strip_chars().cast(pl.Int64, strict=False)
    else:
        ids = pl.Series(column, [None] * len(raw), dtype=pl.Int64)
    bad = ids.is_null()
    if bad.any():
        row = int(bad.arg_true()[0])
        value = "null" if raw[row] is None else repr(raw[row])
        raise DataError(
            f"{_where(shard, row)}: id column {column!r} holds {value}, not an integer; "
            "fix it or leave id_column unset"
        )
    return ids


def _raise_empty(root: Path, shards: list[Shard]) -> NoReturn:
    if len(shards) == 1:
        raise DataError(f"{shards[0].path}: the corpus is empty (0 rows); add examples or fix path")
    names = ", ".join(shard.path.name for shard in shards)
    raise DataError(f"{root}: the corpus is empty: its shards ({names}) hold 0 rows; add examples")
