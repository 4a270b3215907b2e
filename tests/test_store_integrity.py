"""The storage root's guarantees at the library level, local and on S3 (moto on loopback): files are
verified against their manifest on reuse, concurrent writers of one key never delete each other's
files, a full disk is one line naming the root with no file left behind, unsafe names are refused."""

from __future__ import annotations

import errno
import gc
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import moto_s3
from nlrewrite_core import manifest, storage
from nlrewrite_core.manifest import StageWriter
from nlrewrite_core.storage import MANIFEST, STAGING, ArtifactInvalid, StorageFull, Store, UnsafeName, check_name


@pytest.fixture(scope="module")
def s3_url():
    env = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with moto_s3(env, ("nlr-int",)) as url:
        yield url


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(tmp_path / "root")
    url = request.getfixturevalue("s3_url")
    return Store(f"s3://nlr-int/{tmp_path.name}", endpoint_url=url)


def parquet_bytes(values: list[int]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": values}), buf, compression="zstd")  # as StageWriter writes it
    return buf.getvalue()


def write_demo(store: Store, key: str = "k1", values: tuple[int, ...] = (1, 2, 3)) -> None:
    w = StageWriter(store, "demo", key, config={"x": 1}, upstream={}, version="1")
    w.table("t", pa.table({"a": list(values)}))
    w.bytes("notes.txt", b"hello")
    w.finish()


def damage(store: Store, name: str, data: bytes | None) -> None:
    """Replace (or with None remove) one file of the demo artifact, as a user or a crash would."""
    path = f"{store.artifact_dir('demo', 'k1')}/{name}"
    if data is None:
        store.fs.delete_file(path)
    else:
        with store.fs.open_output_stream(path) as f:
            f.write(data)


DAMAGES = {
    "tampered valid parquet": ("t.parquet", parquet_bytes([1, 2, 4]), "sha256"),
    "truncated parquet": ("t.parquet", parquet_bytes([1, 2, 3])[:-20], "bytes"),
    "missing file": ("notes.txt", None, "missing"),
    "garbage manifest": (MANIFEST, b"\x00\xffnot json{", "not JSON"),
    "empty manifest": (MANIFEST, b"", "empty"),
    "manifest without files": (MANIFEST, b'{"stage": "demo"}', "not a manifest"),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_damage_means_not_done_with_one_warning_naming_the_file(store, case, caplog):
    write_demo(store)
    assert manifest.reuse(store, "demo", "k1") is not None
    name, data, why = DAMAGES[case]
    damage(store, name, data)
    with caplog.at_level(logging.WARNING, logger="nlrewrite"):
        assert manifest.reuse(store, "demo", "k1") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert name in warnings[0] and why in warnings[0] and "recomputing" in warnings[0], warnings[0]
    assert not store.has_manifest("demo", "k1")  # "not done" for every later check too
    write_demo(store)  # recomputed: intact again
    assert manifest.verify(store, "demo", "k1", rehash=True) == []
    assert store.read_parquet(f"{store.artifact_dir('demo', 'k1')}/t.parquet").column("a").to_pylist() == [1, 2, 3]


def test_unreadable_manifest_error_names_the_file(store):
    write_demo(store)
    damage(store, MANIFEST, b"{truncated")
    with pytest.raises(ArtifactInvalid, match=r"demo/k1/_manifest.json: manifest is not JSON"):
        manifest.ref(store, "demo", "k1")
    with pytest.raises(ArtifactInvalid, match="_manifest.json"):
        store.read_manifest("demo", "k1")


def test_rows_are_checked_against_the_manifest(tmp_path):
    store = Store(tmp_path)
    write_demo(store)
    path = Path(store.manifest_path("demo", "k1"))
    m = json.loads(path.read_text())
    m["files"][0]["rows"] = 4
    path.write_text(json.dumps(m))
    assert manifest.verify(store, "demo", "k1", rehash=True) == [f"{store.artifact_dir('demo', 'k1')}/t.parquet: 3 rows, "
                                                       "the manifest says 4"]


def test_a_verified_file_is_hashed_once_per_process_unless_it_changes(tmp_path, monkeypatch):
    store = Store(tmp_path)
    write_demo(store)  # the writer's own files count as verified
    hashed: list[str] = []
    real = Store.file_sha256
    monkeypatch.setattr(Store, "file_sha256", lambda self, p: hashed.append(p) or real(self, p))
    assert manifest.verify(store, "demo", "k1") == [] and hashed == []
    manifest._VERIFIED.clear()  # a new process
    assert manifest.verify(store, "demo", "k1") == [] and len(hashed) == 2
    assert manifest.verify(store, "demo", "k1") == [] and len(hashed) == 2
    p = Path(store.artifact_dir("demo", "k1"), "t.parquet")
    data = parquet_bytes([1, 2, 4])
    assert len(data) == p.stat().st_size  # same size, other bytes: the new mtime makes it hash again
    p.write_bytes(data)
    assert "sha256" in manifest.verify(store, "demo", "k1")[0] and len(hashed) == 3


def test_concurrent_writers_of_one_key_never_delete_each_others_files(store):
    """Interleaved writers of one key (what two runs on one root do): both finish, the result is
    intact and complete, and nothing is left in staging."""
    a = StageWriter(store, "demo", "k1", config={}, upstream={}, version="1")
    a.table("t", pa.table({"a": [1, 2, 3]}))
    b = StageWriter(store, "demo", "k1", config={}, upstream={}, version="1")  # must not touch a's file
    b.table("t", pa.table({"a": [1, 2, 3]}))
    a.bytes("notes.txt", b"hello")
    ref_a = a.finish()
    b.bytes("notes.txt", b"hello")
    ref_b = b.finish()
    assert ref_a.rows == ref_b.rows == {"t": 3}
    assert manifest.verify(store, "demo", "k1", rehash=True) == []
    listing = [o["key"] for o in store.list_objects(store.path("artifacts", "demo"))]
    assert sorted(listing) == ["k1/_manifest.json", "k1/notes.txt", "k1/t.parquet"]
    if not store.is_s3:
        assert sorted(os.listdir(store.path("artifacts", "demo"))) == ["k1"]


def test_first_local_publisher_wins(tmp_path):
    """Two writers computing different bytes (a non-deterministic stage): the first to publish wins
    whole; the later copy is dropped, never mixed in."""
    store = Store(tmp_path)
    a = StageWriter(store, "demo", "k1", config={}, upstream={}, version="1")
    b = StageWriter(store, "demo", "k1", config={}, upstream={}, version="1")
    a.table("t", pa.table({"a": [1]}))
    b.table("t", pa.table({"a": [2]}))
    a.finish()
    assert b.finish().rows == {"t": 1}
    assert store.read_parquet(f"{store.artifact_dir('demo', 'k1')}/t.parquet").column("a").to_pylist() == [1]
    assert manifest.verify(store, "demo", "k1", rehash=True) == []


def test_sub_artifacts_publish_into_their_stage_directory(tmp_path):
    store = Store(tmp_path)
    for i in range(2):
        w = StageWriter(store, "demo", "k1", config={}, upstream={}, version="1", sub=f"shard-{i:05d}")
        w.table("p", pa.table({"a": [i]}))
        w.finish()
    w = StageWriter(store, "demo", "k1", config={}, upstream={}, version="1")
    w.files = [f for i in range(2) for f in
               [{**e, "file": f"shard-{i:05d}/{e['file']}"} for e in store.read_manifest("demo", "k1", f"shard-{i:05d}")["files"]]]
    w.finish()
    assert store.sub_artifacts("demo", "k1") == ["shard-00000", "shard-00001"]
    assert manifest.verify(store, "demo", "k1", rehash=True) == []
    assert sorted(os.listdir(store.artifact_dir("demo", "k1"))) == [MANIFEST, "shard-00000", "shard-00001"]


def test_unfinished_writer_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    w = StageWriter(store, "demo", "k1", config={}, upstream={}, version="1")
    w.table("t", pa.table({"a": [1]}))
    assert any(n.startswith(STAGING) for n in os.listdir(store.path("artifacts", "demo")))
    del w
    gc.collect()
    assert os.listdir(store.path("artifacts", "demo")) == []


def test_a_dead_writers_staging_is_removed_a_live_ones_is_not(tmp_path):
    store = Store(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = manifest._writer_id().rsplit("-", 1)[0]
    parent = Path(store.path("artifacts", "demo"))
    stale = parent / f"{STAGING}k1-{host}-{dead.stdout.strip()}-abcd1234"
    live = parent / f"{STAGING}k1-{host}-{os.getppid()}-abcd1234"
    other_host = parent / f"{STAGING}k1-elsewhere-{dead.stdout.strip()}-abcd1234"
    for d in (stale, live, other_host):
        d.mkdir(parents=True)
        (d / "t.parquet").write_bytes(b"x")
    write_demo(store)
    assert not stale.exists() and live.exists() and other_host.exists()


def test_full_disk_is_one_line_naming_the_root_and_leaves_no_file(tmp_path, monkeypatch):
    store = Store(tmp_path / "root")

    def full(path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    w = StageWriter(store, "demo", "k1", config={}, upstream={}, version="1")
    monkeypatch.setattr(storage, "_write_file", full)
    with pytest.raises(StorageFull) as e:
        w.table("t", pa.table({"a": [1]}))
    msg = str(e.value)
    assert "\n" not in msg and f"storage {store.root}: no space left on the device" in msg
    left = [p for p in (tmp_path / "root").rglob("*") if p.is_file()]
    assert left == [] and os.listdir(store.path("artifacts", "demo")) == []


@pytest.mark.parametrize("name", ["../../x", "..", "a/b", "/abs", "", ".hidden", "a b", "x" * 129, "ü"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafeName, match="letters, digits"):
        check_name(name, "run id")


@pytest.mark.parametrize("name", ["micro-test", "tiny-0a1b2c3d4e", "run_1.2", "A"])
def test_safe_names_pass(name):
    assert check_name(name, "run id") == name


def test_no_path_built_from_parts_leaves_the_root(tmp_path):
    store = Store(tmp_path)
    for parts in [("runs", "../../x", "run.json"), ("runs", "..", "run.json"), ("artifacts", "a/../../b")]:
        with pytest.raises(UnsafeName, match="would leave the storage root"):
            store.path(*parts)
    assert store.path("runs", "r1", "run.json") == f"{store.base}/runs/r1/run.json"
