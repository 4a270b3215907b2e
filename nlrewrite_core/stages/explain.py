"""The explain stage: one explanation per latent from its top activating contexts on the explainer's half
of the explain split (nlrewrite_core.explain; n-gram, LLM or contrastive)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from .. import artifacts as art, explain as explain_lib, query as query_lib, stages
from ..config import RewriteConfig
from ..manifest import ArtifactRef
from ..storage import Store

log = logging.getLogger("nlrewrite")


def explain_latents(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """One explanation per latent from its top contexts in the explainer's half of the explain split."""
    if ref := stages.reuse(store, "explain", keys):
        return ref
    w = stages.writer(store, "explain", cfg, keys)
    num_latents = art.num_latents(store, keys)
    seq_ids, tokens = art.load_tokens(store, keys, ("explain",))
    shown, _ = art.explain_halves(seq_ids)
    # The candidate rows (the top max_candidates per latent, or all) selected in DuckDB over the
    # cache's files: the cache itself is never loaded.
    a = query_lib.top_activations(store, keys["activations"], "explain", shown, cfg.explain.max_candidates)
    tokenizer = art.load_tokenizer(store, keys)
    by_seq = {int(s): tokens[i] for i, s in enumerate(seq_ids)}
    t0 = time.perf_counter()
    cost: dict[str, Any] | None = None
    args = (a.column("seq_id").to_numpy(), a.column("pos").to_numpy(), a.column("latent").to_numpy(),
            a.column("act").to_numpy().astype(np.float32), by_seq, lambda t: tokenizer.decode([t]),
            lambda ids: tokenizer.decode(ids), num_latents, cfg.explain)
    if cfg.explain.method in ("llm", "contrastive"):
        neighbors = None
        if cfg.explain.method == "contrastive":
            w_dec = art.load_sae(store, keys).W_dec.detach().float().cpu().numpy()
            neighbors = explain_lib.decoder_neighbors(w_dec, cfg.explain.n_neighbors)
        llm, before = art.llm_with_usage(cfg.explain.llm)
        table = explain_lib.llm_explanations(*args, llm, neighbors=neighbors)
        cost = art.llm_cost(llm, before)
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
