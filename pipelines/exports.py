"""Copies of step tables under `<store>/exports/`, for tools that want a fixed file name."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from pipelines.errors import StoreError
from pipelines.store import Store, StoredObject
from pipelines.store_fs import FsStore


def export_to_store(store: Store, obj: StoredObject, target: str) -> str:
    """Export `obj`'s table to `<store>/exports/<target>`; returns its path (or URI).

    A store on a URI gets a local export, written in its cache and then uploaded.
    """
    if not isinstance(store, FsStore):
        return str(export_table(obj, store.root / "exports" / target))
    (store.root / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.root / "tmp", prefix="export.") as tmp:
        local = export_table(obj, Path(tmp) / Path(target).name)
        return store.upload(local, "exports", *Path(target).parts)


def export_table(obj: StoredObject, target: Path) -> Path:
    """Write `obj`'s table to `target`: a .parquet or .csv file, or a folder of its Parquet files.

    Written beside the target and renamed over it, so a reader never sees half a file.
    """
    if not obj.has_table:
        raise StoreError(f"step {obj.manifest.get('name')!r} has no table to export")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    suffix = target.suffix.lower()
    if suffix == ".parquet":
        obj.table().sink_parquet(tmp)
    elif suffix == ".csv":
        obj.table().sink_csv(tmp)
    else:
        shutil.copytree(obj.data_dir, tmp)
        if target.is_dir():
            shutil.rmtree(target)
    os.replace(tmp, target)
    return target
