"""The `embedding` simulator: predicted activation of a latent at a context from its explanation.

The prediction is the similarity of the explanation to the context (the window ending at the
target token, mixed with the target token itself), clipped to [0, 1] and mapped linearly onto
[0, max_act] -- the analogue of the paper's E/9 * max_act with E the expected 0-9 answer.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .embedding import similarity

PREDICTION_SCHEMA = pa.schema([("context_id", pa.int64()), ("latent", pa.int32()), ("pred", pa.float32())])


def context_windows(tokens: np.ndarray, window: int) -> list[tuple[int, int, int]]:
    """(row, start, end) for every position of every sequence: the window of at most `window`
    tokens that ends at (and includes) the target token."""
    n_seq, seq_len = tokens.shape
    return [(r, max(0, p - window + 1), p + 1) for r in range(n_seq) for p in range(seq_len)]


def linear_prediction(sim: np.ndarray, max_act: np.ndarray) -> np.ndarray:
    """Map similarities [n_ctx, n_lat] in [-1, 1] to activations in [0, max_act] (clip at 0 and 1).

    The end points are exact: sim <= 0 gives 0, sim >= 1 gives max_act.
    """
    return (np.clip(sim, 0.0, 1.0) * max_act[None, :].astype(np.float32)).astype(np.float32)


def simulate_block(expl_emb: np.ndarray, window_emb: np.ndarray, token_emb: np.ndarray,
                   max_act: np.ndarray, token_weight: float) -> np.ndarray:
    """Predictions [n_ctx, n_lat] for a block of latents over all contexts."""
    return linear_prediction(similarity(expl_emb, window_emb, token_emb, token_weight), max_act)


def predictions_table(context_ids: np.ndarray, latents: np.ndarray, pred: np.ndarray) -> pa.Table:
    """Long-format predictions, one row per (context, latent), grouped by latent."""
    if not np.isfinite(pred).all():
        raise ValueError("simulator produced non-finite predictions")
    n_ctx, n_lat = pred.shape
    return pa.table({
        "context_id": pa.array(np.tile(context_ids.astype(np.int64), n_lat)),
        "latent": pa.array(np.repeat(latents.astype(np.int32), n_ctx)),
        "pred": pa.array(pred.T.reshape(-1)),
    }, schema=PREDICTION_SCHEMA)
