"""One Prefect task per stage. Tasks are verbs; the work is in nlrewrite_core.stages.

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

from nlrewrite_core import stages
from nlrewrite_core.storage import ArtifactRef, Store
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


def stage_task(stage: str, name: str, retries: int = 0, run_name: str | None = None):
    """A Prefect task decorator with the stage's cache key, result persistence, and `retries` retries
    of transient errors only (`retry_on_transient`)."""
    return task(name=name, cache_key_fn=stage_cache_key(stage), persist_result=True,
                cache_expiration=timedelta(days=365), retries=retries, retry_delay_seconds=[5, 30, 120][:retries],
                retry_condition_fn=retry_on_transient, task_run_name=run_name or name)


@stage_task("corpus", "build_corpus")
def build_corpus(run: RunContext) -> ArtifactRef:
    return stages.run_corpus(run.store(), run.config, run.stage_keys)


@stage_task("subject", "train_subject")
def train_subject(run: RunContext) -> ArtifactRef:
    return stages.run_subject(run.store(), run.config, run.stage_keys)


@stage_task("transcoder", "train_transcoder")
def train_transcoder(run: RunContext) -> ArtifactRef:
    return stages.run_transcoder(run.store(), run.config, run.stage_keys)


@stage_task("activations", "cache_activations")
def cache_activations(run: RunContext) -> ArtifactRef:
    return stages.run_activations(run.store(), run.config, run.stage_keys)


@stage_task("explain", "explain_latents", retries=2)
def explain_latents(run: RunContext) -> ArtifactRef:
    return stages.run_explain(run.store(), run.config, run.stage_keys)


@stage_task("embed", "embed_contexts")
def embed_contexts(run: RunContext) -> ArtifactRef:
    return stages.run_embed(run.store(), run.config, run.stage_keys)


@stage_task("score", "score_explanations", retries=2)
def score_explanations(run: RunContext) -> ArtifactRef:
    return stages.run_score(run.store(), run.config, run.stage_keys)


@stage_task("simulate", "simulate_shard", retries=2, run_name="simulate_shard-{shard}")
def simulate_shard(run: RunContext, shard: int) -> ArtifactRef:
    return stages.run_simulate_shard(run.store(), run.config, run.stage_keys, shard)


@stage_task("simulate", "collect_shards")
def collect_shards(run: RunContext) -> ArtifactRef:
    return stages.finish_simulate(run.store(), run.config, run.stage_keys)


@stage_task("calibrate", "calibrate_predictions")
def calibrate_predictions(run: RunContext) -> ArtifactRef:
    return stages.run_calibrate(run.store(), run.config, run.stage_keys)


@stage_task("evaluate", "evaluate_rewrite")
def evaluate_rewrite(run: RunContext) -> ArtifactRef:
    return stages.run_evaluate(run.store(), run.config, run.stage_keys)


@stage_task("report", "write_report")
def write_report(run: RunContext) -> ArtifactRef:
    return stages.run_report(run.store(), run.config, run.stage_keys)


@stage_task("multilayer", "evaluate_layers")
def evaluate_layers(run: RunContext) -> ArtifactRef:
    from nlrewrite_core import multilayer

    return multilayer.run_multilayer(run.store(), run.config, run.stage_keys)


def shard_sub(shard: int) -> str:
    """Sub-directory of one simulation shard inside the simulate artifact."""
    return f"shard-{shard:05d}"


def ensure(task_fn, stage: str, run: RunContext, store: Store, **kwargs: Any) -> ArtifactRef:
    """Run a stage task; if Prefect's cache answered but the manifest is gone, or a file it lists
    is damaged (Store.reuse verifies every file's sha256), run it for real.

    The manifest and the files it lists, not Prefect's cache record, decide whether a stage is done.
    """
    ref = task_fn(run, **kwargs)
    sub = shard_sub(kwargs["shard"]) if "shard" in kwargs else ""
    key = run.stage_keys[stage]
    if not store.has_manifest(stage, key, sub):
        get_run_logger().warning("%s: cached result points at a missing manifest; recomputing", stage)
    elif store.reuse(stage, key, sub) is not None:  # intact (damage is named by reuse, in one warning)
        return ref
    return task_fn.with_options(refresh_cache=True)(run, **kwargs)
