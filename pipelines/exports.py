"""Copies of step tables under `<store>/exports/`, for tools that want a fixed file name.

An export lands strictly inside `<store>/exports/` and replaces nothing but its own previous version:

- the target is checked twice: as a spec field (`StorePath`: relative, no `..`, not `.`) and here;
- each folder on the way is opened relative to the one before with O_NOFOLLOW, so a symbolic link
  (`exports` itself, or any folder below it) is refused instead of followed out of the store;
- the export is built in `<store>/tmp/` and renamed into place through the opened folder;
- a folder export carries a `.tda-export` marker, and only a folder with that marker is replaced;
  nothing is ever written inside another folder export.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pipelines.errors import StoreError
from pipelines.store import Store, StoredObject
from pipelines.store_fs import FsStore

MARKER = ".tda-export"


def export_to_store(store: Store, obj: StoredObject, target: str) -> str:
    """Export `obj`'s table to `<store>/exports/<target>`; returns its path (or URI).

    A store on a URI gets a local export, written in its cache and then uploaded.
    """
    parts = export_parts(target)
    (store.root / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.root / "tmp", prefix="export.") as tmp:
        built = export_table(obj, Path(tmp) / parts[-1])
        if isinstance(store, FsStore):
            return store.upload(built, "exports", *parts, replace_marker=MARKER if built.is_dir() else None)
        with _open_folders(store.root, ("exports", *parts[:-1]), target) as folder:
            _install(built, folder, parts[-1], target)
    return str(store.root.joinpath("exports", *parts))


def export_parts(target: str) -> tuple[str, ...]:
    """The folders and name of an export target; StoreError if it could leave `exports/`."""
    path = PurePosixPath(target.replace("\\", "/"))
    parts = path.parts
    if path.is_absolute() or not parts or any(p in ("", ".", "..") for p in parts):
        raise StoreError(
            f"export {target!r}: give a relative path inside <store>/exports/ without '.' or '..' parts"
        )
    return parts


def export_table(obj: StoredObject, target: Path) -> Path:
    """Write `obj`'s table to `target`: a .parquet or .csv file, or a folder of its Parquet files
    (with the export marker)."""
    if not obj.has_table:
        raise StoreError(f"step {obj.manifest.get('name')!r} has no table to export")
    suffix = target.suffix.lower()
    if suffix == ".parquet":
        obj.table().sink_parquet(target)
    elif suffix == ".csv":
        obj.table().sink_csv(target)
    else:
        shutil.copytree(obj.data_dir, target)
        manifest = obj.manifest
        marker = {"step": manifest.get("name"), "kind": manifest.get("kind"), "key": obj.key}
        (target / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return target


@contextlib.contextmanager
def _open_folders(root: Path, names: tuple[str, ...], target: str) -> Iterator[int]:
    """A descriptor of root/names…, each folder made if missing and opened without following links."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        shown = str(root)
        for i, name in enumerate(names):
            shown = f"{shown}/{name}"
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                raise StoreError(
                    f"export {target!r}: {shown} is a symbolic link or not a folder; exports stay "
                    "inside <store>/exports and never follow links: remove it, or choose another export"
                ) from None
            os.close(fd)
            fd = child
            if i > 0 and _exists(MARKER, fd):
                raise StoreError(
                    f"export {target!r}: {shown} is the folder export of another step; choose a path "
                    "outside it"
                )
        yield fd
    finally:
        os.close(fd)


def _exists(name: str, folder: int) -> bool:
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _install(built: Path, folder: int, name: str, target: str) -> None:
    """Rename `built` to `name` in `folder`, replacing only the same export's previous version."""
    try:
        old = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        old = None
    where = f"<store>/exports/{target}"
    if old is not None and stat.S_ISLNK(old.st_mode):
        raise StoreError(
            f"export {target!r}: {where} is a symbolic link; remove it (exports never follow links)"
        )
    if old is not None and stat.S_ISDIR(old.st_mode) != built.is_dir():
        what = "a folder" if stat.S_ISDIR(old.st_mode) else "a file"
        raise StoreError(
            f"export {target!r}: {where} is {what} of another kind; remove it or choose another path"
        )
    if old is None or not built.is_dir():
        os.replace(built, name, dst_dir_fd=folder)
        return
    if not _exists(f"{name}/{MARKER}", folder):
        raise StoreError(
            f"export {target!r}: {where} is a folder that no export made (it has no {MARKER}); remove it "
            "or choose another path"
        )
    aside = f".{name}.old.{uuid.uuid4().hex[:8]}"
    os.rename(name, aside, src_dir_fd=folder, dst_dir_fd=folder)
    os.rename(built, name, dst_dir_fd=folder)
    _remove_tree(aside, folder)


def _remove_tree(name: str, folder: int) -> None:
    """Delete the folder `name` inside `folder` (a descriptor) without following any link."""
    if sys.version_info >= (3, 11):
        shutil.rmtree(name, dir_fd=folder)
    else:  # shutil.rmtree takes dir_fd from Python 3.11
        _remove_tree_at(name, folder)


def _remove_tree_at(name: str, folder: int) -> None:
    """What `shutil.rmtree(name, dir_fd=folder)` does: every entry removed through descriptors, links
    removed as links (never followed)."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    _remove_tree_at(entry.name, fd)
                else:
                    os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=folder)
