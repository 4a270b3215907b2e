"""The score stage: each explanation's detection score on the explain split's scoring half, the sequences
the explainer never saw (nlrewrite_core.score; embedding, LLM detection or lexical)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import artifacts as art, embedding as emb_lib, score as score_lib, stages
from ..config import RewriteConfig
from ..manifest import ArtifactRef, StageWriter
from ..storage import Store

log = logging.getLogger("nlrewrite")


SCORE_BLOCK = 1024
"""Latents scored at a time by the embedding scorer (bounds its memory at any latent count)."""


def score_explanations(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """Each explanation's detection score on the scoring half of the explain split (score.method)."""
    if ref := stages.reuse(store, "score", keys):
        return ref
    w = stages.writer(store, "score", cfg, keys)
    seq_len = cfg.corpus.seq_len
    if cfg.score.method == "detection":
        return _run_score_llm(store, cfg, keys, w)
    if cfg.score.method == "lexical":
        return _run_score_lexical(store, cfg, keys, w)
    cids, win, tok = art.embeddings(store, keys, ("explain",))
    latents, expl = art.explained_embeddings(store, keys, cfg)
    true = art.true_sparse(store, keys, "explain", seq_len, cids)
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
    return w.finish(metrics={"mean_detection_score": mean, "n_scored": int(np.isfinite(scores).sum()),
                             **(totals or {})}, cost=cost)


def _scoring_half(store: Store, cfg: RewriteConfig, keys: dict[str, str]
                  ) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]], np.ndarray, list[str]]:
    """What the `detection` and `lexical` scorers read: the explain split's scoring half (the sequences
    the explainer never saw, explain_halves) as tokens [n_seq, seq_len] (context row = s * seq_len + p),
    each latent's firing rows and activations there, and the explained latents with their explanations."""
    seq_len = cfg.corpus.seq_len
    seq_ids, tokens = art.load_tokens(store, keys, ("explain",))
    keep = np.isin(seq_ids, art.explain_halves(seq_ids)[1])
    seq_ids, tokens = seq_ids[keep], tokens[keep]
    a = art.read_table(store, "activations", keys["activations"], "activations",
               filters=(pc.field("split") == "explain") & pc.field("seq_id").isin(seq_ids.tolist()))
    rows = np.searchsorted(seq_ids, a.column("seq_id").to_numpy()).astype(np.int64) * seq_len \
        + a.column("pos").to_numpy()
    lat_col, act_col = a.column("latent").to_numpy(), a.column("act").to_numpy().astype(np.float32)
    # Grouped by latent with one stable sort (each latent's rows keep their file order).
    order = np.argsort(lat_col, kind="stable")
    uniq, starts = np.unique(lat_col[order], return_index=True)
    bounds = np.append(starts, len(order))
    firing = {int(lat): (rows[order[bounds[i]:bounds[i + 1]]], act_col[order[bounds[i]:bounds[i + 1]]])
              for i, lat in enumerate(uniq)}
    e = art.read_table(store, "explain", keys["explain"], "explanations", filters=pc.field("status") == "explained")
    return tokens, firing, e.column("latent").to_numpy(), e.column("explanation").to_pylist()


def _run_score_llm(store: Store, cfg: RewriteConfig, keys: dict[str, str], w: StageWriter) -> ArtifactRef:
    """The `detection` scorer on the explain split's scoring half (the sequences the explainer never saw)."""
    seq_len = cfg.corpus.seq_len
    tokens, firing, latents, texts = _scoring_half(store, cfg, keys)
    tokenizer = art.load_tokenizer(store, keys)
    win = cfg.score.window

    def window_text(r: int) -> str:
        s, p = divmod(int(r), seq_len)
        return tokenizer.decode(tokens[s, max(0, p - win + 1):p + 1].tolist())

    llm, before = art.llm_with_usage(cfg.score.llm)
    t0 = time.perf_counter()
    table, totals = score_lib.llm_detection_scores(latents, texts, firing, len(tokens) * seq_len, window_text,
                                                   cfg.score, llm)
    return _finish_score(w, table, t0, llm.name, totals, art.llm_cost(llm, before))


def _run_score_lexical(store: Store, cfg: RewriteConfig, keys: dict[str, str], w: StageWriter) -> ArtifactRef:
    """The `lexical` scorer on the explain split's scoring half: no embeddings, no simulator settings."""
    tokens, firing, latents, texts = _scoring_half(store, cfg, keys)
    tokenizer = art.load_tokenizer(store, keys)
    t0 = time.perf_counter()
    table = score_lib.lexical_detection_scores(latents, texts, firing, tokens, tokenizer.decode, cfg.score)
    return _finish_score(w, table, t0, "lexical")
