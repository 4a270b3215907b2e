"""`nlrewrite artifacts ls|pull` and `nlrewrite query` on an S3 root (moto on loopback); fast,
clear errors for a missing bucket, rejected or missing credentials; S3 retries; no secret leaks."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from conftest import moto_s3
from flows.cli import main
from nlrewrite_core.storage import Store

SECRET = "nlrSECRETzq7Xv9Kp2Lm4Wn8Rt6Yb3Hc5Jd1Fg0"  # distinctive: grepped for in everything below
KEY_ID = "AKIANLREWRITETEST000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 and AWS credentials (with a distinctive fake secret) in the env."""
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    with moto_s3(env, ("nlr-art",)) as url:
        yield url


@pytest.fixture(scope="module")
def s3_run(micro_run, s3_env):
    """The session's micro run, copied to s3://nlr-art/runs1 (same layout as a run written there)."""
    storage, result = micro_run
    client = boto3.client("s3", endpoint_url=s3_env)
    root = Path(storage)
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and not rel.startswith(".cache"):
            client.upload_file(str(f), "nlr-art", f"runs1/{rel}")
    return "s3://nlr-art/runs1", s3_env, result


def cli(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_artifacts_ls_on_s3(s3_run, capsys):
    root, url, result = s3_run
    code, out, err = cli(["artifacts", "ls", "micro-test", "--storage", root, "--endpoint-url", url,
                          "--format", "csv"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "stage,key,file,size,etag,last_modified"
    stages = {line.split(",")[0] for line in lines[1:]}
    assert stages == set(result["keys"])
    assert f"simulate,{result['keys']['simulate']},shard-00000/predictions.parquet" in out
    assert SECRET not in out + err


def test_artifacts_ls_presigned_url_downloads(s3_run, capsys):
    import urllib.request

    root, url, result = s3_run
    code, out, err = cli(["artifacts", "ls", "micro-test", "--storage", root, "--endpoint-url", url,
                          "--stage", "evaluate", "--presign", "--format", "json"], capsys)
    assert code == 0, err
    import json

    rows = [json.loads(line) for line in out.splitlines()]
    ce = next(r for r in rows if r["file"] == "ce.parquet")
    data = urllib.request.urlopen(ce["url"], timeout=10).read()
    assert data[:4] == b"PAR1" and len(data) == ce["size"]
    assert SECRET not in out  # a presigned URL carries a signature, never the secret


def test_artifacts_pull_then_query_locally(s3_run, tmp_path, capsys):
    root, url, result = s3_run
    dest = tmp_path / "pulled"
    code, out, err = cli(["artifacts", "pull", "micro-test", str(dest), "--storage", root, "--endpoint-url", url,
                          "--stage", "evaluate", "--stage", "simulate"], capsys)
    assert code == 0, err
    assert (dest / "runs" / "micro-test" / "run.json").exists()
    sim = dest / "artifacts" / "simulate" / result["keys"]["simulate"]
    assert (sim / "_manifest.json").exists() and (sim / "shard-00000" / "predictions.parquet").exists()
    assert not (dest / "artifacts" / "corpus").exists()
    code, out, err = cli(["query", "micro-test", "select count(*) as n from ce", "--storage", str(dest),
                          "--format", "csv"], capsys)
    assert code == 0, err
    assert out.splitlines()[1] == str(len(result["ce"]))
    for f in dest.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_query_on_s3_matches_local(s3_run, micro_run, capsys):
    root, url, result = s3_run
    sql = "select count(*), count(distinct (context_id, latent)), round(sum(pred), 3) from predictions"
    code, out_s3, err = cli(["query", "micro-test", sql, "--storage", root, "--endpoint-url", url, "--format", "csv"],
                            capsys)
    assert code == 0, err
    code, out_local, _ = cli(["query", "micro-test", sql, "--storage", micro_run[0], "--format", "csv"], capsys)
    assert out_s3 == out_local
    n, n_distinct, _ = out_s3.splitlines()[1].split(",")
    assert int(n) == int(n_distinct) > 0


@pytest.mark.parametrize("sql, expected", [
    ("copy (select 'x' as condition) to 's3://nlr-art/runs1/artifacts/evaluate/{key}/ce.parquet'", "refused COPY"),
    ("select * from read_parquet('s3://nlr-art/runs1/artifacts/evaluate/{key}/ce.parquet')", "SQL error"),
    ("select content from read_text('{home}/.bashrc')", "SQL error"),
    ("install httpfs", "refused LOAD"),
    ("set enable_external_access = true", "refused SET"),
])
def test_query_on_s3_refuses_attacks_and_changes_nothing(s3_run, capsys, sql, expected):
    """With external access disabled the S3 views still read (pyarrow opens the objects, not
    DuckDB: test_query_on_s3_matches_local), and no statement reaches anything else."""
    root, url, result = s3_run
    client = boto3.client("s3", endpoint_url=url)
    before = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket="nlr-art")["Contents"]}
    code, out, err = cli(["query", "micro-test", sql.format(key=result["keys"]["evaluate"], home=Path.home()),
                          "--storage", root, "--endpoint-url", url], capsys)
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket="nlr-art")["Contents"]} == before


