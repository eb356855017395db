"""Instruction corpora read into the project's *corpus* layout, with the source's own columns.

    example_id int64 | prompt str | response str | group str (may be null) | [split str] | extras…

A source is one JSONL (`.jsonl`/`.ndjson`), Parquet (`.parquet`/`.pq`), CSV or Arrow IPC (`.arrow`)
file, or a folder of such shards, all of one format, read in sorted file-name order (plain string
order: name shards `part-00000…` so that it is also the numeric order; names starting with `.` or `_`
are skipped, and so are files of other types, such as a `manifest.json`). A folder written by
Hugging Face `datasets`' `save_to_disk` (it holds `state.json`, or `dataset_dict.json` for a
`DatasetDict`) is read through its own file list, with pyarrow (see `tda.data.saved_datasets`).

Two layouts are understood. Prompt/response: columns `prompt`, `response` and optionally `group`.
Alpaca: `instruction`, optional `input`, `output`; the prompt is the instruction followed by
"\\n\\n" + input when the input is not blank, the response is the output. `columns` maps corpus
fields to a file's own column names; a field it leaves out keeps its default name. Texts are kept
exactly as written (no stripping); a prompt or response that is null, empty or only whitespace is
an error. Numbers and booleans in text columns become strings; `group` may be of any scalar type.

Ids are `0..N-1` in file order (sorted shards, then rows), or the integers of `id_column`, which must
be unique.

Extra columns. Every other column of the source (source, url, license, any metadata) is kept after
the contract columns, under its own name and with its type, so that score tables join back to it
with SQL (`JOIN corpus USING (example_id)`); the columns read as the prompt, response, group, id and
split are not repeated. `keep_columns` is `"all"` (the default: in order of first appearance across
shards) or a list (exactly those, in that order; it may name a column that is also read, such as an
Alpaca `input` or the split column's raw values). A column that some shards lack is null in their
rows; a column's type must agree across shards (integer and float shards widen to float; all-null
shards fit any type), else it is an error naming both files. List and struct columns are kept as
they are. Names are kept as written (one that is not a plain SQL identifier needs double quotes in
`tda query`: `"Source URL"`); a blank name, or one of the corpus's own `example_id`, `prompt`,
`response`, `group`, `split`, is an error that names the fix (leave it out with `keep_columns`, or
read it as the ids or the split). CSV columns are text, as CSV has no types.

Pre-split corpora. `split_column` names a column whose values say which rows are training rows
and which are targets; the output then has the split table's `split` column (train | target, right
after `group`) and feeds `train_model` and `influence_scores` without a `split` step. Values are
matched stripped and case-insensitively: train/training -> train; test/testing/validation/valid/
val/dev/eval/evaluation/target -> target; `split_values` adds or overrides entries, and may map a
value to `drop` (those rows are left out after the ids are given, so ids keep numbering the source
rows). An unknown or null value is an error naming it and the fix. A `DatasetDict` folder is
pre-split by nature: all its splits are read (in `dataset_dict.json` order) and, unless
`split_column` names a column of the data, its split names are the split values. To read one
split alone, point at its subfolder.

Every problem a user can cause raises `DataError` with one line naming the file, the line
(1-based, JSONL and CSV) or row (0-based, Parquet and Arrow), the column and the fix; nothing is
returned partially.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

import polars as pl

from tda.data.corpus_files import Shard, format_name, listing, read_shard, shard_files, where
from tda.errors import DataError

PROMPT_RESPONSE = ("prompt", "response", "group")
ALPACA = ("instruction", "input", "output")
FIELD_KEYS = PROMPT_RESPONSE + ALPACA
RESERVED = ("example_id", "prompt", "response", "group", "split")
SplitValue = Literal["train", "target", "drop"]
SPLIT_VALUES: dict[str, SplitValue] = {
    "train": "train",
    "training": "train",
    **dict.fromkeys(("test", "testing", "validation", "valid", "val", "dev", "eval", "evaluation"), "target"),
    "target": "target",
}
CASTABLE_TEXT = (pl.Categorical, pl.Enum, pl.Boolean)


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
    keep_columns: list[str] | Literal["all"] = "all",
    split_column: str | None = None,
    split_values: dict[str, str] | None = None,
) -> pl.DataFrame:
    """Read an instruction corpus into the corpus layout, with its extra columns.

    Args:
        path: a .jsonl/.ndjson, .parquet, .csv or .arrow file, a folder of shards of one of these
            formats, or a `datasets` `save_to_disk` folder (a Dataset or a DatasetDict).
        columns: corpus field -> the file's column, with keys `prompt`, `response`, `group` or, for the
            Alpaca layout, `instruction`, `input`, `output` (and `group`). None = `prompt`/`response`
            if the file has either, else `instruction`/`input`/`output`; `group` when present.
        format: `jsonl` (alias `ndjson`, `json`), `parquet`, `csv` or `arrow`; None = from the file
            suffix. With a folder, only that format's files are read.
        id_column: a column of unique integers to use as `example_id`; None = 0..N-1 in file order.
        keep_columns: `"all"` = every column not read as a text, group, id or split; or exactly these.
        split_column: a column whose values say train or target (see the module docstring); None =
            no split, except for a DatasetDict, whose split names are then the values.
        split_values: value -> `train`, `target` or `drop`, over the defaults (train -> train;
            test, validation, dev, eval, … -> target).

    Returns:
        The corpus: example_id int64, prompt str, response str, group str (null where there is none),
        `split` str when the source is split, then the kept columns.

    Raises:
        DataError: a missing path or column, no supported files, an empty corpus, a null or blank
            prompt or response, non-integer or duplicate ids, undecodable bytes, invalid JSON, an
            extra column whose name clashes or whose type differs across shards, an unknown split value.
    """
    root = Path(path)
    chosen = format_name(format)
    _check_columns_argument(columns)
    values = _split_mapping(split_values)
    read = [read_shard(file, fmt, split) for file, fmt, split in shard_files(root, chosen)]
    shards = [shard for shard in read if shard.frame.height > 0]
    if not shards:
        _raise_empty(root, read)
    layouts = [_layout(shard, columns) for shard in shards]
    table = pl.concat([_corpus_part(s, lay) for s, lay in zip(shards, layouts, strict=True)])
    if id_column is None:
        ids = pl.int_range(0, table.height, dtype=pl.Int64, eager=True)
    else:
        ids = _ids_from_column(shards, id_column)
    parts = [table.select(ids.alias("example_id"), "prompt", "response", "group")]
    split = _split(shards, split_column, values, given=split_values is not None)
    if split is not None:
        parts.append(split.to_frame("split"))
    consumed = [{*lay.columns.values(), id_column, split_column} for lay in layouts]
    extras = _extras(shards, consumed, keep_columns)
    corpus = pl.concat([*parts, extras] if extras.width else parts, how="horizontal")
    return corpus if split is None else _drop_rows(corpus, root)


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
                f"{shard.path}: no column {column!r} for the {field}; columns are {listing(shard.frame)}; "
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
        raise DataError(f"{where(shard, row)}: the {source} is {state}; write one or drop that line")
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
    return where(shards[index], row - offsets[index])


def _shard_ids(shard: Shard, column: str) -> pl.Series:
    if column not in shard.frame.columns:
        raise DataError(
            f"{shard.path}: no id column {column!r}; columns are {listing(shard.frame)}; "
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
            f"{where(shard, row)}: id column {column!r} holds {value}, not an integer; "
            "fix it or leave id_column unset"
        )
    return ids


def _raise_empty(root: Path, shards: list[Shard]) -> NoReturn:
    if len(shards) == 1:
        raise DataError(f"{shards[0].path}: the corpus is empty (0 rows); add examples or fix path")
    names = ", ".join(shard.path.name for shard in shards)
    raise DataError(f"{root}: the corpus is empty: its shards ({names}) hold 0 rows; add examples")


# --- the split column -------------------------------------------------------------------------
def _split_mapping(split_values: dict[str, str] | None) -> dict[str, str]:
    """The defaults with `split_values` over them, keys stripped and lower-cased."""
    given = {str(key).strip().lower(): value for key, value in (split_values or {}).items()}
    bad = [key for key, value in given.items() if value not in ("train", "target", "drop")]
    if bad:
        raise DataError(
            f"split_values.{bad[0]}: {given[bad[0]]!r} is not train, target or drop; map each value to one"
        )
    return {**SPLIT_VALUES, **given}


def _split(shards: list[Shard], column: str | None, values: dict[str, str], given: bool) -> pl.Series | None:
    """train/target/drop of every row, from `column` or from the DatasetDict's split names."""
    if column is None and shards[0].dict_split is None:
        if given:
            raise DataError("split_values: there is no split_column to map; set split_column or drop it")
        return None
    return pl.concat([_shard_split(shard, column, values) for shard in shards])


