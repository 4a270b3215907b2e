"""Artifact storage: one code path for a local directory and ``s3://bucket/prefix``.

Layout::

    <root>/artifacts/<stage>/<key>/...      content-addressed stage outputs
    <root>/runs/<run_id>/run.json           which keys a run used

Writes are atomic: a local file is written under a temporary name and renamed; an S3 object is
uploaded whole. A stage directory's ``_manifest.json`` is written last: a directory without a
manifest does not exist.

Stage keys, refs, manifest verification on reuse and the StageWriter (staging, atomic publish,
concurrent writers) are in `manifest.py`, which builds on this module.
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
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("nlrewrite")

DEFAULT_ROOT = "./nlrewrite-data"
"""The storage root when none is given (the CLI's --storage, the flows' `storage`), relative to the
working directory."""
MANIFEST = "_manifest.json"
STAGING = ".staging-"
"""Prefix of a local writer's staging directory (never part of an artifact)."""
HASH_CHUNK = 8 << 20
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Run ids and preset names: letters, digits, '.', '_', '-', starting with a letter or digit."""
S3_MAX_ATTEMPTS = int(os.environ.get("NLREWRITE_S3_MAX_ATTEMPTS", "10"))
"""Attempts per S3 request (pyarrow and boto3 retry transient errors with exponential backoff)."""


class StorageError(RuntimeError):
    """The storage root cannot be used (missing bucket, rejected credentials, unreachable endpoint).

    Messages name the root and the cause, never a credential."""


class StorageFull(StorageError):
    """The device holding the storage root is full (ENOSPC, EDQUOT)."""


class ArtifactInvalid(StorageError):
    """A manifest that cannot be read (not JSON, not a manifest); the message names the file."""


class UnsafeName(ValueError):
    """A run id, preset name or path part outside the safe character set (could leave the root)."""


def check_name(value: str, what: str) -> str:
    """`value` if it is a safe name (SAFE_NAME) for a path component, else UnsafeName naming `what`."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise UnsafeName(f"{what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")
    return value


def default_cache_dir() -> Path:
    """Where an S3 root's directories (model weights) are downloaded for libraries that need a
    path, kept between runs on purpose: $NLREWRITE_CACHE_DIR, else $XDG_CACHE_HOME/nlrewrite, else
    ~/.cache/nlrewrite (not the temporary directory: nothing temporary outlives a run)."""
    if env := os.environ.get("NLREWRITE_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nlrewrite"


def _write_file(path: str, data: bytes) -> None:
    """Write, flush and fsync one local file (the single place local bytes hit the disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


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
        self._s3: Any = None
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
            self.cache_dir = Path(cache_dir or default_cache_dir())
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
            denied = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")
            if code in denied or status == 403:
                raise StorageError(f"{where}: access denied to bucket {self.bucket!r}; check the AWS credentials "
                                   "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) "
                                   "and their permissions") from None
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
                if f.is_file() and ".tmp-" not in f.name and STAGING not in f.relative_to(root).as_posix():
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
        """Filesystem path (without scheme) of a location under the root; a part with a '..' or '.'
        component (which could leave the root) raises UnsafeName."""
        for p in parts:
            if p and any(c in (".", "..") for c in p.strip("/").split("/")):
                raise UnsafeName(f"path part {p!r} would leave the storage root {self.root}")
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        return ("s3://" if self.is_s3 else "") + self.path(*parts)

    def artifact_dir(self, stage: str, key: str, sub: str = "") -> str:
        return self.path("artifacts", stage, key, sub)

    # ---- primitive I/O ---------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file atomically (temp name + rename locally; one PUT on S3). A full disk
        raises StorageFull naming the root, and leaves no temporary file."""
        if self.is_s3:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _write_file(tmp, data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if is_disk_full(e):
                raise self.full_error(e, path) from e
            raise

    def full_error(self, e: OSError, path: str = "") -> StorageFull:
        """The one-line error for a full device under this root."""
        return StorageFull(f"storage {self.root}: no space left on the device ({e.strerror or e})"
                           + (f" while writing {path}" if path else "") + "; free space or choose another --storage")

    def _client(self):
        if self._s3 is None:
            self._s3 = self.s3_client()
        return self._s3

    def read_bytes(self, path: str) -> bytes:
        """A whole file. On S3 one GET (one version of the object even while another writer
        replaces it; pyarrow's ranged reads could mix two). FileNotFoundError when it is missing."""
        if not self.is_s3:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        from botocore.exceptions import ClientError

        bucket, key = path.split("/", 1)
        try:
            return self._client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"s3://{path}") from None
            raise

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """S3: create the object only if no object has that key (a conditional PUT, If-None-Match);
        False when one exists. An endpoint without conditional writes gets a plain PUT."""
        from botocore.exceptions import ClientError

        bucket, key = path.split("/", 1)
        try:
            self._client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            if code not in ("NotImplemented", "501"):
                raise
            self.write_bytes(path, data)
        return True

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
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=f"{dest.name}.tmp-"))
            try:
                infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
                for info in infos:
                    if info.type == pafs.FileType.File:
                        rel = info.path[len(path):].lstrip("/")
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        (tmp / rel).write_bytes(self.read_bytes(info.path))
                (tmp / ".complete").write_text("")
                if dest.exists() and not (dest / ".complete").exists():
                    shutil.rmtree(dest, ignore_errors=True)  # an incomplete copy (older code)
                with contextlib.suppress(OSError):  # a concurrent process's complete copy wins
                    os.rename(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ---- manifests ---------------------------------------------------------------------------
    def manifest_path(self, stage: str, key: str, sub: str = "") -> str:
        return self.artifact_dir(stage, key, sub) + "/" + MANIFEST

    def has_manifest(self, stage: str, key: str, sub: str = "") -> bool:
        """Whether the manifest file exists (cheap; `reuse` also checks what it lists)."""
        return self.exists(self.manifest_path(stage, key, sub))

    def manifest_and_bytes(self, stage: str, key: str, sub: str = "") -> tuple[dict[str, Any], bytes]:
        """A stage's manifest, parsed and checked for shape, with its bytes (what verification hashes);
        an empty, non-JSON or malformed manifest raises ArtifactInvalid naming it."""
        path = self.manifest_path(stage, key, sub)
        data = self.read_bytes(path)
        try:
            manifest = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            what = "empty" if not data.strip() else f"not JSON ({e.msg if hasattr(e, 'msg') else e})"
            raise ArtifactInvalid(f"{self.uri_of(path)}: manifest is {what}") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, list) or not all(
                isinstance(f, dict) and isinstance(f.get("file"), str) and isinstance(f.get("sha256"), str)
                and ".." not in f["file"].split("/") for f in files):
            raise ArtifactInvalid(f"{self.uri_of(path)}: not a manifest (needs a 'files' list of "
                                  "{file, sha256} entries)")
        return manifest, data

    def read_manifest(self, stage: str, key: str, sub: str = "") -> dict[str, Any]:
        """The parsed manifest; FileNotFoundError without one, ArtifactInvalid (naming the file) when it
        cannot be read as a manifest."""
        return self.manifest_and_bytes(stage, key, sub)[0]

    def uri_of(self, path: str) -> str:
        """The URI (with scheme) of a path under this root, for messages."""
        return ("s3://" if self.is_s3 else "") + path

    def stamp(self, path: str) -> tuple[int, int | str] | None:
        """(size, version) of a stored file, None when it is missing: the version is the mtime in ns
        locally, the ETag on S3 (S3's mtime has one-second resolution; the ETag changes with the
        content). A file whose stamp is unchanged since this process verified it is not hashed again."""
        if not self.is_s3:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            return (st.st_size, st.st_mtime_ns) if not os.path.isdir(path) else None
        from botocore.exceptions import ClientError

        bucket, key = path.split("/", 1)
        try:
            head = self._client().head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"]), str(head["ETag"]).strip('"')

    def file_sha256(self, path: str) -> tuple[str, int]:
        """(sha256, bytes) of a stored file, streamed in HASH_CHUNK pieces (never whole in memory)."""
        h, n = hashlib.sha256(), 0
        with self.fs.open_input_stream(path) as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
                n += len(chunk)
        return h.hexdigest(), n

    def invalidate(self, stage: str, key: str, sub: str = "") -> None:
        """Remove a stage's manifest: the stage is "not done" and the next run recomputes it."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.manifest_path(stage, key, sub))

    def sub_artifacts(self, stage: str, key: str) -> list[str]:
        """Sub-artifacts (e.g. simulation shards: directories with their own manifest) of a stage."""
        base = self.artifact_dir(stage, key)
        return [n for n in self.listdir(base) if not n.startswith(".") and self.exists(f"{base}/{n}/{MANIFEST}")]
