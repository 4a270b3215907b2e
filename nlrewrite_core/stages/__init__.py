"""The stage registry: every stage of the DAG declared once.

A `Stage` says what `plan()`, the Prefect tasks (tasks/stages.py), the flows' order, the multilayer
pipeline and the benchmarks need to know of a stage: its name and version, the config it is keyed
on and its upstream stages, the library function that computes it (in `nlrewrite_core/stages/<name>.py`,
beside it: its reads, its computation's calls, its writes), its retries, and whether it runs in shards.
Adding a stage is one declaration here plus its module.

A stage function is a function of (store, config, keys) that returns an ArtifactRef. It first looks
for its manifest (`reuse`) and returns at once when the manifest is there and every file it lists is
intact, so a rerun, or a Prefect cache miss, never recomputes finished work. All the stage keys of a
run come from `plan()`, a pure function of the config.

The computations stay in the flat modules (corpus.py, calibrate.py, evaluate.py...), pure functions of
arrays and tables that never touch storage; what several stages read is in `nlrewrite_core.artifacts`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import manifest
from ..config import RewriteConfig
from ..manifest import ArtifactRef, StageWriter, stage_key
from ..storage import Store

log = logging.getLogger("nlrewrite")

CACHED_SPLITS = ("explain", "calib", "eval")
"""The corpus splits whose latent activations the activations stage caches (plus `sample`, when asked)."""

Section = Callable[[RewriteConfig, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """One stage of the DAG."""

    name: str
    """The stage's name: its artifact directory (artifacts/<name>/<key>), its config's key in plan()."""
    version: str
    """Bumped when the stage computes something else from the same inputs: its key (and its
    downstream stages' keys) change, so cached artifacts of the old code are never reused."""
    section: Section
    """The part of the config the stage's key hashes: (config, config dumped as JSON) -> dict."""
    upstream: Callable[[RewriteConfig], tuple[str, ...]]
    """The stages whose keys enter this stage's key (the DAG's edges), for a config."""
    function: str
    """The stage function's name in nlrewrite_core/stages/<module>.py; also its Prefect task's name (a verb)."""
    retries: int = 0
    """Prefect retries of transient errors (LLM endpoints, network, S3)."""
    shard_function: str | None = None
    """For a sharded stage: the function computing one shard (store, config, keys, shard); `function`
    then collects the shards' manifests into the stage's."""
    enabled: Callable[[RewriteConfig], bool] = lambda cfg: True
    """Whether a config has the stage at all (embed: embedding methods only; multilayer: layers given)."""
    module: str = ""
    """The module under nlrewrite_core/stages/ (default: the stage's name)."""

    @property
    def sharded(self) -> bool:
        return self.shard_function is not None

    def resolve(self, shard: bool = False) -> Callable[..., ArtifactRef]:
        """The stage function (or its shard function). Imported on first use: planning a run never
        imports torch or transformers."""
        name = self.shard_function if shard else self.function
        if name is None:
            raise ValueError(f"stage {self.name!r} is not sharded: it has no shard function")
        mod = importlib.import_module(f"{__name__}.{self.module or self.name}")
        return getattr(mod, name)


def _fixed(*names: str) -> Callable[[RewriteConfig], tuple[str, ...]]:
    return lambda cfg: names


def _uses_embeddings(cfg: RewriteConfig) -> bool:
    """The context embeddings serve the embedding scorer and simulator only: LLM methods skip the stage."""
    return "embedding" in (cfg.score.method, cfg.simulate.method)


def _emb(cfg: RewriteConfig) -> tuple[str, ...]:
    return ("embed",) if _uses_embeddings(cfg) else ()


def embed_splits(cfg: RewriteConfig) -> tuple[str, ...]:
    """The splits whose context windows the embed stage embeds: the explain split's scoring half serves
    only the `embedding` scorer; the calib and eval contexts serve the `embedding` simulator."""
    return CACHED_SPLITS if cfg.score.method == "embedding" else ("calib", "eval")


def _embed_section(cfg: RewriteConfig, d: dict[str, Any]) -> dict[str, Any]:
    return {"embedding": d["embedding"], "window": d["simulate"]["window"],
            **({"eval_positions": "last"} if cfg.simulate.eval_positions == "last" else {}),
            **({"splits": list(embed_splits(cfg))} if embed_splits(cfg) != CACHED_SPLITS else {})}


def _score_section(cfg: RewriteConfig, d: dict[str, Any]) -> dict[str, Any]:
    # The lexical scorer reads neither embeddings nor the simulator's settings (issue 11: a scorer that
    # shares nothing with the simulator); the others keep their keys.
    if cfg.score.method == "lexical":
        return {"score": d["score"]}
    return {"score": d["score"], "token_weight": d["simulate"]["token_weight"]}


def _score_upstream(cfg: RewriteConfig) -> tuple[str, ...]:
    return ("activations", "explain", *(_emb(cfg) if cfg.score.method != "lexical" else ()))


def _simulate_section(cfg: RewriteConfig, d: dict[str, Any]) -> dict[str, Any]:
    # max_failed_fraction is read by calibrate alone: changing it never reruns the simulator.
    return {"simulate": {k: v for k, v in d["simulate"].items() if k != "max_failed_fraction"},
            "embedding": d["embedding"]}


def _multilayer_section(cfg: RewriteConfig, d: dict[str, Any]) -> dict[str, Any]:
    section = {"multilayer": d["multilayer"], "transcoder": d["transcoder"],
               "evaluate": {k: d["evaluate"][k] for k in ("batch_size", "n_bootstrap", "positions", "patch_base")}}
    if cfg.multilayer.simulate:  # every extra layer's pipeline runs with the same settings as the main layer's
        section.update({s: d[s] for s in ("activations", "explain", "embedding", "score", "simulate", "calibrate")})
    return section


STAGES: tuple[Stage, ...] = (
    Stage("corpus", "1", lambda c, d: d["corpus"], _fixed(), "build_corpus"),
    Stage("subject", "1", lambda c, d: d["subject"], _fixed("corpus"), "train_subject"),
    Stage("transcoder", "2", lambda c, d: d["transcoder"], _fixed("subject", "corpus"), "train_transcoder"),
    Stage("activations", "1", lambda c, d: d["activations"], _fixed("corpus", "subject", "transcoder"),
          "cache_activations"),
    Stage("explain", "1", lambda c, d: d["explain"], _fixed("corpus", "activations"), "explain_latents", retries=2),
    Stage("embed", "2", _embed_section, _fixed("corpus"), "embed_contexts", enabled=_uses_embeddings),
    Stage("score", "1", _score_section, _score_upstream, "score_explanations", retries=2),
    Stage("simulate", "3", _simulate_section, lambda cfg: ("activations", "explain", *_emb(cfg)), "collect_shards",
          retries=2, shard_function="simulate_shard"),
    # 5: the calibration tables' method column is named `calibration`, as in every other table (issue 13)
    Stage("calibrate", "5", lambda c, d: {**d["calibrate"], "max_failed_fraction": c.simulate.max_failed_fraction},
          _fixed("activations", "simulate"), "calibrate_predictions"),
    Stage("evaluate", "3", lambda c, d: d["evaluate"],
          _fixed("corpus", "subject", "transcoder", "activations", "score", "calibrate"), "evaluate_rewrite"),
    Stage("report", "3", lambda c, d: {},
          _fixed("transcoder", "subject", "activations", "score", "calibrate", "evaluate"), "write_report"),
    # Only when configured: a single-layer run keeps exactly its stages and keys.
    Stage("multilayer", "1", _multilayer_section,
          lambda cfg: ("corpus", "subject", "transcoder", *(("score", "calibrate") if cfg.multilayer.simulate else ())),
          "evaluate_layers", enabled=lambda cfg: bool(cfg.multilayer.layers)),
)
"""Every stage, in DAG order (each after its upstream stages)."""

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)

