"""One Prefect task per stage, made from the stage registry (nlrewrite_core.stages.STAGES). Tasks are
verbs: each task is named after its stage function (build_corpus, train_subject, ..., simulate_shard
and collect_shards for the sharded simulate stage) and only calls it.

Each task's cache key is its stage's content key, so Prefect's cache and the manifests agree;
the library function also checks the manifest first, so a cache miss never redoes finished work.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State

from nlrewrite_core import manifest, stages
from nlrewrite_core.manifest import ArtifactRef
from nlrewrite_core.stages import Stage, shard_sub
from nlrewrite_core.storage import Store
from nlrewrite_core.transient import is_transient

from .context import RunContext


def stage_cache_key(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """cache_key_fn: the stage's content key (plus the shard for sharded stages) in its storage root."""
    def key_fn(_ctx: TaskRunContext, params: dict[str, Any]) -> str:
        run: RunContext = params["run"]
        shard = params.get("shard")
        # The absolute root: "./nlrewrite-data" in two checkouts is two roots, not one cache entry.
        where = run.storage if "://" in run.storage else os.path.abspath(run.storage)
        root = hashlib.sha256(f"{where}|{run.endpoint_url}".encode()).hexdigest()[:8]
        return f"{stage}-{run.stage_keys[stage]}-{root}" + (f"-shard-{shard}" if shard is not None else "")
    return key_fn


def retry_on_transient(_task: Task, _task_run: TaskRun, state: State) -> bool:
    """retry_condition_fn: retry only what a retry can fix (network, S3, LLM 429/5xx, timeouts:
    nlrewrite_core.transient); a validation error, a missing file or a ValueError fails at once.
    (Prefect calls it only when it is a plain function, so it stays one.)"""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            return False
    return isinstance(exc, BaseException) and is_transient(exc)


def stage_task(stage: Stage, shard: bool = False) -> Task:
    """The Prefect task of a stage (or of one shard of a sharded stage): named after its stage function,
    cached by the stage's key, its result persisted, `stage.retries` retries of transient errors only."""
    name = stage.shard_function if shard else stage.function
    assert name is not None
    retries = stage.retries

    if shard:
        def run_shard(run: RunContext, shard: int) -> ArtifactRef:
            return stages.run(stage.name, run.store(), run.config, run.stage_keys, shard)
        fn: Callable[..., ArtifactRef] = run_shard
    else:
        def run_stage(run: RunContext) -> ArtifactRef:
            return stages.run(stage.name, run.store(), run.config, run.stage_keys)
        fn = run_stage
    fn.__name__ = fn.__qualname__ = name
    where = f"nlrewrite_core.stages.{stage.module or stage.name}.{name}"
    fn.__doc__ = f"The {stage.name} stage{' (one shard)' if shard else ''}: {where}."
    delays: list[float] = [5, 30, 120]
    return task(name=name, cache_key_fn=stage_cache_key(stage.name), persist_result=True,
                cache_expiration=timedelta(days=365), retries=retries, retry_delay_seconds=delays[:retries],
                retry_condition_fn=retry_on_transient, task_run_name=f"{name}-{{shard}}" if shard else name)(fn)


TASKS: dict[str, Task] = {s.name: stage_task(s) for s in stages.STAGES}
"""Each stage's task, by stage name (a sharded stage's task collects its shards)."""
SHARD_TASKS: dict[str, Task] = {s.name: stage_task(s, shard=True) for s in stages.STAGES if s.sharded}
"""Each sharded stage's one-shard task, by stage name."""


def ensure(stage: str, run: RunContext, store: Store, shard: int | None = None, task_run_name: str | None = None
           ) -> ArtifactRef:
    """Run a stage's task (or one shard's); if Prefect's cache answered but the manifest is gone, or a
    file it lists is damaged (manifest.reuse verifies every file's sha256), run it for real.

    The manifest and the files it lists, not Prefect's cache record, decide whether a stage is done.
    """
    task_fn = TASKS[stage] if shard is None else SHARD_TASKS[stage]
    if task_run_name:
        task_fn = task_fn.with_options(task_run_name=task_run_name)
    kwargs: dict[str, Any] = {} if shard is None else {"shard": shard}
    ref = task_fn(run, **kwargs)
    sub = shard_sub(shard) if shard is not None else ""
    key = run.stage_keys[stage]
    if not store.has_manifest(stage, key, sub):
        get_run_logger().warning("%s: cached result points at a missing manifest; recomputing", stage)
    elif manifest.reuse(store, stage, key, sub) is not None:  # intact (damage is named by reuse, in one warning)
        return ref
    return task_fn.with_options(refresh_cache=True)(run, **kwargs)
