"""The `patch-evaluate` flow: calibrate -> evaluate -> report (and the multilayer stage when configured)
on a finished run's simulations, with overrides of those stages' sections only.

It is also the subflow `rewrite` runs for these stages, so there is one code path. It never
recomputes an upstream stage: each one's manifest must be in the storage root
(nlrewrite_core.patch.check_upstream), else it fails with one line naming the stage and the
`nlrewrite run` that makes it. The result is a run (its own run.json) whose upstream keys are the
finished run's; in the Prefect UI it shows one task per stage, a progress artifact, the CE sweep as
a table artifact, a markdown summary and a link to the report, as `rewrite` does.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.prefect_sync import sync
from nlrewrite_core import patch, stages
from nlrewrite_core.storage import DEFAULT_ROOT, Store
from tasks.context import RunContext
from tasks.stages import ensure


def run_record(run: RunContext, store: Store, **extra: Any) -> dict[str, Any]:
    """A run's run.json: which keys it used, its config and storage (plus `extra`: its report...)."""
    return {"run_id": run.run_id, "preset": run.config.preset, "storage": store.root, "keys": run.stage_keys,
            "config": run.config.model_dump(mode="json"), **extra}


def _rounded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]


def publish(run: RunContext, store: Store, result: dict[str, Any]) -> None:
    """The run's results as Prefect artifacts of the current flow run: the CE sweep (table), a summary
    (markdown) and a link to report.html."""
    create_table_artifact(_rounded(result["ce"]), key="ce-sweep", description=f"CE sweep of run {run.run_id}")
    create_markdown_artifact("# nlrewrite run `" + run.run_id + "`\n\n| metric | value |\n|---|---|\n" + "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result["summary"].items())
        + f"\n\nReport: `{result['report']}`", key="rewrite-summary")
    report = result["report"]
    create_link_artifact(report if store.is_s3 else f"file://{report}", link_text="report.html", key="rewrite-report")


def multilayer_stage(run: RunContext, store: Store) -> list[dict[str, Any]]:
    """The multilayer stage: each extra layer's calibration (its upstream stages were made by `rewrite`),
    then CE with 1..n layers rewritten at once."""
    from nlrewrite_core.stages import multilayer

    cfg = run.config
    if cfg.multilayer.simulate:
        per_layer = multilayer.layer_keys(cfg)
        for layer in cfg.multilayer.layers:
            lrun = run.model_copy(update={"config": multilayer.layer_config(cfg, layer),
                                          "stage_keys": per_layer[layer]})
            ensure("calibrate", lrun, store, task_run_name=f"{stages.get('calibrate').function}-layer{layer}")
    ensure("multilayer", run, store)
    rows = store.read_parquet(f"{store.artifact_dir('multilayer', run.stage_keys['multilayer'])}/multilayer.parquet"
                              ).to_pylist()
    create_table_artifact(_rounded([r for r in rows if r["positions"] == cfg.evaluate.positions]),
                          key="multilayer", description=f"CE with 1..n layers rewritten at once, run {run.run_id}")
    return rows


@flow(name="patch-evaluate", log_prints=True)
def patch_evaluate(run_id: str, storage: str = DEFAULT_ROOT, endpoint_url: str | None = None,
                   overrides: dict[str, Any] | None = None, new_run_id: str | None = None,
                   until: str | None = None) -> dict[str, Any]:
    """Calibrate, evaluate and report a finished run again with overrides of the calibrate, evaluate and
    report sections (new fractions, calibration methods, bootstrap samples...); nothing upstream runs.
    `until` stops after that stage (a run with no report)."""
    for name in ("nlrewrite", "nlrewrite_core"):
        logging.getLogger(name).setLevel(logging.INFO)
    logger = get_run_logger()
    store = Store(storage, endpoint_url=endpoint_url)
    store.check()  # a missing bucket or rejected credentials fail here, before any work
    _, cfg, keys, new_id = patch.prepare(store, run_id, overrides, new_run_id, endpoint_url)
    todo = [s.name for s in stages.order(cfg, until) if s.name in stages.PATCH_STAGES]
    reused = patch.upstream_artifacts(cfg, keys)  # all checked by prepare()
    logger.info("patch-evaluate: run %s from run %s, %d upstream artifacts reused as they are: %s", new_id, run_id,
                len(reused), ", ".join(s if layer is None else f"{s}(layer {layer})" for s, _, layer in reused))
    run = RunContext(run_id=new_id, storage=storage, endpoint_url=endpoint_url, config=cfg, stage_keys=keys)
    total = len(todo)
    progress = sync(create_progress_artifact(0.0, key="patch-evaluate-stages",
                                             description=f"patch-evaluate: stages done / {total}"))
    multilayer_rows = None
    for i, stage in enumerate(todo):
        if stage == "multilayer":
            multilayer_rows = multilayer_stage(run, store)
        else:
            ensure(stage, run, store)
        update_progress_artifact(progress, 100.0 * (i + 1) / total)
    if "report" not in todo:  # `until` stopped before the report: the run is not finished
        store.write_json(store.path("runs", new_id, "run.json"), run_record(run, store, until=until))
        logger.info("run %s: stages up to %s done", new_id, until)
        return {"run_id": new_id, "keys": keys, "until": until, "stages": todo,
                "run_json": store.uri("runs", new_id, "run.json")}

    ce = store.read_parquet(f"{store.artifact_dir('evaluate', keys['evaluate'])}/ce.parquet").to_pylist()
    report = store.uri("artifacts", "report", keys["report"], "html", "report.html")
    extra: dict[str, Any] = {"report": report}
    if new_id != run_id:
        extra["patched_from"] = {"run_id": run_id, "overrides": overrides or {}}
    store.write_json(store.path("runs", new_id, "run.json"), run_record(run, store, **extra))
    summary = store.read_manifest("report", keys["report"])["metrics"]["summary"]
    out = {"run_id": new_id, "report": report, "keys": keys, "ce": ce, "summary": summary,
           "run_json": store.uri("runs", new_id, "run.json"),
           "upstream_reused": [s if layer is None else f"{s}@layer{layer}" for s, _, layer in reused]}
    publish(run, store, out)
    if multilayer_rows is not None:
        out["multilayer"] = multilayer_rows
    logger.info("run %s done: report %s", new_id, report)
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps(patch_evaluate(sys.argv[1]), indent=2, default=str))
