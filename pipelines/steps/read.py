"""`read`: a table from a file, a folder of files or a pyarrow filesystem URI."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field

from pipelines.context import StepContext
from pipelines.params import InputPath, StepParams, is_uri
from pipelines.registry import StepKind

Format = Literal["parquet", "csv", "jsonl", "json"]
SUFFIXES: dict[str, Format] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
}


class ReadParams(StepParams):
    """Read a Parquet, CSV, JSON Lines or JSON file (or a folder of them) into a table."""

    kind: Literal["read"] = "read"
    path: InputPath = Field(
        description="A file or folder: a local path (relative to the spec file) or a pyarrow "
        "filesystem URI such as file:///data/x.parquet or s3://bucket/x.parquet."
    )
    format: Format | None = Field(
        None, description="File format; null = inferred from the suffix of the path (or its files)."
    )
    columns: list[str] | None = Field(None, description="Keep only these columns (null = all).")


def infer_format(path: str, fmt: Format | None) -> Format:
    """The declared format, or the one the path's suffix (or its first file's) names."""
    if fmt is not None:
        return fmt
    suffix = Path(path.rstrip("/")).suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    if not is_uri(path) and Path(path).is_dir():
        for child in sorted(Path(path).iterdir()):
            if child.suffix.lower() in SUFFIXES:
                return SUFFIXES[child.suffix.lower()]
    raise ValueError(
        f"{path}: cannot infer the format from the suffix; set `format:` to one of "
        f"{', '.join(sorted(set(SUFFIXES.values())))}"
    )


def _files(path: str, fmt: Format) -> list[str]:
    """The files to read: the path itself, or every file of that format in the folder."""
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(path) if is_uri(path) else (pafs.LocalFileSystem(), path)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return [path]
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = sorted(
        i.path
        for i in found
        if i.type == pafs.FileType.File and SUFFIXES.get(Path(i.path).suffix.lower()) == fmt
    )
    if not files:
        raise ValueError(f"{path}: no {fmt} files in this folder")
    prefix = path[: path.index("://") + 3] if is_uri(path) else ""
    return [prefix + f if prefix and not f.startswith(prefix) else f for f in files]


def _read_one(path: str, fmt: Format) -> pl.DataFrame:
    import pyarrow.fs as pafs

    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_file(inner) as handle:
            data = handle.read()
        source: str | bytes = data
    else:
        source = path
    if fmt == "parquet":
        return pl.read_parquet(source)
    if fmt == "csv":
        return pl.read_csv(source)
    if fmt == "jsonl":
        return pl.read_ndjson(source)
    return pl.read_json(source)


def read_table(params: ReadParams, ctx: StepContext) -> pl.DataFrame:
    fmt = infer_format(str(params.path), params.format)
    frames = [_read_one(f, fmt) for f in _files(str(params.path), fmt)]
    table = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
    if params.columns:
        missing = [c for c in params.columns if c not in table.columns]
        if missing:
            raise ValueError(f"{params.path}: no column(s) {missing}; it has {table.columns}")
        table = table.select(params.columns)
    ctx.log_metric("files", len(frames))
    return table


STEP = StepKind("read", ReadParams, read_table, version="1")
