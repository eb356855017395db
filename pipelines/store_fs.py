"""The store at a filesystem URI (s3://, gs://, hdfs://, abfs://, file://), read through a local cache.

    <uri>/objects/<key>/manifest.json   uploaded last, and lists the object's files: the commit point
    <uri>/objects/<key>/data/ , model/  the files it lists
    <uri>/runs/<run_id>.json            one put per write
    <uri>/exports/<target>              exports: written locally, then uploaded
    <cache>/objects/<key>/              a materialised copy, fetched again when the remote manifest differs
    <cache>/tmp/, <cache>/scratch/<key>/  staging and resumable partial work: node-local

`<cache>` is `$TDA_CACHE/stores/<sha256(uri)[:16]>` (TDA_CACHE defaults to ~/.cache/tda). Object stores
rename nothing atomically, so an object is committed by its manifest alone: every file is uploaded before
it, `has` looks only at it, and `get` fetches exactly the files it lists (strays of a failed or racing
upload are never read). Steps see local folders, as with a `Store` over a shared volume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.errors import CorruptObject, StoreError
from pipelines.integrity import describe_files, find_problem, listed_files
from pipelines.store import RunRecord, Store, StoredObject, json_object, write_json_atomic

ATOMIC_PUT = frozenset({"s3", "gcs", "abfs"})  # filesystems where one put replaces a whole object at once
COPY_THREADS = 8
CHUNK = 16 << 20
_FIX = (
    "check the URI, the network, the credentials in the environment (e.g. AWS_ACCESS_KEY_ID) "
    "and that its bucket exists"
)


def cache_root(uri: str) -> Path:
    """The node-local cache of the store at `uri`."""
    base = Path(os.environ.get("TDA_CACHE") or "~/.cache/tda").expanduser()
    return base / "stores" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class FsStore(Store):
    """A store at a pyarrow filesystem URI; `root` is its node-local cache (see the module docstring)."""

    is_local = False

    def __init__(self, uri: str, cache: str | Path | None = None) -> None:
        self.uri = uri
        try:
            self.fs, base = pafs.FileSystem.from_uri(uri)
        except (ValueError, NotImplementedError) as exc:  # ArrowInvalid, ArrowNotImplementedError
            raise StoreError(
                f"store {uri}: {_first_line(exc)}; give a folder or a URI that pyarrow.fs opens "
                "(s3://bucket/prefix, gs://bucket/prefix, hdfs://host/path, abfs://…, file:///abs/path)"
            ) from None
        except (OSError, pa.ArrowException) as exc:  # e.g. looking up the region of an S3 bucket
            hint = " (region=… in an s3:// URI skips the region lookup)" if uri.startswith("s3:") else ""
            raise StoreError(f"store {uri}: cannot open: {_first_line(exc)}; {_FIX}{hint}") from None
        self.base = base.rstrip("/")
        self.root = Path(cache).expanduser().resolve() if cache else cache_root(uri)

    @property
    def location(self) -> str:
        return self.uri

    def locate(self, *parts: str) -> str:
        head, sep, query = self.uri.partition("?")
        return f"{head.rstrip('/')}/{'/'.join(parts)}{sep}{query}"

    # remote I/O ---------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    @contextlib.contextmanager
    def _io(self, action: str) -> Iterator[None]:
        """Turn a filesystem error into one line naming the store and the fix."""
        try:
            yield
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"store {self.uri}: cannot {action}: {_first_line(exc)}; {_FIX}") from None

    def _read(self, path: str) -> bytes | None:
        with self._io(f"read {path}"):
            try:
                with self.fs.open_input_stream(path) as src:
                    data: bytes = src.read()
                    return data
            except FileNotFoundError:
                return None

    def _put(self, path: str, data: bytes) -> None:
        """Write `path` so that readers see the old content or the new, never a part."""
        if self.fs.type_name in ATOMIC_PUT:
            with self.fs.open_output_stream(path) as out:
                out.write(data)
            return
        parent, name = path.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, path)

    def _upload(self, pairs: list[tuple[Path, str]]) -> None:
        """Copy local files to remote paths, several at a time."""

        def one(pair: tuple[Path, str]) -> None:
            local, remote = pair
            if self.fs.type_name not in ATOMIC_PUT:  # object stores have no folders to make
                self.fs.create_dir(remote.rsplit("/", 1)[0], recursive=True)
            with open(local, "rb") as src, self.fs.open_output_stream(remote) as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)

        with ThreadPoolExecutor(COPY_THREADS) as pool:
            list(pool.map(one, pairs))

    def _download(self, pairs: list[tuple[str, Path]]) -> list[tuple[int, str | None]]:
        """Copy remote files to local paths, several at a time; returns each one's (size, sha256)."""

        def one(pair: tuple[str, Path]) -> tuple[int, str | None]:
            remote, local = pair
            local.parent.mkdir(parents=True, exist_ok=True)
            digest, size = hashlib.sha256(), 0
            try:
                with self.fs.open_input_stream(remote) as src, open(local, "wb") as out:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                return -1, None
            return size, digest.hexdigest()

        with ThreadPoolExecutor(COPY_THREADS) as pool:
            return list(pool.map(one, pairs))

    # objects ------------------------------------------------------------------
    def object_keys(self) -> list[str]:
        with self._io("list objects"):
            infos = self.fs.get_file_info(pafs.FileSelector(self._path("objects"), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def has(self, key: str) -> bool:
        return listed_files(self.manifest(key)) is not None

    def manifest(self, key: str) -> dict[str, Any] | None:
        data = self._read(self._path("objects", key, "manifest.json"))
        try:
            return None if data is None else json_object(data)
        except ValueError:
            return None

    def get(self, key: str) -> StoredObject:
        """The object, materialised in the cache: the cached copy if it has the same manifest and its
        files match it, else fetched, every file hashed on the way in."""
        data = self._read(self._path("objects", key, "manifest.json"))
        files = listed_files(_loads(data))
        if data is None or files is None:
            raise StoreError(f"{self.uri}: no object {key} in the store")
        local = self.object_dir(key)
        with contextlib.suppress(FileNotFoundError):
            if (local / "manifest.json").read_bytes() == data and find_problem(local, files, True) is None:
                return StoredObject(local)
        tmp = self.root / "tmp" / f"{key}.get.{uuid.uuid4().hex[:12]}"
        try:
            with self._io(f"download object {key}"):
                seen = self._download([(self._path("objects", key, f), tmp / f) for f in files])
            digests = dict(zip(files, seen, strict=True))
            problem = _mismatch(files, digests)
            if problem is not None:
                raise self._corrupt(key, json_object(data), problem)
            (tmp / "manifest.json").write_bytes(data)  # last, as in the store
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StoredObject(_install(tmp, local))

    def check(self, key: str, hashes: bool = False) -> bool:
        """Is `key` a complete object? Its remote files' sizes are compared with the manifest (one
        listing), their sha256 too (a download) with `hashes`; a damaged one is quarantined."""
        manifest = self.manifest(key)
        files = listed_files(manifest)
        if files is None:
            return False
        try:
            if hashes:
                self.verify(key)
            else:
                remote = self._path("objects", key)
                with self._io(f"list object {key}"):
                    sizes = self._sizes(remote)
                problem = _mismatch(files, {f: (n, None) for f, n in sizes.items()})
                if problem is not None:
                    raise self._corrupt(key, manifest or {}, problem)
        except CorruptObject:
            return False
        return True

    def verify(self, key: str, hashes: bool = True, memo: bool = True) -> dict[str, Any]:
        """Hash the remote files of object `key` (streamed, nothing cached) and return its manifest;
        StoreError if there is no object, CorruptObject if they differ."""
        manifest = self.manifest(key)
        files = listed_files(manifest)
        if manifest is None or files is None:
            raise StoreError(f"{self.uri}: no object {key} in the store")
        remote = self._path("objects", key)
        with self._io(f"read object {key}"):
            digests = {f: _stream_digest(self.fs, f"{remote}/{f}") for f in files}
        problem = _mismatch(files, digests)
        if problem is not None:
            raise self._corrupt(key, manifest, problem)
        return manifest

    def quarantine(self, key: str) -> str | None:
        """Take object `key` out of the store: its manifest moves to quarantine/ (so the object is gone
        for every reader at once), its files stay for inspection; the cached copy is dropped."""
        stamp = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        data = self._read(self._path("objects", key, "manifest.json"))
        shutil.rmtree(self.object_dir(key), ignore_errors=True)
        if data is None:
            return None
        with self._io(f"quarantine object {key}"):
            self._put(self._path("quarantine", f"{key}.{stamp}.json"), data)
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self._path("objects", key, "manifest.json"))
        return self.locate("quarantine", f"{key}.{stamp}.json")

    def commit(
        self, key: str, staging: Path, manifest: dict[str, Any], replace: bool = False
    ) -> StoredObject:
        """Upload the staged files, then the manifest (listing them with sizes and sha256) last; keep
        the staging folder as the cached copy. An existing object is kept (ours discarded) unless
        `replace`: then it is deleted first."""
        files = describe_files(staging)
        if not replace and self.has(key):
            self.discard(staging)
            return self.get(key)
        remote = self._path("objects", key)
        with self._io(f"upload object {key}"):
            self._delete(remote)  # also strays of an earlier failed upload, or files of an older object
            self._upload([(staging / f, f"{remote}/{f}") for f in files])
        write_json_atomic(staging / "manifest.json", {**manifest, "files": files})
        self._put_manifest(key, (staging / "manifest.json").read_bytes())
        target = _install(staging, self.object_dir(key))
        shutil.rmtree(self.root / "scratch" / key, ignore_errors=True)
        return StoredObject(target)

    def _sizes(self, remote: str) -> dict[str, int]:
        """Files under `remote` (manifest.json excluded), relative to it → size."""
        infos = self.fs.get_file_info(pafs.FileSelector(remote, allow_not_found=True, recursive=True))
        return {
            i.path[len(remote) + 1 :]: i.size
            for i in infos
            if i.type == pafs.FileType.File and i.path[len(remote) + 1 :] != "manifest.json"
        }

    def _put_manifest(self, key: str, data: bytes) -> None:
        with self._io(f"upload the manifest of object {key}"):
            self._put(self._path("objects", key, "manifest.json"), data)

    def _delete(self, remote: str) -> None:
        """Delete an object: its manifest first, so no reader sees a manifest whose files are gone."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(f"{remote}/manifest.json")
        self.fs.delete_dir_contents(remote, missing_dir_ok=True)

    def upload(self, local: Path, *parts: str, replace_marker: str | None = None) -> str:
        """Copy a local file or folder to `<uri>/<parts>`, replacing what was there; returns its URI.
        With `replace_marker`, a folder already there is replaced only if it holds that file."""
        remote = self._path(*parts)
        with self._io(f"upload {'/'.join(parts)}"):
            if self.fs.get_file_info(remote).type == pafs.FileType.Directory:
                marked = replace_marker is None or self._read(f"{remote}/{replace_marker}") is not None
                if not marked:
                    raise StoreError(
                        f"{self.locate(*parts)}: a folder that no export made (no {replace_marker}); "
                        "remove it or choose another export path"
                    )
                self.fs.delete_dir_contents(remote)
            if local.is_dir():
                files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
                self._upload([(local / f, f"{remote}/{f}") for f in files])
            else:
                self._upload([(local, remote)])
        return self.locate(*parts)

    # runs ---------------------------------------------------------------------
    def write_run(self, record: RunRecord) -> None:
        data = (json.dumps(record.to_json(), indent=2, default=str) + "\n").encode()
        with self._io(f"write run {record.run_id}"):
            self._put(self._path("runs", f"{record.run_id}.json"), data)

    def run_ids(self) -> list[str]:
        with self._io("list runs"):
            infos = self.fs.get_file_info(pafs.FileSelector(self._path("runs"), allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pafs.FileType.File]
        return sorted(n.removesuffix(".json") for n in names if n.endswith(".json") and not n.startswith("."))

    def _run_data(self, run_id: str) -> dict[str, Any]:
        data = self._read(self._path("runs", f"{run_id}.json"))
        if data is None:
            raise StoreError(f"{self.uri}: run {run_id} vanished while reading it; see `tda runs`")
        return json_object(data)


def _loads(data: bytes | None) -> dict[str, Any] | None:
    try:
        return None if data is None else json_object(data)
    except ValueError:
        return None


def _stream_digest(fs: pafs.FileSystem, path: str) -> tuple[int, str | None]:
    """(size, sha256) of a remote file, read in chunks; (-1, None) if it is missing."""
    digest, size = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(path) as src:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return -1, None
    return size, digest.hexdigest()


def _mismatch(files: dict[str, dict[str, Any]], seen: dict[str, tuple[int, str | None]]) -> str | None:
    """The first listed file whose (size, sha256) differs from what was seen ("FILE: what"), else None.
    A seen sha256 of None compares sizes only."""
    for rel, entry in files.items():
        size, digest = seen.get(rel, (-1, None))
        if size < 0:
            return f"{rel}: missing"
        if size != entry["size"]:
            return f"{rel}: {size:,} bytes where the manifest says {entry['size']:,}"
        if digest is not None and digest != entry["sha256"]:
            return f"{rel}: its sha256 differs from the manifest's (the file changed after it was stored)"
    stray = next((f for f in seen if f.startswith("data/") and f not in files), None)
    return f"{stray}: not listed in the manifest" if stray else None


def _install(tmp: Path, target: Path) -> Path:
    """Move the folder `tmp` to `target`, replacing an older copy; if another process installs a copy
    at the same moment, theirs is kept (the next `get` compares manifests again)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        old = tmp.with_name(f"{tmp.name}.old")
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
