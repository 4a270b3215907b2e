"""The embed stage: context windows and vocabulary tokens embedded once, for the embedding scorer and
simulator (nlrewrite_core.embedding)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from .. import artifacts as art, embedding as emb_lib, progress, simulate as sim_lib, stages
from ..config import RewriteConfig
from ..manifest import ArtifactRef
from ..storage import Store

log = logging.getLogger("nlrewrite")


def embed_contexts(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """Embed every context window the scorer and simulator need, once: the explain split's scoring
    half (embedding scorer only) and the simulated calib and eval contexts (sim_context_ids), plus
    every vocabulary token alone."""
    if ref := stages.reuse(store, "embed", keys):
        return ref
    w = stages.writer(store, "embed", cfg, keys)
    tokenizer = art.load_tokenizer(store, keys)
    vocab = tokenizer.get_vocab_size()
    splits = []  # (split, its token rows, which of their contexts are simulated, their context ids)
    for split in stages.embed_splits(cfg):
        seq_ids, tokens = art.load_tokens(store, keys, (split,))
        if split == "explain":
            keep = np.isin(seq_ids, art.explain_halves(seq_ids)[1])
            seq_ids, tokens = seq_ids[keep], tokens[keep]
        cids, keep = art.simulated_contexts(cfg, split, seq_ids)
        splits.append((split, tokens, keep, cids))
    total, done = sum(len(cids) for *_, cids in splits) + vocab, 0  # every window, then every token

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress.advance("embed", done, total, "texts")

    frames = []
    for split, tokens, keep, cids in splits:
        windows = [w for w, k in zip(sim_lib.context_windows(tokens, cfg.simulate.window), keep) if k]
        texts = [tokenizer.decode(tokens[r, a:b].tolist()) for r, a, b in windows]
        t0 = time.perf_counter()
        emb = emb_lib.embed_texts(texts, cfg.embedding, on_batch=advance)
        log.info("embed: %s split, %d windows, %.0f windows/s", split, len(texts),
                 len(texts) / max(time.perf_counter() - t0, 1e-9))
        frames.append(pa.table({
            "context_id": pa.array(cids),
            "split": pa.array([split] * len(texts)),
            "token": pa.array(tokens.reshape(-1)[keep].astype(np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
        }))
    tok_emb = emb_lib.embed_texts([tokenizer.decode([t]) for t in range(vocab)], cfg.embedding, on_batch=advance)
    w.table("contexts", pa.concat_tables(frames))
    w.table("token_embeddings", pa.table({
        "token": pa.array(np.arange(vocab, dtype=np.int32)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(tok_emb.reshape(-1)), tok_emb.shape[1]),
    }))
    return w.finish(metrics={"n_contexts": sum(len(f) for f in frames), "dim": int(tok_emb.shape[1])})
