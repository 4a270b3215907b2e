"""`nlrewrite evaluate` / the patch-evaluate flow on a finished micro run: new fractions and calibration
methods without recomputing anything upstream; upstream overrides and missing upstream stages refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from nlrewrite_core.config import ConfigError, load_config
from nlrewrite_core.patch import patch_config, rerun_command
from nlrewrite_core.stages import PATCH_STAGES
from nlrewrite_core.query import query
from nlrewrite_core.storage import MANIFEST, Store


@pytest.fixture
def finished(micro_run, tmp_path) -> tuple[str, dict]:
    """A copy of the session's finished micro run (run id `micro-test`), free to change."""
    storage, result = micro_run
    copy = tmp_path / "store"
    shutil.copytree(storage, copy)
    return str(copy), result


def upstream_manifests(storage: str, keys: dict[str, str]) -> dict[str, int]:
    """{path: mtime_ns} of every manifest (shards included) in every upstream stage's directory."""
    out = {}
    for stage in keys:
        if stage in PATCH_STAGES:
            continue
        for p in (Path(storage) / "artifacts" / stage).rglob(MANIFEST):
            out[str(p)] = p.stat().st_mtime_ns
    return out


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def evaluate_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["evaluate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def flow_task_names(new_run_id: str) -> set[str]:
    """Names of the task runs of the patch-evaluate flow run that made `new_run_id`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["patch-evaluate"])))
                if (r.parameters or {}).get("new_run_id") == new_run_id]
        assert len(runs) == 1, runs
        assert runs[0].state.is_completed()
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])))
    return {t.name for t in tasks}


def test_evaluate_new_fractions_and_method_reuses_every_upstream_stage(finished, tmp_path, capsys):
    storage, source = finished
    micro = load_config("micro")
    methods = [*micro.calibrate.methods, "quantile-hf8"]
    fractions = [0.1, 0.5, 1.0]
    assert "quantile-hf8" not in micro.calibrate.methods and 0.5 not in micro.evaluate.fractions
    cfg_file = write_yaml(tmp_path / "patch.yaml", {"calibrate": {"methods": methods},
                                                    "evaluate": {"fractions": fractions}})
    before = upstream_manifests(storage, source["keys"])
    assert len(before) >= 8  # every upstream stage, and the simulation shards
    dirs_before = {s: sorted(p.name for p in (Path(storage) / "artifacts" / s).iterdir()) for s in source["keys"]}

    code, out, err = evaluate_cli(["micro-test", "--config", cfg_file, "--storage", storage, "--run-id", "micro-pe"],
                                  capsys)
    assert code == 0, err
    assert "upstream of run micro-test reused, nothing recomputed: corpus, subject, transcoder" in out

    # nothing upstream was rewritten or added; the patch stages got new keys
    assert upstream_manifests(storage, source["keys"]) == before
    run = json.loads((Path(storage) / "runs" / "micro-pe" / "run.json").read_text())
    assert run["patched_from"] == {"run_id": "micro-test", "overrides": {"calibrate": {"methods": methods},
                                                                          "evaluate": {"fractions": fractions}}}
    for stage, key in source["keys"].items():
        if stage in PATCH_STAGES:
            assert run["keys"][stage] != key, stage
        else:
            assert run["keys"][stage] == key, stage
            assert sorted(p.name for p in (Path(storage) / "artifacts" / stage).iterdir()) == dirs_before[stage]
    # the flow ran the patch stages only (one task each), as its Prefect task runs show
    assert flow_task_names("micro-pe") == {"calibrate_predictions", "evaluate_rewrite", "write_report"}

    # the new run's ce table holds the new rows; the finished run's is unchanged
    store = Store(storage)
    _, rows = query(store, "micro-pe", "select calibration, fraction, count(*) from ce where condition = 'simulated' "
                                       "group by all order by all")
    got = {(c, f): n for c, f, n in rows}
    per_cell = (1 + len(micro.evaluate.random_seeds)) * 2  # top + random seeds, both position sets
    assert got == {(c, f): per_cell for c in methods for f in fractions}
    _, old = query(store, "micro-test", "select count(*) from ce where fraction = 0.5 or calibration = 'quantile-hf8'")
    assert old[0][0] == 0
    assert Path(run["report"]).is_file()


def test_upstream_override_is_refused_with_exit_2(finished, tmp_path, capsys):
    storage, _ = finished
    cfg_file = write_yaml(tmp_path / "bad.yaml", {"evaluate": {"fractions": [0.5]}, "simulate": {"window": 4}})
    runs_before = sorted(p.name for p in (Path(storage) / "runs").iterdir())  # other tests may add runs first
    code, out, err = evaluate_cli(["micro-test", "--config", cfg_file, "--storage", storage], capsys)
    assert code == 2
    assert "'simulate' is an upstream section of run 'micro-test'" in err and "nlrewrite run --config" in err
    assert sorted(p.name for p in (Path(storage) / "runs").iterdir()) == runs_before  # no new run


def test_missing_upstream_stage_exits_with_one_line_naming_it_and_the_run(finished, tmp_path, capsys):
    storage, source = finished
    (Path(storage) / "artifacts" / "score" / source["keys"]["score"] / MANIFEST).unlink()
    cfg_file = write_yaml(tmp_path / "p.yaml", {"evaluate": {"fractions": [0.5]}})
    calib_before = sorted(p.name for p in (Path(storage) / "artifacts" / "calibrate").iterdir())
    code, out, err = evaluate_cli(["micro-test", "--config", cfg_file, "--storage", storage], capsys)
    assert code == 2
    line = err.strip()
    assert "\n" not in line
    assert f"stage 'score' (key {source['keys']['score']}) has no manifest" in line
    assert f"`nlrewrite run --preset micro --storage {Path(storage).resolve()} --run-id micro-test`" in line
    assert sorted(p.name for p in (Path(storage) / "artifacts" / "calibrate").iterdir()) == calib_before


def test_bad_override_field_and_unknown_run_exit_2(finished, tmp_path, capsys):
    storage, _ = finished
    cfg_file = write_yaml(tmp_path / "typo.yaml", {"evaluate": {"fractionz": [0.5]}})
    code, _, err = evaluate_cli(["micro-test", "--config", cfg_file, "--storage", storage], capsys)
    assert code == 2 and "evaluate.fractionz: unknown field" in err
    code, _, err = evaluate_cli(["no-such-run", "--storage", storage], capsys)
    assert code == 2 and "run 'no-such-run' not found" in err
    code, _, err = evaluate_cli(["micro-test", "--config", cfg_file.replace("typo", "gone"), "--storage", storage],
                                capsys)
    assert code == 2 and "does not exist" in err


def test_patch_config_accepts_patch_sections_only():
    cfg = load_config("micro")
    record = {"run_id": "r", "preset": "micro", "config": cfg.model_dump(mode="json")}
    patched = patch_config(record, {"evaluate": {"n_bootstrap": 50}, "execution": {"device": "cpu"}})
    assert patched.evaluate.n_bootstrap == 50 and patched.simulate == cfg.simulate
    for section in ("preset", "corpus", "transcoder", "explain", "score"):
        with pytest.raises(ConfigError, match=f"'{section}' is an upstream section"):
            patch_config(record, {section: {}})


def test_rerun_command_names_the_sections_that_differ_from_the_preset(tmp_path):
    store = Store(tmp_path)
    cfg = load_config("micro", overrides={"simulate": {"window": 4}})
    record = {"run_id": "r", "preset": "micro", "config": cfg.model_dump(mode="json")}
    cmd = rerun_command(record, store, None)
    assert cmd.startswith(f"`nlrewrite run --preset micro --storage {store.root} --run-id r --config FILE.yaml`")
    assert "sections simulate of `config` in" in cmd
    plain = {**record, "config": load_config("micro").model_dump(mode="json")}
    assert rerun_command(plain, store, "http://127.0.0.1:9") == (
        f"`nlrewrite run --preset micro --storage {store.root} --run-id r --endpoint-url http://127.0.0.1:9`")