def _shard_split(shard: Shard, column: str | None, values: dict[str, str]) -> pl.Series:
    if column is None:
        raw = pl.Series("split", [shard.dict_split] * shard.frame.height, dtype=pl.String)
    elif column not in shard.frame.columns:
        raise DataError(
            f"{shard.path}: no split column {column!r}; columns are {listing(shard.frame)}; "
            "set split_column to one of them or leave it unset"
        )
    else:
        raw = _text_column(shard, column)
    mapped = raw.str.strip_chars().str.to_lowercase().replace_strict(values, default=None)
    unknown = mapped.is_null()
    if not unknown.any():
        return mapped
    row = int(unknown.arg_true()[0])
    value = raw[row]
    example = f"{{{value.strip() or repr(value)}: target}}" if value is not None else ""
    if column is None:
        raise DataError(
            f"{shard.path.parent}: DatasetDict split {value!r} is neither a training nor a target split; "
            f"map it with split_values, e.g. {example} (or train, or drop)"
        )
    if value is None:
        raise DataError(f"{where(shard, row)}: split column {column!r} is null; give the row a split value")
    raise DataError(
        f"{where(shard, row)}: split column {column!r} holds {value!r}, neither a training nor a target "
        f"value; map it with split_values, e.g. {example} (or train, or drop)"
    )


