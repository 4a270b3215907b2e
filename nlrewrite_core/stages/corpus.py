"""The corpus stage: documents from the configured source, tokenized into fixed-length sequences and split
(nlrewrite_core.corpus)."""

from __future__ import annotations

import logging
import time

from .. import corpus as corpus_lib, stages
from ..config import RewriteConfig
from ..manifest import ArtifactRef
from ..storage import Store

log = logging.getLogger("nlrewrite")


def build_corpus(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """Tokens of every split (train, explain, calib, eval) and the tokenizer, from corpus.source."""
    if ref := stages.reuse(store, "corpus", keys):
        return ref
    w = stages.writer(store, "corpus", cfg, keys)
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
