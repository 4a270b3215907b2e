"""Artifact storage: one code path for a local directory and ``s3://bucket/prefix``.

Layout::

    <root>/artifacts/<stage>/<key>/...      content-addressed stage outputs
    <root>/runs/<run_id>/run.json           which keys a run used

Writes are atomic: a local file is written under a temporary name and renamed; an S3 object is
uploaded whole. A stage directory's ``_manifest.json`` is written last: a directory without a
manifest does not exist.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel

MANIFEST = "_manifest.json"


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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    """Artifact store rooted at a local directory or an S3 URI.

    `endpoint_url` selects a non-AWS S3 endpoint (MinIO, moto); credentials come from the standard
    AWS environment and are never stored here.
    """

    def __init__(self, root: str | os.PathLike[str], endpoint_url: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None):
        root = str(root)
        self.is_s3 = root.startswith("s3://")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if self.is_s3:
            kwargs: dict[str, Any] = {}
            if self.endpoint_url:
                kwargs["endpoint_override"] = self.endpoint_url
                kwargs["scheme"] = "https" if self.endpoint_url.startswith("https") else "http"
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                kwargs["region"] = region
            self.fs: pafs.FileSystem = pafs.S3FileSystem(**kwargs)
            self.base = root[len("s3://"):].rstrip("/")
            self.root = root.rstrip("/")
            self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "nlrewrite-cache")
        else:
            self.fs = pafs.LocalFileSystem()
            self.base = str(Path(root).resolve())
            self.root = self.base
            self.cache_dir = Path(cache_dir) if cache_dir else Path(self.base) / ".cache"

    # ---- paths ---------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Filesystem path (without scheme) of a location under the root."""
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        return ("s3://" if self.is_s3 else "") + self.path(*parts)

    def artifact_dir(self, stage: str, key: str, sub: str = "") -> str:
        return self.path("artifacts", stage, key, sub)

    # ---- primitive I/O ---------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file atomically (temp name + rename locally; one PUT on S3)."""
        if self.is_s3:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def write_parquet(self, path: str, table: pa.Table) -> str:
        """Write a Parquet table atomically; returns its sha256."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        self.write_bytes(path, data)
        return sha256_bytes(data)

    def read_parquet(self, path: str, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
        return pq.read_table(path, filesystem=self.fs, columns=columns, filters=filters)

    def listdir(self, path: str) -> list[str]:
        """Names directly under `path` (empty when it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def remove_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)

    def upload_dir(self, local_dir: str | Path, path: str) -> dict[str, str]:
        """Copy every file of a local directory under `path`; returns {relative name: sha256}."""
        shas: dict[str, str] = {}
        local_dir = Path(local_dir)
        for f in sorted(local_dir.rglob("*")):
            if f.is_file():
                rel = f.relative_to(local_dir).as_posix()
                data = f.read_bytes()
                self.write_bytes(f"{path}/{rel}", data)
                shas[rel] = sha256_bytes(data)
        return shas

    def local_dir(self, path: str) -> Path:
        """A local directory holding the files under `path` (the path itself on a local root;
        a download into the cache directory on S3)."""
        if not self.is_s3:
            return Path(path)
        dest = self.cache_dir / hashlib.sha256(path.encode()).hexdigest()[:16]
        if not (dest / ".complete").exists():
            tmp = Path(tempfile.mkdtemp(dir=self.cache_dir.mkdir(parents=True, exist_ok=True) or self.cache_dir))
            infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
            for info in infos:
                if info.type == pafs.FileType.File:
                    rel = info.path[len(path):].lstrip("/")
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / rel).write_bytes(self.read_bytes(info.path))
            (tmp / ".complete").write_text("")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        return dest

    # ---- manifests ---------------------------------------------------------------------------
    def has_manifest(self, stage: str, key: str, sub: str = "") -> bool:
        return self.exists(self.artifact_dir(stage, key, sub) + "/" + MANIFEST)

    def read_manifest(self, stage: str, key: str, sub: str = "") -> dict[str, Any]:
        return self.read_json(self.artifact_dir(stage, key, sub) + "/" + MANIFEST)

    def ref(self, stage: str, key: str) -> ArtifactRef:
        """The ref of a finished artifact (raises FileNotFoundError if it has no manifest)."""
        path = self.artifact_dir(stage, key) + "/" + MANIFEST
        data = self.read_bytes(path)
        manifest = json.loads(data)
        rows = {f["name"]: f["rows"] for f in manifest["files"] if f.get("rows") is not None}
        return ArtifactRef(stage=stage, key=key, uri=self.uri("artifacts", stage, key), rows=rows,
                           manifest_sha256=sha256_bytes(data))


class StageWriter:
    """Collects a stage's files and writes its manifest last.

    Usage::

        w = StageWriter(store, "corpus", key, config=..., upstream=...)
        w.table("tokens", table)
        ref = w.finish(metrics={...})
    """

    def __init__(self, store: Store, stage: str, key: str, *, config: dict[str, Any],
                 upstream: dict[str, str], version: str, sub: str = ""):
        self.store, self.stage, self.key, self.sub = store, stage, key, sub
        self.dir = store.artifact_dir(stage, key, sub)
        self.config, self.upstream, self.version = config, upstream, version
        self.files: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        # A previous, killed attempt may have left files without a manifest: they are not trusted.
        if not store.has_manifest(stage, key, sub):
            for name in store.listdir(self.dir):
                if not store.has_manifest(stage, key, f"{sub}/{name}".strip("/")):
                    p = f"{self.dir}/{name}"
                    if store.fs.get_file_info(p).type == pafs.FileType.File:
                        store.fs.delete_file(p)

    def table(self, name: str, table: pa.Table) -> None:
        sha = self.store.write_parquet(f"{self.dir}/{name}.parquet", table)
        self.files.append({"name": name, "file": f"{name}.parquet", "rows": table.num_rows, "sha256": sha})

    def bytes(self, name: str, data: bytes, rows: int | None = None) -> None:
        """Write a whole file into the artifact."""
        self.store.write_bytes(f"{self.dir}/{name}", data)
        self.files.append({"name": name.removesuffix(".parquet"), "file": name, "rows": rows, "sha256": sha256_bytes(data)})

    def directory(self, name: str, local_dir: str | Path) -> None:
        """Copy a local directory (e.g. a `save_pretrained` output) into the artifact."""
        shas = self.store.upload_dir(local_dir, f"{self.dir}/{name}")
        for rel, sha in shas.items():
            self.files.append({"name": f"{name}/{rel}", "file": f"{name}/{rel}", "rows": None, "sha256": sha})

    def finish(self, metrics: dict[str, Any] | None = None, cost: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> ArtifactRef:
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
        self.store.write_json(f"{self.dir}/{MANIFEST}", manifest)
        if self.sub:
            return ArtifactRef(stage=self.stage, key=self.key, uri=self.store.uri("artifacts", self.stage, self.key, self.sub),
                               rows={f["name"]: f["rows"] for f in self.files if f["rows"] is not None})
        return self.store.ref(self.stage, self.key)
