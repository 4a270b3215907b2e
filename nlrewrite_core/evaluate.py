"""Patching simulated latents into the transcoder and measuring next-token cross-entropy."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from .subject import replace_mlp, token_ce

MlpFn = Callable[[torch.Tensor], torch.Tensor]


# ---- the patched transcoder ---------------------------------------------------------------------
def pre_activations(sae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The transcoder's pre-TopK latent values relu(W_enc x + b_enc) for x [n, d] -> [n, latents]."""
    return F.relu(F.linear(x.to(sae.dtype), sae.encoder.weight, sae.encoder.bias))


def decode_topk(sae: torch.nn.Module, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Apply TopK to pre-activations [n, latents] and decode: W_dec(topk) + b_dec + skip."""
    acts, idx = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    out = sae.decode(acts, idx)
    if sae.W_skip is not None:
        out = out + x.to(sae.dtype) @ sae.W_skip.mT
    return out


def patched_output(sae: torch.nn.Module, x: torch.Tensor, latents: torch.Tensor | None = None,
                   values: torch.Tensor | None = None) -> torch.Tensor:
    """Transcoder output with the pre-TopK values of `latents` replaced by `values` [n, len(latents)],
    TopK re-applied (exactly k latents), then decoded. No replacement gives the transcoder itself."""
    pre = pre_activations(sae, x)
    if latents is not None and len(latents):
        pre[:, latents] = values.to(pre.dtype)
    return decode_topk(sae, x, pre)


def flat(fn: Callable[[torch.Tensor], torch.Tensor]) -> MlpFn:
    """Lift a function on [n, d] to [batch, seq, d]."""
    def wrapped(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return fn(x.reshape(-1, shape[-1])).reshape(shape).to(x.dtype)
    return wrapped


# ---- CE under a replacement ---------------------------------------------------------------------
@torch.no_grad()
def ce_with(model: torch.nn.Module, layer: int, tokens: np.ndarray, batch_size: int,
            make_fn: Callable[[slice], MlpFn] | None) -> np.ndarray:
    """Per-position CE [n_seq, seq_len-1] with the MLP at `layer` replaced by make_fn(rows)
    for each batch of sequence rows (None: the clean model)."""
    out = []
    for start in range(0, len(tokens), batch_size):
        rows = slice(start, min(start + batch_size, len(tokens)))
        if make_fn is None:
            out.append(token_ce(model, tokens[rows], batch_size))
        else:
            with replace_mlp(model, layer, make_fn(rows)):
                out.append(token_ce(model, tokens[rows], batch_size))
    return torch.cat(out).numpy()


def per_sequence(ce: np.ndarray, positions: str) -> np.ndarray:
    """Per-sequence CE: mean over all positions, or the last position only (the paper)."""
    return ce[:, -1] if positions == "last" else ce.mean(axis=1)


def bootstrap_mean(values: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap 95% interval, resampling sequences."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# ---- latent selection ---------------------------------------------------------------------------
def select_latents(live: np.ndarray, scores: np.ndarray, fraction: float, selection: str, seed: int) -> np.ndarray:
    """Latent ids to simulate: the top `fraction` of live latents by detection score (NaN last,
    ties broken by id), or a uniform random draw. Returns latent ids, never indices into values."""
    n = max(1, math.ceil(fraction * len(live)))
    if selection == "top":
        key = np.where(np.isnan(scores), -np.inf, scores)
        order = np.lexsort((live, -key))
        return np.sort(live[order[:n]])
    if selection == "random":
        return np.sort(np.random.default_rng(seed).choice(live, size=n, replace=False))
    raise ValueError(f"unknown selection {selection!r}")


# ---- per-latent metrics -------------------------------------------------------------------------
def activity_metrics(pred: np.ndarray, true: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Specificity and sensitivity of predicted activity (pred > threshold) against true activity
    (true > 0), per latent, for dense [n_ctx, n_lat] arrays. NaN where undefined."""
    p = pred > threshold
    t = true > 0
    tp = (p & t).sum(0)
    fn = (~p & t).sum(0)
    tn = (~p & ~t).sum(0)
    fp = (p & ~t).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        prec = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
    return {"specificity": spec, "sensitivity": sens, "precision": prec, "n_true_active": t.sum(0)}


CE_SCHEMA = pa.schema([
    ("condition", pa.string()), ("selection", pa.string()), ("fraction", pa.float64()),
    ("calibration", pa.string()), ("seed", pa.int32()), ("n_latents", pa.int32()),
    ("ce_mean", pa.float64()), ("ce_lo", pa.float64()), ("ce_hi", pa.float64()), ("n", pa.int64()),
    ("delta_zero_mean", pa.float64()), ("delta_zero_lo", pa.float64()), ("delta_zero_hi", pa.float64()),
])


def ce_row(condition: str, seq_ce: np.ndarray, zero_seq_ce: np.ndarray, n_boot: int, *, selection: str = "all",
           fraction: float | None = None, calibration: str = "", seed: int = -1, n_latents: int = 0) -> dict[str, Any]:
    """One row of the `ce` table, with a paired difference against zero-ablation."""
    mean, lo, hi = bootstrap_mean(seq_ce, n_boot)
    d_mean, d_lo, d_hi = bootstrap_mean(seq_ce - zero_seq_ce, n_boot)
    return {"condition": condition, "selection": selection, "fraction": fraction, "calibration": calibration,
            "seed": seed, "n_latents": n_latents, "ce_mean": mean, "ce_lo": lo, "ce_hi": hi, "n": len(seq_ce),
            "delta_zero_mean": d_mean, "delta_zero_lo": d_lo, "delta_zero_hi": d_hi}
