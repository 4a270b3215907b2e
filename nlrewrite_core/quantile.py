"""Quantile normalisation: the true sample and the knot fits of the quantile calibration methods.

Holds the true sample that quantile normalisation maps onto (:class:`TrueSample`, each latent's
cached true activations, and :class:`SampleBlock`, the samples of a block of latents), the knot-fit
signature every calibration method shares (:data:`KnotFit`: it takes a :class:`SampleBlock`), the
column sorting and quantile helpers (:func:`quantile_grid`, the padding of ragged knots that
``isotonic`` also uses) and the fits of the quantile methods:

- ``quantile``: the paper's quantile normalisation, exact. A prediction ``p`` goes to
  ``Q_true(F_pred(p))``: ``F_pred`` is the empirical CDF of the latent's calib predictions and
  ``Q_true`` the empirical inverse CDF of its *true sample* (:class:`TrueSample`: in the paper,
  ~10M true activations of the latent cache, disjoint from eval). A right-continuous step
  function (``CalibrationMethod.step``), stored as the knots where its value steps up after a
  floor knot at the lowest float32; nothing is interpolated, so no prediction gets a value
  between two true quantiles (fit predictions [1, 3] onto true [0, 2]: 2 maps to 0, not 1).
- ``quantile-interp``: an ablation, the interpolated map nlrewrite used before: knots
  ``x_j = Q_pred(p_j)``, ``y_j = Q_true(p_j)`` on ``n_knots`` probabilities ``p_j``
  (:func:`quantile_grid`: even on [0, 0.5], crowded towards 1 where sparse latents are active;
  linear interpolation between order statistics, numpy's default type 7) of the calib contexts'
  *paired* true values, joined by straight lines. A run of tied prediction quantiles gets one
  value: ``Q_true`` at the run's middle probability, so a constant-prediction latent maps to
  the median true activation.
- ``quantile-hf1`` .. ``quantile-hf9``: the same quantile normalisation with each of Hyndman &
  Fan's (1996) sample-quantile definitions (numpy.quantile's ``method=``: 1 inverted_cdf,
  2 averaged_inverted_cdf, 3 closest_observation, 4 interpolated_inverted_cdf, 5 hazen,
  6 weibull, 7 linear, 8 median_unbiased, 9 normal_unbiased) for both the prediction and the
  true quantiles, on the same knot grid and with the same tie rule (the paired calib true
  values, like ``quantile-interp``). ``quantile-hf7`` equals ``quantile-interp`` up to rounding.

The method registry (:data:`nlrewrite_core.calibrate.METHODS`), the other methods' fits (``none``,
``isotonic``, ``affine``), fitting, applying, validating and the table I/O of maps are in
:mod:`nlrewrite_core.calibrate`; fitting and applying them shard by shard over the simulation's
prediction files is in :mod:`nlrewrite_core.calibrate_stream`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

KnotFit = Callable[[np.ndarray, np.ndarray, int, "SampleBlock"], tuple[np.ndarray, np.ndarray]]
"""Fit for a block of latents: (pred [n, L], true [n, L], n_knots, the block's true sample) ->
(x [L, K], y [L, K]). ``true`` holds the true activations of the same contexts as ``pred``
(paired methods use it); the true sample is each latent's distribution of true activations
(quantile normalisation uses it; see :class:`TrueSample`)."""


def _quantile_sorted(sorted_cols: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Quantiles of each column of ``sorted_cols`` [n, L] at per-column probabilities [K, L].

    Linear interpolation between order statistics (Hyndman & Fan type 7, numpy's default):
    ``h = (n - 1) p``, ``Q = s[floor h] + (h - floor h) (s[floor h + 1] - s[floor h])``.
    """
    n = sorted_cols.shape[0]
    h = np.clip(probs, 0.0, 1.0) * (n - 1)
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = h - lo
    s_lo = np.take_along_axis(sorted_cols, lo, axis=0)
    s_hi = np.take_along_axis(sorted_cols, hi, axis=0)
    return s_lo + frac * (s_hi - s_lo)


def sort_columns(a: np.ndarray) -> np.ndarray:
    """``np.sort(a.astype(float64), axis=0)``, the same values, about 4x faster: each column is
    sorted as a contiguous row of the transpose (numpy's axis-0 sort copies strided columns)."""
    t = a.T.astype(np.float64, order="C")
    t.sort(axis=1)
    return t.T


def _tie_runs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of the run of equal values containing each entry, along axis 0.

    ``x`` is [K, L] and non-decreasing along axis 0.
    """
    k = x.shape[0]
    idx = np.arange(k)[:, None]
    starts = np.ones(x.shape, dtype=bool)
    starts[1:] = x[1:] != x[:-1]
    ends = np.ones(x.shape, dtype=bool)
    ends[:-1] = x[:-1] != x[1:]
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=0)
    last = np.minimum.accumulate(np.where(ends, idx, k - 1)[::-1], axis=0)[::-1]
    return first, last


def quantile_grid(n_knots: int, n_contexts: int) -> np.ndarray:
    """Probabilities of the ``n_knots`` quantile knots: strictly increasing from 0 to 1.

    Half the knots are evenly spaced on [0, 0.5]; the other half crowd geometrically towards 1,
    with ``1 - p`` running from 0.5 down to ``1 / (n_contexts - 1)`` (the spacing of the order
    statistics) before the final knot at 1. Latents are sparse: their non-zero activations
    fill only the top fraction of a percent of the probability range, and an even grid would
    leave that part to one linear segment. With too few knots or contexts for a tail, the
    grid is even on [0, 1].
    """
    n_even = n_knots // 2 + 1
    n_tail = n_knots - n_even
    even = np.linspace(0.0, 0.5, n_even)
    smallest = 1.0 / max(n_contexts - 1, 1)
    if n_tail < 2 or smallest >= 0.5:
        return np.linspace(0.0, 1.0, n_knots)
    tail = 1.0 - np.geomspace(0.5, smallest, n_tail)[1:]
    return np.concatenate([even, tail, [1.0]])


def fit_quantile_interp(pred: np.ndarray, true: np.ndarray, n_knots: int, sample: SampleBlock
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated quantile-normalisation knots on the calib contexts' paired true values (``quantile-interp``;
    see the module docstring)."""
    n_latents = pred.shape[1]
    probs = quantile_grid(n_knots, pred.shape[0])
    grid = np.broadcast_to(probs[:, None], (n_knots, n_latents))
    sorted_pred = sort_columns(pred)
    sorted_true = sort_columns(true)
    # Ties are found on the stored (float32) knots, so rounding cannot create a jump.
    x = _quantile_sorted(sorted_pred, grid).astype(np.float32)
    first, last = _tie_runs(x)
    mid_probs = 0.5 * (probs[first] + probs[last])
    y = _quantile_sorted(sorted_true, mid_probs)
    # Guard against rounding: quantiles of sorted data at increasing probabilities never decrease.
    y = np.maximum.accumulate(y, axis=0)
    return x.T.astype(np.float64), y.T


class SampleBlock:
    """The true samples of a block of latents, sparse: column ``c`` holds ``m`` values of which
    ``counts[c]`` are positive (``values[offsets[c]:offsets[c] + counts[c]]``, sorted ascending)
    and the rest are 0. True post-TopK activations are never negative, so the zeros are the
    smallest order statistics."""

    def __init__(self, m: int, offsets: np.ndarray, counts: np.ndarray, values: np.ndarray) -> None:
        if m < 1:
            raise ValueError("a true sample needs at least one token")
        if np.any(counts > m):
            raise ValueError("a true sample has more active values than tokens")
        if values.size and values.min() <= 0:
            raise ValueError("a true sample's active values must be positive")
        self.m, self.offsets, self.counts, self.values = int(m), offsets, counts, values

    @classmethod
    def from_dense(cls, true: np.ndarray) -> SampleBlock:
        """The columns of a dense [m, L] array as true samples (the calib-only design)."""
        srt = sort_columns(true)
        pos = srt > 0
        counts = pos.sum(axis=0)
        values = srt.T[pos.T].astype(np.float32)  # column-major: each column's positive values, ascending
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(true.shape[0], offsets, counts.astype(np.int64), values)

    def order_stat(self, cols: np.ndarray, j: np.ndarray) -> np.ndarray:
        """The ``j``-th smallest value (0-based) of column ``cols`` (arrays broadcast together)."""
        zeros = self.m - self.counts[cols]
        k = j - zeros
        idx = self.offsets[cols] + np.maximum(k, 0)
        got = self.values[np.minimum(idx, max(self.values.size - 1, 0))] if self.values.size else np.zeros(idx.shape)
        return np.where(k >= 0, got, 0.0)


class TrueSample:
    """Each latent's true activations over a large sample of tokens disjoint from eval (the
    latent cache), kept sparse: its positive values, sorted, plus the sample's token count
    ``m``. The paper maps predictions onto the empirical inverse CDF of ~10M true activations:
    cheap, because they are the latent cache. Memory: 12 bytes per cached active value."""

    def __init__(self, latents: np.ndarray, values: np.ndarray, m: int) -> None:
        latents = np.asarray(latents, dtype=np.int64)
        values = np.asarray(values, dtype=np.float32)
        keep = values > 0
        latents, values = latents[keep], values[keep]
        order = np.lexsort((values, latents))
        self.latents, self.values, self.m = latents[order], values[order], int(m)

    def block(self, latents: np.ndarray) -> SampleBlock:
        """The true samples of the given latent ids (a sorted array)."""
        latents = np.asarray(latents, dtype=np.int64)
        lo = np.searchsorted(self.latents, latents, side="left")
        hi = np.searchsorted(self.latents, latents, side="right")
        counts = hi - lo
        values = np.concatenate([self.values[a:b] for a, b in zip(lo, hi)]) if latents.size else np.zeros(0, np.float32)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return SampleBlock(self.m, offsets, counts, values)


FLOOR = float(np.finfo(np.float32).min)
"""The first knot of a step map: every prediction is at or above it."""


def fit_quantile(pred: np.ndarray, true: np.ndarray, n_knots: int, sample: SampleBlock
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The paper's quantile normalisation, exact: a prediction ``p`` goes to ``Q_true(F_pred(p))``,
    where ``F_pred`` is the empirical CDF of the latent's ``n`` calib predictions (the fraction
    at or below ``p``) and ``Q_true`` the empirical inverse CDF of its true sample of ``m``
    values, ``Q_true(u) = `` the ``ceil(u m)``-th smallest value (Hyndman & Fan type 1; the
    smallest at ``u = 0``). A step function: its knots are the distinct calib predictions
    where the value changes, after a floor knot for predictions below all of them. ``n_knots``
    is ignored (the data decide). Computed in integers: the index is ``ceil(i m / n) - 1``.

    Where we follow and differ from the paper: the paper maps ~10K predictions onto ~10M true
    activations of the latent cache, which is what ``sample`` holds (``calibrate.true_sample``);
    its released scripts only keep the normalised values, so the tie rule here (the CDF counts
    ties, i.e. a prediction equal to others takes the highest of their quantiles) is ours."""
    n, n_latents = pred.shape
    srt = sort_columns(pred)  # float64 copy of float32 values
    idx = np.arange(1, n + 1, dtype=np.int64)[:, None]
    last = np.ones(srt.shape, dtype=bool)
    last[:-1] = srt[1:] != srt[:-1]  # the last of each run of ties: F_pred there counts the whole run
    j = (idx * sample.m + n - 1) // n - 1
    cols = np.broadcast_to(np.arange(n_latents)[None, :], srt.shape)
    y = sample.order_stat(cols, j)
    floor = sample.order_stat(np.arange(n_latents), np.zeros(n_latents, dtype=np.int64))
    rows = []
    for c in range(n_latents):
        xs, ys = srt[last[:, c], c], y[last[:, c], c]
        prev = np.concatenate([[floor[c]], ys[:-1]])
        keep = ys > prev  # a knot only where the value steps up (y never decreases along x)
        rows.append((np.concatenate([[FLOOR], xs[keep]]), np.concatenate([[floor[c]], ys[keep]])))
    return pad_rows(rows)


QuantileMethod = Literal[
    "inverted_cdf", "averaged_inverted_cdf", "closest_observation", "interpolated_inverted_cdf",
    "hazen", "weibull", "linear", "median_unbiased", "normal_unbiased",
]
"""The numpy.quantile ``method=`` names of the nine Hyndman & Fan types."""

HF_TYPES: dict[int, QuantileMethod] = {
    1: "inverted_cdf",
    2: "averaged_inverted_cdf",
    3: "closest_observation",
    4: "interpolated_inverted_cdf",
    5: "hazen",
    6: "weibull",
    7: "linear",
    8: "median_unbiased",
    9: "normal_unbiased",
}
"""Hyndman & Fan (1996) sample-quantile type -> numpy.quantile ``method=`` name."""


def fit_quantile_hf(hf_type: int) -> KnotFit:
    """Quantile-normalisation knots with Hyndman & Fan type ``hf_type`` quantiles."""
    method = HF_TYPES[hf_type]

    def fit(pred: np.ndarray, true: np.ndarray, n_knots: int, sample: SampleBlock) -> tuple[np.ndarray, np.ndarray]:
        probs = quantile_grid(n_knots, pred.shape[0])
        x = np.quantile(pred.astype(np.float64), probs, axis=0, method=method)
        # Sample quantiles never decrease in p; the guard only absorbs rounding.
        x = np.maximum.accumulate(x.astype(np.float32), axis=0)
        first, last = _tie_runs(x)
        mid_probs = 0.5 * (probs[first] + probs[last])
        sorted_true = sort_columns(true)
        y = np.empty(mid_probs.shape, dtype=np.float64)
        for j in range(x.shape[1]):
            unique, inverse = np.unique(mid_probs[:, j], return_inverse=True)
            y[:, j] = np.quantile(sorted_true[:, j], unique, method=method)[inverse]
        y = np.maximum.accumulate(y, axis=0)
        return x.T.astype(np.float64), y.T

    fit.__name__ = f"fit_quantile_hf{hf_type}"
    return fit


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-latent knots as [L, K] arrays, each row padded with its last knot."""
    width = max((r[0].size for r in rows), default=1)
    xs = np.empty((len(rows), width), dtype=np.float64)
    ys = np.empty((len(rows), width), dtype=np.float64)
    for i, (x, y) in enumerate(rows):
        xs[i, : x.size], xs[i, x.size :] = x, x[-1]
        ys[i, : y.size], ys[i, y.size :] = y, y[-1]
    return xs, ys
