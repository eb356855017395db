"""Fingerprints of the files a step reads (`InputPath` fields), for its cache key.

A file is fingerprinted by (name, size, modification time), like make: editing or replacing a data
file re-runs the steps that read it, without hashing gigabytes on every run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.errors import SpecError
from pipelines.params import InputPath, find_values, is_uri

Loc = tuple[str | int, ...]


def find_input_paths(value: Any) -> Iterator[tuple[Loc, str]]:
    """Every InputPath inside a params value that names a real file or folder, with its field path."""
    return ((loc, str(path)) for loc, path in find_values(value, InputPath) if not path.is_virtual)


def _local_entries(path: Path) -> list[str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [
        f"{f.relative_to(path) if f != path else f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
        for f in files
    ]


def _uri_entries(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [
            i
            for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
            if i.type == pafs.FileType.File
        ]
    return sorted(f"{i.path}:{i.size}:{i.mtime_ns}" for i in infos)


def input_fingerprint(params: Any, source: Any, step_loc: Loc) -> str:
    """One string for every InputPath of a step; a missing local path is a spec error."""
    parts = []
    for loc, path in find_input_paths(params):
        try:
            if not is_uri(path) and not Path(path).exists():
                raise FileNotFoundError(path)
            entries = _uri_entries(path) if is_uri(path) else _local_entries(Path(path))
        except FileNotFoundError:
            raise SpecError(
                source.error(
                    (*step_loc, *loc),
                    f"no such file or folder: {path}; give a path relative to the spec file, or a URI",
                )
            ) from None
        parts.append(f"{'.'.join(map(str, loc))}={';'.join(entries)}")
    return "|".join(parts)
