"""The rewrite flow on the micro preset: complete, cached on rerun, resumable after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentTaskRunId

from nlrewrite_core import artifacts, stages
from nlrewrite_core.config import load_config
from nlrewrite_core.query import query
from nlrewrite_core.storage import MANIFEST, Store


def task_states(flow_run_id) -> dict[str, str]:
    """{task run name: state name} of one flow run and of its subflow runs (patch-evaluate), whose
    stand-in task runs in the parent are left out."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[r.id for r in runs])))
    stand_ins = {f.parent_task_run_id for f in subflows}
    out = {r.name: r.state.name for r in runs if r.id not in stand_ins}
    for f in subflows:
        out.update(task_states(f.id))
    return out


def read_all_tables(storage: str, keys: dict[str, str]) -> dict[str, bytes]:
    store = Store(storage)
    out = {}
    for stage in ("corpus", "activations", "explain", "score", "calibrate", "evaluate"):
        m = store.read_manifest(stage, keys[stage])
        for f in m["files"]:
            if f["file"].endswith(".parquet"):
                out[f"{stage}/{f['file']}"] = Path(store.artifact_dir(stage, keys[stage]), f["file"]).read_bytes()
    return out


def test_micro_run_is_complete(micro_run):
    storage, result = micro_run
    store = Store(storage)
    for stage, key in result["keys"].items():
        assert store.has_manifest(stage, key), stage
    ce = {(r["condition"], r["selection"], r["fraction"], r["calibration"], r["seed"]): r for r in result["ce"]}
    for cond in ("clean", "transcoder", "zero_ablation", "mlp_ablation", "mean_ablation"):
        assert (cond, "all", None, "", -1) in ce
    cfg = load_config("micro")
    n_sim = len(cfg.evaluate.fractions) * len(cfg.calibrate.methods) * (1 + len(cfg.evaluate.random_seeds))
    n_sim *= 2  # both position sets (all, last) are in the ce table
    assert sum(r["condition"] == "simulated" for r in result["ce"]) == n_sim
    for r in result["ce"]:
        assert r["ce_lo"] <= r["ce_mean"] <= r["ce_hi"]
    report = Path(result["report"])
    html = report.read_text()
    for png in ("fig1_distributions.png", "fig3_ce_vs_fraction.png", "fig4_specificity_sensitivity.png"):
        assert png in html and (report.parent / png).stat().st_size > 1000
    run = json.loads((Path(storage) / "runs" / "micro-test" / "run.json").read_text())
    assert run["keys"] == result["keys"]


def test_manifest_lists_files_with_rows_and_hashes(micro_run):
    storage, result = micro_run
    store = Store(storage)
    m = store.read_manifest("activations", result["keys"]["activations"])
    assert m["upstream"] == {k: result["keys"][k] for k in ("corpus", "subject", "transcoder")}
    by_name = {f["name"]: f for f in m["files"]}
    t = pq.read_table(f"{store.artifact_dir('activations', result['keys']['activations'])}/activations.parquet")
    assert by_name["activations"]["rows"] == t.num_rows > 0
    assert len(by_name["activations"]["sha256"]) == 64


