"""The pipeline's stages: each reads its upstream artifacts, computes, and writes its own.

Every stage is a function of (store, config, keys) that returns an ArtifactRef. It first looks
for its manifest and returns at once when it is there (the manifest is the source of truth for
"done"), so a rerun, or a Prefect cache miss, never recomputes finished work. All the stage
keys of a run come from `plan()`, a pure function of the config.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from . import activations as acts_lib
from . import calibrate as calib_lib
from . import corpus as corpus_lib
from . import embedding as emb_lib
from . import evaluate as eval_lib
from . import explain as explain_lib
from . import progress
from . import query as query_lib
from . import score as score_lib
from . import simulate as sim_lib
from . import subject as subject_lib
from . import transcoder as tc_lib
from .config import RewriteConfig
from .storage import ArtifactRef, StageWriter, Store, stage_key

log = logging.getLogger("nlrewrite")

VERSIONS = {
    "corpus": "1", "subject": "1", "transcoder": "2", "activations": "1", "explain": "1",
    "embed": "2", "score": "1", "simulate": "3", "calibrate": "4", "evaluate": "3", "report": "3",
    "multilayer": "1",
}
CACHED_SPLITS = ("explain", "calib", "eval")


# ---- keys ---------------------------------------------------------------------------------------
def stage_configs(cfg: RewriteConfig) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """Each stage's config section and its upstream stages (the DAG)."""
    d = cfg.model_dump(mode="json")
    # The context embeddings serve the embedding scorer and simulator only: LLM methods skip the stage.
    emb = ["embed"] if "embedding" in (cfg.score.method, cfg.simulate.method) else []
    out = {
        "corpus": (d["corpus"], []),
        "subject": (d["subject"], ["corpus"]),
        "transcoder": (d["transcoder"], ["subject", "corpus"]),
        "activations": (d["activations"], ["corpus", "subject", "transcoder"]),
        "explain": (d["explain"], ["corpus", "activations"]),
        "embed": ({"embedding": d["embedding"], "window": d["simulate"]["window"],
                   **({"eval_positions": "last"} if cfg.simulate.eval_positions == "last" else {}),
                   **({"splits": list(embed_splits(cfg))} if embed_splits(cfg) != CACHED_SPLITS else {})}, ["corpus"]),
        # The lexical scorer reads neither embeddings nor the simulator's settings (issue 11: a scorer
        # that shares nothing with the simulator); the others keep their keys.
        "score": (({"score": d["score"]} if cfg.score.method == "lexical" else
                   {"score": d["score"], "token_weight": d["simulate"]["token_weight"]}),
                  ["activations", "explain", *(emb if cfg.score.method != "lexical" else [])]),
        # max_failed_fraction is read by calibrate alone: changing it never reruns the simulator.
        "simulate": ({"simulate": {k: v for k, v in d["simulate"].items() if k != "max_failed_fraction"},
                      "embedding": d["embedding"]}, ["activations", "explain", *emb]),
        "calibrate": ({**d["calibrate"], "max_failed_fraction": cfg.simulate.max_failed_fraction},
                      ["activations", "simulate"]),
        "evaluate": (d["evaluate"], ["corpus", "subject", "transcoder", "activations", "score", "calibrate"]),
        "report": ({}, ["transcoder", "subject", "activations", "score", "calibrate", "evaluate"]),
    }
    if not emb:
        del out["embed"]
    if cfg.multilayer.layers:  # only when configured: a single-layer run keeps exactly its stages and keys
        ml = cfg.multilayer
        section = {"multilayer": d["multilayer"], "transcoder": d["transcoder"],
                   "evaluate": {k: d["evaluate"][k] for k in ("batch_size", "n_bootstrap", "positions", "patch_base")}}
        if ml.simulate:  # every extra layer's pipeline runs with the same settings as the main layer's
            section.update({s: d[s] for s in ("activations", "explain", "embedding", "score", "simulate", "calibrate")})
        out["multilayer"] = (section, ["corpus", "subject", "transcoder"]
                             + (["score", "calibrate"] if ml.simulate else []))
    return out


def embed_splits(cfg: RewriteConfig) -> tuple[str, ...]:
    """The splits whose context windows the embed stage embeds: the explain split's scoring half serves
    only the `embedding` scorer; the calib and eval contexts serve the `embedding` simulator."""
    return CACHED_SPLITS if cfg.score.method == "embedding" else ("calib", "eval")


def plan(cfg: RewriteConfig) -> dict[str, str]:
    """The content key of every stage, in DAG order."""
    keys: dict[str, str] = {}
    for stage, (section, ups) in stage_configs(cfg).items():
        keys[stage] = stage_key(stage, VERSIONS[stage], section, {u: keys[u] for u in ups})
    return keys


def shard_ranges(num_latents: int, shard_latents: int) -> list[tuple[int, int]]:
    """Latent ranges [start, stop) of the simulation shards."""
    return [(a, min(a + shard_latents, num_latents)) for a in range(0, num_latents, shard_latents)]


def _writer(store: Store, stage: str, cfg: RewriteConfig, keys: dict[str, str], sub: str = "") -> StageWriter:
    section, ups = stage_configs(cfg)[stage]
    return StageWriter(store, stage, keys[stage], config=section, upstream={u: keys[u] for u in ups},
                       version=VERSIONS[stage], sub=sub)


def _done(store: Store, stage: str, keys: dict[str, str], sub: str = "") -> ArtifactRef | None:
    """The stage's ref when its manifest is there and every file it lists is intact (Store.reuse:
    sha256, size, rows); None when it must be computed (a damaged one is named in one warning)."""
    if ref := store.reuse(stage, keys[stage], sub):
        log.info("%s: found manifest for key %s%s, nothing to do", stage, keys[stage], f"/{sub}" if sub else "")
        progress.stage_event(stage, "cached", sub)
    return ref


def _device(cfg: RewriteConfig) -> str:
    dev = cfg.execution.device
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev


def _table(store: Store, stage: str, key: str, name: str, **kw: Any) -> pa.Table:
    return store.read_parquet(f"{store.artifact_dir(stage, key)}/{name}.parquet", **kw)


