"""The `rewrite` flow: the stages of the registry (nlrewrite_core.stages.STAGES) in DAG order, corpus ->
subject -> transcoder -> activations -> explain -> embed -> score -> simulate (shards) -> calibrate ->
evaluate -> report, every stage cached by its content key. The stages downstream of the simulation
(stages.PATCH_STAGES: calibrate, evaluate, report, multilayer) are the `patch-evaluate` subflow
(flows/patch_evaluate.py). `until` stops after a stage: a prefix of the DAG."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from flows.patch_evaluate import patch_evaluate, publish, run_record
from flows.prefect_sync import flow_run_id, sync
from nlrewrite_core import runtime, stages
from nlrewrite_core.config import RewriteConfig, load_config
from nlrewrite_core.manifest import ArtifactRef
from nlrewrite_core.progress import advance
from nlrewrite_core.storage import DEFAULT_ROOT, MANIFEST, Store, check_name
from tasks.context import RunContext
from tasks.stages import ensure


def missing_shards(run: RunContext, store: Store, shards: Iterable[int]) -> list[int]:
    """The shards of `shards` without a manifest (the manifest, not Prefect's state, says a shard is done)."""
    key = run.stage_keys["simulate"]
    return [i for i in shards if not store.has_manifest("simulate", key, stages.shard_sub(i))]


def count_done_shards(run: RunContext, store: Store) -> int:
    """Shards with a manifest, from one listing of the simulate artifact (cheap to poll on S3)."""
    import pyarrow.fs as pafs

    base = store.artifact_dir("simulate", run.stage_keys["simulate"])
    infos = store.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sum(1 for i in infos if i.base_name == MANIFEST and i.path[len(base):].strip("/").startswith("shard-"))


def simulate_all(run: RunContext, store: Store) -> ArtifactRef:
    """Run every simulation shard (skipping finished ones), with a progress artifact, in-process
    (`execution.fanout: local`) or as `simulate-shard` deployment runs (`deployment`)."""
    logger = get_run_logger()
    n_shards = stages.n_shards(store, run.config, run.stage_keys)
    todo = missing_shards(run, store, range(n_shards))
    done = n_shards - len(todo)
    progress = sync(create_progress_artifact(100.0 * done / n_shards, key="simulate-shards",
                                             description=f"simulate: shards done / {n_shards}"))
    if todo:  # the console's bar starts at the shards already done (none to show when all are)
        advance("simulate", done, n_shards, "shards")
    if run.config.execution.fanout == "deployment":
        fan_out(run, store, n_shards, progress)
    else:
        for i in range(n_shards):
            ensure("simulate", run, store, shard=i)
            if i in todo:
                done += 1
                update_progress_artifact(progress, 100.0 * done / n_shards)
                advance("simulate", done, n_shards, "shards")
                logger.info("simulate: %d / %d shards done", done, n_shards)
    missing = missing_shards(run, store, range(n_shards))  # verify every shard before calibration
    if missing:
        raise RuntimeError(f"simulate: shards {missing} have no manifest after fan-out")
    return ensure("simulate", run, store)


def _cancel_stale_shard_runs(client, deployment_id, run: RunContext, parent_id: str | None) -> int:
    """Cancel scheduled/pending shard runs of the same simulate key left by an earlier, killed parent run
    (they would duplicate the shards this run launches). Running ones are left alone."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.SCHEDULED, StateType.PENDING]))))
    n = 0
    for fr in runs:
        p = fr.parameters or {}
        if (p.get("expected_key") == run.stage_keys["simulate"] and p.get("storage") == run.storage
                and str(fr.parent_task_run_id or "") != "" and fr.tags and f"parent:{parent_id}" not in fr.tags):
            client.set_flow_run_state(fr.id, Cancelled(message="superseded by a newer rewrite run"), force=True)
            n += 1
    return n


def fan_out(run: RunContext, store: Store, n_shards: int, progress: UUID) -> None:
    """Launch one `simulate-shard` deployment run per range of missing shards, wait for all, relaunch
    failed ranges (at most `execution.max_run_attempts` attempts each)."""
    logger = get_run_logger()
    ex = run.config.execution
    todo = missing_shards(run, store, range(n_shards))
    if not todo:
        update_progress_artifact(progress, 100.0)
        return
    ranges = [todo[i:i + ex.shards_per_run] for i in range(0, len(todo), ex.shards_per_run)]
    parent_id = flow_run_id()
    base = {"config": run.config.model_dump(mode="json"), "storage": run.storage, "endpoint_url": run.endpoint_url,
            "run_id": run.run_id, "expected_key": run.stage_keys["simulate"]}
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(ex.deployment)
        try:
            if n := _cancel_stale_shard_runs(client, deployment.id, run, parent_id):
                logger.info("simulate: cancelled %d stale scheduled shard runs of an earlier run", n)
        except Exception as e:  # never block the run on housekeeping
            logger.warning("simulate: could not look for stale shard runs: %s", type(e).__name__)

    def launch(idx: int, attempt: int) -> UUID:
        shards = ranges[idx]
        fr = sync(run_deployment(ex.deployment, parameters={**base, "shards": shards}, timeout=0,
                                 flow_run_name=f"{run.run_id}-shards-{shards[0]}-{shards[-1]}-a{attempt}",
                                 tags=["nlrewrite", f"parent:{parent_id}"],
                                 idempotency_key=f"{parent_id}-{idx}-{attempt}"))
        return fr.id

    t0 = time.perf_counter()
    attempts = {i: 1 for i in range(len(ranges))}
    active = {i: launch(i, 1) for i in range(len(ranges))}
    logger.info("simulate: launched %d runs of %s for %d shards (%d per run)", len(ranges), ex.deployment,
                len(todo), ex.shards_per_run)
    failed: dict[int, str] = {}
    last_done = -1
    with get_client(sync_client=True) as client:
        while active:
            if time.perf_counter() - t0 > ex.run_timeout_s:
                raise TimeoutError(f"simulate: shard runs {sorted(map(str, active.values()))} still not finished "
                                   f"after {ex.run_timeout_s:.0f}s; finished shards stay done, rerun to resume")
            time.sleep(ex.poll_s)
            for idx, fr_id in list(active.items()):
                state = client.read_flow_run(fr_id).state
                if state is None or not state.is_final():
                    continue
                del active[idx]
                left = missing_shards(run, store, ranges[idx])
                if state.is_completed() and not left:
                    continue
                why = f"{state.name}" + (f", shards {left} missing" if left else "")
                if attempts[idx] < ex.max_run_attempts:
                    attempts[idx] += 1
                    logger.warning("simulate: shard run %s ended %s; relaunching (attempt %d of %d)", fr_id, why,
                                   attempts[idx], ex.max_run_attempts)
                    active[idx] = launch(idx, attempts[idx])
                else:
                    failed[idx] = f"{fr_id} ({why})"
            done = count_done_shards(run, store)
            if done != last_done:
                update_progress_artifact(progress, 100.0 * done / n_shards)
                advance("simulate", done, n_shards, "shards")
                logger.info("simulate: %d / %d shards done (%.0fs)", done, n_shards, time.perf_counter() - t0)
                last_done = done
    if failed:
        raise RuntimeError(f"simulate: shard runs failed after {ex.max_run_attempts} attempts: "
                           + "; ".join(failed[i] for i in sorted(failed)))


@flow(name="rewrite", log_prints=True)
def rewrite(preset: str = "tiny", config_file: str | None = None, storage: str = DEFAULT_ROOT,
            run_id: str | None = None, endpoint_url: str | None = None,
            overrides: dict[str, Any] | None = None, until: str | None = None) -> dict[str, Any]:
    """Rewrite part of a transformer in natural language and measure the cost (the whole DAG, or its
    stages up to and including `until`)."""
    for name in ("nlrewrite", "nlrewrite_core"):
        logging.getLogger(name).setLevel(logging.INFO)
    cfg = load_config(preset, config_file, overrides)
    return run_pipeline(cfg, storage, run_id, endpoint_url, until)


def run_pipeline(cfg: RewriteConfig, storage: str, run_id: str | None, endpoint_url: str | None,
                 until: str | None = None) -> dict[str, Any]:
    check_name(cfg.preset, "config field preset")
    if run_id is not None:
        check_name(run_id, "run id")
    todo = stages.order(cfg, until)  # an unknown stage, or one this config lacks: refused before any work
    store = Store(storage, endpoint_url=endpoint_url)
    store.check()  # a missing bucket or rejected credentials fail here, before any work
    runtime.check_run(cfg)  # devices, backends, checkpoint, corpus size: before the first stage
    runtime.apply_threads(cfg)
    keys = stages.plan(cfg)
    run_id = run_id or stages.default_run_id(cfg, keys)
    run = RunContext(run_id=run_id, storage=storage, endpoint_url=endpoint_url, config=cfg, stage_keys=keys)
    logger = get_run_logger()
    logger.info("run %s: storage %s", run_id, store.root)
    upstream = [s for s in todo if s.name not in stages.PATCH_STAGES]
    total = len(todo)
    progress = sync(create_progress_artifact(0.0, key="rewrite-stages",
                                             description=f"rewrite: stages done / {total}"))
    for i, stage in enumerate(upstream):
        if stage.sharded:
            simulate_all(run, store)
        else:
            ensure(stage.name, run, store)
        update_progress_artifact(progress, 100.0 * (i + 1) / total)
    if len(upstream) == len(todo):  # `until` stopped before calibration: no evaluation, no report
        store.write_json(store.path("runs", run_id, "run.json"), run_record(run, store, until=until))
        update_progress_artifact(progress, 100.0)
        logger.info("run %s: stages up to %s done", run_id, until)
        return {"run_id": run_id, "keys": keys, "until": until, "stages": [s.name for s in todo],
                "run_json": store.uri("runs", run_id, "run.json")}
    if cfg.multilayer.layers and until in (None, "multilayer"):
        layer_pipelines(run, store)
    # calibrate -> evaluate -> report (-> multilayer): the patch-evaluate subflow on this run, one code path
    # with `nlrewrite evaluate`; it reads the run's record, so that is written first (the subflow completes it).
    store.write_json(store.path("runs", run_id, "run.json"), run_record(run, store))
    out = patch_evaluate(run_id=run_id, storage=storage, endpoint_url=endpoint_url, new_run_id=run_id, until=until)
    if out["keys"] != keys:
        raise RuntimeError(f"patch-evaluate planned keys {out['keys']} for run {run_id}, rewrite planned {keys}")
    update_progress_artifact(progress, 100.0)
    if "report" in out:
        publish(run, store, out)
        logger.info("run %s done: report %s", run_id, out["report"])
    return out


def layer_pipelines(run: RunContext, store: Store) -> None:
    """Several layers at once: each extra layer's own pipeline up to the simulation (the ordinary stage
    tasks on that layer's config, content-addressed and cached like the main layer's). Their calibration
    and the `multilayer` stage run in the patch-evaluate subflow."""
    from nlrewrite_core.stages import multilayer

    logger = get_run_logger()
    cfg = run.config
    per_layer = multilayer.layer_keys(cfg)
    for layer in cfg.multilayer.layers:
        lrun = run.model_copy(update={"config": multilayer.layer_config(cfg, layer), "stage_keys": per_layer[layer]})
        for stage in stages.order(lrun.config, "simulate" if cfg.multilayer.simulate else "transcoder"):
            if stage.name not in multilayer.LAYER_STAGES:  # corpus, subject: the run's own
                continue
            if stage.sharded:
                simulate_all(lrun, store)
            else:
                ensure(stage.name, lrun, store, task_run_name=f"{stage.function}-layer{layer}")
        logger.info("multilayer: layer %d's pipeline up to the simulation done", layer)


if __name__ == "__main__":
    print(json.dumps(rewrite(), indent=2, default=str))
