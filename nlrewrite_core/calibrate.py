"""Per-latent calibration of simulator predictions.

A calibration map sends one latent's raw prediction (already mapped linearly into
``[0, max_act]``) to a calibrated activation. Every map is a monotone function stored as knots
``(x, y)``: ``x`` non-decreasing prediction values, ``y`` non-decreasing activation values, with
equal ``y`` wherever ``x`` ties, so the map is a function. A step map (``quantile``) holds
``y[j]`` from ``x[j]`` up to the next knot; the others interpolate linearly between knots and
outside them are clamped to the end values, or, for methods that declare ``extrapolate``
(``none``, ``affine``), continued along the end segments. A failed prediction (NaN) is fit
around and stays NaN: it is never given a value here.

Methods (registry :data:`METHODS`, name -> :class:`CalibrationMethod`):

- ``none``: the identity (knots ``(0, 0), (1, 1)``, extrapolated).
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
- ``isotonic``: scikit-learn's ``IsotonicRegression`` of true on predicted activation (the
  least-squares monotone fit), clamped outside the calib range. Its knots are the fit's
  thresholds, so on its own fit data it reproduces ``IsotonicRegression.predict`` and the mean of
  the true activations.
- ``affine``: ``scale * max(pred - threshold, 0)``, extrapolated. The threshold makes the fraction
  of calib contexts predicted active equal the fraction truly active (the ``m``-th largest
  prediction is the last one above it); the scale makes the calibrated mean equal the true
  mean, capped so that the largest calib prediction maps no higher than the largest true
  activation (a guard against near-zero denominators).

New methods are added by registering a fit function that returns knot arrays for a block of
latents (:data:`METHODS`).

Maps are joined to prediction columns by latent id, never by position:
:func:`apply_calibration` takes the latent id of each column, and :func:`maps_from_table`
sorts rows by latent id whatever their order in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KnotFit = Callable[[np.ndarray, np.ndarray, int, "SampleBlock"], tuple[np.ndarray, np.ndarray]]
"""Fit for a block of latents: (pred [n, L], true [n, L], n_knots, the block's true sample) ->
(x [L, K], y [L, K]). ``true`` holds the true activations of the same contexts as ``pred``
(paired methods use it); the true sample is each latent's distribution of true activations
(quantile normalisation uses it; see :class:`TrueSample`)."""

LATENT_BLOCK = 512
"""Latents fitted at once: bounds the memory of the sorted copies to n_contexts x 512 values."""


@dataclass(frozen=True)
class CalibrationMethod:
    """A registered calibration method."""

    fit: KnotFit
    """Knot fit for a block of latents (see :data:`KnotFit`)."""
    extrapolate: bool
    """Continue the end segments linearly outside the knots (else clamp to the end values)."""
    step: bool = False
    """A right-continuous step function: value ``y[j]`` for ``x[j] <= pred < x[j+1]`` (no
    interpolation); ``x[0]`` is the lowest float32, so every prediction has a knot at or below it."""


@dataclass(frozen=True)
class CalibrationMaps:
    """Per-latent piecewise-linear maps of one method.

    Row ``i`` of ``x`` and ``y`` is the map of latent ``latents[i]``. Rows are padded to a common
    length by repeating their last knot, which leaves the function unchanged.
    """

    method: str
    latents: np.ndarray
    """int64 [L], sorted, unique latent ids."""
    x: np.ndarray
    """float32 [L, K], non-decreasing along each row."""
    y: np.ndarray
    """float32 [L, K], non-decreasing along each row, equal where x ties."""
    extrapolate: bool
    step: bool = False
    """Step-function semantics (see :class:`CalibrationMethod`)."""

    @property
    def n_latents(self) -> int:
        """Number of latents with a map."""
        return int(self.latents.shape[0])


# ---------------------------------------------------------------------------------------------
# Knot fits
# ---------------------------------------------------------------------------------------------


def _fit_identity(pred: np.ndarray, true: np.ndarray, n_knots: int, sample: SampleBlock
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Identity map for every latent: knots (0, 0) and (1, 1), to be extrapolated."""
    n_latents = pred.shape[1]
    knots = np.tile(np.array([0.0, 1.0]), (n_latents, 1))
    return knots, knots.copy()


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


def _sort_columns(a: np.ndarray) -> np.ndarray:
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


def _fit_quantile_interp(pred: np.ndarray, true: np.ndarray, n_knots: int, sample: SampleBlock
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated quantile-normalisation knots on the calib contexts' paired true values (``quantile-interp``;
    see the module docstring)."""
    n_latents = pred.shape[1]
    probs = quantile_grid(n_knots, pred.shape[0])
    grid = np.broadcast_to(probs[:, None], (n_knots, n_latents))
    sorted_pred = _sort_columns(pred)
    sorted_true = _sort_columns(true)
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
        srt = _sort_columns(true)
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


def _fit_quantile(pred: np.ndarray, true: np.ndarray, n_knots: int, sample: SampleBlock
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
    srt = _sort_columns(pred)  # float64 copy of float32 values
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
    return _pad_rows(rows)


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


def _fit_quantile_hf(hf_type: int) -> KnotFit:
    """Quantile-normalisation knots with Hyndman & Fan type ``hf_type`` quantiles."""
    method = HF_TYPES[hf_type]

    def fit(pred: np.ndarray, true: np.ndarray, n_knots: int, sample: SampleBlock) -> tuple[np.ndarray, np.ndarray]:
        probs = quantile_grid(n_knots, pred.shape[0])
        x = np.quantile(pred.astype(np.float64), probs, axis=0, method=method)
        # Sample quantiles never decrease in p; the guard only absorbs rounding.
        x = np.maximum.accumulate(x.astype(np.float32), axis=0)
        first, last = _tie_runs(x)
        mid_probs = 0.5 * (probs[first] + probs[last])
        sorted_true = _sort_columns(true)
        y = np.empty(mid_probs.shape, dtype=np.float64)
        for j in range(x.shape[1]):
            unique, inverse = np.unique(mid_probs[:, j], return_inverse=True)
            y[:, j] = np.quantile(sorted_true[:, j], unique, method=method)[inverse]
        y = np.maximum.accumulate(y, axis=0)
        return x.T.astype(np.float64), y.T

    fit.__name__ = f"_fit_quantile_hf{hf_type}"
    return fit


def _pad_rows(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-latent knots as [L, K] arrays, each row padded with its last knot."""
    width = max((r[0].size for r in rows), default=1)
    xs = np.empty((len(rows), width), dtype=np.float64)
    ys = np.empty((len(rows), width), dtype=np.float64)
    for i, (x, y) in enumerate(rows):
        xs[i, : x.size], xs[i, x.size :] = x, x[-1]
        ys[i, : y.size], ys[i, y.size :] = y, y[-1]
    return xs, ys


def _fit_isotonic(pred: np.ndarray, true: np.ndarray, n_knots: int, sample: SampleBlock
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic regression (scikit-learn) of true on predicted activation, one fit per latent.

    What ``IsotonicRegression(out_of_bounds="clip").fit`` does on float64 inputs, without its
    per-call overhead (about 6x faster): exactly tied predictions are merged (mean true value, weight = count),
    ``sklearn.isotonic.isotonic_regression`` fits the merged points, and only the ends of each
    constant run are kept as knots (sklearn's ``X_thresholds_``/``y_thresholds_``). The map
    interpolates linearly between knots and clamps outside, as sklearn's predict does.
    ``n_knots`` is ignored (the fit decides how many knots it needs).
    """
    from sklearn.isotonic import isotonic_regression

    rows = []
    for j in range(pred.shape[1]):
        p = pred[:, j].astype(np.float32)
        t = true[:, j].astype(np.float64)
        x, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
        means = np.bincount(inverse, weights=t, minlength=x.size) / counts
        if x.size == 1:  # a constant prediction: the map is the mean, wherever it is asked
            rows.append((x.astype(np.float64), means))
            continue
        y = isotonic_regression(means, sample_weight=counts.astype(np.float64), increasing=True)
        y = np.maximum.accumulate(np.asarray(y, dtype=np.float64))
        keep = np.ones(x.size, dtype=bool)
        keep[1:-1] = (y[1:-1] != y[:-2]) | (y[1:-1] != y[2:])
        rows.append((x[keep].astype(np.float64), y[keep]))
    return _pad_rows(rows)


AFFINE_SPACING = 1e-3
"""Relative spacing of the affine map's three knots (a float32 can tell them apart)."""


def _fit_affine(pred: np.ndarray, true: np.ndarray, n_knots: int, sample: SampleBlock
                ) -> tuple[np.ndarray, np.ndarray]:
    """Affine knots ``(t - d, 0), (t, 0), (t + d, s d)`` (see the module docstring)."""
    n, n_latents = pred.shape
    cols = np.arange(n_latents)
    p = _sort_columns(pred)
    t = true.astype(np.float64)
    n_active = (t > 0).sum(axis=0)
    span = p[-1] - p[0]
    threshold = p[np.clip(n - n_active - 1, 0, n - 1), cols]
    spacing = AFFINE_SPACING * np.maximum.reduce([span, np.abs(threshold), np.ones(n_latents)])
    # Every context truly active: the threshold goes below the smallest prediction.
    threshold = np.where(n_active >= n, p[0] - spacing, threshold)
    threshold = threshold.astype(np.float32).astype(np.float64)
    spacing = np.maximum(spacing, 2.0 * np.abs(threshold) * np.finfo(np.float32).eps)
    excess = np.maximum(p - threshold, 0.0).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(excess > 0, t.mean(axis=0) / excess, 0.0)
        top = p[-1] - threshold
        cap = np.where(top > 0, t.max(axis=0) / top, 0.0)
    scale = np.clip(np.minimum(scale, cap), 0.0, None)
    x = np.stack([threshold - spacing, threshold, threshold + spacing], axis=1)
    y = np.stack([np.zeros(n_latents), np.zeros(n_latents), scale * spacing], axis=1)
    return x, y


METHODS: dict[str, CalibrationMethod] = {
    "none": CalibrationMethod(fit=_fit_identity, extrapolate=True),
    "quantile": CalibrationMethod(fit=_fit_quantile, extrapolate=False, step=True),
    "quantile-interp": CalibrationMethod(fit=_fit_quantile_interp, extrapolate=False),
    **{f"quantile-hf{k}": CalibrationMethod(fit=_fit_quantile_hf(k), extrapolate=False) for k in HF_TYPES},
    "isotonic": CalibrationMethod(fit=_fit_isotonic, extrapolate=False),
    "affine": CalibrationMethod(fit=_fit_affine, extrapolate=True),
}
"""Calibration methods by name."""


# ---------------------------------------------------------------------------------------------
# Construction and validation
# ---------------------------------------------------------------------------------------------


def _method(name: str) -> CalibrationMethod:
    """The registered method ``name``; a clear error for an unknown one."""
    if name not in METHODS:
        raise ValueError(f"unknown calibration method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def validate_maps(maps: CalibrationMaps) -> None:
    """Raise ValueError unless ``maps`` is well formed (finite, monotone, a function, unique ids)."""
    x, y, latents = maps.x, maps.y, maps.latents
    if x.ndim != 2 or x.shape != y.shape or x.shape[0] != latents.shape[0] or x.shape[1] < 1:
        raise ValueError(f"bad map shapes: latents {latents.shape}, x {x.shape}, y {y.shape}")
    if latents.size and np.any(np.diff(latents) <= 0):
        raise ValueError("latent ids of calibration maps must be sorted and unique")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"calibration maps ({maps.method}) contain NaN or inf")
    if np.any(np.diff(x, axis=1) < 0) or np.any(np.diff(y, axis=1) < 0):
        raise ValueError(f"calibration maps ({maps.method}) are not monotone")
    tied = np.diff(x, axis=1) == 0
    if np.any(tied & (np.diff(y, axis=1) != 0)):
        raise ValueError(f"calibration maps ({maps.method}) give two values to one prediction")


def _make_maps(method: str, latents: np.ndarray, x: np.ndarray, y: np.ndarray) -> CalibrationMaps:
    """Maps sorted by latent id, cast to storage types, and validated."""
    order = np.argsort(latents, kind="stable")
    maps = CalibrationMaps(
        method=method,
        latents=np.asarray(latents, dtype=np.int64)[order],
        x=np.ascontiguousarray(x[order], dtype=np.float32),
        y=np.ascontiguousarray(y[order], dtype=np.float32),
        extrapolate=_method(method).extrapolate,
        step=_method(method).step,
    )
    validate_maps(maps)
    return maps


def _check_matrix(name: str, a: np.ndarray) -> np.ndarray:
    """``a`` as a 2-D float array with only finite values."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_contexts, n_latents], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _column_latents(latents: np.ndarray | None, n_cols: int) -> np.ndarray:
    """Latent id of each column: ``latents`` checked, or 0..n_cols-1."""
    if latents is None:
        return np.arange(n_cols, dtype=np.int64)
    latents = np.asarray(latents, dtype=np.int64)
    if latents.shape != (n_cols,):
        raise ValueError(f"latents has shape {latents.shape}, expected ({n_cols},)")
    if np.unique(latents).size != n_cols:
        raise ValueError("latent ids must be unique")
    return latents


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def fit_calibration(
    method: str,
    pred: np.ndarray,
    true: np.ndarray,
    n_knots: int = 257,
    *,
    latents: np.ndarray | None = None,
    sample: TrueSample | None = None,
) -> CalibrationMaps:
    """Fit one map per latent on the calib split.

    ``pred`` and ``true`` are [n_contexts, n_latents]: raw predictions and true post-TopK
    activations of the same contexts. NaN in ``pred`` marks a failed prediction: that latent's
    map is fit on its other contexts. ``latents`` gives the latent id of each column (default:
    column j is latent j). ``sample`` is the large true sample that ``quantile`` maps onto
    (default: the paired ``true`` columns, the calib-only design). ``n_knots`` is the number of
    quantile probabilities of the interpolated quantile methods (see :func:`quantile_grid`);
    other methods ignore it.
    """
    spec = _method(method)
    pred = np.asarray(pred)
    if pred.ndim != 2:
        raise ValueError(f"pred must be 2-D [n_contexts, n_latents], got shape {pred.shape}")
    if np.isinf(pred).any():
        raise ValueError("pred contains inf")
    true = _check_matrix("true", true)
    if pred.shape != true.shape:
        raise ValueError(f"pred {pred.shape} and true {true.shape} differ in shape")
    if pred.shape[0] < 1:
        raise ValueError("calibration needs at least one context")
    if n_knots < 2:
        raise ValueError(f"n_knots must be >= 2, got {n_knots}")
    ids = _column_latents(latents, pred.shape[1])
    failed = np.isnan(pred)
    if failed.all(axis=0).any():
        raise ValueError(f"latents {ids[failed.all(axis=0)][:10].tolist()} have no calib prediction to fit on")

    def samples(cols: np.ndarray, rows: np.ndarray | slice = slice(None)) -> SampleBlock:
        if sample is not None:
            return sample.block(ids[cols])
        return SampleBlock.from_dense(true[rows][:, cols])

    xs, ys, order = [], [], []
    complete = np.flatnonzero(~failed.any(axis=0))
    for start in range(0, complete.size, LATENT_BLOCK):
        cols = complete[start:start + LATENT_BLOCK]
        x, y = spec.fit(pred[:, cols], true[:, cols], n_knots, samples(cols))
        xs.append(x)
        ys.append(y)
        order.append(cols)
    for c in np.flatnonzero(failed.any(axis=0)):  # a latent with failed predictions: its valid contexts
        rows = ~failed[:, c]
        col = np.array([c])
        x, y = spec.fit(pred[rows][:, col], true[rows][:, col], n_knots, samples(col, rows))
        xs.append(x)
        ys.append(y)
        order.append(col)
    if not xs:
        return _make_maps(method, ids, np.zeros((0, 2)), np.zeros((0, 2)))
    # Blocks may need different knot counts (isotonic, quantile): pad each row with its last knot.
    width = max(x.shape[1] for x in xs)
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])), mode="edge")  # noqa: E731
    cols = np.concatenate(order)
    return _make_maps(method, ids[cols], np.concatenate([pad(x) for x in xs]), np.concatenate([pad(y) for y in ys]))


def _distinct_knots(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row's knots with ties removed (strictly increasing x)."""
    keep = np.ones(x.shape, dtype=bool)
    keep[1:] = x[1:] != x[:-1]
    return x[keep], y[keep]


def _apply_one(x: np.ndarray, y: np.ndarray, values: np.ndarray, extrapolate: bool, step: bool = False) -> np.ndarray:
    """One latent's map applied to ``values`` (float64)."""
    xk, yk = _distinct_knots(x.astype(np.float64), y.astype(np.float64))
    if step:
        return yk[np.maximum(np.searchsorted(xk, values, side="right") - 1, 0)]
    out = np.interp(values, xk, yk)
    if extrapolate and xk.size >= 2:
        below = values < xk[0]
        above = values > xk[-1]
        slope_lo = (yk[1] - yk[0]) / (xk[1] - xk[0])
        slope_hi = (yk[-1] - yk[-2]) / (xk[-1] - xk[-2])
        out[below] = yk[0] + (values[below] - xk[0]) * slope_lo
        out[above] = yk[-1] + (values[above] - xk[-1]) * slope_hi
    return out


def apply_calibration(
    maps: CalibrationMaps, pred_eval: np.ndarray, latents: np.ndarray | None = None
) -> np.ndarray:
    """Calibrated predictions, float32 with the shape of ``pred_eval`` [n_contexts, n_cols].

    ``latents`` gives the latent id of each column (default: column j is latent j); each column
    uses the map of its latent id, and a column whose latent has no map is an error. A NaN
    (failed) prediction stays NaN: it is never given a value here.
    """
    pred_eval = np.asarray(pred_eval)
    if pred_eval.ndim != 2 or np.isinf(pred_eval).any():
        raise ValueError(f"pred_eval must be 2-D and without inf, got shape {pred_eval.shape}")
    ids = _column_latents(latents, pred_eval.shape[1])
    rows = np.minimum(np.searchsorted(maps.latents, ids), max(maps.n_latents - 1, 0))
    found = maps.latents[rows] == ids if maps.n_latents else np.zeros(ids.shape, dtype=bool)
    if not np.all(found):
        missing = ids[~found]
        raise KeyError(f"no {maps.method} calibration map for latents {missing[:10].tolist()}")
    out = np.empty(pred_eval.shape, dtype=np.float32)
    values = pred_eval.astype(np.float64)
    for col, row in enumerate(rows):
        out[:, col] = _apply_one(maps.x[row], maps.y[row], values[:, col], maps.extrapolate, maps.step)
    out[np.isnan(pred_eval)] = np.nan
    if np.isinf(out).any() or np.isnan(out[~np.isnan(pred_eval)]).any():
        raise ValueError(f"calibration ({maps.method}) produced NaN or inf")
    return out


TABLE_SCHEMA = pa.schema(
    [
        ("latent", pa.int32()),
        ("calibration", pa.string()),
        ("x", pa.list_(pa.float32())),
        ("y", pa.list_(pa.float32())),
    ]
)
"""Schema of the ``calibration`` table: one row per (latent, method)."""


def maps_to_table(maps: CalibrationMaps) -> pa.Table:
    """The maps as a table (schema :data:`TABLE_SCHEMA`), ties and padding removed from the knots."""
    validate_maps(maps)
    keep = np.ones(maps.x.shape, dtype=bool)
    keep[:, 1:] = maps.x[:, 1:] != maps.x[:, :-1]
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    x = pa.ListArray.from_arrays(pa.array(offsets), pa.array(maps.x[keep], type=pa.float32()))
    y = pa.ListArray.from_arrays(pa.array(offsets), pa.array(maps.y[keep], type=pa.float32()))
    return pa.Table.from_arrays(
        [
            pa.array(maps.latents.astype(np.int32), type=pa.int32()),
            pa.array([maps.method] * maps.n_latents, type=pa.string()),
            x,
            y,
        ],
        schema=TABLE_SCHEMA,
    )


def _padded(lists: pa.ChunkedArray, lengths: np.ndarray, width: int) -> np.ndarray:
    """A list<float32> column as a float32 [rows, width] array, each row padded with its last value."""
    if lengths.size == 0:
        return np.zeros((0, width), dtype=np.float32)
    if np.any(lengths < 1):
        raise ValueError("calibration table has a row without knots")
    values = np.asarray(pc.list_flatten(lists).to_numpy(zero_copy_only=False), dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    take = starts[:, None] + np.minimum(np.arange(width), lengths[:, None] - 1)
    return values[take]


def maps_from_table(table: pa.Table, method: str) -> CalibrationMaps:
    """The maps of ``method`` from a calibration table, in latent-id order whatever the row order."""
    _method(method)
    missing = set(TABLE_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"calibration table lacks columns {sorted(missing)}")
    rows = table.filter(pc.equal(table["calibration"], method))
    latents = np.asarray(rows["latent"].to_numpy(), dtype=np.int64)
    if np.unique(latents).size != latents.size:
        raise ValueError(f"calibration table has duplicate latents for method {method!r}")
    if rows["x"].null_count or rows["y"].null_count or rows["latent"].null_count:
        raise ValueError("calibration table has null latents or knots")
    x_len = np.asarray(pc.list_value_length(rows["x"]).to_numpy(), dtype=np.int64)
    y_len = np.asarray(pc.list_value_length(rows["y"]).to_numpy(), dtype=np.int64)
    if not np.array_equal(x_len, y_len):
        raise ValueError("calibration table rows have x and y of different lengths")
    width = int(x_len.max()) if x_len.size else 2
    return _make_maps(method, latents, _padded(rows["x"], x_len, width), _padded(rows["y"], y_len, width))


# ---------------------------------------------------------------------------------------------
# Streaming over simulation shards
# ---------------------------------------------------------------------------------------------
# Every map is fit on its own latent's column alone (see fit_calibration), so fitting the latents
# of each shard separately gives exactly the maps of one fit over all latents at once. The helpers
# below turn one shard's long-format predictions and the sparse true activations into the dense
# [contexts x shard latents] blocks that fit_calibration and apply_calibration take.


class SparseColumns:
    """Sparse values (row, latent, value), e.g. the true activations of a split, from which dense
    [n_rows, len(latents)] blocks of chosen latents are cut without ever building [n_rows x all
    latents]. Memory: the sparse entries, sorted by latent once."""

    def __init__(self, rows: np.ndarray, latents: np.ndarray, values: np.ndarray, n_rows: int):
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise ValueError("sparse rows outside [0, n_rows)")
        order = np.argsort(latents, kind="stable")
        self.rows, self.latents = rows[order], np.asarray(latents, dtype=np.int64)[order]
        self.values = np.asarray(values, dtype=np.float32)[order]
        self.n_rows = n_rows

    def dense(self, latents: np.ndarray) -> np.ndarray:
        """float32 [n_rows, len(latents)]: column j holds latent latents[j] (zero where absent).
        `latents` must be sorted and unique."""
        latents = np.asarray(latents, dtype=np.int64)
        out = np.zeros((self.n_rows, len(latents)), dtype=np.float32)
        if not len(latents):
            return out
        a, b = np.searchsorted(self.latents, [latents[0], latents[-1] + 1])
        lat = self.latents[a:b]
        col = np.searchsorted(latents, lat)
        hit = (col < len(latents)) & (latents[np.minimum(col, len(latents) - 1)] == lat)
        out[self.rows[a:b][hit], col[hit]] = self.values[a:b][hit]
        return out


@dataclass(frozen=True)
class ShardBlock:
    """One shard's predictions, dense: calib rows [n_calib, L] and eval rows [n_eval, L], columns
    the shard's latents (sorted ids); NaN where a prediction is missing (a failed answer)."""

    latents: np.ndarray
    calib: np.ndarray
    eval: np.ndarray

    def failed_fraction(self) -> np.ndarray:
        """Per latent, the fraction of its calib and eval contexts without a prediction."""
        n = self.calib.shape[0] + self.eval.shape[0]
        return (np.isnan(self.calib).sum(0) + np.isnan(self.eval).sum(0)) / max(n, 1)

    def columns(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(calib, eval) predictions of the given latents (a sorted subset of this shard's)."""
        col = np.searchsorted(self.latents, latents)
        return self.calib[:, col], self.eval[:, col]


class ShardReader:
    """A shard's prediction file read in pieces: its latent ids first (one small column), then its
    row groups (context blocks) one at a time, so a shard's long rows are never all in memory."""

    def __init__(self, parquet_file):
        self.file = parquet_file

    def latents(self) -> np.ndarray:
        return np.unique(self.file.read(columns=["latent"]).column("latent").to_numpy())

    def batches(self):
        for i in range(self.file.num_row_groups):
            yield self.file.read_row_group(i, columns=["context_id", "latent", "pred"])


def shard_block(context_ids: np.ndarray, latents: np.ndarray, pred: np.ndarray, calib_cids: np.ndarray,
                eval_cids: np.ndarray) -> ShardBlock:
    """Dense calib and eval blocks of one shard's long-format predictions, joined by context id and
    latent id (rows in calib_cids / eval_cids order). Predictions of other contexts are ignored;
    a (context, latent) pair given twice is an error."""
    import pyarrow as pa

    t = pa.table({"context_id": np.asarray(context_ids), "latent": np.asarray(latents), "pred": np.asarray(pred)})
    return shard_block_batches(np.unique(latents), [t], calib_cids, eval_cids)


def shard_block_batches(lat_ids: np.ndarray, batches, calib_cids: np.ndarray, eval_cids: np.ndarray) -> ShardBlock:
    """`shard_block` over a shard given as its sorted latent ids and an iterable of long-format
    tables (context_id, latent, pred): each batch is scattered into the dense block and dropped."""
    lat_ids = np.asarray(lat_ids, dtype=np.int64)
    lo = int(lat_ids[0]) if lat_ids.size else 0
    lookup = np.full(int(lat_ids[-1]) - lo + 1 if lat_ids.size else 0, -1, dtype=np.int64)
    lookup[lat_ids - lo] = np.arange(len(lat_ids))
    all_cids = np.concatenate([calib_cids, eval_cids]).astype(np.int64)
    index = np.full(int(all_cids.max(initial=-1)) + 1, -1, dtype=np.int64)
    index[all_cids] = np.arange(len(all_cids))
    out = np.full((len(all_cids), len(lat_ids)), np.nan, dtype=np.float32)
    flat_out = out.reshape(-1)
    n_values = 0
    for t in batches:
        cid = t.column("context_id").to_numpy()
        lat = t.column("latent").to_numpy()
        known = (lat >= lo) & (lat - lo < len(lookup))
        col = np.where(known, lookup[np.where(known, lat - lo, 0)], -1)
        if (col < 0).any():
            raise ValueError("a batch holds latents outside the shard's latent ids")
        inside = cid < len(index)
        row = np.where(inside, index[np.where(inside, cid, 0)], -1)
        keep = row >= 0
        values = t.column("pred").to_numpy().astype(np.float32)[keep]
        if not np.isfinite(values).all():
            raise ValueError("predictions contain NaN or inf")
        flat_out[row[keep] * len(lat_ids) + col[keep]] = values
        n_values += len(values)
        del t, cid, lat, col, row, keep, values
    if np.count_nonzero(~np.isnan(out)) != n_values:
        raise ValueError("a shard holds two predictions for one (context, latent) pair")
    n = len(calib_cids)
    return ShardBlock(lat_ids, out[:n], out[n:])


@dataclass
class StreamResult:
    """What :func:`stream_calibration` fit: maps tables per method, calibrated latents, latents
    left out (failed predictions above the allowed fraction, or no calib prediction at all),
    latents kept with some failed contexts (fit without them; their eval contexts are left out
    of the calibrated table and patched as 0 by evaluate), failed contexts kept, calib
    predictions fit, seconds per method (fit only)."""

    maps: dict[str, list[pa.Table]]
    latents: list[np.ndarray]
    excluded: list[np.ndarray]
    with_failures: list[np.ndarray] = field(default_factory=list)
    n_failed_kept: int = 0
    n_fit: int = 0
    fit_seconds: dict[str, float] = field(default_factory=dict)


def stream_calibration(shards, methods: list[str], n_knots: int, calib_cids: np.ndarray, eval_cids: np.ndarray,
                       true_calib: SparseColumns, write, *, sample: TrueSample | None = None,
                       max_failed_fraction: float = 0.0) -> StreamResult:
    """Fit every method's maps shard by shard and write the calibrated eval predictions.

    ``shards`` yields, per simulation shard, a long-format prediction table (context_id, latent,
    pred) holding all predictions of its latents, or a :class:`ShardReader` (read a row group at
    a time). A missing prediction is a failed one: a latent whose failed fraction (over its calib
    and eval contexts) exceeds ``max_failed_fraction`` is left out (``excluded``); below it, its
    maps are fit without the failed calib contexts and its failed eval contexts get no row.
    ``sample`` is the true sample the quantile methods map onto (None: the calib contexts' own true
    values). ``write`` receives one table per (shard, method): context_id, latent, pred (float32),
    method. Memory: one shard's dense [calib + eval contexts x shard latents]. Equal, map for map,
    to one :func:`fit_calibration` over all latents at once."""
    import time

    res = StreamResult({m: [] for m in methods}, [], [], fit_seconds={m: 0.0 for m in methods})
    for t in shards:
        if isinstance(t, ShardReader):
            block = shard_block_batches(t.latents(), t.batches(), calib_cids, eval_cids)
        else:
            block = shard_block(t.column("context_id").to_numpy(), t.column("latent").to_numpy(),
                                t.column("pred").to_numpy(), calib_cids, eval_cids)
        del t
        frac = block.failed_fraction()
        no_calib = np.isnan(block.calib).all(axis=0)
        ok = (frac <= max_failed_fraction) & ~no_calib
        latents = block.latents[ok]
        res.latents.append(latents)
        res.excluded.append(block.latents[~ok])
        res.with_failures.append(block.latents[ok & (frac > 0)])
        if not len(latents):
            continue
        pred_c, pred_e = block.columns(latents)
        del block
        res.n_failed_kept += int(np.isnan(pred_c).sum() + np.isnan(pred_e).sum())
        true_c = true_calib.dense(latents)
        res.n_fit += int((~np.isnan(pred_c)).sum())
        for method in methods:
            t0 = time.perf_counter()
            maps = fit_calibration(method, pred_c, true_c, n_knots, latents=latents, sample=sample)
            res.fit_seconds[method] += time.perf_counter() - t0
            res.maps[method].append(maps_to_table(maps))
            out = apply_calibration(maps, pred_e, latents=latents)
            write(long_table(eval_cids, latents, out).append_column(
                "calibration", pa.repeat(pa.scalar(method, pa.string()), int((~np.isnan(out)).sum()))))
    return res


def long_table(context_ids: np.ndarray, latents: np.ndarray, values: np.ndarray) -> pa.Table:
    """Dense [n_contexts, n_latents] values as long rows (context_id, latent, pred float32), grouped by
    latent; NaN entries (failed predictions) get no row."""
    keep = ~np.isnan(values.T)
    return pa.table({
        "context_id": pa.array(np.broadcast_to(context_ids.astype(np.int64)[None, :], keep.shape)[keep]),
        "latent": pa.array(np.broadcast_to(latents.astype(np.int32)[:, None], keep.shape)[keep]),
        "pred": pa.array(values.T[keep].astype(np.float32)),
    })