def test_splits_never_leak(micro_run, tmp_path, monkeypatch):
    """No sequence is in two splits; the scorer's and explainer's contexts are explain contexts (never
    calib or eval); calibrated predictions are eval contexts only; and the calibration maps do not
    change when every eval truth changes (calibrate reads no eval activation)."""
    import shutil

    import pyarrow.compute as pc

    storage, result = micro_run
    store, keys = Store(storage), result["keys"]
    cols, rows = query(store, "micro-test",
                       "select count(*) from (select seq_id from tokens group by seq_id having count(distinct split) > 1)")
    assert rows[0][0] == 0
    _, splits = query(store, "micro-test", "select distinct split from activations order by 1")
    assert [s for (s,) in splits] == ["calib", "eval", "explain"]
    seq_len = load_config("micro").corpus.seq_len
    split_of = {int(s): sp for s, sp in query(store, "micro-test", "select seq_id, split from tokens")[1]}
    explain_seqs = sorted(s for s, sp in split_of.items() if sp == "explain")
    shown, judged = artifacts.explain_halves(np.array(explain_seqs))
    if "embed" in keys:  # the scorer's contexts: the explain split's judging half only
        emb = artifacts.read_table(store, "embed", keys["embed"], "contexts", columns=["context_id", "split"])
        scorer_ctx = emb.filter(pc.field("split") == "explain").column("context_id").to_numpy()
        assert set(np.unique(scorer_ctx // seq_len).tolist()) <= set(judged.tolist())
    # The explainer's candidate rows (selected over the cache) are from its half of the explain split.
    from nlrewrite_core import query as query_lib

    cand = query_lib.top_activations(store, keys["activations"], "explain", shown, 0)
    assert set(np.unique(cand.column("seq_id").to_numpy()).tolist()) <= set(shown.tolist())
    cal_ctx = artifacts.read_table(store, "calibrate", keys["calibrate"], "calibrated", columns=["context_id"])
    assert {split_of[int(c) // seq_len] for c in np.unique(cal_ctx.column("context_id").to_numpy())} == {"eval"}

    # Calibrate again on a copy whose eval truth is scrambled: identical maps.
    copy = tmp_path / "store"
    shutil.copytree(storage, copy)
    cstore = Store(str(copy))
    cstore.remove_dir(cstore.artifact_dir("calibrate", keys["calibrate"]))
    read = Store.read_parquet

    def scrambled(self, path, columns=None, filters=None):
        t = read(self, path, columns=columns, filters=filters)
        if path.endswith("activations.parquet") and "act" in t.column_names:
            t = read(self, path, filters=filters)  # every column, to see the split
            is_eval = pc.equal(t.column("split"), "eval")
            act = pc.if_else(is_eval, pc.multiply(t.column("act"), pa.scalar(7.0, t.schema.field("act").type)),
                             t.column("act"))
            t = t.set_column(t.column_names.index("act"), "act", act)
            t = t.select(columns) if columns else t
        return t

    monkeypatch.setattr(Store, "read_parquet", scrambled)
    stages.run("calibrate", cstore, load_config("micro"), keys)
    monkeypatch.undo()
    before = artifacts.read_table(store, "calibrate", keys["calibrate"], "calibration").sort_by([("calibration", "ascending"), ("latent", "ascending")])
    after = artifacts.read_table(cstore, "calibrate", keys["calibrate"], "calibration").sort_by([("calibration", "ascending"), ("latent", "ascending")])
    assert before.equals(after)


def test_second_run_hits_cache_and_gives_identical_tables(micro_run):
    from flows.rewrite import rewrite

    storage, first = micro_run
    before = read_all_tables(storage, first["keys"])
    state = rewrite(preset="micro", storage=storage, run_id="micro-test", return_state=True)
    second = state.result()
    assert second["keys"] == first["keys"]
    states = task_states(state.state_details.flow_run_id)
    assert states and all(s == "Cached" for s in states.values()), states
    assert {"calibrate_predictions", "evaluate_rewrite", "write_report"} <= set(states)  # the subflow's
    after = read_all_tables(storage, first["keys"])
    assert before.keys() == after.keys()
    for name in before:
        assert before[name] == after[name], name


def test_run_interrupted_mid_simulate_resumes_without_duplicates(micro_run, tmp_path, monkeypatch):
    """The flow-level crash-resume test, on a copy of the micro run whose simulation and later stages
    are removed (the upstream stages are reused from their manifests: no second full pipeline): a
    worker killed mid-shard leaves a half-written file; the rerun redoes only the unfinished shards,
    whose predictions equal the uninterrupted run's, and no (context, latent) is predicted twice."""
    import shutil

    from flows.rewrite import rewrite

    storage = str(tmp_path / "store")
    shutil.copytree(micro_run[0], storage)
    cfg = load_config("micro")
    keys = stages.plan(cfg)
    for stage in ("simulate", "calibrate", "evaluate", "report"):
        Store(storage).remove_dir(Store(storage).artifact_dir(stage, keys[stage]))
    from nlrewrite_core.stages import simulate as simulate_stage
    from tasks.stages import SHARD_TASKS

    real = simulate_stage.simulate_shard

    def crash_on_shard_2(store, cfg, keys, shard):
        if shard == 2:
            # a half-written file, as a kill mid-write would leave it
            path = Path(store.artifact_dir("simulate", keys["simulate"], f"shard-{shard:05d}"))
            path.mkdir(parents=True, exist_ok=True)
            (path / "predictions.parquet").write_bytes(b"PAR1 truncated")
            raise RuntimeError("worker killed")
        return real(store, cfg, keys, shard)

    monkeypatch.setattr(simulate_stage, "simulate_shard", crash_on_shard_2)
    monkeypatch.setitem(SHARD_TASKS, "simulate", SHARD_TASKS["simulate"].with_options(retries=0))
    with pytest.raises(RuntimeError, match="worker killed"):
        rewrite(preset="micro", storage=storage, run_id="crashy")
    store = Store(storage)
    assert store.has_manifest("simulate", keys["simulate"], "shard-00001")
    assert not store.has_manifest("simulate", keys["simulate"], "shard-00002")
    assert not store.has_manifest("simulate", keys["simulate"])
    done_before = {i: Path(store.artifact_dir("simulate", keys["simulate"], f"shard-{i:05d}"), MANIFEST).stat().st_mtime_ns
                   for i in (0, 1)}

    monkeypatch.setattr(simulate_stage, "simulate_shard", real)
    result = rewrite(preset="micro", storage=storage, run_id="crashy")
    for i, mtime in done_before.items():  # finished shards were not redone
        assert Path(store.artifact_dir("simulate", keys["simulate"], f"shard-{i:05d}"), MANIFEST).stat().st_mtime_ns == mtime
    # the shards redone (the crashed one and those after it) hold the uninterrupted run's predictions
    for i in range(2, len(stages.shard_ranges(artifacts.num_latents(store, keys), cfg.simulate.shard_latents))):
        shard = f"shard-{i:05d}/predictions.parquet"
        assert pq.read_table(Path(store.artifact_dir("simulate", keys["simulate"]), shard)).equals(
            pq.read_table(Path(Store(micro_run[0]).artifact_dir("simulate", keys["simulate"]), shard))), shard
    _, rows = query(store, "crashy", "select count(*), count(distinct (context_id, latent)), "
                                     "typeof(any_value(pred)) from predictions")
    n, n_distinct, pred_type = rows[0]
    assert pred_type == "FLOAT"
    _, expl = query(store, "crashy", "select count(*) from explanations where status = 'explained'")
    n_contexts = (cfg.corpus.n_calib + cfg.corpus.n_eval) * cfg.corpus.seq_len
    assert n == n_distinct == n_contexts * expl[0][0]
    assert result["keys"] == keys


def test_cache_key_uses_the_absolute_storage_root(tmp_path, monkeypatch):
    """A relative storage path names a different root in each working directory: Prefect's cache key
    must differ (else a fresh checkout's run would find another checkout's cache records)."""
    from nlrewrite_core import stages
    from nlrewrite_core.config import load_config
    from tasks.context import RunContext
    from tasks.stages import stage_cache_key

    cfg = load_config("micro")
    key_of = lambda storage: stage_cache_key("corpus")(None, {"run": RunContext(  # noqa: E731
        run_id="r", storage=storage, endpoint_url=None, config=cfg, stage_keys=stages.plan(cfg))})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    in_a = key_of("./data")
    assert in_a == key_of(str(tmp_path / "a" / "data"))
    monkeypatch.chdir(tmp_path / "b")
    assert key_of("./data") != in_a
