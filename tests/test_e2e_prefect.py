"""End to end with real components on 127.0.0.1, all started here: a `prefect server start`
(on PostgreSQL when its binaries are installed, else SQLite), the `cpu` and `gpu` work pools,
`prefect deploy` of deployments/prefect.yaml, process workers, and a moto S3 server.

`prefect deployment run rewrite/full` runs the micro preset on the S3 root with
`execution.fanout: deployment`; then a crash (SIGKILL of the workers mid-simulation) and a resume;
then two GPU workers sharing shards on the PostgreSQL-backed server; then `patch-evaluate/default` on
the finished S3 run (new fractions and calibration methods, nothing upstream written). Timings go to
benchmarks/results/e2e_prefect.json. Slow: marked `e2e`, but part of the default run.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import httpx
import psutil
import pyarrow.parquet as pq
import pytest

from nlrewrite_core.config import load_config
from nlrewrite_core.storage import MANIFEST

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECRET = "nlrE2EsecretQ8vXk3Lp9Zt2Wm7Rn5Yc4Hd6Jf1Gb"
KEY_ID = "AKIANLREWRITEE2E0000"
BUCKET = "e2e"
TIMINGS: dict[str, float] = {}
UPSTREAM = ("corpus", "subject", "transcoder", "activations", "explain", "embed", "score")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process we started and every descendant (flow-run subprocesses included)."""
    try:
        p = psutil.Process(proc.pid)
        procs = p.children(recursive=True) + [p]
    except psutil.NoSuchProcess:
        procs = []
    for q in procs:
        try:
            q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