PATCH_STAGES = ("calibrate", "evaluate", "report", "multilayer")
"""The stages downstream of the simulation: the patch-evaluate flow recomputes these on a finished
run (`nlrewrite evaluate`); every other stage is upstream of them."""


def get(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}: one of {', '.join(NAMES)}") from None


def order(cfg: RewriteConfig, until: str | None = None) -> list[Stage]:
    """The config's stages in DAG order; with `until`, up to and including that stage."""
    out = [s for s in STAGES if s.enabled(cfg)]
    if until is not None:
        names = [s.name for s in out]
        if get(until).name not in names:
            raise ValueError(f"stage {until!r} is not part of this config's pipeline: {', '.join(names)}")
        out = out[:names.index(until) + 1]
    return out


# ---- keys ---------------------------------------------------------------------------------------
def stage_configs(cfg: RewriteConfig) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """Each stage's config section and its upstream stages (the DAG)."""
    d = cfg.model_dump(mode="json")
    return {s.name: (s.section(cfg, d), list(s.upstream(cfg))) for s in order(cfg)}


def plan(cfg: RewriteConfig) -> dict[str, str]:
    """The content key of every stage, in DAG order."""
    keys: dict[str, str] = {}
    for name, (section, ups) in stage_configs(cfg).items():
        keys[name] = stage_key(name, BY_NAME[name].version, section, {u: keys[u] for u in ups})
    return keys


