"""The simulate stage, in shards of latents: every explained latent's predicted activation on every
simulated calib and eval context, from its explanation alone (nlrewrite_core.simulate); the shards'
manifests are then collected into the stage's."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow.compute as pc

from .. import artifacts as art, simulate as sim_lib, stages
from ..config import RewriteConfig
from ..manifest import ArtifactRef, StageWriter
from ..storage import Store

log = logging.getLogger("nlrewrite")


def _run_simulate_shard_llm(store: Store, cfg: RewriteConfig, keys: dict[str, str], w: StageWriter,
                            lo: int, hi: int, num_latents: int) -> ArtifactRef:
    """The `llm` or `llm-all-at-once` simulator on one shard's latents over every simulated calib and eval
    context (the all-at-once one: one prompt per sentence, its simulated positions read at once)."""
    t0 = time.perf_counter()
    tokenizer = art.load_tokenizer(store, keys)
    at_once = cfg.simulate.method == "llm-all-at-once"
    parts, suffixes, sentences, read = [], [], [], []
    for split in ("calib", "eval"):
        seq_ids, tokens = art.load_tokens(store, keys, (split,))
        split_cids, keep = art.simulated_contexts(cfg, split, seq_ids)
        parts.append(split_cids)
        if at_once:
            sentences += sim_lib.sentence_token_texts(tokens, lambda t: tokenizer.decode([t]))
            read += [np.flatnonzero(row) for row in keep.reshape(tokens.shape)]
        else:
            suffixes += sim_lib.context_suffixes(tokens, cfg.simulate.window, lambda ids: tokenizer.decode(ids), keep)
    cids = np.concatenate(parts)
    e = art.read_table(store, "explain", keys["explain"], "explanations", filters=pc.field("status") == "explained")
    lat = e.column("latent").to_numpy()
    keep = (lat >= lo) & (lat < hi)
    latents = lat[keep]
    texts = [t for t, k in zip(e.column("explanation").to_pylist(), keep) if k]
    max_act = art.max_act(store, keys, num_latents)[latents]
    llm, before = art.llm_with_usage(cfg.simulate.llm)
    if at_once:
        table, failed = sim_lib.llm_all_at_once_predictions(latents, texts, sentences, read, cids, max_act, llm,
                                                            cfg.simulate.renormalize)
    else:
        table, failed = sim_lib.llm_predictions(latents, texts, suffixes, cids, max_act, llm, cfg.simulate.renormalize,
                                                order=cfg.simulate.prompt_order)
    w.table("predictions", table)
    # Failed predictions are listed beside the shard's Parquet (JSON, so that readers of the
    # predictions, which take every .parquet of the stage, never mix them with values).
    w.bytes("failed.json", json.dumps(failed.to_pylist()).encode())
    dt = time.perf_counter() - t0
    n = len(table) + len(failed)
    log.info("simulate shard (latents %d-%d) with %s: %d predictions, %d failed, in %.1fs (%.1f/s)", lo, hi,
             llm.name, len(table), len(failed), dt, n / max(dt, 1e-9))
    return w.finish(metrics={"latents": [lo, hi], "n_predictions": len(table), "n_failed": len(failed),
                             "predictions_per_s": n / max(dt, 1e-9)}, cost=art.llm_cost(llm, before))


def simulate_shard(store: Store, cfg: RewriteConfig, keys: dict[str, str], shard: int) -> ArtifactRef:
    """Predictions of every calib and eval context for one shard's latents."""
    sub = stages.shard_sub(shard)
    if ref := stages.reuse(store, "simulate", keys, sub):
        return ref
    num_latents = art.num_latents(store, keys)
    lo, hi = stages.shard_ranges(num_latents, cfg.simulate.shard_latents)[shard]
    w = stages.writer(store, "simulate", cfg, keys, sub=sub)
    if cfg.simulate.method in ("llm", "llm-all-at-once"):
        return _run_simulate_shard_llm(store, cfg, keys, w, lo, hi, num_latents)
    t0 = time.perf_counter()
    cids, win, tok = art.embeddings(store, keys, ("calib", "eval"))
    latents, expl = art.explained_embeddings(store, keys, cfg, lo, hi)
    max_act = art.max_act(store, keys, num_latents)[latents]
    writer = sim_lib.BlockWriter(store.fs, f"{w.dir}/predictions.parquet", local=not store.is_s3)
    try:
        for block in sim_lib.simulate_shard_blocks(cids, win, tok, latents, expl, max_act, cfg.simulate.token_weight,
                                                   cfg.simulate.context_block):
            writer.write(block)
    except BaseException:
        writer.abort()
        raise
    rows, sha, size = writer.close()
    w.files.append({"name": "predictions", "file": "predictions.parquet", "rows": rows, "sha256": sha})
    dt = time.perf_counter() - t0
    log.info("simulate shard %d (latents %d-%d): %d predictions in %.1fs (%.0f/s), %.2f bytes/prediction", shard, lo,
             hi, rows, dt, rows / max(dt, 1e-9), size / max(rows, 1))
    return w.finish(metrics={"latents": [lo, hi], "n_predictions": rows, "n_failed": 0, "bytes": size,
                             "bytes_per_prediction": size / max(rows, 1)})


def collect_shards(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """Verify every shard's manifest, then write the stage manifest that lists them."""
    if ref := stages.reuse(store, "simulate", keys):
        return ref
    num_latents = art.num_latents(store, keys)
    n_shards = len(stages.shard_ranges(num_latents, cfg.simulate.shard_latents))
    missing = [i for i in range(n_shards) if not store.has_manifest("simulate", keys["simulate"], stages.shard_sub(i))]
    if missing:
        raise RuntimeError(f"simulate: shards {missing} have no manifest; rerun the flow to finish them")
    w = stages.writer(store, "simulate", cfg, keys)
    total = 0
    cost: dict[str, float] = {}
    for i in range(n_shards):
        m = store.read_manifest("simulate", keys["simulate"], stages.shard_sub(i))
        for f in m["files"]:
            sub = stages.shard_sub(i)
            w.files.append({**f, "name": f"{sub}/{f['name']}", "file": f"{sub}/{f['file']}"})
            total += f["rows"] or 0
        for k, v in m.get("cost", {}).items():  # the stage's cost is its shards' (LLM tokens, seconds)
            if isinstance(v, (int, float)):
                name = "shards_wall_s" if k == "wall_s" else k
                cost[name] = cost.get(name, 0) + v
    cost = {k: round(v, 3) if isinstance(v, float) else v for k, v in cost.items()}
    return w.finish(metrics={"n_shards": n_shards, "n_predictions": total}, cost=cost)
