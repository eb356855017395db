"""Checksums of stored objects: what a manifest records of each file, and how a read checks it.

    manifest["files"] = {"data/part-00000.parquet": {"size": 1234, "sha256": "9f86…"}, …}

The manifest lists every file of its object. An object is checked against that list

- *cheaply* (`hashes=False`): every listed file exists with its size, and no file outside the list
  sits in `data/` (a reader globs `data/*.parquet`). Planning a run does this for each cached step.
- *fully* (`hashes=True`): the sizes, then the sha256 of every file. Every read through the store
  (`Store.get`: a step's inputs, `tda query`, `open_run(...).table(...)`) does this, once per process
  and file: a file already hashed in this process is not hashed again while its identity (size,
  mtime, ctime, inode) is unchanged. Any write to a file, and any reset of its mtime, changes its
  ctime, so the memo never hides a change made through the filesystem. `tda verify` hashes without
  the memo, and a URI store hashes what it downloads.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
MANIFEST = "manifest.json"

_verified: set[tuple[str, int, int, int, int, str]] = set()
_lock = threading.Lock()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest is Python 3.11+
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` but the manifest: relative posix path → {size, sha256}."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            out[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def listed_files(manifest: dict[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """The manifest's file list, or None when it has none with checksums (an older manifest)."""
    files = (manifest or {}).get("files")
    if not isinstance(files, dict):
        return None
    ok = all(isinstance(v, dict) and "size" in v and "sha256" in v for v in files.values())
    return files if ok else None


def find_problem(
    folder: Path, files: dict[str, dict[str, Any]], hashes: bool, memo: bool = True
) -> str | None:
    """What is wrong with the copy of an object in `folder` ("FILE: what"), or None if it matches."""
    for rel, entry in files.items():
        path = folder / rel
        try:
            st = path.lstat()
        except FileNotFoundError:
            return f"{rel}: missing"
        if not path.is_file() or path.is_symlink():
            return f"{rel}: not a regular file"
        if st.st_size != entry["size"]:
            return f"{rel}: {st.st_size:,} bytes where the manifest says {entry['size']:,}"
    stray = _stray_data_file(folder, files)
    if stray:
        return f"{stray}: not listed in the manifest"
    if hashes:
        for rel, entry in files.items():
            if not _hash_matches(folder / rel, entry["sha256"], memo):
                return f"{rel}: its sha256 differs from the manifest's (the file changed after it was stored)"
    return None


def _stray_data_file(folder: Path, files: dict[str, dict[str, Any]]) -> str | None:
    data = folder / "data"
    if not data.is_dir():
        return None
    for path in data.iterdir():
        rel = path.relative_to(folder).as_posix()
        if rel not in files:
            return rel
    return None


def _hash_matches(path: Path, expected: str, memo: bool) -> bool:
    st = path.stat()
    identity = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, expected)
    if memo:
        with _lock:
            if identity in _verified:
                return True
    if sha256_file(path) != expected:
        return False
    with _lock:
        _verified.add(identity)
    return True
