"""Artifact storage: atomic writes, manifests last, stable keys; local and S3 (moto on loopback)."""

from __future__ import annotations

import json

import boto3
import pyarrow as pa
import pytest

from conftest import moto_s3
from nlrewrite_core import manifest
from nlrewrite_core.manifest import StageWriter, stage_key
from nlrewrite_core.storage import MANIFEST, Store


def test_stage_key_is_stable_and_sensitive():
    a = stage_key("explain", "1", {"n": 1, "m": 2}, {"activations": "abc"})
    assert a == stage_key("explain", "1", {"m": 2, "n": 1}, {"activations": "abc"})
    assert a != stage_key("explain", "2", {"n": 1, "m": 2}, {"activations": "abc"})
    assert a != stage_key("explain", "1", {"n": 1, "m": 3}, {"activations": "abc"})
    assert a != stage_key("explain", "1", {"n": 1, "m": 2}, {"activations": "abd"})


def write_stage(store: Store) -> None:
    w = StageWriter(store, "demo", "k1", config={"x": 1}, upstream={"up": "u1"}, version="1")
    w.table("t", pa.table({"a": [1, 2, 3]}))
    assert not store.has_manifest("demo", "k1")  # files first, manifest last
    ref = w.finish(metrics={"m": 1.5})
    assert ref.rows == {"t": 3} and ref.key == "k1"


def test_local_manifest_written_last_and_no_temp_files(tmp_path):
    store = Store(tmp_path)
    write_stage(store)
    d = tmp_path / "artifacts" / "demo" / "k1"
    assert sorted(p.name for p in d.iterdir()) == [MANIFEST, "t.parquet"]
    m = json.loads((d / MANIFEST).read_text())
    assert m["files"][0]["rows"] == 3 and len(m["files"][0]["sha256"]) == 64
    assert m["config"] == {"x": 1} and m["upstream"] == {"up": "u1"}


def test_half_written_stage_is_not_done_and_its_files_are_left_alone(tmp_path):
    """A directory without a manifest is not done; its files may be another writer's in flight, so a
    new writer never deletes them: it publishes its own files over them, the manifest last."""
    store = Store(tmp_path)
    d = tmp_path / "artifacts" / "demo" / "k1"
    d.mkdir(parents=True)
    (d / "stale.parquet").write_bytes(b"half")
    (d / "t.parquet").write_bytes(b"half")
    assert not store.has_manifest("demo", "k1") and manifest.reuse(store, "demo", "k1") is None
    write_stage(store)
    assert (d / "stale.parquet").read_bytes() == b"half"  # not ours: untouched, and not in the manifest
    assert [f["file"] for f in store.read_manifest("demo", "k1")["files"]] == ["t.parquet"]
    assert manifest.verify(store, "demo", "k1", rehash=True) == []
    assert sorted(p.name for p in d.parent.iterdir()) == ["k1"]  # no staging directory left


@pytest.fixture(scope="module")
def s3():
    env = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    with moto_s3(env, ("nlr",)) as url:
        yield url


def test_s3_round_trip(s3):
    store = Store("s3://nlr/prefix", endpoint_url=s3)
    write_stage(store)
    assert store.has_manifest("demo", "k1")
    ref = manifest.ref(store, "demo", "k1")
    assert ref.uri == "s3://nlr/prefix/artifacts/demo/k1"
    assert store.read_parquet(store.artifact_dir("demo", "k1") + "/t.parquet").column("a").to_pylist() == [1, 2, 3]
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket="nlr")["Contents"]]
    assert sorted(keys) == ["prefix/artifacts/demo/k1/_manifest.json", "prefix/artifacts/demo/k1/t.parquet"]
    # directories download to a local cache for libraries that need a path
    local = store.local_dir(store.artifact_dir("demo", "k1"))
    assert (local / "t.parquet").exists()