def test_verify_on_s3(s3_run, capsys):
    root, url, result = s3_run
    code, out, err = cli(["verify", "micro-test", "--storage", root, "--endpoint-url", url, "--format", "csv"], capsys)
    assert code == 0, err
    rows = [line.split(",") for line in out.splitlines()[1:]]
    assert {r[0] for r in rows} >= set(result["keys"]) and all(r[2] == "ok" for r in rows)
    assert SECRET not in out + err


@pytest.mark.parametrize("cmd", [
    ["artifacts", "ls", "micro-test"],
    ["query", "micro-test", "select 1"],
    ["run", "--preset", "micro"],
])
def test_missing_bucket_fails_fast_with_exit_2(s3_env, capsys, cmd):
    t0 = time.perf_counter()
    code, out, err = cli(cmd + ["--storage", "s3://no-such-bucket/x", "--endpoint-url", s3_env], capsys)
    assert code == 2
    assert "bucket 'no-such-bucket' does not exist" in err and err.count("\n") == 1
    assert time.perf_counter() - t0 < 10
    assert SECRET not in out + err


@pytest.fixture(scope="module")
def auth_s3():
    """A moto server that rejects unknown credentials (INITIAL_NO_AUTH_ACTION_COUNT=0), in its own process."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("cmd", [["artifacts", "ls", "r"], ["run", "--preset", "micro"]])
def test_wrong_credentials_fail_fast_without_showing_them(auth_s3, s3_env, capsys, caplog, cmd):
    caplog.set_level(logging.DEBUG)
    t0 = time.perf_counter()
    code, out, err = cli(cmd + ["--storage", "s3://nlr-art/x", "--endpoint-url", auth_s3], capsys)
    assert code == 2, err
    assert "access denied to bucket 'nlr-art'" in err and "credentials" in err
    assert time.perf_counter() - t0 < 10
    assert SECRET not in out + err + caplog.text
    assert not any(SECRET in str(r.args) for r in caplog.records)


def test_no_credentials_message(s3_env, capsys, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, out, err = cli(["artifacts", "ls", "r", "--storage", "s3://nlr-art/x", "--endpoint-url", s3_env], capsys)
    assert code == 2 and "no AWS credentials found" in err


def test_unreachable_endpoint(s3_env, capsys):
    code, out, err = cli(["artifacts", "ls", "r", "--storage", "s3://nlr-art/x", "--endpoint-url",
                          f"http://127.0.0.1:{free_port()}"], capsys)
    assert code == 2 and "cannot reach the S3 endpoint" in err


def test_transient_s3_outage_is_retried(tmp_path, monkeypatch):
    """The endpoint goes away and comes back on the same port: reads and writes wait and succeed."""
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="flaky")
        store = Store("s3://flaky/p", endpoint_url=url)
        store.write_bytes(store.path("a.bin"), b"first")
        server.stop()
        restarted = {}

        def restart():
            time.sleep(1.5)
            s = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
            s.start()
            restarted["server"] = s

        th = threading.Thread(target=restart)
        th.start()
        t0 = time.perf_counter()
        store.write_bytes(store.path("b.bin"), b"second")  # issued while the endpoint is down
        waited = time.perf_counter() - t0
        th.join()
        server = restarted["server"]
        assert waited >= 1.0
        assert store.read_bytes(store.path("a.bin")) == b"first"  # moto keeps its state across restarts
        assert store.read_bytes(store.path("b.bin")) == b"second"
    finally:
        server.stop()


def test_artifacts_ls_local_root_and_unknown_stage(micro_run, capsys):
    storage, result = micro_run
    code, out, err = cli(["artifacts", "ls", "micro-test", "--storage", storage, "--stage", "evaluate",
                          "--format", "csv"], capsys)
    assert code == 0, err
    files = {line.split(",")[2] for line in out.splitlines()[1:]}
    assert {"ce.parquet", "latent_metrics.parquet", "_manifest.json"} <= files
    code, out, err = cli(["artifacts", "ls", "micro-test", "--storage", storage, "--stage", "nope"], capsys)
    assert code == 2 and "--stage nope" in err