def _drop_rows(corpus: pl.DataFrame, root: Path) -> pl.DataFrame:
    kept = corpus.filter(pl.col("split") != "drop")
    if kept.height == 0:
        raise DataError(f"{root}: split_values drops every row; map some values to train or target")
    return kept


# --- extra columns ----------------------------------------------------------------------------
def _extras(shards: list[Shard], consumed: list[set], keep: list[str] | Literal["all"]) -> pl.DataFrame:
    """The kept columns of every shard, in one type each; null where a shard lacks a column."""
    names = _extra_names(shards, consumed, keep)
    types = {name: _extra_type(shards, name) for name in names}
    parts = [
        shard.frame.select(
            pl.col(name).cast(dtype) if name in shard.frame.columns else pl.lit(None, dtype).alias(name)
            for name, dtype in types.items()
        )
        for shard in shards
    ]
    return pl.concat(parts) if names else pl.DataFrame()


def _extra_names(shards: list[Shard], consumed: list[set], keep: list[str] | Literal["all"]) -> list[str]:
    """`keep` checked against the shards, or every column not consumed, in order of first appearance."""
    if keep == "all":
        names = [
            n
            for shard, used in zip(shards, consumed, strict=True)
            for n in shard.frame.columns
            if n not in used
        ]
        names = list(dict.fromkeys(names))
    else:
        names = list(keep)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise DataError(f"keep_columns: {repeated[0]!r} is listed twice; list each column once")
        missing = [name for name in names if not any(name in shard.frame.columns for shard in shards)]
        if missing:
            raise DataError(
                f"keep_columns: no file has a column {missing[0]!r}; columns are {listing(shards[0].frame)}"
            )
    for name in names:
        _check_extra_name(next(s for s in shards if name in s.frame.columns), name)
    return names


def _check_extra_name(shard: Shard, name: str) -> None:
    if not name.strip():
        raise DataError(
            f"{shard.path}: a column has a blank name ({name!r}); name it in the source, "
            "or list the columns to keep in keep_columns"
        )
    use = {"split": "split_column: split to read it as the split", "example_id": "id_column: example_id"}
    if name in use:
        raise DataError(
            f"{shard.path}: column {name!r} would clash with the corpus's own {name!r}; set {use[name]}, "
            "or list the columns to keep in keep_columns"
        )
    if name in RESERVED:
        raise DataError(
            f"{shard.path}: column {name!r} would clash with the corpus's own {name!r}; list the columns "
            "to keep in keep_columns without it, or rename it in the source"
        )


def _extra_type(shards: list[Shard], name: str) -> pl.DataType:
    """The column's one type across shards: equal types, or numbers (widened to float if any is);
    shards where it is all null fit any type, and a column null everywhere is text."""
    typed = [(s, s.frame.schema[name]) for s in shards if name in s.frame.columns]
    typed = [(s, dtype) for s, dtype in typed if dtype != pl.Null]
    if not typed:
        return pl.String()
    first, first_type = typed[0]
    for shard, dtype in typed[1:]:
        if dtype != first_type and not (dtype.is_numeric() and first_type.is_numeric()):
            raise DataError(
                f"{shard.path}: column {name!r} holds {dtype} values but {first.path} holds {first_type}; "
                "give the column one type in every shard, or leave it out with keep_columns"
            )
    if all(dtype == first_type for _, dtype in typed):
        return first_type
    return pl.Float64() if any(dtype.is_float() or dtype == pl.Decimal for _, dtype in typed) else pl.Int64()
