"""deployments/prefect.yaml and docker/ checked statically (no Docker engine here), and the
`execution.fanout: deployment` logic of the rewrite flow with a stand-in for run_deployment."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

from nlrewrite_core.config import ConfigError, ExecutionConfig, load_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile", "gpu": REPO / "docker" / "Dockerfile.gpu"}


def prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_FILE.read_text())


def load_entrypoint(entrypoint: str):
    path, func = entrypoint.split(":")
    file = REPO / path
    assert file.is_file(), f"entrypoint file {path} does not exist"
    spec = importlib.util.spec_from_file_location(f"_entry_{file.stem}", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, func)


def test_deployments_entrypoints_exist_and_import():
    from prefect import Flow

    deps = prefect_yaml()["deployments"]
    names = {}
    for d in deps:
        fl = load_entrypoint(d["entrypoint"])
        assert isinstance(fl, Flow), d["entrypoint"]
        names[f"{fl.name}/{d['name']}"] = d
        # every declared parameter is a parameter of the flow
        assert set(d.get("parameters") or {}) <= set(fl.parameters.properties), d["name"]
    assert set(names) == {"rewrite/full", "simulate-shard/gpu", "patch-evaluate/default"}
    assert names["rewrite/full"]["work_pool"]["name"] == "cpu"
    assert names["patch-evaluate/default"]["work_pool"]["name"] == "cpu"
    pe = load_entrypoint(names["patch-evaluate/default"]["entrypoint"])
    assert {"run_id", "storage", "endpoint_url", "overrides"} <= set(pe.parameters.properties)
    assert pe.parameters.required == ["run_id"]  # the finished run: given with every run
    assert names["simulate-shard/gpu"]["work_pool"]["name"] == "gpu"
    assert {"preset", "config_file"} <= set(names["rewrite/full"]["parameters"])
    # the storage root's default is the library's (written once), not repeated in the YAML
    from nlrewrite_core.storage import DEFAULT_ROOT

    for d in names.values():
        fl = load_entrypoint(d["entrypoint"])
        assert "storage" not in (d.get("parameters") or {}), d["name"]
        if "storage" in fl.parameters.properties and d["name"] != "gpu":
            assert fl.parameters.properties["storage"]["default"] == DEFAULT_ROOT, d["name"]
    # the fan-out default names a declared deployment
    assert ExecutionConfig().deployment in names


def test_pull_step_sets_working_directory_from_env():
    pull = prefect_yaml()["pull"]
    step = pull[0]["prefect.deployments.steps.set_working_directory"]
    var = re.fullmatch(r"\{\{\s*\$(\w+)\s*\}\}", step["directory"]).group(1)
    assert var == "NLREWRITE_HOME"
    for df in DOCKERFILES.values():  # the images set it to where they copy the repo
        assert re.search(rf"{var}=/app\b", df.read_text()) and "WORKDIR /app" in df.read_text()


def test_execution_config_fanout():
    assert ExecutionConfig().fanout == "local"
    cfg = load_config("micro", overrides={"execution": {"fanout": "deployment", "shards_per_run": 2}})
    assert cfg.execution.fanout == "deployment" and cfg.execution.shards_per_run == 2
    with pytest.raises(ConfigError, match="execution.fanout"):
        load_config("micro", overrides={"execution": {"fanout": "k8s"}})
    with pytest.raises(ConfigError, match="execution.shards_per_run"):
        load_config("micro", overrides={"execution": {"shards_per_run": 0}})


# ---- Dockerfiles ----------------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        op, _, args = buf.strip().partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    return out


def run_commands(args: str) -> list[list[str]]:
    """The simple commands of a shell-form RUN (split on && ; |)."""
    lex = shlex.shlex(args, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    cmds, cur = [], []
    for tok in lex:
        if tok in ("&&", ";", "||", "|"):
            cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    return [c for c in cmds + [cur] if c]


@pytest.mark.parametrize("pool", ["cpu", "gpu"])
def test_dockerfile_copies_existing_paths_and_runs_known_commands(pool):
    path = DOCKERFILES[pool]
    ins = instructions(path)
    assert ins[0][0] in ("FROM", "ARG")
    copied: list[str] = []
    for op, args in ins:
        if op in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            for src in words[:-1]:
                assert (REPO / src).exists(), f"{path.name}: COPY source {src} does not exist in the repo"
                copied.append(src.rstrip("/").removeprefix("./"))
    # every package the project installs is copied (a new package must be added to the image)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        pkg = pattern.rstrip("*").rstrip(".")
        assert pkg in copied, f"{path.name} does not COPY package {pkg}"
    assert {"pyproject.toml", "README.md", "deployments"} <= set(copied)
    known = {"pip", "python", "python3", "nlrewrite", "prefect", "test"}
    runs = [c for op, args in ins if op == "RUN" for c in run_commands(args)]
    for cmd in runs:
        exe = cmd[0]
        assert exe in known, f"{path.name}: unexpected command {exe}"
        if exe in ("nlrewrite", "prefect"):
            assert (BIN / exe).exists()
    pips = [c for c in runs if c[0] == "pip" or c[:3] == ["python3", "-m", "pip"]]
    assert any("-e" in c and "." in c for c in pips), "the project is installed"
    if pool == "cpu":  # torch==2.13.0 (CPU) before the project
        order = [next(i for i, c in enumerate(pips) if "torch==2.13.0" in c),
                 next(i for i, c in enumerate(pips) if "-e" in c)]
        assert order[0] < order[1]
        assert "torch==2.13.0" in (REPO / "pyproject.toml").read_text()
    else:
        assert "vllm" in path.read_text() and any("2.13.0" in a for op, a in ins if op == "RUN")
    cmd = json.loads(next(a for op, a in ins if op == "CMD"))
    assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--pool") + 1] == pool


def test_worker_cli_accepts_the_dockerfile_options():
    out = subprocess.run([str(BIN / "prefect"), "worker", "start", "--help"], capture_output=True, text=True,
                         timeout=120, env={"PREFECT_CLI_WRAP_LINES": "false", "COLUMNS": "200", "PATH": str(BIN)}).stdout
    assert "--pool" in out and "--type" in out and "--limit" in out


# ---- fan-out logic with a stand-in for run_deployment -------------------------------------------------
class FakeDeploymentRuns:
    """Stands in for run_deployment + the Prefect client: a launched range 'runs' when polled."""

    def __init__(self, store, keys, fail: dict[tuple[int, ...], int]):
        self.store, self.keys, self.fail = store, keys, dict(fail)
        self.launched: list[tuple[int, ...]] = []
        self.runs: dict[uuid.UUID, tuple[int, ...]] = {}

    def run_deployment(self, name, parameters, timeout, **kw):
        assert timeout == 0 and name == "simulate-shard/gpu"
        assert parameters["expected_key"] == self.keys["simulate"]
        shards = tuple(parameters["shards"])
        self.launched.append(shards)
        fr_id = uuid.uuid4()
        self.runs[fr_id] = shards
        return type("FR", (), {"id": fr_id})()

    # client API used by fan_out
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def read_deployment_by_name(self, name):
        return type("D", (), {"id": uuid.uuid4()})()

    def read_flow_runs(self, **kw):
        return []

    def read_flow_run(self, fr_id):
        from prefect.states import Completed, Failed

        shards = self.runs[fr_id]
        if self.fail.get(shards, 0) > 0:
            self.fail[shards] -= 1
            return type("R", (), {"state": Failed(message="worker lost")})()
        for s in shards:
            self.store.write_json(self.store.artifact_dir("simulate", self.keys["simulate"], f"shard-{s:05d}")
                                  + "/_manifest.json", {"files": []})
        return type("R", (), {"state": Completed()})()


def fanout_flow(tmp_path, monkeypatch, fail, max_attempts=3):
    from prefect import flow
    from prefect.artifacts import create_progress_artifact

    from flows import rewrite as rw
    from nlrewrite_core import stages
    from nlrewrite_core.storage import Store
    from tasks.context import RunContext

    cfg = load_config("micro", overrides={"execution": {"fanout": "deployment", "shards_per_run": 2, "poll_s": 0.01,
                                                         "max_run_attempts": max_attempts}})
    keys = stages.plan(cfg)
    store = Store(tmp_path / "store")
    store.write_json(store.artifact_dir("simulate", keys["simulate"], "shard-00001") + "/_manifest.json", {"files": []})
    fake = FakeDeploymentRuns(store, keys, fail)
    monkeypatch.setattr(rw, "run_deployment", fake.run_deployment)
    monkeypatch.setattr(rw, "get_client", lambda sync_client=True: fake)
    run = RunContext(run_id="fan", storage=str(tmp_path / "store"), config=cfg, stage_keys=keys)

    @flow
    def f():
        progress = create_progress_artifact(0.0)
        rw.fan_out(run, store, 5, progress)

    return f, fake, store, keys


def test_fanout_launches_missing_ranges_and_relaunches_failed(prefect_server, tmp_path, monkeypatch):
    f, fake, store, keys = fanout_flow(tmp_path, monkeypatch, fail={(3, 4): 1})
    f()
    # shard 1 was done: ranges of the missing shards only; the failed range relaunched once
    assert fake.launched == [(0, 2), (3, 4), (3, 4)]
    for s in range(5):
        assert store.has_manifest("simulate", keys["simulate"], f"shard-{s:05d}")


def test_fanout_gives_up_after_max_attempts(prefect_server, tmp_path, monkeypatch):
    f, fake, store, keys = fanout_flow(tmp_path, monkeypatch, fail={(3, 4): 5}, max_attempts=2)
    with pytest.raises(RuntimeError, match="failed after 2 attempts"):
        f()
    assert fake.launched.count((3, 4)) == 2


def test_stale_scheduled_shard_runs_of_a_killed_parent_are_cancelled(tmp_path):
    """A resumed run cancels the still-scheduled shard runs its killed predecessor launched for the
    same simulate key and storage, and leaves everything else alone."""
    from types import SimpleNamespace as NS

    from flows import rewrite as rw
    from nlrewrite_core import stages
    from tasks.context import RunContext

    cfg = load_config("micro")
    keys = stages.plan(cfg)
    run = RunContext(run_id="r", storage="s3://b/p", config=cfg, stage_keys=keys)
    mine = {"expected_key": keys["simulate"], "storage": "s3://b/p"}
    runs = [
        NS(id=1, parameters=mine, parent_task_run_id=uuid.uuid4(), tags=["parent:old"]),       # stale: cancel
        NS(id=2, parameters=mine, parent_task_run_id=uuid.uuid4(), tags=["parent:new"]),       # this run's own
        NS(id=3, parameters={**mine, "storage": "s3://b/other"}, parent_task_run_id=uuid.uuid4(), tags=["parent:old"]),
        NS(id=4, parameters={**mine, "expected_key": "other"}, parent_task_run_id=uuid.uuid4(), tags=["parent:old"]),
    ]
    cancelled = []
    client = NS(read_flow_runs=lambda **kw: runs,
                set_flow_run_state=lambda fr_id, state, force: cancelled.append((fr_id, state.type.value, force)))
    assert rw._cancel_stale_shard_runs(client, uuid.uuid4(), run, "new") == 1
    assert cancelled == [(1, "CANCELLED", True)]
