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
S3_MAX_ATTEMPTS = int(os.environ.get("NLREWRITE_S3_MAX_ATTEMPTS", "10"))
"""Attempts per S3 request (pyarrow and boto3 retry transient errors with exponential backoff)."""


class StorageError(RuntimeError):
    """The storage root cannot be used (missing bucket, rejected credentials, unreachable endpoint).

    Messages name the root and the cause, never a credential."""


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
            # Transient failures (throttling, 5xx, dropped connections) are retried with backoff.
            kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)
            kwargs["connect_timeout"] = 10
            kwargs["request_timeout"] = 60
            self.fs: pafs.FileSystem = pafs.S3FileSystem(**kwargs)
            self.base = root[len("s3://"):].rstrip("/")
            self.root = root.rstrip("/")
            self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "nlrewrite-cache")
        else:
            self.fs = pafs.LocalFileSystem()
            self.base = str(Path(root).resolve())
            self.root = self.base
            self.cache_dir = Path(cache_dir) if cache_dir else Path(self.base) / ".cache"

    # ---- S3 helpers (boto3) ------------------------------------------------------------------
    @property
    def bucket(self) -> str:
        return self.base.split("/", 1)[0]

    @property
    def prefix(self) -> str:
        """Key prefix of the root inside its bucket ('' or 'a/b')."""
        return self.base.split("/", 1)[1] if "/" in self.base else ""

    def s3_client(self):
        """A boto3 S3 client for this root's endpoint; credentials from the standard AWS chain."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url,
                            config=Config(retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                                          connect_timeout=10, read_timeout=60))

    def check(self) -> None:
        """Fail fast, with a clear message, if the root cannot be used.

        S3: one HEAD request on the bucket (no retries) distinguishes a missing bucket, rejected
        credentials, missing credentials and an unreachable endpoint. Local roots always pass here.
        """
        if not self.is_s3:
            return
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        where = f"storage {self.root}" + (f" (endpoint {self.endpoint_url})" if self.endpoint_url else "")
        client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url,
                              config=Config(retries={"max_attempts": 2, "mode": "standard"},
                                            connect_timeout=5, read_timeout=15))
        try:
            client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StorageError(f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                               "or AWS_PROFILE (standard AWS environment and config)") from None
        except EndpointConnectionError:
            raise StorageError(f"{where}: cannot reach the S3 endpoint") from None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"{where}: bucket {self.bucket!r} does not exist") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden") or status == 403:
                raise StorageError(f"{where}: access denied to bucket {self.bucket!r}; check the AWS credentials "
                                   "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and their permissions") from None
            raise StorageError(f"{where}: S3 error {code or status}") from None
        except BotoCoreError as e:
            raise StorageError(f"{where}: {type(e).__name__}") from None

    def list_objects(self, path: str) -> list[dict[str, Any]]:
        """Every object under `path` (a path from `self.path`): key relative to `path`, size, etag, mtime.

        S3 uses boto3's paginated listing; a local root walks the directory."""
        out: list[dict[str, Any]] = []
        if self.is_s3:
            prefix = path.split("/", 1)[1].rstrip("/") + "/" if "/" in path else ""
            pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for o in page.get("Contents", []):
                    out.append({"key": o["Key"][len(prefix):], "size": o["Size"], "etag": o["ETag"].strip('"'),
                                "last_modified": o["LastModified"].isoformat()})
            return out
        root = Path(path)
        if root.is_dir():
            for f in sorted(root.rglob("*")):
                if f.is_file() and ".tmp-" not in f.name:
                    st = f.stat()
                    out.append({"key": f.relative_to(root).as_posix(), "size": st.st_size, "etag": "",
                                "last_modified": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(st.st_mtime))})
        return out

    def presigned_url(self, path: str, expires_s: int = 3600) -> str:
        """A time-limited HTTPS GET URL for one S3 object (a local root gives a file:// URL)."""
        if not self.is_s3:
            return Path(path).as_uri()
        bucket, key = path.split("/", 1)
        return self.s3_client().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                       ExpiresIn=expires_s)

    def download(self, path: str, dest: str | os.PathLike[str]) -> int:
        """Copy every file under `path` into the local directory `dest` (atomically per file); returns the count."""
        dest = Path(dest)
        n = 0
        for o in self.list_objects(path):
            target = dest / o["key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
            with self.fs.open_input_stream(f"{path.rstrip('/')}/{o['key']}") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, target)
            n += 1
        return n

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