# ---- PostgreSQL ---------------------------------------------------------------------------------
def pg_bindir() -> str | None:
    initdb = shutil.which("initdb")
    if initdb:
        return str(Path(os.path.realpath(initdb)).parent)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return str(Path(found[-1]).parent) if found else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (initdb into a temp dir); None if not installed."""
    bindir = pg_bindir()
    if bindir is None or os.environ.get("NLREWRITE_E2E_DB") == "sqlite":  # the SQLite path, on request
        yield None
        return
    d = Path(tempfile.mkdtemp(prefix="nlr-pg-"))
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: use the package's `postgres` user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:  # binaries without the Debian package's user
            yield None
            return
        os.chown(d, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    run = lambda *a: subprocess.run(as_user + list(a), check=True, capture_output=True, text=True)  # noqa: E731
    run(f"{bindir}/initdb", "-D", str(d / "data"), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
    run(f"{bindir}/pg_ctl", "-D", str(d / "data"), "-l", str(d / "log"), "-w", "-t", "60", "-o",
        f"-h 127.0.0.1 -p {port} -k {d} -c fsync=off -c max_connections=200", "start")
    run(f"{bindir}/psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", "create database prefect")
    yield {"url": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect", "port": port, "bindir": bindir,
           "as_user": as_user}
    subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", str(d / "data"), "-m", "immediate", "stop"],
                   capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


# ---- S3, Prefect server, deployments ----------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.session.Session(aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                                   region_name="us-east-1").client("s3", endpoint_url=url)
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    holder = {"server": server, "port": port}
    yield url, client, holder
    holder["server"].stop()


def s3_outage(holder: dict, seconds: float) -> None:
    """Stop the S3 endpoint, wait, start it again on the same port (moto keeps its state in-process)."""
    from moto.server import ThreadedMotoServer

    holder["server"].stop()
    time.sleep(seconds)
    holder["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=holder["port"])
    holder["server"].start()


class Cluster:
    """Handles on the started server, its API and the workers."""

    def __init__(self, home: Path, api: str, env: dict[str, str], s3_url: str, s3_client, db: str):
        self.home, self.api, self.env, self.s3_url, self.s3, self.db = home, api, env, s3_url, s3_client, db
        self.http = httpx.Client(base_url=api, timeout=30)
        self.workers: list[tuple[subprocess.Popen, Path]] = []

    def prefect(self, *args: str, timeout: float = 120) -> str:
        r = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, f"prefect {' '.join(args)}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
        return r.stdout

    def start_worker(self, pool: str, name: str, limit: int | None = None) -> subprocess.Popen:
        log = self.home / f"worker-{name}.log"
        cmd = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
        if limit:
            cmd += ["--limit", str(limit)]
        proc = subprocess.Popen(cmd, cwd=self.home, env=self.env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.workers.append((proc, log))
        return proc

    def stop_workers(self) -> None:
        for proc, _ in self.workers:
            if proc.poll() is None:
                kill_tree(proc)
        self.workers.clear()

    def run_deployment(self, prefix: str, run_id: str, **execution) -> str:
        params = {"preset": "micro", "storage": f"s3://{BUCKET}/{prefix}", "endpoint_url": self.s3_url,
                  "run_id": run_id, "overrides": {"execution": {"fanout": "deployment", "poll_s": 1, **execution}}}
        out = self.prefect("deployment", "run", "rewrite/full", "--params", json.dumps(params))
        m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert m, out
        return m.group(1)

    def flow_run(self, fr_id: str) -> dict:
        return self.http.get(f"/flow_runs/{fr_id}").json()

    def wait(self, fr_id: str, timeout: float = 420) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            fr = self.flow_run(fr_id)
            if fr["state"] and fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return fr
            time.sleep(1)
        raise AssertionError(f"flow run {fr_id} not finished after {timeout}s: {self.flow_run(fr_id)['state']}; "
                             + self.logs_text([fr_id])[-3000:])

    def child_runs(self, parent_id: str) -> list[dict]:
        body = {"flow_runs": {"tags": {"all_": [f"parent:{parent_id}"]}}, "sort": "EXPECTED_START_TIME_ASC"}
        return self.http.post("/flow_runs/filter", json=body).json()

    def artifacts(self, fr_id: str) -> list[dict]:
        return self.http.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [fr_id]}}}).json()

    def logs_text(self, fr_ids: list[str]) -> str:
        out, offset = [], 0
        while True:
            page = self.http.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": fr_ids}},
                                                        "offset": offset, "limit": 200}).json()
            out += [f"{r['level']} {r['message']}" for r in page]
            if len(page) < 200:
                return "\n".join(out)
            offset += 200

    def wait_for_logs(self, fr_ids: list[str], *needles: str, timeout: float = 60) -> str:
        """The runs' logs once they hold every needle. A flow run's last lines reach the API after its
        state does (the log handler flushes in batches, and on exit), so a check made the moment the
        state is final can miss them; stop the workers only after this returns."""
        t0 = time.time()
        while True:
            text = self.logs_text(fr_ids)
            if all(n in text for n in needles) or time.time() - t0 > timeout:
                return text
            time.sleep(1)

    def objects(self, prefix: str) -> dict[str, list[dict]]:
        """{key: [versions]} of every object under a prefix."""
        out: dict[str, list[dict]] = {}
        for page in self.s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
            for v in page.get("Versions", []):
                out.setdefault(v["Key"], []).append(v)
        return out

    def copy_upstream(self, src: str, dst: str, keys: dict[str, str]) -> None:
        """Seed a prefix with the stages before simulate (saves recomputing them for each scenario)."""
        for stage in UPSTREAM:
            pre = f"{src}/artifacts/{stage}/{keys[stage]}/"
            for o in self.s3.list_objects_v2(Bucket=BUCKET, Prefix=pre).get("Contents", []):
                self.s3.copy_object(Bucket=BUCKET, Key=dst + o["Key"][len(src):],
                                    CopySource={"Bucket": BUCKET, "Key": o["Key"]})


@pytest.fixture(scope="module")
def cluster(postgres, s3, tmp_path_factory):
    s3_url, s3_client, holder = s3
    home = tmp_path_factory.mktemp("prefect-e2e")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update({
        "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1", "PREFECT_LOGGING_EXTRA_LOGGERS": "nlrewrite", "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "0", "PREFECT_CLI_COLORS": "false", "PREFECT_CLI_WRAP_LINES": "false",
        "NLREWRITE_HOME": str(REPO), "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
    })
    db = "sqlite"
    if postgres is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres["url"]
        db = "postgresql"
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    t0 = time.perf_counter()
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                               "--no-ui", "--no-scheduler"], cwd=home, env=server_env,
                              stdout=open(home / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    c = Cluster(home, api, env, s3_url, s3_client, db)
    c.s3_holder = holder
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                if c.http.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "prefect server not healthy after 120 s"
            time.sleep(0.5)
        TIMINGS["server_healthy_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        for pool in ("cpu", "gpu"):
            c.prefect("work-pool", "create", pool, "--type", "process")
        c.prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        TIMINGS["pools_and_deploy_s"] = round(time.perf_counter() - t0, 1)
        yield c
    finally:
        c.stop_workers()
        kill_tree(server)
        c.http.close()
        Path(REPO / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
        (REPO / "benchmarks" / "results" / "e2e_prefect.json").write_text(json.dumps({"db": db, **TIMINGS}, indent=2))
        print("\ne2e timings:", json.dumps({"db": db, **TIMINGS}))


def run_keys(c: "Cluster", prefix: str, run_id: str) -> dict[str, str]:
    """The stage keys a finished run used (its run.json), as the workers planned them."""
    return json.loads(c.s3.get_object(Bucket=BUCKET, Key=f"{prefix}/runs/{run_id}/run.json")["Body"].read())["keys"]


@pytest.fixture(scope="module")
def keys(cluster, full_run):
    return run_keys(cluster, "full", "e2e-full")


def ce_rows(c: Cluster, prefix: str, keys) -> list[dict]:
    body = c.s3.get_object(Bucket=BUCKET, Key=f"{prefix}/artifacts/evaluate/{keys['evaluate']}/ce.parquet")["Body"].read()
    return pq.read_table(io.BytesIO(body)).to_pylist()


def shard_overheads(c: Cluster, children: list[dict], prefix: str, keys) -> list[float]:
    """Per child run: (end - start of the flow run) - compute time of its shards (from their manifests)."""
    from datetime import datetime

    out = []
    for ch in children:
        if ch["state"]["type"] != "COMPLETED":
            continue
        wall = (datetime.fromisoformat(ch["end_time"]) - datetime.fromisoformat(ch["start_time"])).total_seconds()
        queued = (datetime.fromisoformat(ch["start_time"]) - datetime.fromisoformat(ch["created"])).total_seconds()
        compute = 0.0
        for s in ch["parameters"]["shards"]:
            m = json.loads(c.s3.get_object(Bucket=BUCKET, Key=f"{prefix}/artifacts/simulate/{keys['simulate']}/"
                                           f"shard-{s:05d}/{MANIFEST}")["Body"].read())
            compute += m["cost"]["wall_s"]
        out.append(round(wall + queued - compute, 2))
    return out


@pytest.fixture(scope="module")
def full_run(cluster):
    """One uninterrupted `prefect deployment run rewrite/full` on s3://e2e/full (fanout: deployment)."""
    c = cluster
    c.start_worker("cpu", "cpu-1")
    c.start_worker("gpu", "gpu-1")
    t0 = time.perf_counter()
    fr_id = c.run_deployment("full", "e2e-full", shards_per_run=2)
    fr = c.wait(fr_id)
    TIMINGS["cold_run_s"] = round(time.perf_counter() - t0, 1)
    assert fr["state"]["type"] == "COMPLETED", c.logs_text([fr_id])[-5000:]
    children = c.child_runs(fr_id)
    TIMINGS["shard_run_overhead_s"] = shard_overheads(c, children, "full", run_keys(c, "full", "e2e-full"))
    c.stop_workers()
    return fr_id, children


