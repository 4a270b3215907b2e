"""Artifact manifests: stage keys, refs, verification on reuse and the StageWriter.

The Store itself (local/S3 paths, reads and writes, listing, conditional PUT, full-disk errors,
`check`) is in `storage.py`; this module builds on it (storage never imports it).

Integrity: a manifest records each file's sha256, size and rows. `reuse` (what every stage
calls before computing) verifies them, streaming each file through sha256; a missing file, a
mismatch or an unreadable manifest makes the stage "not done" (one warning naming the file, the
manifest is removed, the stage is recomputed). A file verified once is not hashed again in the
same process while its size and mtime are unchanged.

Concurrency: any number of writers of one stage key may run at once on one root and no writer
deletes another's files. Locally each StageWriter writes into its own staging directory
(``.staging-<name>-<host>-<pid>-<id>`` next to the stage directory) and publishes it with one
atomic rename; when the stage directory already holds a manifest the first publisher wins and the
later copy is discarded. On S3 every object is uploaded whole and the manifest last, with a
conditional PUT (If-None-Match): the first manifest stays, never overwritten, so no reader sees a
manifest torn between two writers; writers of one key upload the same bytes (stages are
deterministic), so that manifest matches the files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from . import progress
from .storage import MANIFEST, STAGING, ArtifactInvalid, Store, is_disk_full, sha256_bytes

log = logging.getLogger("nlrewrite")


_VERIFIED: dict[str, tuple[int, int | str, str]] = {}
"""path -> (size, mtime_ns or S3 ETag, sha256) of files verified (or written) by this process."""
_VERIFIED_LOCK = threading.Lock()


def _remember(path: str, size: int, version: int | str, sha: str) -> None:
    with _VERIFIED_LOCK:
        _VERIFIED[path] = (size, version, sha)


def _writer_id() -> str:
    """<host>-<pid> of this process, as it appears in its staging directories' names."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_stagings(parent: str, name: str) -> None:
    """Remove staging directories of `name` left by writers of this host whose process is gone
    (killed mid-stage). Another host's, or a live process's, are never touched."""
    prefix = f"{STAGING}{name}-{_writer_id().rsplit('-', 1)[0]}-"
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return
    for e in entries:
        if not e.startswith(prefix):
            continue
        pid = e[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, e), ignore_errors=True)


class ArtifactRef(BaseModel):
    """A small, picklable pointer to a finished stage output (what Prefect tasks return)."""

    stage: str
    key: str
    uri: str
    rows: dict[str, int] = {}
    """Row count of each Parquet table in the artifact."""
    manifest_sha256: str = ""