# ---- loaders ------------------------------------------------------------------------------------
def load_tokens(store: Store, keys: dict[str, str], splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(seq_ids, tokens [n, seq_len]) of the given splits, ordered by seq_id."""
    t = _table(store, "corpus", keys["corpus"], "tokens", filters=pc.field("split").isin(list(splits)))
    t = t.sort_by("seq_id")
    seq_ids = t.column("seq_id").to_numpy()
    if not len(t):
        return seq_ids, np.zeros((0, 0), np.int64)
    flat = t.column("tokens").combine_chunks().flatten().to_numpy()  # no Python lists: 8 bytes per token
    return seq_ids, flat.astype(np.int64).reshape(len(t), -1)


def load_tokenizer(store: Store, keys: dict[str, str]):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(store.read_bytes(f"{store.artifact_dir('corpus', keys['corpus'])}/tokenizer.json").decode())


def load_subject(store: Store, keys: dict[str, str], device: str = "cpu") -> torch.nn.Module:
    from transformers import GPTNeoXForCausalLM

    path = store.local_dir(store.artifact_dir("subject", keys["subject"], "model"))
    return GPTNeoXForCausalLM.from_pretrained(path).to(device).eval()


def load_sae(store: Store, keys: dict[str, str], device: str = "cpu") -> torch.nn.Module:
    path = store.local_dir(store.artifact_dir("transcoder", keys["transcoder"], "sae"))
    return tc_lib.load_transcoder(path).to(device).eval()


def explain_halves(seq_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split the explain split's sequences in two: the explainer sees the first half (even rank),
    the detection scorer judges on the second (odd rank), so scoring never reuses shown examples."""
    s = np.sort(seq_ids)
    return s[0::2], s[1::2]


def dense(rows_ctx: np.ndarray, rows_lat: np.ndarray, values: np.ndarray, ctx_index: dict[int, int] | np.ndarray,
          shape: tuple[int, int], fill: float = 0.0) -> np.ndarray:
    """Scatter long-format (context_id, latent, value) rows into a dense [n_ctx, n_lat] array,
    joined by context id and latent id. `ctx_index` maps a context id to its row."""
    out = np.full(shape, fill, dtype=np.float32)
    out[ctx_index[rows_ctx], rows_lat] = values
    return out


def context_index(context_ids: np.ndarray) -> np.ndarray:
    """A lookup array: index[context_id] = row, -1 elsewhere."""
    idx = np.full(int(context_ids.max()) + 1 if len(context_ids) else 1, -1, dtype=np.int64)
    idx[context_ids] = np.arange(len(context_ids))
    return idx


def context_ids(seq_ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Context id of every (seq, pos), row-major: seq_id * seq_len + pos."""
    return (seq_ids[:, None] * seq_len + np.arange(seq_len)[None, :]).reshape(-1)


def sim_context_ids(cfg: RewriteConfig, split: str, seq_ids: np.ndarray) -> np.ndarray:
    """The contexts of a split that are simulated, calibrated and evaluated: every position, or for
    the calib and eval splits with simulate.eval_positions 'last' the last scored position of each
    sentence (calibration maps are fit on the position set that is evaluated)."""
    seq_len = cfg.corpus.seq_len
    if split in ("calib", "eval") and cfg.simulate.eval_positions == "last":
        return np.asarray(seq_ids, dtype=np.int64) * seq_len + eval_lib.scored_last_position(seq_len)
    return context_ids(seq_ids, seq_len)


def _simulated(cfg: RewriteConfig, split: str, seq_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(context ids, mask) of the simulated contexts (sim_context_ids) among every (sequence, position)
    context of `seq_ids`, row-major: the mask selects them from context_ids / context_windows."""
    cids = context_ids(seq_ids, cfg.corpus.seq_len)
    keep = np.isin(cids, sim_context_ids(cfg, split, seq_ids))
    return cids[keep], keep


def _sparse_activations(store: Store, keys: dict[str, str], split: str, seq_len: int, cids: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row in `cids`, latent, act) of a split's cached activations at the contexts `cids`; the
    split's activations at other contexts are left out."""
    t = _table(store, "activations", keys["activations"], "activations", columns=["seq_id", "pos", "latent", "act"],
               filters=pc.field("split") == split)
    c = t.column("seq_id").to_numpy().astype(np.int64) * seq_len + t.column("pos").to_numpy()
    idx = context_index(cids)
    row = np.where(c < len(idx), idx[np.minimum(c, len(idx) - 1)], -1)
    keep = row >= 0
    return row[keep], t.column("latent").to_numpy()[keep], t.column("act").to_numpy()[keep]


def true_activations(store: Store, keys: dict[str, str], split: str, seq_len: int, cids: np.ndarray,
                     num_latents: int) -> np.ndarray:
    """Dense true activations [len(cids), num_latents] of a split at the contexts `cids`, rows in `cids` order."""
    row, lat, act = _sparse_activations(store, keys, split, seq_len, cids)
    out = np.zeros((len(cids), num_latents), dtype=np.float32)
    out[row, lat] = act
    return out


def true_sparse(store: Store, keys: dict[str, str], split: str, seq_len: int,
                cids: np.ndarray) -> calib_lib.SparseColumns:
    """A split's true activations at the contexts `cids` as sparse columns (rows in `cids` order)."""
    row, lat, act = _sparse_activations(store, keys, split, seq_len, cids)
    return calib_lib.SparseColumns(row, lat, act, len(cids))


# ---- stages -------------------------------------------------------------------------------------
def run_corpus(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    if ref := _done(store, "corpus", keys):
        return ref
    w = _writer(store, "corpus", cfg, keys)
    t0 = time.perf_counter()
    table, tokenizer = corpus_lib.build_corpus(cfg.corpus)
    dt = time.perf_counter() - t0
    w.table("tokens", table)
    w.bytes("tokenizer.json", tokenizer.to_str().encode())
    splits = table.column("split").to_numpy(zero_copy_only=False)
    counts = {s: int((splits == s).sum()) for s in ("train", "explain", "calib", "eval")}
    n_tokens = len(table) * cfg.corpus.seq_len
    log.info("corpus: %d sequences of %d tokens from %s in %.1fs (%.0f tokens/s), splits %s", len(table),
             cfg.corpus.seq_len, cfg.corpus.source, dt, n_tokens / max(dt, 1e-9), counts)
    return w.finish(metrics={"n_sequences": len(table), "splits": counts, "vocab_size": tokenizer.get_vocab_size(),
                             "n_tokens": n_tokens, "source": cfg.corpus.source,
                             "tokens_per_s": n_tokens / max(dt, 1e-9)})


def run_subject(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    if ref := _done(store, "subject", keys):
        return ref
    w = _writer(store, "subject", cfg, keys)
    device = _device(cfg)
    _, train = load_tokens(store, keys, ("train",))
    _, eval_tokens = load_tokens(store, keys, ("eval",))
    tokenizer = load_tokenizer(store, keys)
    if cfg.subject.source == "hub":
        model = subject_lib.load_hub_model(cfg.subject.hub_id, device=device)
        n_vocab = model.get_input_embeddings().weight.shape[0]
        top = int(max(train.max(initial=0), eval_tokens.max(initial=0)))
        if top >= n_vocab:
            raise ValueError(f"the corpus holds token id {top} but subject.hub_id {cfg.subject.hub_id!r} has only "
                             f"{n_vocab} embeddings: corpus.tokenizer ({cfg.corpus.tokenizer!r}) must be the subject's")
        metrics: dict[str, Any] = {"hub_id": cfg.subject.hub_id, "tokenizer": cfg.corpus.tokenizer,
                                   "n_params": subject_lib.num_params(model)}
    else:
        model = subject_lib.build_model(cfg.subject, tokenizer.get_vocab_size(), cfg.corpus.seq_len).to(device)
        metrics = subject_lib.train_subject(model, train, cfg.subject, device=device)
    model.eval()
    ce = eval_lib.ce_with(model, 0, eval_tokens, cfg.evaluate.batch_size, None)
    metrics["eval_ce"] = float(ce.mean())
    metrics["unigram_ce"] = subject_lib.unigram_ce(train, eval_tokens, tokenizer.get_vocab_size())
    metrics["mlp_ablation_ce"] = subject_lib.mlp_ablation_costs(model, eval_tokens, cfg.evaluate.batch_size, device)
    log.info("subject: eval CE %.3f (unigram %.3f); CE with each layer's MLP zeroed: %s", metrics["eval_ce"],
             metrics["unigram_ce"], [round(c, 3) for c in metrics["mlp_ablation_ce"]])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        w.directory("model", tmp)
    return w.finish(metrics=metrics)


def run_transcoder(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    if ref := _done(store, "transcoder", keys):
        return ref
    w = _writer(store, "transcoder", cfg, keys)
    device = _device(cfg)
    model = load_subject(store, keys, device)
    layer = cfg.transcoder.layer
    n_layers = model.config.num_hidden_layers
    if layer >= n_layers:
        raise ValueError(f"transcoder.layer ({layer}) is out of range: the subject has {n_layers} layers")
    if cfg.transcoder.checkpoint:  # refused unless it fits the subject and the config (also checked up front)
        tc_lib.check_checkpoint(tc_lib.checkpoint_shape(cfg.transcoder.checkpoint), model.config.hidden_size,
                                cfg.transcoder)
        sae = tc_lib.load_transcoder(cfg.transcoder.checkpoint).to(device)
        eval_lib.check_supported(sae)  # a TopK transcoder, or a clear refusal before any work
        metrics: dict[str, Any] = {"checkpoint": cfg.transcoder.checkpoint}
    else:
        _, train = load_tokens(store, keys, ("train",))
        n_seq = max(1, min(len(train), cfg.transcoder.max_train_tokens // train.shape[1]))
        train = train[:n_seq].astype(np.int32)  # token ids only: MLP inputs/outputs are streamed
        # Checkpoints live in the artifact directory (a directory without a manifest survives a restart)
        # and go once the stage is done.
        checkpoints = tc_lib.Checkpoints(store, store.artifact_dir("transcoder", keys["transcoder"], "checkpoints"),
                                         f"layers.{layer}.mlp")
        sae, metrics = tc_lib.train_streaming(model, layer, train, cfg.transcoder, cfg.evaluate.batch_size, device,
                                              checkpoints)
        del train
    sae.eval()
    # The fit on the eval split: FVU, dead latents, and CE (clean, transcoder, zero-ablation, MLP zeroed).
    _, eval_tokens = load_tokens(store, keys, ("eval",))
    Xe, Ye = tc_lib.collect_mlp_io(model, layer, eval_tokens, cfg.evaluate.batch_size, device)
    fit_eval = tc_lib.evaluate_fit(sae, Xe.to(sae.dtype), Ye.to(sae.dtype))
    ce = tc_lib.transcoder_ce(model, layer, sae, eval_tokens, cfg.evaluate.batch_size, device)
    fit = {"eval_fvu": fit_eval["fvu"], "eval_dead_fraction": fit_eval["dead_fraction"], **ce,
           "zero_ablation_cost_frac": (ce["ce_zero_ablation"] - ce["ce_clean"]) / ce["ce_clean"], "layer": layer}
    log.info("transcoder: FVU %.4f, dead %.1f%%, CE recovered %.3f, CE %s", fit["eval_fvu"],
             100 * fit["eval_dead_fraction"], ce["ce_recovered"], {k: round(v, 4) for k, v in ce.items()})
    with tempfile.TemporaryDirectory() as tmp:
        tc_lib.save_transcoder(sae, tmp)
        w.directory("sae", tmp)
    w.table("fit", pa.table({"metric": list(fit), "value": [float(v) for v in fit.values()]}))
    ref = w.finish(metrics={**metrics, **fit})
    store.remove_dir(store.artifact_dir("transcoder", keys["transcoder"], "checkpoints"))
    return ref


def run_activations(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    if ref := _done(store, "activations", keys):
        return ref
    import pyarrow.parquet as pq

    w = _writer(store, "activations", cfg, keys)
    device = _device(cfg)
    model = load_subject(store, keys, device)
    sae = load_sae(store, keys, device)
    layer = cfg.transcoder.layer
    schema = acts_lib.ACTIVATION_SCHEMA.append(pa.field("split", pa.string()))
    if cfg.activations.dtype == "float16":
        schema = schema.set(schema.get_field_index("act"), pa.field("act", pa.float16()))
    n_tokens: dict[str, int] = {}
    parts: list[pa.Table] = []  # only (split, latent, act) for the statistics: 3 narrow columns
    rows, t0 = 0, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nlrewrite-activations-") as tmp:  # removed however the stage ends
        tmp_path = Path(tmp) / "activations.parquet"
        with pq.ParquetWriter(tmp_path, schema, compression="zstd") as writer:
            for split in (*CACHED_SPLITS, *(("sample",) if cfg.activations.sample_tokens else ())):
                seq_ids, tokens = load_tokens(store, keys, (split if split != "sample" else "train",))
                if split == "sample":  # the train split's last sequences: the true sample's extra tokens
                    n_seq = min(len(tokens), cfg.activations.sample_tokens // max(tokens.shape[1], 1))
                    seq_ids, tokens = seq_ids[len(seq_ids) - n_seq:], tokens[len(tokens) - n_seq:]
                n_tokens[split] = tokens.size
                for batch in acts_lib.iter_latents(model, sae, layer, tokens, seq_ids, cfg.activations.batch_size,
                                                   device):
                    b = pa.Table.from_batches([batch]).append_column("split", pa.array([split] * batch.num_rows))
                    acts_lib.check_storable(b.column("act").to_numpy(), cfg.activations.dtype)
                    writer.write_table(b.cast(schema))
                    parts.append(b.select(["split", "latent", "act"]))
                    rows += batch.num_rows
        dt = time.perf_counter() - t0
        total_tokens = sum(n_tokens.values())
        log.info("activations: %d tokens, %d non-zero latents in %.1fs (%.0f tokens/s)", total_tokens, rows, dt,
                 total_tokens / max(dt, 1e-9))
        w.bytes("activations.parquet", tmp_path.read_bytes(), rows=rows)
    stats = acts_lib.latent_stats(pa.concat_tables(parts), n_tokens, sae.num_latents)
    w.table("latent_stats", stats)
    return w.finish(metrics={"rows": rows, "n_tokens": n_tokens, "tokens_per_s": total_tokens / max(dt, 1e-9),
                             "num_latents": sae.num_latents, "k": sae.cfg.k})


def _max_act(store: Store, keys: dict[str, str], num_latents: int) -> np.ndarray:
    """Per-latent maximum activation on the explain split (the scale the simulator maps onto)."""
    s = _table(store, "activations", keys["activations"], "latent_stats", filters=pc.field("split") == "explain")
    out = np.zeros(num_latents, dtype=np.float32)
    out[s.column("latent").to_numpy()] = s.column("max_act").to_numpy()
    return out


def _num_latents(store: Store, keys: dict[str, str]) -> int:
    return int(store.read_manifest("activations", keys["activations"])["metrics"]["num_latents"])


def run_explain(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    if ref := _done(store, "explain", keys):
        return ref
    w = _writer(store, "explain", cfg, keys)
    num_latents = _num_latents(store, keys)
    seq_ids, tokens = load_tokens(store, keys, ("explain",))
    shown, _ = explain_halves(seq_ids)
    # The candidate rows (the top max_candidates per latent, or all) selected in DuckDB over the
    # cache's files: the cache itself is never loaded.
    a = query_lib.top_activations(store, keys["activations"], "explain", shown, cfg.explain.max_candidates)
    tokenizer = load_tokenizer(store, keys)
    by_seq = {int(s): tokens[i] for i, s in enumerate(seq_ids)}
    t0 = time.perf_counter()
    cost: dict[str, Any] | None = None
    args = (a.column("seq_id").to_numpy(), a.column("pos").to_numpy(), a.column("latent").to_numpy(),
            a.column("act").to_numpy().astype(np.float32), by_seq, lambda t: tokenizer.decode([t]),
            lambda ids: tokenizer.decode(ids), num_latents, cfg.explain)
    if cfg.explain.method in ("llm", "contrastive"):
        neighbors = None
        if cfg.explain.method == "contrastive":
            w_dec = load_sae(store, keys).W_dec.detach().float().cpu().numpy()
            neighbors = explain_lib.decoder_neighbors(w_dec, cfg.explain.n_neighbors)
        llm, before = _llm_for(cfg.explain.llm)
        table = explain_lib.llm_explanations(*args, llm, neighbors=neighbors)
        cost = _llm_cost(llm, before)
    else:
        table = explain_lib.ngram_explanations(*args)
    statuses = table.column("status").to_pylist()
    n_expl = statuses.count("explained")
    log.info("explain: %d of %d latents explained (%.0f latents/s)", n_expl, num_latents,
             num_latents / max(time.perf_counter() - t0, 1e-9))
    w.table("explanations", table)
    metrics: dict[str, Any] = {"n_explained": n_expl, "n_dead": num_latents - n_expl}
    if cfg.explain.method != "ngram":
        metrics.update(n_dead=statuses.count("dead"), n_unexplained=statuses.count("unexplained"))
    return w.finish(metrics=metrics, cost=cost)


def _llm_for(llm_cfg):
    """The (cached) LLM backend of a config section and a usage snapshot to diff against."""
    from .llm import get_llm

    llm = get_llm(llm_cfg)
    return llm, llm.usage.snapshot()


def _llm_cost(llm, before: dict[str, float]) -> dict[str, Any]:
    """The manifest cost of the LLM calls since `before`: tokens in/out, seconds, calls (never a key)."""
    return {"llm_backend": llm.backend, "llm_model": llm.cfg.model, **llm.usage.since(before)}


def run_embed(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """Embed every context window the scorer and simulator need, once: the explain split's scoring
    half (embedding scorer only) and the simulated calib and eval contexts (sim_context_ids), plus
    every vocabulary token alone."""
    if ref := _done(store, "embed", keys):
        return ref
    w = _writer(store, "embed", cfg, keys)
    tokenizer = load_tokenizer(store, keys)
    frames = []
    for split in embed_splits(cfg):
        seq_ids, tokens = load_tokens(store, keys, (split,))
        if split == "explain":
            keep = np.isin(seq_ids, explain_halves(seq_ids)[1])
            seq_ids, tokens = seq_ids[keep], tokens[keep]
        cids, keep = _simulated(cfg, split, seq_ids)
        windows = [w for w, k in zip(sim_lib.context_windows(tokens, cfg.simulate.window), keep) if k]
        texts = [tokenizer.decode(tokens[r, a:b].tolist()) for r, a, b in windows]
        t0 = time.perf_counter()
        emb = emb_lib.embed_texts(texts, cfg.embedding)
        log.info("embed: %s split, %d windows, %.0f windows/s", split, len(texts),
                 len(texts) / max(time.perf_counter() - t0, 1e-9))
        frames.append(pa.table({
            "context_id": pa.array(cids),
            "split": pa.array([split] * len(texts)),
            "token": pa.array(tokens.reshape(-1)[keep].astype(np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
        }))
    vocab = tokenizer.get_vocab_size()
    tok_emb = emb_lib.embed_texts([tokenizer.decode([t]) for t in range(vocab)], cfg.embedding)
    w.table("contexts", pa.concat_tables(frames))
    w.table("token_embeddings", pa.table({
        "token": pa.array(np.arange(vocab, dtype=np.int32)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(tok_emb.reshape(-1)), tok_emb.shape[1]),
    }))
    return w.finish(metrics={"n_contexts": sum(len(f) for f in frames), "dim": int(tok_emb.shape[1])})


def _embeddings(store: Store, keys: dict[str, str], splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(context_ids, window embeddings, target-token embeddings) of the embedded contexts of `splits`."""
    t = _table(store, "embed", keys["embed"], "contexts", filters=pc.field("split").isin(list(splits)))
    t = t.sort_by("context_id")
    dim = t.schema.field("embedding").type.list_size
    win = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    v = _table(store, "embed", keys["embed"], "token_embeddings").sort_by("token")
    vocab_emb = v.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return t.column("context_id").to_numpy(), win, vocab_emb[t.column("token").to_numpy()]


def _explained(store: Store, keys: dict[str, str], cfg: RewriteConfig, lo: int = 0, hi: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(latent ids, explanation embeddings) of the explained latents in [lo, hi)."""
    t = _table(store, "explain", keys["explain"], "explanations", filters=pc.field("status") == "explained")
    lat = t.column("latent").to_numpy()
    keep = (lat >= lo) & (lat < (hi if hi is not None else np.iinfo(np.int32).max))
    texts = [s for s, k in zip(t.column("explanation").to_pylist(), keep) if k]
    return lat[keep], emb_lib.embed_texts(texts, cfg.embedding)


SCORE_BLOCK = 1024
"""Latents scored at a time by the embedding scorer (bounds its memory at any latent count)."""


def run_score(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    if ref := _done(store, "score", keys):
        return ref
    w = _writer(store, "score", cfg, keys)
    seq_len = cfg.corpus.seq_len
    if cfg.score.method == "detection":
        return _run_score_llm(store, cfg, keys, w)
    if cfg.score.method == "lexical":
        return _run_score_lexical(store, cfg, keys, w)
    cids, win, tok = _embeddings(store, keys, ("explain",))
    latents, expl = _explained(store, keys, cfg)
    true = true_sparse(store, keys, "explain", seq_len, cids)
    t0 = time.perf_counter()
    # A block of latents at a time: similarities and firing masks are [contexts x block], never x all latents.
    tables = [score_lib.score_latents(emb_lib.similarity(expl[b], win, tok, cfg.simulate.token_weight),
                                      true.dense(latents[b]) > 0, latents[b], cfg.score.n_pos, cfg.score.n_neg,
                                      cfg.score.seed, "embedding-detection")
              for b in (slice(a, a + SCORE_BLOCK) for a in range(0, len(latents), SCORE_BLOCK))]
    table = pa.concat_tables(tables) if tables else score_lib.score_latents(
        np.zeros((len(cids), 0), np.float32), np.zeros((len(cids), 0), bool), latents, 0, 0, 0, "embedding-detection")
    return _finish_score(w, table, t0, "embedding")


def _finish_score(w: StageWriter, table: pa.Table, t0: float, judge: str, totals: dict[str, int] | None = None,
                  cost: dict[str, Any] | None = None) -> ArtifactRef:
    scores = np.array([np.nan if v is None else v for v in table.column("score").to_pylist()], dtype=float)
    mean = float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
    log.info("score: %d latents scored by %s in %.1fs, mean detection score %.3f%s", len(table), judge,
             time.perf_counter() - t0, mean,
             f", {totals['n_malformed_prompts']} of {totals['n_prompts']} prompts malformed" if totals else "")
    w.table("scores", table)
    return w.finish(metrics={"mean_detection_score": mean, "n_scored": int(np.isfinite(scores).sum()), **(totals or {})},
                    cost=cost)


def _scoring_half(store: Store, cfg: RewriteConfig, keys: dict[str, str]
                  ) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]], np.ndarray, list[str]]:
    """What the `detection` and `lexical` scorers read: the explain split's scoring half (the sequences
    the explainer never saw, explain_halves) as tokens [n_seq, seq_len] (context row = s * seq_len + p),
    each latent's firing rows and activations there, and the explained latents with their explanations."""
    seq_len = cfg.corpus.seq_len
    seq_ids, tokens = load_tokens(store, keys, ("explain",))
    keep = np.isin(seq_ids, explain_halves(seq_ids)[1])
    seq_ids, tokens = seq_ids[keep], tokens[keep]
    a = _table(store, "activations", keys["activations"], "activations",
               filters=(pc.field("split") == "explain") & pc.field("seq_id").isin(seq_ids.tolist()))
    rows = np.searchsorted(seq_ids, a.column("seq_id").to_numpy()).astype(np.int64) * seq_len \
        + a.column("pos").to_numpy()
    lat_col, act_col = a.column("latent").to_numpy(), a.column("act").to_numpy().astype(np.float32)
    # Grouped by latent with one stable sort (each latent's rows keep their file order).
    order = np.argsort(lat_col, kind="stable")
    uniq, starts = np.unique(lat_col[order], return_index=True)
    bounds = np.append(starts, len(order))
    firing = {int(l): (rows[order[bounds[i]:bounds[i + 1]]], act_col[order[bounds[i]:bounds[i + 1]]])
              for i, l in enumerate(uniq)}
    e = _table(store, "explain", keys["explain"], "explanations", filters=pc.field("status") == "explained")
    return tokens, firing, e.column("latent").to_numpy(), e.column("explanation").to_pylist()


def _run_score_llm(store: Store, cfg: RewriteConfig, keys: dict[str, str], w: StageWriter) -> ArtifactRef:
    """The `detection` scorer on the explain split's scoring half (the sequences the explainer never saw)."""
    seq_len = cfg.corpus.seq_len
    tokens, firing, latents, texts = _scoring_half(store, cfg, keys)
    tokenizer = load_tokenizer(store, keys)
    win = cfg.score.window

    def window_text(r: int) -> str:
        s, p = divmod(int(r), seq_len)
        return tokenizer.decode(tokens[s, max(0, p - win + 1):p + 1].tolist())

    llm, before = _llm_for(cfg.score.llm)
    t0 = time.perf_counter()
    table, totals = score_lib.llm_detection_scores(latents, texts, firing, len(tokens) * seq_len, window_text,
                                                   cfg.score, llm)
    return _finish_score(w, table, t0, llm.name, totals, _llm_cost(llm, before))


def _run_score_lexical(store: Store, cfg: RewriteConfig, keys: dict[str, str], w: StageWriter) -> ArtifactRef:
    """The `lexical` scorer on the explain split's scoring half: no embeddings, no simulator settings."""
    tokens, firing, latents, texts = _scoring_half(store, cfg, keys)
    tokenizer = load_tokenizer(store, keys)
    t0 = time.perf_counter()
    table = score_lib.lexical_detection_scores(latents, texts, firing, tokens, tokenizer.decode, cfg.score)
    return _finish_score(w, table, t0, "lexical")


def _run_simulate_shard_llm(store: Store, cfg: RewriteConfig, keys: dict[str, str], w: StageWriter,
                            lo: int, hi: int, num_latents: int) -> ArtifactRef:
    """The `llm` or `llm-all-at-once` simulator on one shard's latents over every simulated calib and eval
    context (the all-at-once one: one prompt per sentence, its simulated positions read at once)."""
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(store, keys)
    at_once = cfg.simulate.method == "llm-all-at-once"
    parts, suffixes, sentences, read = [], [], [], []
    for split in ("calib", "eval"):
        seq_ids, tokens = load_tokens(store, keys, (split,))
        split_cids, keep = _simulated(cfg, split, seq_ids)
        parts.append(split_cids)
        if at_once:
            sentences += sim_lib.sentence_token_texts(tokens, lambda t: tokenizer.decode([t]))
            read += [np.flatnonzero(row) for row in keep.reshape(tokens.shape)]
        else:
            suffixes += sim_lib.context_suffixes(tokens, cfg.simulate.window, lambda ids: tokenizer.decode(ids), keep)
    cids = np.concatenate(parts)
    e = _table(store, "explain", keys["explain"], "explanations", filters=pc.field("status") == "explained")
    lat = e.column("latent").to_numpy()
    keep = (lat >= lo) & (lat < hi)
    latents = lat[keep]
    texts = [t for t, k in zip(e.column("explanation").to_pylist(), keep) if k]
    max_act = _max_act(store, keys, num_latents)[latents]
    llm, before = _llm_for(cfg.simulate.llm)
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
                             "predictions_per_s": n / max(dt, 1e-9)}, cost=_llm_cost(llm, before))


def run_simulate_shard(store: Store, cfg: RewriteConfig, keys: dict[str, str], shard: int) -> ArtifactRef:
    """Predictions of every calib and eval context for one shard's latents."""
    sub = f"shard-{shard:05d}"
    if ref := _done(store, "simulate", keys, sub):
        return ref
    num_latents = _num_latents(store, keys)
    lo, hi = shard_ranges(num_latents, cfg.simulate.shard_latents)[shard]
    w = _writer(store, "simulate", cfg, keys, sub=sub)
    if cfg.simulate.method in ("llm", "llm-all-at-once"):
        return _run_simulate_shard_llm(store, cfg, keys, w, lo, hi, num_latents)
    t0 = time.perf_counter()
    cids, win, tok = _embeddings(store, keys, ("calib", "eval"))
    latents, expl = _explained(store, keys, cfg, lo, hi)
    max_act = _max_act(store, keys, num_latents)[latents]
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


def finish_simulate(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """Verify every shard's manifest, then write the stage manifest that lists them."""
    if ref := _done(store, "simulate", keys):
        return ref
    num_latents = _num_latents(store, keys)
    n_shards = len(shard_ranges(num_latents, cfg.simulate.shard_latents))
    missing = [i for i in range(n_shards) if not store.has_manifest("simulate", keys["simulate"], f"shard-{i:05d}")]
    if missing:
        raise RuntimeError(f"simulate: shards {missing} have no manifest; rerun the flow to finish them")
    w = _writer(store, "simulate", cfg, keys)
    total, cost = 0, {}
    for i in range(n_shards):
        m = store.read_manifest("simulate", keys["simulate"], f"shard-{i:05d}")
        for f in m["files"]:
            w.files.append({**f, "name": f"shard-{i:05d}/{f['name']}", "file": f"shard-{i:05d}/{f['file']}"})
            total += f["rows"] or 0
        for k, v in m.get("cost", {}).items():  # the stage's cost is its shards' (LLM tokens, seconds)
            if isinstance(v, (int, float)):
                name = "shards_wall_s" if k == "wall_s" else k
                cost[name] = cost.get(name, 0) + v
    cost = {k: round(v, 3) if isinstance(v, float) else v for k, v in cost.items()}
    return w.finish(metrics={"n_shards": n_shards, "n_predictions": total}, cost=cost)


def prediction_files(store: Store, keys: dict[str, str]) -> list[str]:
    """Paths of the shards' prediction files, in shard (latent range) order, from the stage manifest."""
    m = store.read_manifest("simulate", keys["simulate"])
    base = store.artifact_dir("simulate", keys["simulate"])
    return [f"{base}/{f['file']}" for f in m["files"] if f["file"].endswith("predictions.parquet")]


def _as_float32(t: pa.Table) -> pa.Table:
    """Stored predictions (float16 values) with their values as float32, what every reader computes on."""
    if "pred" in t.column_names and t.schema.field("pred").type != pa.float32():
        t = t.set_column(t.column_names.index("pred"), "pred", t.column("pred").cast(pa.float32()))
    return t


def read_predictions(store: Store, keys: dict[str, str], filters: Any = None,
                     columns: list[str] | None = None) -> pa.Table:
    """All shards' predictions (the stage manifest lists the shard files), values as float32.
    This holds them all in memory: stream over `prediction_files` for large runs."""
    return pa.concat_tables([_as_float32(store.read_parquet(f, filters=filters, columns=columns))
                             for f in prediction_files(store, keys)])


CALIBRATED_SCHEMA = sim_lib.CALIBRATED_SCHEMA


def _shard_readers(store: Store, keys: dict[str, str]):
    """The simulation shards' prediction files, one ShardReader at a time (opened lazily)."""
    return (calib_lib.ShardReader(pq.ParquetFile(store.fs.open_input_file(f))) for f in prediction_files(store, keys))


def true_sample(store: Store, keys: dict[str, str], seq_len: int, seq_ids: np.ndarray | None = None
                ) -> tuple[calib_lib.TrueSample, int]:
    """The true sample quantile normalisation maps onto (calibrate.true_sample 'cache'): every cached
    token outside the eval split (explain, calib and the `sample` split), or only the sequences
    `seq_ids` of them; sparse. Returns it and its token count."""
    n_tokens = store.read_manifest("activations", keys["activations"])["metrics"]["n_tokens"]
    splits = [s for s in n_tokens if s != "eval"]
    flt = pc.field("split").isin(splits)
    if seq_ids is not None:
        flt = flt & pc.field("seq_id").isin(pa.array(np.asarray(seq_ids, dtype=np.int64)))
    t = _table(store, "activations", keys["activations"], "activations", columns=["latent", "act"], filters=flt)
    m = int(sum(n_tokens[s] for s in splits)) if seq_ids is None else int(len(np.unique(seq_ids)) * seq_len)
    return calib_lib.TrueSample(t.column("latent").to_numpy(), t.column("act").to_numpy(), m), m


def true_sample_sequences(store: Store, keys: dict[str, str]) -> np.ndarray:
    """The sequence ids of the true sample (every cached split but eval), sorted."""
    n_tokens = store.read_manifest("activations", keys["activations"])["metrics"]["n_tokens"]
    t = _table(store, "activations", keys["activations"], "activations", columns=["seq_id"],
               filters=pc.field("split").isin([s for s in n_tokens if s != "eval"]))
    return np.unique(t.column("seq_id").to_numpy())


def calibrate_shards(store: Store, cfg: RewriteConfig, keys: dict[str, str], calib_cids: np.ndarray,
                     eval_cids: np.ndarray, methods: list[str], write,
                     sample: calib_lib.TrueSample | None) -> calib_lib.StreamResult:
    """calib_lib.stream_calibration over the simulation shards with the run's settings (the calibrate
    stage and the sample-size ablations share it)."""
    return calib_lib.stream_calibration(
        _shard_readers(store, keys), methods, cfg.calibrate.n_knots, calib_cids, eval_cids,
        true_sparse(store, keys, "calib", cfg.corpus.seq_len, calib_cids), write, sample=sample,
        max_failed_fraction=cfg.simulate.max_failed_fraction)


def run_calibrate(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """Per-latent maps fit on the calib split, streaming over the simulation shards: a shard's
    latents are calibrated from that shard's predictions and those latents' (sparse) true
    activations alone, so only one shard's dense [contexts x shard latents] block is ever in
    memory. The calibrated eval predictions are written a shard at a time; a failed eval
    prediction gets no row."""
    if ref := _done(store, "calibrate", keys):
        return ref
    w = _writer(store, "calibrate", cfg, keys)
    calib_cids = sim_context_ids(cfg, "calib", load_tokens(store, keys, ("calib",))[0])
    eval_cids = sim_context_ids(cfg, "eval", load_tokens(store, keys, ("eval",))[0])
    sample, m = true_sample(store, keys, cfg.corpus.seq_len) if cfg.calibrate.true_sample == "cache" else (None, len(calib_cids))
    writer = sim_lib.BlockWriter(store.fs, f"{w.dir}/calibrated.parquet", schema=CALIBRATED_SCHEMA,
                                 local=not store.is_s3)
    t_start = time.perf_counter()
    try:
        res = calibrate_shards(store, cfg, keys, calib_cids, eval_cids, list(cfg.calibrate.methods), writer.write,
                               sample)
    except BaseException:
        writer.abort()
        raise
    del sample
    rows, sha, _ = writer.close()
    w.files.append({"name": "calibrated", "file": "calibrated.parquet", "rows": rows, "sha256": sha})
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    latents, excluded, with_failures = cat(res.latents), cat(res.excluded), cat(res.with_failures)
    if len(excluded):
        # Too many failed predictions to simulate the latent faithfully: left out of calibration (so
        # never patched: it keeps its true value in the paper's accounting, 0 in the strict one) and counted.
        log.warning("calibrate: %d latents have more than %g failed predictions and are not simulated: %s",
                    len(excluded), cfg.simulate.max_failed_fraction, excluded[:20].tolist())
    n_active = _table(store, "activations", keys["activations"], "latent_stats", columns=["latent", "n_active"],
                      filters=pc.field("split") == "calib")
    active_calib = n_active.column("latent").to_numpy()[n_active.column("n_active").to_numpy() > 0]
    no_calib_activity = np.setdiff1d(latents, active_calib)
    fit_seconds = {m_: round(v, 3) for m_, v in res.fit_seconds.items()}
    total = time.perf_counter() - t_start
    n_fit = res.n_fit
    log.info("calibrate: %d methods on %d latents (%d calib predictions, true sample of %d tokens) in %.1fs, "
             "fit seconds %s", len(fit_seconds), len(latents), n_fit, m, total, fit_seconds)
    empty = pa.Table.from_pylist([], schema=calib_lib.TABLE_SCHEMA)
    w.table("calibration", pa.concat_tables([t for m_ in cfg.calibrate.methods for t in res.maps[m_]] or [empty]))
    return w.finish(metrics={"methods": list(cfg.calibrate.methods), "n_latents": int(len(latents)),
                             "n_latents_excluded_failed": int(len(excluded)), "excluded_latents": excluded.tolist(),
                             "n_latents_with_failed_contexts": int(len(with_failures)),
                             "n_failed_contexts_kept": int(res.n_failed_kept),
                             "n_latents_no_calib_activity": int(len(no_calib_activity)),
                             "max_failed_fraction": cfg.simulate.max_failed_fraction,
                             "true_sample": cfg.calibrate.true_sample, "n_true_sample_tokens": int(m),
                             "n_calib_contexts": int(len(calib_cids)), "fit_seconds": fit_seconds,
                             "n_calib_predictions": int(n_fit),
                             "fit_predictions_per_s": {m_: n_fit / max(v, 1e-9) for m_, v in fit_seconds.items()},
                             "predictions_per_s": n_fit / max(total, 1e-9)})


def raw_thresholds(max_act: np.ndarray, digit: float) -> np.ndarray:
    """Per-latent activity threshold of raw predictions: the level of simulator digit `digit`
    (prediction = E * max_act / 9, so digit d is at d * max_act / 9)."""
    return np.asarray(max_act, dtype=np.float64) * digit / 9.0


def _calib_latent_means(store: Store, keys: dict[str, str], num_latents: int) -> np.ndarray:
    """Each latent's mean activation over all calib tokens (zeros included), from latent_stats."""
    s = _table(store, "activations", keys["activations"], "latent_stats", filters=pc.field("split") == "calib")
    n_tokens = store.read_manifest("activations", keys["activations"])["metrics"]["n_tokens"]["calib"]
    out = np.zeros(num_latents, dtype=np.float64)
    lat = s.column("latent").to_numpy()
    out[lat] = s.column("n_active").to_numpy() * s.column("mean_act").to_numpy().astype(np.float64) / max(n_tokens, 1)
    return out.astype(np.float32)


def run_evaluate(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """CE of every condition (both position sets), per-latent metrics and their relation to the
    detection score, the specificity oracle, and the calibration sample-size ablation."""
    if ref := _done(store, "evaluate", keys):
        return ref
    w = _writer(store, "evaluate", cfg, keys)
    ev = cfg.evaluate
    device = _device(cfg)
    model, sae = load_subject(store, keys, device), load_sae(store, keys, device)
    layer, seq_len, num_latents = cfg.transcoder.layer, cfg.corpus.seq_len, sae.num_latents
    seq_ids, tokens = load_tokens(store, keys, ("eval",))
    cids = sim_context_ids(cfg, "eval", seq_ids)
    cidx = context_index(cids)
    true = true_activations(store, keys, "eval", seq_len, cids, num_latents)
    # simulate.eval_positions 'last': one simulated context per sentence, patched at that position alone.
    position = eval_lib.scored_last_position(seq_len) if cfg.simulate.eval_positions == "last" else None
    per_row = 1 if position is not None else seq_len
    cal = _table(store, "calibrate", keys["calibrate"], "calibrated")
    preds: dict[str, np.ndarray] = {}
    for method in ev_methods(cfg):
        t = cal.filter(pc.field("method") == method)
        preds[method] = dense(t.column("context_id").to_numpy(), t.column("latent").to_numpy(),
                              t.column("pred").to_numpy(), cidx, (len(cids), num_latents), fill=np.nan)
    del cal
    sc = _table(store, "score", keys["score"], "scores")
    scores = np.full(num_latents, np.nan)
    sv = sc.column("score").to_numpy(zero_copy_only=False).astype(float)
    scores[sc.column("latent").to_numpy()] = sv
    live = np.unique(_table(store, "calibrate", keys["calibrate"], "calibration", columns=["latent"])
                     .column("latent").to_numpy())
    # Latents active on some patched eval context: the ones whose true value can matter. A condition
    # that leaves any of them unsimulated keeps true information: its `n_true_kept` says how much.
    active_eval = np.flatnonzero((true > 0).any(axis=0))
    bs = ev.batch_size
    primary = ev.positions
    positions = [primary] + [p for p in eval_lib.POSITIONS if p != primary and position is None]

    def run(fn_for_rows) -> dict[str, np.ndarray]:
        ce = eval_lib.ce_with(model, layer, tokens, bs, fn_for_rows, position)
        return {p: eval_lib.per_sequence(ce, p) for p in positions}

    def patch_with(values: np.ndarray, sel: np.ndarray, what: str):
        """An MLP replacement patching dense values [n_ctx, len(sel)] (rows in context order) from
        evaluate.patch_base. A failed prediction (NaN) is patched as 0: it must be counted first."""
        return eval_lib.patch_rows(sae, np.nan_to_num(values, nan=0.0), sel, per_row, what, ev.patch_base)

    def rows_for(condition: str, ce: dict[str, np.ndarray], **kw: Any) -> list[dict[str, Any]]:
        return [eval_lib.ce_row(condition, ce[p], zero[p], ev.n_bootstrap, positions=p, patch_base=ev.patch_base,
                                **kw) for p in positions]

    def kept(sel: np.ndarray) -> int:
        return int(np.setdiff1d(active_eval, sel, assume_unique=True).size)

    t0 = time.perf_counter()
    n_runs = 0
    zero = run(lambda r: tc_lib.skip_fn(sae))
    mean_acts = torch.as_tensor(_calib_latent_means(store, keys, num_latents), device=device)
    base = {
        "clean": (run(None), None),
        "transcoder": (run(lambda r: eval_lib.flat(lambda x: eval_lib.patched_output(sae, x))), len(active_eval)),
        "zero_ablation": (zero, 0),
        "mlp_ablation": (run(lambda r: subject_lib.zero_mlp), None),
        "mean_ablation": (run(lambda r: eval_lib.flat(lambda x: eval_lib.mean_ablation_output(sae, x, mean_acts))), 0),
    }
    n_runs += len(base)
    rows = [r for name, (v, n_kept) in base.items() for r in rows_for(name, v, n_true_kept=n_kept)]
    done: dict[tuple[str, bytes], dict[str, np.ndarray]] = {}  # the same latents twice (e.g. fraction 1): one run
    n_failed_patched: dict[str, int] = {}
    all_latents = np.arange(num_latents)
    for method in ev_methods(cfg):
        n_failed_patched[method] = int(np.isnan(preds[method][:, live]).sum())
        for selection in ev.selections:
            for seed in (ev.random_seeds if selection == "random" else [-1]):
                for frac in ev.fractions:
                    sel = eval_lib.select_latents(live, scores[live], frac, selection, seed)
                    key = (method, sel.tobytes())
                    if key not in done:
                        done[key] = run(patch_with(preds[method][:, sel], sel, f"{method} predictions"))
                        n_runs += 1
                    rows += rows_for("simulated", done[key], selection=selection, fraction=frac, calibration=method,
                                     seed=seed, n_latents=len(sel), n_true_kept=kept(sel))
        # Strict accounting of "all latents simulated": every latent is replaced; a latent without a
        # calibrated prediction (unexplained, dead on the explain split, too many failed answers)
        # predicts 0, so no true value is left (the paper's fraction 1.0 patches only its explained
        # latents; the `simulated` row at fraction 1.0 is that accounting).
        strict = np.where(np.isnan(preds[method]), 0.0, preds[method]).astype(np.float32)
        ce = run(patch_with(strict, all_latents, f"{method} predictions (strict)"))
        n_runs += 1
        rows += rows_for("simulated_strict", ce, selection="all", fraction=1.0, calibration=method,
                         n_latents=num_latents, n_true_kept=0)
        del strict
    t_sweep = time.perf_counter() - t0
    log.info("evaluate: %d CE runs (sweep) in %.1fs", n_runs, t_sweep)
    ce_table = pa.Table.from_pylist(rows, schema=eval_lib.CE_SCHEMA)

    # Per-latent metrics: activity at a stated threshold, and threshold-free rank metrics.
    max_act = _max_act(store, keys, num_latents)
    metric_rows, relation_rows = [], []
    for method in ev_methods(cfg):
        p, tr = preds[method][:, live], true[:, live]
        if method == "none":
            thr = raw_thresholds(max_act[live], ev.raw_active_digit)
            rule = f"pred > max_act * {ev.raw_active_digit:g} / 9 (raw: simulator digit > {ev.raw_active_digit:g})"
        else:
            thr = np.full(len(live), ev.active_threshold)
            rule = f"pred > {ev.active_threshold:g}"
        # A failed prediction (NaN) is left out of its latent's metrics, never counted as inactive.
        m = eval_lib.per_column(eval_lib.activity_metrics, p, tr, thr)
        rk = eval_lib.per_column(eval_lib.rank_metrics, p, tr)
        for j, lat in enumerate(live):
            metric_rows.append({"latent": int(lat), "calibration": method, "detection_score": scores[lat],
                                "specificity": m["specificity"][j], "sensitivity": m["sensitivity"][j],
                                "precision": m["precision"][j], "n_true_active": int(m["n_true_active"][j]),
                                "threshold": float(thr[j]), "threshold_rule": rule,
                                "spearman": rk["spearman"][j], "auroc": rk["auroc"][j]})
        for metric, values in (("specificity", m["specificity"]), ("sensitivity", m["sensitivity"]),
                               ("precision", m["precision"]), ("spearman", rk["spearman"]), ("auroc", rk["auroc"])):
            bins, rho, n_used = eval_lib.score_relation(scores[live], np.asarray(values, float), ev.n_score_bins)
            for b in bins:
                relation_rows.append({"calibration": method, "metric": metric, **b, "rho": rho,
                                      "n_latents_total": n_used, "threshold_rule": rule})

    # The oracle: true activations with injected false positives / negatives, all live latents patched.
    t1 = time.perf_counter()
    calib_acts = _table(store, "activations", keys["activations"], "activations", columns=["latent", "act"],
                        filters=pc.field("split") == "calib")
    pool = eval_lib.ValuePool(calib_acts.column("latent").to_numpy(), calib_acts.column("act").to_numpy(), num_latents)
    del calib_acts
    true_live = true[:, live]
    oracle_rows = []
    for i_fn, fn_rate in enumerate(ev.oracle_fn_rates):
        for i_fp, fp_rate in enumerate(ev.oracle_fp_rates):
            rng = np.random.default_rng([ev.oracle_seed, i_fn, i_fp])
            values, c = eval_lib.inject_errors(true_live, live, fp_rate, fn_rate, pool, rng)
            ce = run(patch_with(values, live, "oracle values"))
            n_runs += 1
            spec = c["tn"] / max(c["tn"] + c["fp"], 1)
            sens = c["tp"] / max(c["tp"] + c["fn"], 1)
            for r in rows_for("oracle", ce, selection="all", fraction=1.0, calibration="oracle", n_latents=len(live)):
                oracle_rows.append({"fp_rate": fp_rate, "fn_rate": fn_rate, "specificity": spec, "sensitivity": sens,
                                    **{k: r[k] for k in ("positions", "n_latents", "ce_mean", "ce_lo", "ce_hi", "n",
                                                         "delta_zero_mean", "delta_zero_lo", "delta_zero_hi")},
                                    **{f"n_{k}": v for k, v in c.items()}})
    zero_means = {p: float(zero[p].mean()) for p in positions}
    crossings = {}
    for p in positions:
        for fn_rate in ev.oracle_fn_rates:
            sub = [r for r in oracle_rows if r["positions"] == p and r["fn_rate"] == fn_rate]
            x = eval_lib.crossing_specificity(
                np.array([r["specificity"] for r in sub]), np.array([r["ce_mean"] for r in sub]), zero_means[p])
            crossings[f"{p}/fn={fn_rate:g}"] = None if math.isnan(x) else x  # None: no crossing (JSON-safe)
    t_oracle = time.perf_counter() - t1
    log.info("evaluate: oracle %d runs in %.1fs; specificity where CE crosses zero-ablation: %s",
             len(ev.oracle_fp_rates) * len(ev.oracle_fn_rates), t_oracle, crossings)

    # Sample-size ablation (Figure A2): maps fit on nested subsets of the calib sequences.
    t2 = time.perf_counter()
    size_rows = _sample_size_ablation(store, cfg, keys, live, scores, true, cids, run, patch_with, rows_for,
                                      num_latents)
    n_runs += len(size_rows) // max(len(positions), 1)
    t_sizes = time.perf_counter() - t2

    w.table("ce", ce_table)
    w.table("latent_metrics", pa.Table.from_pylist(metric_rows))
    w.table("score_relation", pa.Table.from_pylist(relation_rows, schema=SCORE_RELATION_SCHEMA))
    w.table("oracle", pa.Table.from_pylist(oracle_rows, schema=ORACLE_SCHEMA))
    w.table("sample_size", pa.Table.from_pylist(size_rows, schema=SAMPLE_SIZE_SCHEMA))
    return w.finish(metrics={"n_conditions": len(rows), "positions": primary, "all_positions": positions,
                             "patch_base": ev.patch_base, "n_live_latents": int(len(live)),
                             "n_active_eval_latents": int(len(active_eval)),
                             "n_failed_patched_as_zero": n_failed_patched,
                             "n_sequences": len(seq_ids), "n_ce_runs": n_runs,
                             "oracle_crossing_specificity": crossings,
                             "seconds": {"sweep": round(t_sweep, 1), "oracle": round(t_oracle, 1),
                                         "sample_size": round(t_sizes, 1)}})


SCORE_RELATION_SCHEMA = pa.schema([
    ("calibration", pa.string()), ("metric", pa.string()), ("bin", pa.int32()), ("score_lo", pa.float64()),
    ("score_hi", pa.float64()), ("score_mean", pa.float64()), ("n_latents", pa.int64()), ("mean", pa.float64()),
    ("rho", pa.float64()), ("n_latents_total", pa.int64()), ("threshold_rule", pa.string()),
])
ORACLE_SCHEMA = pa.schema([
    ("fp_rate", pa.float64()), ("fn_rate", pa.float64()), ("specificity", pa.float64()), ("sensitivity", pa.float64()),
    ("positions", pa.string()), ("n_latents", pa.int32()), ("ce_mean", pa.float64()), ("ce_lo", pa.float64()),
    ("ce_hi", pa.float64()), ("n", pa.int64()), ("delta_zero_mean", pa.float64()), ("delta_zero_lo", pa.float64()),
    ("delta_zero_hi", pa.float64()), ("n_tp", pa.int64()), ("n_fn", pa.int64()), ("n_fp", pa.int64()),
    ("n_tn", pa.int64()),
])
SAMPLE_SIZE_SCHEMA = pa.schema([
    ("varied", pa.string()), ("calibration", pa.string()), ("calib_fraction", pa.float64()),
    ("n_calib_sequences", pa.int32()), ("n_calib_contexts", pa.int64()), ("true_fraction", pa.float64()),
    ("n_true_tokens", pa.int64()), ("fraction", pa.float64()), ("n_latents", pa.int32()),
    ("positions", pa.string()), ("ce_mean", pa.float64()), ("ce_lo", pa.float64()), ("ce_hi", pa.float64()),
    ("n", pa.int64()), ("delta_zero_mean", pa.float64()), ("delta_zero_lo", pa.float64()),
    ("delta_zero_hi", pa.float64()), ("specificity", pa.float64()), ("sensitivity", pa.float64()),
    ("threshold", pa.float64()), ("n_failed", pa.int64()),
])
"""The sample-size ablations (Figure A2): `varied` is `calib_predictions` (the number of calib
predictions each map is fit on, the true sample fixed: the paper's 1K vs 10K) or `true_sample` (the
size of the true sample that `quantile` maps onto, the calib predictions fixed)."""


def calib_subsets(n_sequences: int, sizes: list[float], seed: int = 0) -> list[tuple[float, np.ndarray]]:
    """Nested subsets of n sequences (row indices, sorted) for each size fraction: one permutation,
    its first max(1, round(size * n)) entries."""
    perm = np.random.default_rng(seed).permutation(n_sequences)
    return [(s, np.sort(perm[:max(1, min(n_sequences, round(s * n_sequences)))])) for s in sizes]


def _sample_size_ablation(store: Store, cfg: RewriteConfig, keys: dict[str, str], live: np.ndarray,
                          scores: np.ndarray, true_eval: np.ndarray, eval_cids: np.ndarray, run, patch_with,
                          rows_for, num_latents: int) -> list[dict[str, Any]]:
    """CE (top selection) and mean specificity/sensitivity with calibration maps fit on subsets, the
    paper's way (Figure A2): (1) subsets of the calib sequences' predictions with the true sample
    fixed, for every method except `none` (which fits nothing); (2) subsets of the true sample's
    sequences with every calib prediction, for `quantile` (the one method that maps onto the true
    sample; calibrate.true_sample 'cache' only). Each fit streams over the simulation shards as the
    calibrate stage does (one shard in memory)."""
    ev, seq_len = cfg.evaluate, cfg.corpus.seq_len
    methods = [m for m in ev_methods(cfg) if m != "none"]
    if not methods:
        return []
    calib_seq = load_tokens(store, keys, ("calib",))[0]
    all_calib = sim_context_ids(cfg, "calib", calib_seq)
    cached = cfg.calibrate.true_sample == "cache"
    sample, m_all = true_sample(store, keys, seq_len) if cached else (None, len(all_calib))
    eidx = context_index(eval_cids)
    plans: list[tuple[str, list[str], float, np.ndarray, float, Any, int]] = []
    for size, seq_rows in (calib_subsets(len(calib_seq), ev.sample_sizes) if ev.sample_sizes else []):
        calib_cids = sim_context_ids(cfg, "calib", calib_seq[seq_rows])
        plans.append(("calib_predictions", methods, size, calib_cids, 1.0, sample,
                      m_all if cached else len(calib_cids)))
    if cached and "quantile" in methods and ev.true_sample_sizes:
        seqs = true_sample_sequences(store, keys)
        for size, rows in calib_subsets(len(seqs), ev.true_sample_sizes, seed=1):
            sub, m = true_sample(store, keys, seq_len, seqs[rows]) if size < 1 else (sample, m_all)
            plans.append(("true_sample", ["quantile"], 1.0, all_calib, size, sub, m))
    out = []
    for varied, meths, size, calib_cids, true_size, smp, m in plans:
        preds = {m_: np.full((len(eval_cids), num_latents), np.nan, dtype=np.float32) for m_ in meths}

        def collect(t: pa.Table) -> None:
            m_ = t.column("method")[0].as_py()
            preds[m_][eidx[t.column("context_id").to_numpy()], t.column("latent").to_numpy()] = \
                t.column("pred").to_numpy()

        res = calibrate_shards(store, cfg, keys, calib_cids, eval_cids, meths, collect, smp)
        fitted = np.concatenate(res.latents) if res.latents else np.zeros(0, np.int64)
        use = np.intersect1d(live, fitted)  # a subset can leave a latent without a calib prediction
        for method in meths:
            pred = preds[method]
            mt = eval_lib.per_column(eval_lib.activity_metrics, pred[:, use], true_eval[:, use], ev.active_threshold)
            spec, sens = float(np.nanmean(mt["specificity"])), float(np.nanmean(mt["sensitivity"]))
            for frac in ev.sample_size_fractions:
                sel = eval_lib.select_latents(use, scores[use], frac, "top", -1)
                n_failed = int(np.isnan(pred[:, sel]).sum())
                ce = run(patch_with(pred[:, sel], sel, f"{method} predictions ({varied} subset)"))
                for r in rows_for("simulated", ce, selection="top", fraction=frac, calibration=method,
                                  n_latents=len(sel)):
                    out.append({"varied": varied, "calibration": method, "calib_fraction": size,
                                "n_calib_sequences": len(calib_cids) if cfg.simulate.eval_positions == "last"
                                else len(calib_cids) // seq_len,
                                "n_calib_contexts": len(calib_cids), "true_fraction": true_size, "n_true_tokens": m,
                                "fraction": frac, "n_latents": len(sel),
                                **{k: r[k] for k in ("positions", "ce_mean", "ce_lo", "ce_hi", "n", "delta_zero_mean",
                                                     "delta_zero_lo", "delta_zero_hi")},
                                "specificity": spec, "sensitivity": sens, "threshold": ev.active_threshold,
                                "n_failed": n_failed})
    return out


def ev_methods(cfg: RewriteConfig) -> list[str]:
    return list(cfg.calibrate.methods)


def _example_latents(store: Store, keys: dict[str, str], cfg: RewriteConfig, lm: Any, preds: dict[str, np.ndarray],
                     true: np.ndarray, tokens: np.ndarray, ctx_row: np.ndarray, ctx_pos: np.ndarray,
                     n_examples: int = 4) -> list[dict[str, Any]]:
    """A few example latents for the report: the best, two middle and the worst by detection score
    among latents active on eval, with explanation, raw-prediction metrics, top eval contexts and
    (true, predicted) activations per method. ``preds`` holds dense [n_ctx, n_latents] arrays; context
    row i is position ctx_pos[i] of token row ctx_row[i]."""
    raw = lm[lm["calibration"] == "none"] if "none" in set(lm["calibration"]) else lm.drop_duplicates("latent")
    raw = raw[(raw["n_true_active"] > 0) & np.isfinite(raw["detection_score"].astype(float))]
    if raw.empty:
        return []
    raw = raw.sort_values(["detection_score", "latent"], ascending=[False, True])
    picks = sorted({int(round(q * (len(raw) - 1))) for q in np.linspace(0, 1, n_examples)})
    chosen = raw.iloc[picks]
    expl = _table(store, "explain", keys["explain"], "explanations").to_pandas().set_index("latent")
    tokenizer = load_tokenizer(store, keys)
    out = []
    for _, r in chosen.iterrows():
        lat = int(r["latent"])
        col = true[:, lat]
        top = np.argsort(-col, kind="stable")[:3]
        contexts = []
        for row in top[col[top] > 0]:
            s, pos = int(ctx_row[row]), int(ctx_pos[row])
            left = tokenizer.decode(tokens[s, max(0, pos - 12):pos].tolist())
            target = tokenizer.decode([int(tokens[s, pos])])
            contexts.append(f"{col[row]:.3f}: …{left}[{target}]")
        out.append({"latent": lat, "score": float(r["detection_score"]),
                    "explanation": str(expl["explanation"].get(lat, "")) if lat in expl.index else "",
                    "metrics": {k: float(r[k]) for k in ("spearman", "auroc", "specificity", "sensitivity") if k in r},
                    "top_contexts": contexts, "true": col,
                    "preds": {("raw" if m == "none" else m): p[:, lat] for m, p in preds.items()}})
    return out


def run_report(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    if ref := _done(store, "report", keys):
        return ref
    from . import report as report_lib

    w = _writer(store, "report", cfg, keys)
    ev_table = lambda name: _table(store, "evaluate", keys["evaluate"], name).to_pandas()  # noqa: E731
    ce, lm = ev_table("ce"), ev_table("latent_metrics")
    oracle, sizes, relation = ev_table("oracle"), ev_table("sample_size"), ev_table("score_relation")
    ev_metrics = store.read_manifest("evaluate", keys["evaluate"])["metrics"]
    fit = store.read_manifest("transcoder", keys["transcoder"])["metrics"]
    subj = store.read_manifest("subject", keys["subject"])["metrics"]
    score_m = store.read_manifest("score", keys["score"])["metrics"]
    cal_m = store.read_manifest("calibrate", keys["calibrate"])["metrics"]
    # Activation distributions on the eval split, before and after calibration, for explained latents:
    # one sample of (context, latent) pairs, the same for every method (the tables share their row order).
    num_latents, seq_len = _num_latents(store, keys), cfg.corpus.seq_len
    seq_ids, tokens = load_tokens(store, keys, ("eval",))
    eval_cids = sim_context_ids(cfg, "eval", seq_ids)
    true = true_activations(store, keys, "eval", seq_len, eval_cids, num_latents)
    cal = _table(store, "calibrate", keys["calibrate"], "calibrated")
    cidx = context_index(eval_cids)
    dists: dict[str, np.ndarray] = {}
    dense_preds: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    sample = None
    for method in ev_methods(cfg):
        t = cal.filter(pc.field("method") == method)
        c, l, v = t.column("context_id").to_numpy(), t.column("latent").to_numpy(), t.column("pred").to_numpy()
        if sample is None:
            sample = np.sort(rng.choice(len(t), size=min(len(t), 300_000), replace=False))
            dists["true"] = true[cidx[c[sample]], l[sample]]
        dists["raw" if method == "none" else method] = v[sample]
        dense_preds[method] = dense(c, l, v, cidx, (len(eval_cids), num_latents))
    del cal
    examples = _example_latents(store, keys, cfg, lm, dense_preds, true, tokens, np.searchsorted(seq_ids, eval_cids // seq_len),
                                eval_cids % seq_len)
    del dense_preds
    methods = report_lib.pipeline_methods(cfg)
    summary = {
        "preset": cfg.preset,
        **methods,
        "eval CE, clean subject": subj.get("eval_ce"),
        "unigram CE": subj.get("unigram_ce"),
        "transcoder layer": cfg.transcoder.layer,
        "latents / k": f"{num_latents} / {cfg.transcoder.k}",
        "FVU (eval)": fit.get("eval_fvu"),
        "dead fraction (eval)": fit.get("eval_dead_fraction"),
        "CE recovered": fit.get("ce_recovered"),
        "mean detection score": score_m.get("mean_detection_score"),
        "explained latents": cal_m.get("n_latents"),
        "latents excluded (failed predictions)": cal_m.get("n_latents_excluded_failed"),
        "latents with failed contexts patched as 0": cal_m.get("n_latents_with_failed_contexts"),
        "latents with no calib activity": cal_m.get("n_latents_no_calib_activity"),
        "calib contexts": cal_m.get("n_calib_contexts"),
        "true sample (tokens) for quantile": cal_m.get("n_true_sample_tokens"),
        "patch base": cfg.evaluate.patch_base,
        "explainer / scorer / simulator": f"{cfg.explain.method} / {cfg.score.method} / {cfg.simulate.method}",
        "eval sequences / contexts": f"{len(seq_ids)} / {len(eval_cids)}",
        "positions": cfg.evaluate.positions,
        "active_threshold": cfg.evaluate.active_threshold,
        "raw_active_digit": cfg.evaluate.raw_active_digit,
        "oracle crossing specificity": ev_metrics.get("oracle_crossing_specificity"),
    }
    meta = {"run": f"{cfg.preset} (report key {keys['report'][:10]})", "positions": cfg.evaluate.positions,
            "n_sequences": len(seq_ids), "n_contexts": len(eval_cids), "n_latents": cal_m.get("n_latents"),
            "n_calib_contexts": cal_m.get("n_calib_contexts"),
            "crossings": ev_metrics.get("oracle_crossing_specificity"), "methods": methods}
    with tempfile.TemporaryDirectory() as tmp:
        report_lib.write_report(Path(tmp), ce, lm, dists, summary, oracle=oracle, sample_size=sizes,
                                relation=relation, examples=examples, meta=meta)
        w.directory("html", tmp)
    return w.finish(metrics={"summary": summary, "figures": list(report_lib.ALL_FIGURES)})
