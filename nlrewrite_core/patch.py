"""Patch-evaluate a finished run: the config and upstream checks of the `patch-evaluate` flow.

A finished run (its `runs/<run_id>/run.json`) fixes every stage up to the simulation. Patching and
evaluation (calibrate -> evaluate -> report, and the multilayer stage when configured) can be redone
with other settings -- fractions, calibration methods, bootstrap samples, selections -- without
touching anything upstream: `patch_config` applies overrides of the downstream sections only, and
`check_upstream` demands a manifest for every upstream stage (it never recomputes one). The result
is a new run whose upstream keys are the finished run's.

Pure library (no Prefect): the CLI calls it before Prefect starts, the flow calls it again.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from . import manifest, stages
from .config import PRESETS, ConfigError, RewriteConfig, deep_merge, format_validation_error, load_config
from .storage import Store

log = logging.getLogger("nlrewrite")


PATCH_SECTIONS = ("calibrate", "evaluate", "report", "multilayer", "execution")
"""Config sections an override may change: those of the patch stages, and `execution` (where the work
runs; it is part of no stage key). Every other section feeds an upstream stage."""


class UpstreamMissing(ConfigError):
    """An upstream stage of the finished run has no (valid) manifest: patch-evaluate never recomputes it."""


def patch_config(run_record: dict[str, Any], overrides: dict[str, Any] | None, origin: str = "overrides"
                 ) -> RewriteConfig:
    """The finished run's config with `overrides` merged in; an override of an upstream section is refused."""
    overrides = overrides or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{origin} must be a mapping of config sections, got {type(overrides).__name__}")
    upstream = [s for s in overrides if s not in PATCH_SECTIONS]
    if upstream:
        what = "is an upstream section" if len(upstream) == 1 else "are upstream sections"
        raise ConfigError(
            f"{origin}: {', '.join(map(repr, upstream))} {what} of run {run_record.get('run_id')!r}; patch-evaluate "
            f"reuses its upstream artifacts as they are and overrides only {', '.join(PATCH_SECTIONS)}; "
            f"to change {', '.join(upstream)}, use `nlrewrite run --config FILE`")
    try:
        return RewriteConfig.model_validate(deep_merge(run_record["config"], overrides))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"{origin} over run {run_record.get('run_id')!r}")) from None


def upstream_artifacts(cfg: RewriteConfig, keys: dict[str, str]) -> list[tuple[str, str, int | None]]:
    """(stage, key, layer) of every artifact the patch stages read and never compute: the run's stages
    before calibrate, and with `multilayer.layers` each extra layer's transcoder (and, with
    `multilayer.simulate`, its activations ... simulate). `layer` is None for the run's own stages."""
    out: list[tuple[str, str, int | None]] = [(s, k, None) for s, k in keys.items() if s not in stages.PATCH_STAGES]
    if cfg.multilayer.layers:
        from .stages import multilayer

        per_layer = multilayer.layer_keys(cfg)
        for layer in cfg.multilayer.layers:
            wanted = [s for s in multilayer.LAYER_STAGES if s not in stages.PATCH_STAGES] \
                if cfg.multilayer.simulate else ["transcoder"]
            out += [(s, per_layer[layer][s], layer) for s in wanted if s in per_layer[layer]]
    return out


def artifact_ok(store: Store, stage: str, key: str) -> bool:
    """Whether an upstream artifact is done and sound: its manifest exists and every file it lists has
    its recorded size, sha256 and rows (manifest.verify). Nothing is removed or rewritten here: a damaged
    upstream stage is reported, and `nlrewrite run` (or `nlrewrite verify --repair`) redoes it."""
    if not store.has_manifest(stage, key):
        return False
    problems = manifest.verify(store, stage, key)
    if problems:
        log.warning("%s %s: %s", stage, key, problems[0])
    return not problems


def rerun_command(run_record: dict[str, Any], store: Store, endpoint_url: str | None) -> str:
    """The `nlrewrite run` that makes the finished run's artifacts (its preset, storage and run id), in
    backquotes; the sections that differ from the preset, if any, are named for a --config file."""
    preset = run_record.get("preset") or run_record["config"].get("preset", "tiny")
    cmd = f"nlrewrite run --preset {preset} --storage {store.root} --run-id {run_record['run_id']}"
    if endpoint_url:
        cmd += f" --endpoint-url {endpoint_url}"
    base = load_config(preset).model_dump(mode="json") if preset in PRESETS else {}
    changed = [s for s, v in run_record["config"].items() if s != "preset" and base.get(s) != v]
    if not changed:
        return f"`{cmd}`"
    return (f"`{cmd} --config FILE.yaml` (FILE.yaml: sections {', '.join(changed)} of `config` in "
            f"{store.uri('runs', run_record['run_id'], 'run.json')})")


def check_upstream(store: Store, cfg: RewriteConfig, keys: dict[str, str], run_record: dict[str, Any],
                   endpoint_url: str | None = None) -> list[tuple[str, str, int | None]]:
    """Every upstream artifact of the patch stages, checked (`artifact_ok`); the first missing one raises
    UpstreamMissing with one line naming it and the `nlrewrite run` that makes it."""
    ups = upstream_artifacts(cfg, keys)
    for stage, key, layer in ups:
        if artifact_ok(store, stage, key):
            continue
        recorded = run_record.get("keys", {}).get(stage) if layer is None else None
        why = (f" (run {run_record['run_id']!r} recorded key {recorded}: this nlrewrite version plans another,"
               f" a stage version changed)") if recorded and recorded != key else ""
        where = f"stage {stage!r}" + (f" of layer {layer}" if layer is not None else "")
        fix = rerun_command(run_record, store, endpoint_url)
        raise UpstreamMissing(f"{where} (key {key}) has no manifest in {store.root}{why}; patch-evaluate never "
                              f"recomputes an upstream stage: make it with {fix}")
    return ups


def prepare(store: Store, run_id: str, overrides: dict[str, Any] | None, new_run_id: str | None = None,
            endpoint_url: str | None = None, origin: str = "overrides"
            ) -> tuple[dict[str, Any], RewriteConfig, dict[str, str], str]:
    """Everything checked before any work: (finished run's record, patched config, its keys, new run id).
    Raises ConfigError (bad or upstream override, unknown run, reused run id) or UpstreamMissing."""
    from .query import RunNotFound, load_run

    try:
        record = load_run(store, run_id)
    except RunNotFound as e:
        raise ConfigError(str(e)) from None
    cfg = patch_config(record, overrides, origin)
    keys = stages.plan(cfg)
    check_upstream(store, cfg, keys, record, endpoint_url)
    new_run_id = new_run_id or stages.default_run_id(cfg, keys)
    if new_run_id == run_id and keys != record.get("keys", keys):
        raise ConfigError(f"the new run id {new_run_id!r} is the finished run itself, whose record would be "
                          f"overwritten by other results; choose another (--run-id)")
    return record, cfg, keys, new_run_id
