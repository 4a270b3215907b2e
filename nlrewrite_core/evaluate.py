"""Patching simulated latents into the transcoder and measuring next-token cross-entropy."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from .subject import replace_mlp, token_ce

if TYPE_CHECKING:
    from sparsify import SparseCoder

MlpFn = Callable[[torch.Tensor], torch.Tensor]


# ---- the patched transcoder ---------------------------------------------------------------------
PATCH_BASES = ("topk", "pre_topk")
"""What the vector that TopK is re-applied to starts from (evaluate.patch_base):

- ``topk`` (the paper's, the default): the transcoder's true *post*-TopK latents; a latent that is
  not simulated keeps its true top-k value, or 0 when it was not in the true top-k.
- ``pre_topk`` (an ablation, never the headline): every latent's pre-TopK encoder value, so a latent
  outside the true top-k that is not simulated can be promoted into the top k with its true
  encoder value when simulated values are low: true information leaks into the simulated
  condition."""


def check_supported(sae: SparseCoder) -> None:
    """Refuse a sparse coder our patching cannot reproduce exactly: only a TopK *transcoder* (sparsify's
    ``transcode: true``, ``activation: topk``; with or without a skip connection) replaces an MLP.
    An SAE (``transcode: false``) reconstructs its own input, not the MLP's output; ``groupmax``
    selects one latent per group, which re-applying TopK would not reproduce."""
    cfg = sae.cfg
    if getattr(cfg, "activation", "topk") != "topk":
        raise ValueError(f"the checkpoint uses activation {cfg.activation!r}; nlrewrite patches TopK transcoders only "
                         "(sparsify activation: topk)")
    if not getattr(cfg, "transcode", False):
        raise ValueError("the checkpoint is an SAE (transcode: false): it reconstructs its input, so it cannot replace "
                         "an MLP; use a transcoder checkpoint (sparsify transcode: true)")


def pre_activations(sae: SparseCoder, x: torch.Tensor) -> torch.Tensor:
    """Every latent's pre-TopK value for x [n, d] -> [n, latents], exactly as sparsify's ``encode``:
    ``relu(W_enc (x - b_dec) + b_enc)`` for an SAE, ``relu(W_enc x + b_enc)`` for a transcoder."""
    x = x.to(sae.dtype)
    if not sae.cfg.transcode:
        x = x - sae.b_dec
    return F.relu(F.linear(x, sae.encoder.weight, sae.encoder.bias))


def true_latents(sae: SparseCoder, x: torch.Tensor) -> torch.Tensor:
    """The transcoder's true post-TopK latent vector [n, latents]: its top-k pre-activations, 0 elsewhere."""
    pre = pre_activations(sae, x)
    acts, idx = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(1, idx, acts)


def decode_topk(sae: SparseCoder, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Apply TopK to a latent vector [n, latents] and decode: W_dec(topk) + b_dec + skip (raw x)."""
    acts, idx = latents.topk(sae.cfg.k, dim=-1, sorted=False)
    out = sae.decode(acts, idx)
    if sae.W_skip is not None:
        out = out + x.to(sae.dtype) @ sae.W_skip.mT
    return out


def patched_output(sae: SparseCoder, x: torch.Tensor, latents: torch.Tensor | None = None,
                   values: torch.Tensor | None = None, base: str = "topk") -> torch.Tensor:
    """Transcoder output with the latents `latents` set to `values` [n, len(latents)], TopK re-applied
    (exactly k latents), then decoded with b_dec and the skip path. No replacement gives the
    transcoder itself.

    With ``base="topk"`` (the default) the vector starts from the true post-TopK latents, as the
    paper's ``get_predicted_features_top32`` (nl_simulation/ce_reconstructions.py) does: so every
    latent simulated as 0 gives exactly zero-ablation, and a latent outside the true top-k that is
    not simulated contributes nothing. Where we differ from that code: it turns a missing (NaN)
    prediction into 0 silently; here NaN is refused (check_patch_values) and callers patch failed
    predictions as 0 explicitly and count them. ``base="pre_topk"`` is the leaky ablation (see
    PATCH_BASES)."""
    if base == "topk":
        vec = true_latents(sae, x)
    elif base == "pre_topk":
        vec = pre_activations(sae, x)
    else:
        raise ValueError(f"unknown patch base {base!r}; known: {PATCH_BASES}")
    if latents is not None and len(latents):
        if values is None:
            raise ValueError("patched_output: latents are given without values")
        vec[:, latents] = values.to(vec.dtype)
    return decode_topk(sae, x, vec)


def flat(fn: Callable[[torch.Tensor], torch.Tensor]) -> MlpFn:
    """Lift a function on [n, d] to [batch, seq, d]."""
    def wrapped(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return fn(x.reshape(-1, shape[-1])).reshape(shape).to(x.dtype)
    return wrapped


def patch_rows(sae: SparseCoder, values: np.ndarray, latents: np.ndarray, per_row: int,
               what: str, base: str = "topk") -> Callable[[slice], MlpFn]:
    """A `ce_with` make_fn patching `latents` with dense values [n_contexts, len(latents)] (rows in
    context order, `per_row` contexts per sequence: seq_len, or 1 when one position is patched),
    from the patch `base` (see patched_output). Non-finite values are refused first
    (check_patch_values; `what` names them)."""
    check_patch_values(values, what)
    device = sae.encoder.weight.device
    sel = torch.as_tensor(latents, device=device)

    def make(rows: slice) -> MlpFn:
        vals = torch.as_tensor(values[rows.start * per_row:rows.stop * per_row], device=device)
        return flat(lambda x: patched_output(sae, x, sel, vals, base))
    return make


# ---- CE under a replacement ---------------------------------------------------------------------
@torch.no_grad()
def ce_with(model: torch.nn.Module, layer: int, tokens: np.ndarray, batch_size: int,
            make_fn: Callable[[slice], MlpFn] | None, position: int | None = None) -> np.ndarray:
    """Per-position CE [n_seq, seq_len-1] with the MLP at `layer` replaced by make_fn(rows)
    for each batch of sequence rows (None: the clean model); at sequence position `position` only
    when given (see `replace_mlp`)."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(tokens), batch_size):
        rows = slice(start, min(start + batch_size, len(tokens)))
        if make_fn is None:
            out.append(token_ce(model, tokens[rows], batch_size, device))
        else:
            with replace_mlp(model, layer, make_fn(rows), position):
                out.append(token_ce(model, tokens[rows], batch_size, device))
    return torch.cat(out).numpy()


@torch.no_grad()
def ce_with_layers(model: torch.nn.Module, tokens: np.ndarray, batch_size: int,
                   makers: list[tuple[int, Callable[[slice], MlpFn]]]) -> np.ndarray:
    """Per-position CE [n_seq, seq_len-1] with the MLP of every listed layer replaced at once: for each
    batch of sequence rows, (layer, make_fn) gives that layer's replacement make_fn(rows). Nested
    replace_mlp contexts, one forward hook per layer; no makers gives the clean model."""
    import contextlib

    out = []
    device = next(model.parameters()).device
    for start in range(0, len(tokens), batch_size):
        rows = slice(start, min(start + batch_size, len(tokens)))
        with contextlib.ExitStack() as stack:
            for layer, make_fn in makers:
                stack.enter_context(replace_mlp(model, layer, make_fn(rows)))
            out.append(token_ce(model, tokens[rows], batch_size, device))
    return torch.cat(out).numpy()


POSITIONS = ("all", "last")
"""Position sets whose CE is reported: every position, or the last of each sequence (the paper)."""


def scored_last_position(seq_len: int) -> int:
    """The position whose MLP output feeds the last scored prediction (of token seq_len - 1): the
    context `last` CE is measured at, and the one simulated with simulate.eval_positions 'last'."""
    return seq_len - 2


def per_sequence(ce: np.ndarray, positions: str) -> np.ndarray:
    """Per-sequence CE: mean over all positions, or the last position only (the paper)."""
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; known: {POSITIONS}")
    return ce[:, -1] if positions == "last" else ce.mean(axis=1)


def mean_ablation_output(sae: SparseCoder, x: torch.Tensor, mean_acts: torch.Tensor) -> torch.Tensor:
    """Mean-ablation: every latent at its mean activation (over all calib tokens, zeros included),
    decoded without TopK (the mean latent vector is dense): ``mean_acts @ W_dec + b_dec + skip``.
    By linearity of the decoder this is the transcoder's average latent contribution."""
    flat = x.to(sae.dtype)
    out = (mean_acts.to(sae.dtype) @ sae.W_dec + sae.b_dec).expand(flat.shape[0], -1)
    if sae.W_skip is not None:
        out = out + flat @ sae.W_skip.mT
    return out


def check_patch_values(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` unchanged if every entry is finite, else a ValueError: no NaN reaches patching
    (a missing prediction is a NaN in the dense matrices, never a value)."""
    if not np.all(np.isfinite(values)):
        bad = int((~np.isfinite(values)).sum())
        raise ValueError(f"{what}: {bad} non-finite values would be patched into the transcoder")
    return values


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
def activity_metrics(pred: np.ndarray, true: np.ndarray, threshold: float | np.ndarray) -> dict[str, np.ndarray]:
    """Specificity and sensitivity of predicted activity (pred > threshold) against true activity
    (true > 0), per latent, for dense [n_ctx, n_lat] arrays. NaN where undefined. A NaN prediction
    is refused: it is neither active nor inactive (see per_column for failed predictions)."""
    if np.isnan(pred).any():
        raise ValueError(f"activity_metrics: {int(np.isnan(pred).sum())} NaN predictions; leave failed predictions "
                         "out (per_column) instead of counting them as inactive")
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


def per_column(metric: Callable[..., dict[str, np.ndarray]], pred: np.ndarray, true: np.ndarray,
               *args: Any) -> dict[str, np.ndarray]:
    """``metric(pred, true, *args)`` for dense [n_ctx, n_lat] arrays in which NaN marks a failed
    prediction: complete columns are measured together, a column with failures on its valid
    contexts alone (a per-latent threshold array in ``args`` follows its column)."""
    bad = np.isnan(pred).any(axis=0)
    if not bad.any():
        return metric(pred, true, *args)

    def cols(a: Any, c: Any) -> Any:
        return a[c] if isinstance(a, np.ndarray) and a.ndim == 1 and a.shape[0] == pred.shape[1] else a

    ok = np.flatnonzero(~bad)
    first = metric(pred[:, ok], true[:, ok], *(cols(a, ok) for a in args))
    out = {k: np.full(pred.shape[1], np.nan, dtype=np.float64) for k in first}
    for k, v in first.items():
        out[k][ok] = v
    for j in np.flatnonzero(bad):
        rows = ~np.isnan(pred[:, j])
        one = metric(pred[rows, j:j + 1], true[rows, j:j + 1], *(cols(a, [j]) for a in args))
        for k, v in one.items():
            out[k][j] = v[0]
    return out


def rank_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold-free per-latent metrics for dense [n_ctx, n_lat] arrays (average ranks for ties):
    ``spearman`` (rank correlation of predicted and true activation; NaN if either is constant) and
    ``auroc`` (probability that a truly active context gets a higher prediction than an inactive
    one, ties counting half; NaN without both classes)."""
    from scipy.stats import rankdata

    n = pred.shape[0]
    rp = rankdata(pred, axis=0).astype(np.float64)
    rt = rankdata(true, axis=0).astype(np.float64)
    rp -= rp.mean(axis=0)
    rt -= rt.mean(axis=0)
    denom = np.sqrt((rp ** 2).sum(0) * (rt ** 2).sum(0))
    active = true > 0
    n_pos = active.sum(0).astype(np.float64)
    n_neg = n - n_pos
    rank_sum = np.where(active, rp + (n + 1) / 2.0, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        spearman = np.where(denom > 0, (rp * rt).sum(0) / denom, np.nan)
        auroc = np.where((n_pos > 0) & (n_neg > 0), (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), np.nan)
    return {"spearman": spearman, "auroc": auroc}


def score_relation(scores: np.ndarray, values: np.ndarray, n_bins: int) -> tuple[list[dict[str, Any]], float, int]:
    """Binned means of a per-latent metric against the detection score, and their rank correlation.

    Bins hold (about) equal numbers of latents, by score rank. Latents with a NaN score or value
    are left out. Returns (rows with bin, score_lo, score_hi, score_mean, n_latents, mean,
    Spearman rho over the latents, number of latents used)."""
    from scipy.stats import spearmanr

    ok = np.isfinite(scores) & np.isfinite(values)
    s, v = scores[ok], values[ok]
    if s.size == 0:
        return [], float("nan"), 0
    order = np.argsort(s, kind="stable")
    rows = []
    for b, idx in enumerate(np.array_split(order, min(n_bins, s.size))):
        rows.append({"bin": b, "score_lo": float(s[idx].min()), "score_hi": float(s[idx].max()),
                     "score_mean": float(s[idx].mean()), "n_latents": int(idx.size), "mean": float(v[idx].mean())})
    rho = float(spearmanr(s, v).statistic) if s.size > 2 and np.ptp(s) > 0 and np.ptp(v) > 0 else float("nan")
    return rows, rho, int(s.size)


# ---- the oracle: true activations with injected errors ------------------------------------------
class ValuePool:
    """Per-latent pools of active values (from the calib split) to draw false positives from.
    A latent without active values draws from all latents' values together."""

    def __init__(self, latents: np.ndarray, values: np.ndarray, num_latents: int) -> None:
        values = np.asarray(values, dtype=np.float32)
        keep = values > 0
        latents, values = np.asarray(latents)[keep], values[keep]
        order = np.lexsort((values, latents))
        self.values = values[order]
        self.counts = np.bincount(latents, minlength=num_latents)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.fallback = self.values if self.values.size else np.ones(1, dtype=np.float32)

    def draw(self, cols: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One value for each latent id in ``cols``."""
        u = rng.random(cols.shape)
        count = self.counts[cols]
        own = self.values[np.minimum(self.offsets[cols] + (u * count).astype(np.int64),
                                     max(self.values.size - 1, 0))] if self.values.size else None
        other = self.fallback[np.minimum((u * self.fallback.size).astype(np.int64), self.fallback.size - 1)]
        return np.where(count > 0, own, other) if own is not None else other


def inject_errors(true: np.ndarray, latents: np.ndarray, fp_rate: float, fn_rate: float, pool: ValuePool,
                  rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
    """True activations [n_ctx, len(latents)] of the given latent ids with errors injected: each
    inactive entry becomes active with probability ``fp_rate`` (a value drawn from its latent's
    pool), each active entry becomes 0 with probability ``fn_rate``. Returns the values and the
    counts (tp, fp, tn, fn) of the injected activity against the true activity."""
    active = true > 0
    u = rng.random(true.shape)
    fp = ~active & (u < fp_rate)
    fn = active & (u < fn_rate)
    out = np.where(fn, 0.0, true).astype(np.float32)
    rows, cols = np.nonzero(fp)
    out[rows, cols] = pool.draw(latents[cols], rng)
    n_fp, n_fn = int(fp.sum()), int(fn.sum())
    counts = {"tp": int(active.sum()) - n_fn, "fn": n_fn, "fp": n_fp, "tn": int((~active).sum()) - n_fp}
    return out, counts


def crossing_specificity(specificity: np.ndarray, ce: np.ndarray, zero_ce: float) -> float:
    """The specificity at which the oracle's CE crosses zero-ablation's, interpolated linearly
    between the measured points (sorted by specificity); NaN when it never crosses."""
    order = np.argsort(specificity)[::-1]
    s, d = np.asarray(specificity, float)[order], np.asarray(ce, float)[order] - zero_ce
    for i in range(len(s) - 1):
        if d[i] <= 0 < d[i + 1] or d[i] >= 0 > d[i + 1]:
            t = d[i] / (d[i] - d[i + 1])
            return float(s[i] + t * (s[i + 1] - s[i]))
    return float("nan")


CE_SCHEMA = pa.schema([
    ("condition", pa.string()), ("selection", pa.string()), ("fraction", pa.float64()),
    ("calibration", pa.string()), ("seed", pa.int32()), ("n_latents", pa.int32()), ("positions", pa.string()),
    ("ce_mean", pa.float64()), ("ce_lo", pa.float64()), ("ce_hi", pa.float64()), ("n", pa.int64()),
    ("delta_zero_mean", pa.float64()), ("delta_zero_lo", pa.float64()), ("delta_zero_hi", pa.float64()),
    ("n_true_kept", pa.int64()), ("patch_base", pa.string()),
])
"""The `ce` table. `n_true_kept`: latents active on some patched eval context that keep their true
value in this condition (the transcoder: all of them; a simulated condition: those not simulated;
`simulated_strict`: 0; null where the transcoder is not used). `patch_base`: evaluate.patch_base."""


def ce_row(condition: str, seq_ce: np.ndarray, zero_seq_ce: np.ndarray, n_boot: int, *, selection: str = "all",
           fraction: float | None = None, calibration: str = "", seed: int = -1, n_latents: int = 0,
           positions: str = "all", n_true_kept: int | None = None, patch_base: str = "topk") -> dict[str, Any]:
    """One row of the `ce` table, with a paired difference against zero-ablation."""
    mean, lo, hi = bootstrap_mean(seq_ce, n_boot)
    d_mean, d_lo, d_hi = bootstrap_mean(seq_ce - zero_seq_ce, n_boot)
    return {"condition": condition, "selection": selection, "fraction": fraction, "calibration": calibration,
            "seed": seed, "n_latents": n_latents, "positions": positions,
            "ce_mean": mean, "ce_lo": lo, "ce_hi": hi, "n": len(seq_ce),
            "delta_zero_mean": d_mean, "delta_zero_lo": d_lo, "delta_zero_hi": d_hi, "n_true_kept": n_true_kept,
            "patch_base": patch_base}