def default_run_id(cfg: RewriteConfig, keys: dict[str, str] | None = None) -> str:
    """A run's id when none is given, what `nlrewrite run` names it: the preset and the start of the
    report stage's key (same config, same keys, same name)."""
    return f"{cfg.preset}-{(keys or plan(cfg))['report'][:10]}"


def shard_ranges(num_latents: int, shard_latents: int) -> list[tuple[int, int]]:
    """Latent ranges [start, stop) of the simulation shards."""
    return [(a, min(a + shard_latents, num_latents)) for a in range(0, num_latents, shard_latents)]


def shard_sub(shard: int) -> str:
    """Sub-directory of one simulation shard inside the simulate artifact."""
    return f"shard-{shard:05d}"


# ---- what every stage function does first ----------------------------------------------------------
def writer(store: Store, stage: str, cfg: RewriteConfig, keys: dict[str, str], sub: str = "") -> StageWriter:
    """The StageWriter of `stage` (or of its part `sub`), with the config section, upstream keys and
    version its manifest records."""
    section, ups = stage_configs(cfg)[stage]
    return StageWriter(store, stage, keys[stage], config=section, upstream={u: keys[u] for u in ups},
                       version=BY_NAME[stage].version, sub=sub)


def reuse(store: Store, stage: str, keys: dict[str, str], sub: str = "") -> ArtifactRef | None:
    """The stage's ref when its manifest is there and every file it lists is intact (manifest.reuse:
    sha256, size, rows); None when it must be computed (a damaged one is named in one warning)."""
    if ref := manifest.reuse(store, stage, keys[stage], sub):
        log.info("%s: found manifest for key %s%s, nothing to do", stage, keys[stage], f"/{sub}" if sub else "")
    return ref


# ---- running stages in this process (no Prefect) -----------------------------------------------
def run(name: str, store: Store, cfg: RewriteConfig, keys: dict[str, str], shard: int | None = None) -> ArtifactRef:
    """Run one stage (or one shard of a sharded stage) in this process."""
    stage = get(name)
    if shard is not None:
        if not stage.sharded:
            raise ValueError(f"stage {name!r} has no shards")
        return stage.resolve(shard=True)(store, cfg, keys, shard)
    return stage.resolve()(store, cfg, keys)


def n_shards(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> int:
    """The number of simulation shards of a run (its activations stage must be done)."""
    from ..artifacts import num_latents

    return len(shard_ranges(num_latents(store, keys), cfg.simulate.shard_latents))


def run_all(store: Store, cfg: RewriteConfig, keys: dict[str, str], until: str | None = None,
            only: list[str] | None = None) -> dict[str, ArtifactRef]:
    """Run the config's stages in DAG order in this process (every shard of a sharded stage, then its
    collection), up to and including `until`, only those named in `only` if given. Finished stages are
    found by manifest. The Prefect flows run the same functions as tasks."""
    refs: dict[str, ArtifactRef] = {}
    for stage in order(cfg, until):
        if only is not None and stage.name not in only:
            continue
        if stage.sharded and not store.has_manifest(stage.name, keys[stage.name]):
            for shard in range(n_shards(store, cfg, keys)):
                run(stage.name, store, cfg, keys, shard)
        refs[stage.name] = run(stage.name, store, cfg, keys)
    return refs
