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
- ``quantile``, ``quantile-interp``, ``quantile-hf1`` .. ``quantile-hf9``: the paper's quantile
  normalisation, exact (a step map onto each latent's true sample) and its interpolated variants;
  described with their fits, and the true sample, in :mod:`nlrewrite_core.quantile`.
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

Where the rest is: the true sample (:class:`~nlrewrite_core.quantile.TrueSample`), the knot-fit
signature and the quantile fits are in :mod:`nlrewrite_core.quantile`; fitting and applying the maps
shard by shard over the simulation's prediction files, with the sparse true activations
(``SparseColumns``, ``ShardReader``, ``stream_calibration``...), is in
:mod:`nlrewrite_core.calibrate_stream`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .quantile import (
    HF_TYPES,
    KnotFit,
    SampleBlock,
    TrueSample,
    fit_quantile,
    fit_quantile_hf,
    fit_quantile_interp,
    pad_rows,
    sort_columns,
)

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
    return pad_rows(rows)


AFFINE_SPACING = 1e-3
"""Relative spacing of the affine map's three knots (a float32 can tell them apart)."""


def _fit_affine(pred: np.ndarray, true: np.ndarray, n_knots: int, sample: SampleBlock
                ) -> tuple[np.ndarray, np.ndarray]:
    """Affine knots ``(t - d, 0), (t, 0), (t + d, s d)`` (see the module docstring)."""
    n, n_latents = pred.shape
    cols = np.arange(n_latents)
    p = sort_columns(pred)
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
    "quantile": CalibrationMethod(fit=fit_quantile, extrapolate=False, step=True),
    "quantile-interp": CalibrationMethod(fit=fit_quantile_interp, extrapolate=False),
    **{f"quantile-hf{k}": CalibrationMethod(fit=fit_quantile_hf(k), extrapolate=False) for k in HF_TYPES},
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

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), mode="edge")

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