@pytest.mark.slow
def test_deployment_run_on_s3_with_fanout(cluster, full_run, keys, capsys, monkeypatch):
    c = cluster
    fr_id, children = full_run
    # two shard ranges of two shards each, on the gpu pool, all completed
    assert sorted(tuple(ch["parameters"]["shards"]) for ch in children) == [(0, 1), (2, 3)]
    assert all(ch["state"]["type"] == "COMPLETED" for ch in children)
    dep = c.http.get("/deployments/name/simulate-shard/gpu").json()
    assert {ch["deployment_id"] for ch in children} == {dep["id"]} and dep["work_pool_name"] == "gpu"
    # every stage's manifest is in the bucket
    objs = c.objects("full")
    for stage, key in keys.items():
        assert f"full/artifacts/{stage}/{key}/{MANIFEST}" in objs, stage
    assert "full/runs/e2e-full/run.json" in objs
    # `nlrewrite query` on the S3 root
    from flows.cli import main

    for k, v in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    code = main(["query", "e2e-full", "select count(*) as n, count(distinct (context_id, latent)) as d from predictions",
                 "--storage", f"s3://{BUCKET}/full", "--endpoint-url", c.s3_url, "--format", "csv"])
    out = capsys.readouterr().out
    assert code == 0
    n, d = map(int, out.splitlines()[1].split(","))
    assert n == d > 0
    # the flow run's Prefect artifacts, as the UI shows them
    arts = {a["key"]: a for a in c.artifacts(fr_id)}
    assert arts["rewrite-stages"]["type"] == "progress" and arts["rewrite-stages"]["data"] == 100.0
    assert arts["simulate-shards"]["type"] == "progress" and arts["simulate-shards"]["data"] == 100.0
    assert arts["ce-sweep"]["type"] == "table"
    table = arts["ce-sweep"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert len(table) == len(ce_rows(c, "full", keys))
    report_uri = f"s3://{BUCKET}/full/artifacts/report/{keys['report']}/html/report.html"
    assert report_uri in arts["rewrite-report"]["data"]
    assert arts["rewrite-summary"]["type"] == "markdown"
    logs = c.wait_for_logs([fr_id] + [ch["id"] for ch in children], "simulate: 4 / 4 shards done",
                           "simulate-shard: 2 / 2 shards of this run done")
    assert "simulate: 4 / 4 shards done" in logs and "simulate-shard: 2 / 2 shards of this run done" in logs


@pytest.mark.slow
def test_crash_mid_simulation_then_resume(cluster, full_run, keys, monkeypatch):
    c = cluster
    c.copy_upstream("full", "crash", keys)
    sim = f"crash/artifacts/simulate/{keys['simulate']}"
    c.start_worker("cpu", "cpu-2")
    c.start_worker("gpu", "gpu-2", limit=1)
    t0 = time.perf_counter()
    first = c.run_deployment("crash", "e2e-crash", shards_per_run=4)
    deadline = time.time() + 300
    while not any(k.endswith(f"shard-00000/{MANIFEST}") for k in c.objects(sim)):
        assert time.time() < deadline and c.flow_run(first)["state"]["type"] not in ("FAILED", "CRASHED")
        time.sleep(0.2)
    c.stop_workers()  # SIGKILL the workers and their flow-run processes, mid-simulation
    TIMINGS["crash_after_s"] = round(time.perf_counter() - t0, 1)
    before = {k: v for k, v in c.objects(sim).items()}
    done = {k.split("/")[-2] for k in before if k.endswith(MANIFEST)}
    assert "shard-00000" in done and len(done) < 4, done
    assert c.flow_run(first)["state"]["type"] == "RUNNING"  # killed, not finished

    c.start_worker("cpu", "cpu-3")
    c.start_worker("gpu", "gpu-3", limit=1)
    t0 = time.perf_counter()
    second = c.run_deployment("crash", "e2e-crash", shards_per_run=4)
    fr = c.wait(second)
    TIMINGS["resume_run_s"] = round(time.perf_counter() - t0, 1)
    assert fr["state"]["type"] == "COMPLETED", c.logs_text([second])[-5000:]
    c.stop_workers()
    assert run_keys(c, "crash", "e2e-crash") == keys
    relaunched = sorted(s for ch in c.child_runs(second) for s in ch["parameters"]["shards"])
    assert relaunched == sorted({0, 1, 2, 3} - {int(d[-5:]) for d in done})  # only the shards without a manifest
    after = c.objects(sim)
    for key, versions in before.items():  # files of finished shards were not rewritten
        if key.split("/")[-2] in done:
            assert [v["VersionId"] for v in after[key]] == [v["VersionId"] for v in versions], key
    for key, versions in after.items():  # no shard written twice (a rewrite adds an object version)
        if key.split("/")[-2] not in done:
            assert len(versions) <= 2, (key, versions)
    n_shards = sum(1 for k in after if re.search(r"shard-\d{5}/_manifest.json$", k))
    assert n_shards == 4
    from nlrewrite_core.query import query
    from nlrewrite_core.storage import Store

    for k, v in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    store = Store(f"s3://{BUCKET}/crash", endpoint_url=c.s3_url)
    _, rows = query(store, "e2e-crash", "select count(*), count(distinct (context_id, latent)) from predictions")
    _, expl = query(store, "e2e-crash", "select count(*) from explanations where status = 'explained'")
    cfg = load_config("micro")
    assert rows[0][0] == rows[0][1] == (cfg.corpus.n_calib + cfg.corpus.n_eval) * cfg.corpus.seq_len * expl[0][0]
    # The same table as the uninterrupted run: every label and count exact, every number to float
    # tolerance (two processes' CE can differ in the last bits, which moves a bootstrap bound by 1e-10).
    crash, full = ce_rows(c, "crash", keys), ce_rows(c, "full", keys)
    assert len(crash) == len(full)
    for a, b in zip(crash, full):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float) and isinstance(b[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9, nan_ok=True), k
            else:
                assert a[k] == b[k], k


@pytest.mark.slow
def test_two_gpu_workers_on_postgres_share_shards_through_an_s3_outage(cluster, full_run, keys, postgres):
    """Two GPU workers, one PostgreSQL-backed server: each shard computed exactly once; the S3
    endpoint is stopped for a few seconds mid-simulation and restarted: the run completes."""
    if postgres is None:
        pytest.skip("no PostgreSQL: its binaries (initdb) are not installed (`apt-get install -y postgresql`; "
                    "make test installs them when run as root), or NLREWRITE_E2E_DB=sqlite")
    c = cluster
    assert c.db == "postgresql"
    c.copy_upstream("full", "pg", keys)
    c.start_worker("cpu", "cpu-4")
    w1 = c.start_worker("gpu", "gpu-a", limit=1)
    w2 = c.start_worker("gpu", "gpu-b", limit=1)
    logs = [c.workers[-2][1], c.workers[-1][1]]
    t0 = time.perf_counter()
    fr_id = c.run_deployment("pg", "e2e-pg", shards_per_run=2)
    sim_prefix = f"pg/artifacts/simulate/{keys['simulate']}"
    deadline = time.time() + 300
    while not any(k.endswith(MANIFEST) for k in c.objects(sim_prefix)):
        assert time.time() < deadline and c.flow_run(fr_id)["state"]["type"] not in ("FAILED", "CRASHED")
        time.sleep(0.2)
    s3_outage(c.s3_holder, 4.0)  # transient: requests during the outage are retried
    fr = c.wait(fr_id)
    assert fr["state"]["type"] == "COMPLETED", c.logs_text([fr_id])[-5000:]
    c.stop_workers()
    TIMINGS["two_workers_run_s"] = round(time.perf_counter() - t0, 1)
    assert run_keys(c, "pg", "e2e-pg") == keys
    children = c.child_runs(fr_id)
    assert sorted(tuple(ch["parameters"]["shards"]) for ch in children) == [(0, 1), (2, 3)]
    assert all(ch["state"]["type"] == "COMPLETED" for ch in children)
    # each shard computed exactly once: one object version per shard file
    sim = c.objects(f"pg/artifacts/simulate/{keys['simulate']}")
    shard_files = {k: v for k, v in sim.items() if "/shard-" in k}
    assert len(shard_files) == 8 and all(len(v) == 1 for v in shard_files.values()), shard_files
    # both workers took shard runs
    # (both workers may try to submit the same run; the server lets exactly one of them have it)
    ran = [len(re.findall(r"submitted to infrastructure", p.read_text())) for p in logs]
    assert all(n >= 1 for n in ran), ran
    assert ce_rows(c, "pg", keys) == ce_rows(c, "full", keys)
    del w1, w2


@pytest.mark.slow
def test_patch_evaluate_deployment_on_a_finished_s3_run(cluster, full_run, keys):
    """`prefect deployment run patch-evaluate/default` on the finished run of s3://e2e/full: new fractions and
    one more calibration method; no upstream object is written (each keeps its one version), only the patch
    stages run, and the new run shares the upstream keys. An upstream override fails the run with its reason."""
    from nlrewrite_core.stages import PATCH_STAGES

    c = cluster
    micro = load_config("micro")
    methods, fractions = [*micro.calibrate.methods, "quantile-hf8"], [0.1, 0.5, 1.0]
    upstream = lambda: {k: [v["VersionId"] for v in vs] for k, vs in c.objects("full").items()  # noqa: E731
                        if k.split("/")[1] == "artifacts" and k.split("/")[2] not in PATCH_STAGES}
    before = upstream()
    assert any(k.endswith(f"shard-00000/{MANIFEST}") for k in before)
    c.start_worker("cpu", "cpu-pe")

    def launch(overrides: dict, new_run_id: str) -> str:
        params = {"run_id": "e2e-full", "storage": f"s3://{BUCKET}/full", "endpoint_url": c.s3_url,
                  "overrides": overrides, "new_run_id": new_run_id}
        out = c.prefect("deployment", "run", "patch-evaluate/default", "--params", json.dumps(params))
        m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert m, out
        return m.group(1)

    t0 = time.perf_counter()
    fr_id = launch({"calibrate": {"methods": methods}, "evaluate": {"fractions": fractions}}, "e2e-pe")
    fr = c.wait(fr_id)
    TIMINGS["patch_evaluate_run_s"] = round(time.perf_counter() - t0, 1)
    assert fr["state"]["type"] == "COMPLETED", c.logs_text([fr_id])[-5000:]
    dep = c.http.get("/deployments/name/patch-evaluate/default").json()
    assert fr["deployment_id"] == dep["id"] and dep["work_pool_name"] == "cpu"
    bad = launch({"simulate": {"window": 4}}, "e2e-pe-bad")
    bad_fr = c.wait(bad)
    needle = "'simulate' is an upstream section of run 'e2e-full'"
    bad_logs = c.wait_for_logs([bad], needle)
    c.stop_workers()
    assert bad_fr["state"]["type"] == "FAILED"
    assert needle in bad_logs

    assert upstream() == before  # nothing upstream written, not even rewritten in place
    new_keys = run_keys(c, "full", "e2e-pe")
    for stage, key in keys.items():
        assert (new_keys[stage] == key) == (stage not in PATCH_STAGES), stage
    tasks = c.http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [fr_id]}}}).json()
    assert {t["name"] for t in tasks} == {"calibrate_predictions", "evaluate_rewrite", "write_report"}
    ce = ce_rows(c, "full", new_keys)
    sim = {(r["calibration"], r["fraction"]) for r in ce if r["condition"] == "simulated"}
    assert sim == {(m, f) for m in methods for f in fractions}
    arts = {a["key"]: a for a in c.artifacts(fr_id)}
    assert arts["patch-evaluate-stages"]["type"] == "progress" and arts["patch-evaluate-stages"]["data"] == 100.0
    table = arts["ce-sweep"]["data"]
    assert len(json.loads(table) if isinstance(table, str) else table) == len(ce)
    assert f"s3://{BUCKET}/full/artifacts/report/{new_keys['report']}/html/report.html" in arts["rewrite-report"]["data"]
    assert arts["rewrite-summary"]["type"] == "markdown"


@pytest.mark.slow
def test_no_secret_anywhere(cluster, full_run, keys, postgres):
    """The fake secret is in the workers' environment only: never in S3 objects, Prefect's database,
    logs (server, workers, flow runs) or artifacts."""
    c = cluster
    needle = SECRET.encode()
    for page in c.s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET):
        for v in page.get("Versions", []):
            body = c.s3.get_object(Bucket=BUCKET, Key=v["Key"], VersionId=v["VersionId"])["Body"].read()
            assert needle not in body, v["Key"]
    for f in c.home.rglob("*"):
        if f.is_file():
            assert needle not in f.read_bytes(), f
    runs = c.http.post("/flow_runs/filter", json={}).json()
    assert SECRET not in json.dumps(runs)
    assert SECRET not in c.logs_text([r["id"] for r in runs])
    assert SECRET not in json.dumps(c.http.post("/artifacts/filter", json={}).json())
    if postgres is not None:
        dump = subprocess.run(postgres["as_user"] + [f"{postgres['bindir']}/pg_dump", "-h", "127.0.0.1", "-p",
                                                     str(postgres["port"]), "-U", "postgres", "prefect"],
                              capture_output=True, check=True).stdout
        assert len(dump) > 10_000 and needle not in dump