def stage_key(stage: str, version: str, config: dict[str, Any], upstream: dict[str, str]) -> str:
    """Content key of a stage output: sha256 of (stage, version, config section, upstream keys)."""
    payload = json.dumps({"stage": stage, "version": version, "config": config, "upstream": upstream},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def ref(store: Store, stage: str, key: str, sub: str = "") -> ArtifactRef:
    """The ref of a finished artifact (FileNotFoundError without a manifest, ArtifactInvalid
    for an unreadable one)."""
    manifest, data = store.manifest_and_bytes(stage, key, sub)
    rows = {f["name"]: f["rows"] for f in manifest["files"] if f.get("rows") is not None}
    return ArtifactRef(stage=stage, key=key, uri=store.uri("artifacts", stage, key, sub), rows=rows,
                       manifest_sha256=sha256_bytes(data))


def verify(store: Store, stage: str, key: str, sub: str = "", *, rehash: bool = False) -> list[str]:
    """Problems of a finished artifact, one line each naming the file ([] when it is intact):
    a missing or unreadable manifest, a listed file that is missing, or whose size, sha256 or
    Parquet row count differs from the manifest. Files this process verified or wrote, with
    unchanged size and mtime, are not hashed again unless `rehash`."""
    try:
        manifest = store.read_manifest(stage, key, sub)
    except FileNotFoundError:
        return [f"{store.uri_of(store.manifest_path(stage, key, sub))}: missing"]
    except ArtifactInvalid as e:
        return [str(e)]
    base = store.artifact_dir(stage, key, sub)
    problems: list[str] = []
    for f in manifest["files"]:
        path = f"{base}/{f['file']}"
        where = store.uri_of(path)
        stamp = store.stamp(path)
        if stamp is None:
            problems.append(f"{where}: missing")
            continue
        if f.get("size") is not None and stamp[0] != f["size"]:
            problems.append(f"{where}: {stamp[0]} bytes, the manifest says {f['size']}")
            continue
        if not rehash and _VERIFIED.get(path) == (*stamp, f["sha256"]):
            continue
        sha, _ = store.file_sha256(path)
        if sha != f["sha256"]:
            problems.append(f"{where}: sha256 {sha[:12]}... differs from the manifest's {f['sha256'][:12]}...")
            continue
        if f.get("rows") is not None and path.endswith(".parquet"):
            try:
                rows = pq.ParquetFile(store.fs.open_input_file(path)).metadata.num_rows
            except (OSError, pa.ArrowException) as e:
                problems.append(f"{where}: not readable as Parquet ({type(e).__name__})")
                continue
            if rows != f["rows"]:
                problems.append(f"{where}: {rows} rows, the manifest says {f['rows']}")
                continue
        _remember(path, *stamp, sha)
    return problems


def reuse(store: Store, stage: str, key: str, sub: str = "") -> ArtifactRef | None:
    """The ref of a finished, intact artifact (a `cached` progress event), or None when it must be
    (re)computed: no manifest (silently), or a problem found by `verify` (one warning naming the
    file; the manifest is removed so that every later check agrees)."""
    if not store.has_manifest(stage, key, sub):
        return None
    problems = verify(store, stage, key, sub)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        log.warning("%s %s%s: %s%s; recomputing it", stage, key, f"/{sub}" if sub else "", problems[0], more)
        store.invalidate(stage, key, sub)
        return None
    found = ref(store, stage, key, sub)
    progress.stage_event(stage, "cached", sub)
    return found


class StageWriter:
    """Collects a stage's files and writes its manifest last.

    Usage::

        w = StageWriter(store, "corpus", key, config=..., upstream=...)
        w.table("tokens", table)
        ref = w.finish(metrics={...})

    Files go to `w.dir`: a staging directory private to this writer on a local root (published
    by one rename in `finish`, removed if the writer is dropped unfinished), the stage directory
    itself on S3 (objects appear whole; the manifest last). Nothing of another writer is deleted.
    """

    def __init__(self, store: Store, stage: str, key: str, *, config: dict[str, Any],
                 upstream: dict[str, str], version: str, sub: str = ""):
        self.store, self.stage, self.key, self.sub = store, stage, key, sub
        self.final = store.artifact_dir(stage, key, sub)
        self.config, self.upstream, self.version = config, upstream, version
        self.files: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        progress.stage_event(stage, "running", sub)
        if store.is_s3:
            self.dir = self.final
            return
        parent, name = os.path.split(self.final)
        _remove_dead_stagings(parent, name)
        self.dir = f"{parent}/{STAGING}{name}-{_writer_id()}-{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(self.dir)
        except OSError as e:
            if is_disk_full(e):
                raise store.full_error(e, self.dir) from e
            raise
        # An unfinished writer (an exception mid-stage) leaves nothing: its staging directory goes
        # when the writer is collected, or at exit.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, True)

    def abort(self) -> None:
        """Drop this writer's staged files (local; on S3 objects already uploaded stay, unlisted)."""
        if not self.store.is_s3:
            self._cleanup()

    @contextlib.contextmanager
    def _aborting(self) -> Iterator[None]:
        """A failed write (a full disk...) ends the writer: its staged files go at once."""
        try:
            yield
        except BaseException:
            self.abort()
            raise

    def _entry(self, name: str, file: str, rows: int | None, sha: str, size: int) -> None:
        self.files.append({"name": name, "file": file, "rows": rows, "sha256": sha, "size": size})

    def table(self, name: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.bytes(f"{name}.parquet", buf.getvalue(), rows=table.num_rows)

    def bytes(self, name: str, data: bytes, rows: int | None = None) -> None:
        """Write a whole file into the artifact."""
        with self._aborting():
            self.store.write_bytes(f"{self.dir}/{name}", data)
        self._entry(name.removesuffix(".parquet"), name, rows, sha256_bytes(data), len(data))

    def directory(self, name: str, local_dir: str | Path) -> None:
        """Copy a local directory (e.g. a `save_pretrained` output) into the artifact."""
        with self._aborting():
            shas = self.store.upload_dir(local_dir, f"{self.dir}/{name}")
        for rel, sha in shas.items():
            self._entry(f"{name}/{rel}", f"{name}/{rel}", None, sha, (Path(local_dir) / rel).stat().st_size)

    def finish(self, metrics: dict[str, Any] | None = None, cost: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> ArtifactRef:
        for f in self.files:  # entries a stage added itself (streamed files) get their size too
            if f.get("size") is None:
                stamp = self.store.stamp(f"{self.dir}/{f['file']}") or self.store.stamp(f"{self.final}/{f['file']}")
                if stamp is not None:
                    f["size"] = stamp[0]
        manifest = {
            "stage": self.stage,
            "key": self.key,
            "version": self.version,
            "config": self.config,
            "upstream": self.upstream,
            "files": self.files,
            "metrics": metrics or {},
            "cost": {"wall_s": round(time.perf_counter() - self.t0, 3), **(cost or {})},
            **(extra or {}),
        }
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        with self._aborting():
            if not self.store.is_s3:
                self.store.write_bytes(f"{self.dir}/{MANIFEST}", data)
                self._publish()
            elif not self.store.put_if_absent(f"{self.dir}/{MANIFEST}", data):
                log.info("%s %s: another writer published it first; keeping that copy", self.stage, self.key)
        for f in self.files:  # what this process wrote needs no hashing when it is reused
            path = f"{self.final}/{f['file']}"
            stamp = self.store.stamp(path)
            if stamp is not None and stamp[0] == f.get("size", stamp[0]):
                _remember(path, *stamp, f["sha256"])
        progress.stage_event(self.stage, "done", self.sub, time.perf_counter() - self.t0)
        if self.sub:
            uri = self.store.uri("artifacts", self.stage, self.key, self.sub)
            return ArtifactRef(stage=self.stage, key=self.key, uri=uri,
                               rows={f["name"]: f["rows"] for f in self.files if f["rows"] is not None})
        return ref(self.store, self.stage, self.key)

    def _publish(self) -> None:
        """Move the staging directory into place: one rename when the stage directory is absent
        (or empty); when it holds a manifest, another writer published first and this copy is
        dropped; otherwise (a directory of sub-artifacts, e.g. simulation shards) the files are
        renamed in one by one and the manifest last."""
        try:
            os.rename(self.dir, self.final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if os.path.exists(f"{self.final}/{MANIFEST}"):
            log.info("%s %s: another writer published it first; keeping that copy", self.stage, self.key)
        else:
            staged = Path(self.dir)
            for f in sorted(p for p in staged.rglob("*") if p.is_file() and p.name != MANIFEST):
                target = Path(self.final) / f.relative_to(staged)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, target)
            os.replace(staged / MANIFEST, Path(self.final) / MANIFEST)
        shutil.rmtree(self.dir, ignore_errors=True)
