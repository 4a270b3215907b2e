"""Three `rewrite` runs at once on one storage root, local and on S3 (moto on loopback), each in its
own process: all finish, every artifact is intact and byte-identical to a run made alone (the
session's micro run), and no temporary file or directory outlives them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import moto_s3
from nlrewrite_core import manifest
from nlrewrite_core.storage import MANIFEST, STAGING, Store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
from flows.rewrite import rewrite
r = rewrite(preset="micro", storage=sys.argv[1], run_id=sys.argv[2], endpoint_url=sys.argv[3] or None)
print("KEYS", sorted(r["keys"].items()))
"""


def run_three(storage: str, endpoint_url: str, tmp_path: Path, threads: int) -> list[str]:
    """Start three runs on `storage` at once (each with a private TMPDIR); returns their stdouts."""
    from prefect.settings import PREFECT_API_URL

    procs = []
    for i in range(3):
        tmpdir = tmp_path / f"tmp{i}"
        tmpdir.mkdir()
        # The torch thread count of the reference run (the session's micro run): training is
        # bit-identical only at equal thread counts.
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "TMPDIR": str(tmpdir),
               "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
               "NLREWRITE_CACHE_DIR": str(tmp_path / f"cache{i}")}
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, storage, f"conc-{i}", endpoint_url], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    for i in range(3):  # no temporary file or directory of a run outlives it
        assert list((tmp_path / f"tmp{i}").iterdir()) == [], i
    return outs


def check_same_as_alone(store: Store, reference: Store, keys: dict[str, str]) -> None:
    """Every stage of the concurrent runs is intact and its files are the alone run's bytes."""
    for stage, key in keys.items():
        assert manifest.verify(store, stage, key, rehash=True) == [], stage
        ours = {f["file"]: f["sha256"] for f in store.read_manifest(stage, key)["files"]}
        alone = {f["file"]: f["sha256"] for f in reference.read_manifest(stage, key)["files"]}
        assert ours == alone, stage
        for sub in store.sub_artifacts(stage, key):
            assert manifest.verify(store, stage, key, sub, rehash=True) == [], (stage, sub)
    listing = store.list_objects(store.path("artifacts"))
    assert not [o for o in listing if ".tmp-" in o["key"] or STAGING in o["key"]]
    for i in range(3):
        assert store.read_json(store.path("runs", f"conc-{i}", "run.json"))["keys"] == keys


def test_three_concurrent_runs_on_one_local_root(prefect_server, micro_run, tmp_path):
    ref_root, result = micro_run
    root = tmp_path / "root"
    outs = run_three(str(root), "", tmp_path, result["torch_threads"])
    assert len({o.splitlines()[-1] for o in outs}) == 1
    check_same_as_alone(Store(root), Store(ref_root), result["keys"])
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.startswith(STAGING)]
    assert all((root / "artifacts" / s / k / MANIFEST).exists() for s, k in result["keys"].items())


def test_three_concurrent_runs_on_one_s3_root(prefect_server, micro_run, tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    ref_root, result = micro_run
    with moto_s3(env, ("nlr-conc",)) as url:
        outs = run_three("s3://nlr-conc/root", url, tmp_path, result["torch_threads"])
        assert len({o.splitlines()[-1] for o in outs}) == 1
        check_same_as_alone(Store("s3://nlr-conc/root", endpoint_url=url), Store(ref_root), result["keys"])
