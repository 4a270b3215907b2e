"""The `rewrite` flow: corpus -> subject -> transcoder -> activations -> explain -> embed -> score
-> simulate (shards) -> calibrate -> evaluate -> report, every stage cached by its content key."""

from __future__ import annotations

import json
import logging
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_progress_artifact, \
    create_table_artifact, update_progress_artifact

from nlrewrite_core import stages
from nlrewrite_core.config import RewriteConfig, load_config
from nlrewrite_core.storage import ArtifactRef, Store
from tasks import stages as t
from tasks.context import RunContext


def ensure(task_fn, stage: str, run: RunContext, store: Store, **kwargs: Any) -> ArtifactRef:
    """Run a stage task; if Prefect's cache answered but the manifest is gone, run it for real.

    The manifest, not Prefect's cache record, decides whether a stage is done.
    """
    ref = task_fn(run, **kwargs)
    sub = f"shard-{kwargs['shard']:05d}" if "shard" in kwargs else ""
    if not store.has_manifest(stage, run.stage_keys[stage], sub):
        get_run_logger().warning("%s: cached result points at a missing manifest; recomputing", stage)
        ref = task_fn.with_options(refresh_cache=True)(run, **kwargs)
    return ref


def simulate_all(run: RunContext, store: Store) -> ArtifactRef:
    """Run every simulation shard as its own task (skipping finished ones), with a progress artifact."""
    logger = get_run_logger()
    num_latents = stages._num_latents(store, run.stage_keys)
    ranges = stages.shard_ranges(num_latents, run.config.simulate.shard_latents)
    done = sum(store.has_manifest("simulate", run.stage_keys["simulate"], f"shard-{i:05d}") for i in range(len(ranges)))
    progress = create_progress_artifact(100.0 * done / len(ranges), key="simulate-shards",
                                        description=f"simulate: shards done / {len(ranges)}")
    for i in range(len(ranges)):
        ensure(t.simulate_shard, "simulate", run, store, shard=i)
        update_progress_artifact(progress, 100.0 * (i + 1) / len(ranges))
        logger.info("simulate: %d / %d shards done", i + 1, len(ranges))
    return ensure(t.collect_shards, "simulate", run, store)


@flow(name="rewrite", log_prints=True)
def rewrite(preset: str = "tiny", config_file: str | None = None, storage: str = "./nlrewrite-data",
            run_id: str | None = None, endpoint_url: str | None = None,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rewrite part of a transformer in natural language and measure the cost (the whole DAG)."""
    logging.getLogger("nlrewrite").setLevel(logging.INFO)
    cfg = load_config(preset, config_file, overrides)
    return run_pipeline(cfg, storage, run_id, endpoint_url)


def run_pipeline(cfg: RewriteConfig, storage: str, run_id: str | None, endpoint_url: str | None) -> dict[str, Any]:
    store = Store(storage, endpoint_url=endpoint_url)
    keys = stages.plan(cfg)
    run_id = run_id or f"{cfg.preset}-{keys['report'][:10]}"
    run = RunContext(run_id=run_id, storage=storage, endpoint_url=endpoint_url, config=cfg, stage_keys=keys)
    logger = get_run_logger()
    logger.info("run %s: storage %s", run_id, store.root)
    stage_tasks = [("corpus", t.build_corpus), ("subject", t.train_subject), ("transcoder", t.train_transcoder),
                   ("activations", t.cache_activations), ("explain", t.explain_latents), ("embed", t.embed_contexts),
                   ("score", t.score_explanations)]
    total = len(stage_tasks) + 4
    progress = create_progress_artifact(0.0, key="rewrite-stages", description=f"rewrite: stages done / {total}")
    refs: dict[str, ArtifactRef] = {}
    for i, (stage, fn) in enumerate(stage_tasks):
        refs[stage] = ensure(fn, stage, run, store)
        update_progress_artifact(progress, 100.0 * (i + 1) / total)
    refs["simulate"] = simulate_all(run, store)
    for i, (stage, fn) in enumerate([("calibrate", t.calibrate_predictions), ("evaluate", t.evaluate_rewrite),
                                     ("report", t.write_report)]):
        refs[stage] = ensure(fn, stage, run, store)
        update_progress_artifact(progress, 100.0 * (len(stage_tasks) + 2 + i) / total)

    ce = store.read_parquet(f"{store.artifact_dir('evaluate', keys['evaluate'])}/ce.parquet").to_pylist()
    report = store.uri("artifacts", "report", keys["report"], "html", "report.html")
    run_record = {"run_id": run_id, "preset": cfg.preset, "storage": store.root, "keys": keys,
                  "config": cfg.model_dump(mode="json"), "report": report}
    store.write_json(store.path("runs", run_id, "run.json"), run_record)
    update_progress_artifact(progress, 100.0)
    create_table_artifact([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in ce],
                          key="ce-sweep", description=f"CE sweep of run {run_id}")
    summary = store.read_manifest("report", keys["report"])["metrics"]["summary"]
    create_markdown_artifact("# nlrewrite run `" + run_id + "`\n\n| metric | value |\n|---|---|\n" + "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items())
        + f"\n\nReport: `{report}`", key="rewrite-summary")
    create_link_artifact(report if store.is_s3 else f"file://{report}", link_text="report.html", key="rewrite-report")
    logger.info("run %s done: report %s", run_id, report)
    return {"run_id": run_id, "report": report, "keys": keys, "ce": ce, "summary": summary,
            "run_json": store.uri("runs", run_id, "run.json")}


if __name__ == "__main__":
    print(json.dumps(rewrite(), indent=2, default=str))
