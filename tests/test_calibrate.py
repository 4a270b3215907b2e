"""Tests of per-latent calibration maps (nlrewrite_core.calibrate; the quantile fits and the true sample:
nlrewrite_core.quantile)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from nlrewrite_core.calibrate import (
    METHODS,
    TABLE_SCHEMA,
    CalibrationMaps,
    apply_calibration,
    fit_calibration,
    maps_from_table,
    maps_to_table,
)
from nlrewrite_core.quantile import quantile_grid


def sparse_data(
    n: int = 4000, n_latents: int = 6, active: float = 0.03, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions correlated with sparse true activations (about ``active`` of them non-zero)."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, n_latents))
    cut = np.quantile(signal, 1 - active, axis=0)
    true = np.where(signal > cut, (signal - cut) * 3.0 + 0.5, 0.0).astype(np.float32)
    pred = np.clip(2.0 + signal + 0.7 * rng.normal(size=signal.shape), 0.0, 9.0).astype(np.float32)
    return pred, true


def test_registry_has_paper_methods() -> None:
    assert {"none", "quantile"} <= set(METHODS)
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibration("nope", np.zeros((3, 1)), np.zeros((3, 1)))


def test_none_is_identity_everywhere() -> None:
    pred, true = sparse_data()
    maps = fit_calibration("none", pred, true)
    wide = np.array([[-1.0, 0.0], [0.25, 3.0], [9.0, 50.0]], dtype=np.float32)
    out = apply_calibration(maps, wide, latents=np.array([0, 5]))
    np.testing.assert_array_equal(out, wide)
    np.testing.assert_array_equal(apply_calibration(maps, pred), pred)


def test_quantile_is_monotone_in_prediction() -> None:
    pred, true = sparse_data()
    maps = fit_calibration("quantile", pred, true)
    grid = np.linspace(-1.0, 10.0, 2001, dtype=np.float32)
    out = apply_calibration(maps, np.tile(grid[:, None], (1, pred.shape[1])))
    assert np.all(np.diff(out, axis=0) >= 0)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("active", [0.03, 0.002])
def test_interpolated_quantile_reproduces_target_distribution_on_fit_data(active: float) -> None:
    pred, true = sparse_data(n=5000, active=active)
    out = apply_calibration(fit_calibration("quantile-interp", pred, true, n_knots=257), pred)
    for j in range(pred.shape[1]):
        zero_true = np.mean(true[:, j] == 0)
        assert zero_true == pytest.approx(1 - active, abs=0.002)
        assert np.mean(out[:, j] == 0) == pytest.approx(zero_true, abs=0.002)
        # Top values match: the maximum exactly, the largest eight closely.
        assert out[:, j].max() == pytest.approx(true[:, j].max(), rel=1e-6)
        top_true = np.sort(true[:, j])[-8:]
        top_out = np.sort(out[:, j])[-8:]
        np.testing.assert_allclose(top_out, top_true, rtol=0.05)
        for q in (0.5, 0.98, 0.99, 0.995, 0.999):
            assert np.quantile(out[:, j], q) == pytest.approx(np.quantile(true[:, j], q), rel=0.05, abs=0.02)
        # Rank order is kept: the context with the largest prediction gets the largest value.
        assert out[np.argmax(pred[:, j]), j] == out[:, j].max()


def test_quantile_grid() -> None:
    for n_knots, n in [(257, 10_000), (257, 50), (64, 1000), (5, 100), (3, 100), (2, 100), (257, 2)]:
        grid = quantile_grid(n_knots, n)
        assert grid.shape == (n_knots,)
        assert grid[0] == 0.0 and grid[-1] == 1.0
        assert np.all(np.diff(grid) > 0)
    grid = quantile_grid(257, 10_000)
    assert 0.5 in grid
    assert np.sum(grid > 0.999) >= 30  # dense where sparse latents are active
    assert grid[-2] == pytest.approx(1 - 1 / 9_999)


def test_interpolated_quantile_end_points_clamp_to_target_range() -> None:
    pred, true = sparse_data()
    maps = fit_calibration("quantile-interp", pred, true)
    below = np.full((1, pred.shape[1]), -100.0, dtype=np.float32)
    above = np.full((1, pred.shape[1]), 100.0, dtype=np.float32)
    np.testing.assert_allclose(apply_calibration(maps, below)[0], true.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(apply_calibration(maps, above)[0], true.max(axis=0), rtol=1e-6)
    # The prediction extremes of the fit data land on the target extremes.
    lo = pred.min(axis=0, keepdims=True)
    hi = pred.max(axis=0, keepdims=True)
    np.testing.assert_allclose(apply_calibration(maps, lo)[0], true.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(apply_calibration(maps, hi)[0], true.max(axis=0), rtol=1e-6)
    # Knot ends: first knot is (min pred, min true), last is (max pred, max true).
    np.testing.assert_allclose(maps.x[:, 0], pred.min(axis=0))
    np.testing.assert_allclose(maps.x[:, -1], pred.max(axis=0))
    np.testing.assert_allclose(maps.y[:, -1], true.max(axis=0))


def test_interpolated_quantile_ties_map_to_one_value() -> None:
    rng = np.random.default_rng(1)
    n = 1000
    # 60% of predictions tied at 0.0, 20% tied at 3.0, the rest spread.
    pred = np.concatenate([np.zeros(600), np.full(200, 3.0), rng.uniform(4, 9, 200)])
    true = np.sort(rng.exponential(size=n)) * (rng.uniform(size=n) < 0.5)
    pred = pred[:, None].astype(np.float32)
    true = true[:, None].astype(np.float32)
    maps = fit_calibration("quantile-interp", pred, true)
    out = apply_calibration(maps, pred)
    assert np.all(np.isfinite(out))
    assert np.unique(out[:600]).size == 1
    assert np.unique(out[600:800]).size == 1
    assert out[0, 0] <= out[600, 0] <= out[800:].min()
    # The tied run at 0 covers probabilities 0..0.6: it takes the true quantile at its middle.
    assert out[0, 0] == pytest.approx(np.quantile(true[:, 0], 0.3), abs=1e-2)


def test_interpolated_quantile_constant_prediction_maps_to_true_median() -> None:
    rng = np.random.default_rng(2)
    pred = np.full((501, 2), 4.2, dtype=np.float32)
    true = rng.exponential(size=(501, 2)).astype(np.float32)
    maps = fit_calibration("quantile-interp", pred, true)
    out = apply_calibration(maps, np.array([[0.0, 4.2], [4.2, 9.0], [4.3, 1.0]], dtype=np.float32))
    for j in range(2):
        np.testing.assert_allclose(out[:, j], np.median(true[:, j]), rtol=1e-6)
    assert np.unique(maps_to_table(maps)["x"].to_pylist()[0]).size == 1


def test_all_zero_true_latent_maps_to_zero() -> None:
    pred, true = sparse_data(n_latents=3)
    true[:, 1] = 0.0
    maps = fit_calibration("quantile", pred, true)
    out = apply_calibration(maps, np.concatenate([pred, pred * 10 - 5]))
    assert np.all(out[:, 1] == 0.0)
    assert np.any(out[:, 0] > 0)


def test_no_nan_inf_or_sentinel() -> None:
    pred, true = sparse_data(n=300, n_latents=20, seed=3)
    pred[:, 0] = 0.0  # constant
    true[:, 1] = 0.0  # dead
    pred[:150, 2] = 1.0  # half tied
    true[:, 3] = 7.0  # constant target
    for method in METHODS:
        maps = fit_calibration(method, pred, true)
        out = apply_calibration(maps, pred)
        assert np.all(np.isfinite(out))
        assert np.all(np.isfinite(maps.x)) and np.all(np.isfinite(maps.y))
        if method == "quantile":
            assert np.all(out >= true.min(axis=0)) and np.all(out <= true.max(axis=0))
            assert not np.any(out == -1.0)
            np.testing.assert_allclose(out[:, 3], 7.0)


def test_rejects_inf_and_fits_around_failed_predictions() -> None:
    pred, true = sparse_data(n=50, n_latents=2)
    bad = pred.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="inf"):
        fit_calibration("quantile", bad, true)
    maps = fit_calibration("quantile", pred, true)
    with pytest.raises(ValueError, match="inf"):
        apply_calibration(maps, bad)
    with pytest.raises(ValueError, match="shape"):
        fit_calibration("quantile", pred, true[:, :1])
    # A NaN is a failed prediction: that latent's map is fit on its other contexts, and a NaN stays NaN.
    failed = pred.copy()
    failed[[3, 7], 1] = np.nan
    keep = ~np.isnan(failed[:, 1])
    for method in METHODS:
        maps = fit_calibration(method, failed, true)
        alone = fit_calibration(method, pred[keep][:, 1:], true[keep][:, 1:])
        probe = _grid(2)
        np.testing.assert_array_equal(apply_calibration(maps, probe)[:, 1], apply_calibration(alone, probe[:, :1])[:, 0])
        out = apply_calibration(maps, failed)
        assert np.isnan(out[[3, 7], 1]).all() and np.isfinite(out[keep]).all()
    failed[:, 0] = np.nan
    with pytest.raises(ValueError, match="no calib prediction"):
        fit_calibration("quantile", failed, true)


def test_fit_spans_latent_blocks() -> None:
    from nlrewrite_core import calibrate

    pred, true = sparse_data(n=200, n_latents=calibrate.LATENT_BLOCK + 7, seed=4)
    maps = fit_calibration("quantile-interp", pred, true, n_knots=33)
    assert maps.n_latents == pred.shape[1]
    assert maps.x.shape == (pred.shape[1], 33)
    single = fit_calibration("quantile-interp", pred[:, -1:], true[:, -1:], n_knots=33)
    np.testing.assert_array_equal(maps.y[-1], single.y[0])
    # Methods whose knot count varies by latent (isotonic) pad blocks to one width.
    iso = fit_calibration("isotonic", pred, true)
    alone = fit_calibration("isotonic", pred[:, -1:], true[:, -1:])
    np.testing.assert_array_equal(apply_calibration(iso, pred)[:, -1:], apply_calibration(alone, pred[:, -1:]))


def test_table_round_trip() -> None:
    pred, true = sparse_data(n_latents=5)
    pred[:, 2] = 1.5  # a single-knot map after de-duplication
    for method in METHODS:
        maps = fit_calibration(method, pred, true, latents=np.array([10, 3, 7, 0, 42]))
        table = maps_to_table(maps)
        assert table.schema.equals(TABLE_SCHEMA)
        assert table.num_rows == 5
        assert set(table["calibration"].to_pylist()) == {method}
        back = maps_from_table(table, method)
        np.testing.assert_array_equal(back.latents, [0, 3, 7, 10, 42])
        probe = np.linspace(-2, 12, 97, dtype=np.float32)[:, None].repeat(5, axis=1)
        ids = np.array([42, 0, 10, 7, 3])
        np.testing.assert_array_equal(
            apply_calibration(back, probe, latents=ids), apply_calibration(maps, probe, latents=ids)
        )


def test_fit_joins_columns_by_latent_id() -> None:
    pred, true = sparse_data(n_latents=4)
    ids = np.array([9, 2, 5, 1])
    maps = fit_calibration("quantile", pred, true, latents=ids)
    # Latent 9 is column 0: its map must reproduce column 0's fit whatever the column order.
    alone = fit_calibration("quantile", pred[:, :1], true[:, :1])
    row = int(np.flatnonzero(maps.latents == 9)[0])
    np.testing.assert_array_equal(maps.y[row], alone.y[0])
    perm = np.array([3, 0, 2, 1])
    out = apply_calibration(maps, pred[:, perm], latents=ids[perm])
    np.testing.assert_array_equal(out, apply_calibration(maps, pred, latents=ids)[:, perm])


def test_permuted_table_joins_by_latent_id() -> None:
    pred, true = sparse_data(n_latents=6, seed=5)
    # Give each latent a distinct scale so a mix-up between latents is visible.
    true = true * np.arange(1, 7, dtype=np.float32)
    maps = fit_calibration("quantile", pred, true)
    table = maps_to_table(maps)
    perm = np.array([4, 1, 5, 0, 3, 2])
    permuted = table.take(pa.array(perm))
    assert permuted["latent"].to_pylist() != table["latent"].to_pylist()
    back = maps_from_table(permuted, "quantile")
    np.testing.assert_array_equal(back.latents, np.arange(6))
    expected = apply_calibration(maps, pred)
    np.testing.assert_array_equal(apply_calibration(back, pred), expected)
    # Each latent's calibrated maximum is its own true maximum (not a neighbour's).
    np.testing.assert_allclose(expected.max(axis=0), true.max(axis=0), rtol=1e-6)


def test_table_with_several_methods_selects_one() -> None:
    pred, true = sparse_data(n_latents=3)
    both = pa.concat_tables(
        [maps_to_table(fit_calibration(m, pred, true)) for m in ("quantile", "none")]
    )
    back = maps_from_table(both.take(pa.array([5, 0, 3, 1, 4, 2])), "none")
    np.testing.assert_array_equal(apply_calibration(back, pred), pred)


def test_missing_or_duplicate_latents_are_errors() -> None:
    pred, true = sparse_data(n_latents=3)
    maps = fit_calibration("quantile", pred, true)
    with pytest.raises(KeyError, match="no quantile calibration map"):
        apply_calibration(maps, pred, latents=np.array([0, 1, 99]))
    table = maps_to_table(maps)
    with pytest.raises(ValueError, match="duplicate"):
        maps_from_table(pa.concat_tables([table, table]), "quantile")


def test_invalid_maps_are_rejected() -> None:
    from nlrewrite_core.calibrate import validate_maps

    x = np.array([[0.0, 1.0, 1.0]], dtype=np.float32)
    y = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)  # two values at x = 1
    with pytest.raises(ValueError, match="two values"):
        validate_maps(CalibrationMaps("quantile", np.array([0]), x, y, False))
    with pytest.raises(ValueError, match="not monotone"):
        validate_maps(CalibrationMaps("quantile", np.array([0]), x, y[:, ::-1].copy(), False))


def test_table_without_the_method_gives_no_maps() -> None:
    pred, true = sparse_data(n_latents=2)
    table = maps_to_table(fit_calibration("none", pred, true))
    maps = maps_from_table(table, "quantile")
    assert maps.n_latents == 0
    with pytest.raises(KeyError):
        apply_calibration(maps, pred)


# ---- the methods added for issue 5: Hyndman & Fan quantile types, isotonic, affine ------------


def _grid(n_latents: int, lo: float = -1.0, hi: float = 12.0, n: int = 801) -> np.ndarray:
    return np.tile(np.linspace(lo, hi, n, dtype=np.float32)[:, None], (1, n_latents))


def test_registry_lists_every_method_and_config_accepts_them() -> None:
    from typing import get_args

    from nlrewrite_core.config import CalibrateConfig, CalibrationMethodName, load_config

    expected = {"none", "quantile", "quantile-interp", "isotonic", "affine"} | {f"quantile-hf{k}" for k in range(1, 10)}
    assert set(METHODS) == expected
    assert set(get_args(CalibrationMethodName)) == expected
    assert CalibrateConfig(methods=sorted(expected)).methods == sorted(expected)
    tiny = load_config("tiny").calibrate.methods
    assert {"none", "quantile", "isotonic", "affine"} <= set(tiny)
    with pytest.raises(Exception, match="unique"):
        CalibrateConfig(methods=["quantile", "quantile"])
    with pytest.raises(Exception):
        CalibrateConfig(methods=["quantile-hf10"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_is_monotone_and_finite(method: str) -> None:
    pred, true = sparse_data(n=1500, n_latents=5, seed=7)
    maps = fit_calibration(method, pred, true, n_knots=65)
    out = apply_calibration(maps, _grid(5))
    assert np.all(np.isfinite(out))
    assert np.all(np.diff(out, axis=0) >= 0)
    if method != "none":
        assert np.all(out >= 0)  # activations are non-negative after any fitted map


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("case", ["constant_pred", "ties", "all_zero_true", "constant_true", "n1", "n2", "n3"])
def test_every_method_is_stable_on_degenerate_inputs(method: str, case: str) -> None:
    rng = np.random.default_rng(11)
    n = {"n1": 1, "n2": 2, "n3": 3}.get(case, 200)
    pred = rng.uniform(0, 5, size=(n, 3)).astype(np.float32)
    true = (rng.exponential(size=(n, 3)) * (rng.uniform(size=(n, 3)) < 0.3)).astype(np.float32)
    if case == "constant_pred":
        pred[:] = 2.5
    elif case == "ties":
        pred = np.round(pred).astype(np.float32)  # six distinct values, many ties
    elif case == "all_zero_true":
        true[:] = 0.0
    elif case == "constant_true":
        true[:] = 1.5
    maps = fit_calibration(method, pred, true, n_knots=33)
    probe = np.concatenate([pred, _grid(3, -10, 20, 101)])
    out = apply_calibration(maps, probe)
    assert np.all(np.isfinite(out)) and out.dtype == np.float32
    assert np.all(np.diff(apply_calibration(maps, _grid(3, -10, 20, 101)), axis=0) >= 0)
    if method == "none":
        return
    if case == "all_zero_true":
        np.testing.assert_array_equal(out, 0.0)
    if case == "constant_true" and method != "affine":
        np.testing.assert_allclose(out, 1.5, rtol=1e-6)
    if case == "ties":  # equal predictions get equal values
        fit_out = apply_calibration(maps, pred)
        for j in range(3):
            for v in np.unique(pred[:, j]):
                assert np.unique(fit_out[pred[:, j] == v, j]).size == 1
    back = maps_from_table(maps_to_table(maps), method)
    np.testing.assert_array_equal(apply_calibration(back, probe), out)


def test_hf7_equals_the_interpolated_quantile() -> None:
    pred, true = sparse_data(n=2000, n_latents=6, seed=8)
    a = apply_calibration(fit_calibration("quantile-interp", pred, true), _grid(6))
    b = apply_calibration(fit_calibration("quantile-hf7", pred, true), _grid(6))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hf_type", range(1, 10))
def test_hf_types_match_the_target_distribution_on_fit_data(hf_type: int) -> None:
    from nlrewrite_core.quantile import HF_TYPES

    pred, true = sparse_data(n=4000, n_latents=3, active=0.03, seed=9)
    maps = fit_calibration(f"quantile-hf{hf_type}", pred, true, n_knots=257)
    out = apply_calibration(maps, pred)
    for j in range(3):
        # The fraction of zeros and the extremes are the target's; the knots are numpy's quantiles.
        assert np.mean(out[:, j] == 0) == pytest.approx(np.mean(true[:, j] == 0), abs=0.003)
        assert out[:, j].max() == pytest.approx(true[:, j].max(), rel=1e-6)
        assert out[:, j].min() == pytest.approx(true[:, j].min(), abs=1e-6)
        np.testing.assert_allclose(maps.x[j, -1], np.quantile(pred[:, j], 1.0, method=HF_TYPES[hf_type]))


def test_isotonic_is_sklearns_fit_exactly() -> None:
    from sklearn.isotonic import IsotonicRegression

    pred, true = sparse_data(n=1500, n_latents=4, seed=12)
    pred[:300, 1] = 2.0  # ties
    maps = fit_calibration("isotonic", pred, true)
    probe = np.concatenate([pred, _grid(4)])
    out = apply_calibration(maps, probe)
    for j in range(4):
        ref = IsotonicRegression(out_of_bounds="clip").fit(pred[:, j].astype(float), true[:, j].astype(float))
        np.testing.assert_allclose(out[:, j], ref.predict(probe[:, j].astype(float)), rtol=1e-5, atol=1e-6)
        # least squares among monotone maps: it keeps the mean on its fit data
        fit_out = apply_calibration(maps, pred)[:, j]
        assert fit_out.mean() == pytest.approx(true[:, j].mean(), rel=1e-4)


def test_affine_matches_activity_rate_and_mean_on_fit_data() -> None:
    rng = np.random.default_rng(13)
    n = 3000
    # Data from an affine relation: true = 2 (pred - 1)+, about 5% active.
    pred = rng.uniform(0, 1.05, size=(n, 4)).astype(np.float32)
    true = (2.0 * np.maximum(pred.astype(np.float64) - 1.0, 0.0)).astype(np.float32)
    maps = fit_calibration("affine", pred, true)
    out = apply_calibration(maps, pred)
    for j in range(4):
        assert np.sum(out[:, j] > 0) == np.sum(true[:, j] > 0)  # threshold: the activity rate
        assert out[:, j].mean() == pytest.approx(true[:, j].mean(), rel=1e-4)  # scale: the mean
        assert out[:, j].max() <= true[:, j].max() * (1 + 1e-5)
    thr, scale = maps.x[:, 1].astype(float), (maps.y[:, 2] / (maps.x[:, 2] - maps.x[:, 1])).astype(float)
    np.testing.assert_allclose(thr, 1.0, atol=2e-3)
    np.testing.assert_allclose(scale, 2.0, rtol=0.05)
    # Linear above the threshold (extrapolated), zero below.
    probe = np.array([[-5.0] * 4, [20.0] * 4, [30.0] * 4], dtype=np.float32)
    res = apply_calibration(maps, probe)
    np.testing.assert_array_equal(res[0], 0.0)
    np.testing.assert_allclose(res[1], scale * (20.0 - thr), rtol=1e-4)
    # Noisy data: the activity rate is still exact, and the top never overshoots the true maximum.
    noisy = (true * 0.7 + rng.uniform(0, 0.4, size=true.shape)).astype(np.float32)
    out = apply_calibration(fit_calibration("affine", noisy, true), noisy)
    assert np.array_equal((out > 0).sum(0), (true > 0).sum(0))
    assert np.all(out.max(0) <= true.max(0) * (1 + 1e-4))  # float32 knots


def test_affine_scale_is_capped_by_the_largest_true_value() -> None:
    # One truly active context whose prediction barely clears the others: mean matching alone
    # would give an enormous scale.
    pred = np.full((100, 1), 1.0, dtype=np.float32)
    pred[:, 0] += np.linspace(0, 1e-3, 100, dtype=np.float32)
    true = np.zeros((100, 1), dtype=np.float32)
    true[-1, 0] = 2.0
    out = apply_calibration(fit_calibration("affine", pred, true), pred)
    assert out.max() <= 2.0 + 1e-5
    assert np.sum(out > 0) == 1


# ---- the exact quantile map (issue 11): the paper's definition, onto a large true sample ------------


def test_exact_quantile_smallest_case() -> None:
    """Fit predictions [1, 3] onto true [0, 2]: F_pred(2) = 1/2 and Q_true(1/2) = 0 (a step, not a line)."""
    maps = fit_calibration("quantile", np.array([[1.0], [3.0]], np.float32), np.array([[0.0], [2.0]], np.float32))
    out = apply_calibration(maps, np.array([[0.5], [1.0], [2.0], [2.999], [3.0], [7.0]], np.float32))
    np.testing.assert_array_equal(out[:, 0], [0.0, 0.0, 0.0, 0.0, 2.0, 2.0])
    interp = fit_calibration("quantile-interp", np.array([[1.0], [3.0]], np.float32), np.array([[0.0], [2.0]], np.float32))
    assert apply_calibration(interp, np.array([[2.0]], np.float32))[0, 0] == pytest.approx(1.0)  # the old line


def test_exact_quantile_is_q_true_of_f_pred_by_brute_force() -> None:
    """Against the definition computed directly: value p goes to the ceil(F(p) m)-th smallest true value."""
    rng = np.random.default_rng(21)
    pred = np.round(rng.uniform(0, 5, size=(300, 4)), 1).astype(np.float32)  # ties included
    sample_true = (rng.exponential(size=(5000, 4)) * (rng.uniform(size=(5000, 4)) < 0.05)).astype(np.float32)
    from nlrewrite_core.quantile import TrueSample

    lat, ctx = np.nonzero(sample_true.T)
    sample = TrueSample(lat, sample_true.T[lat, ctx], 5000)
    maps = fit_calibration("quantile", pred, np.zeros_like(pred), sample=sample)
    probe = np.concatenate([pred, rng.uniform(-1, 6, size=(200, 4)).astype(np.float32)])
    out = apply_calibration(maps, probe)
    for j in range(4):
        srt = np.sort(sample_true[:, j])
        for i, p in enumerate(probe[:, j]):
            f = np.mean(pred[:, j] <= p)
            expected = srt[max(int(np.ceil(f * 5000 - 1e-9)) - 1, 0)]
            assert out[i, j] == expected, (j, p, f)


def test_exact_quantile_reproduces_the_target_exactly_on_distinct_fit_data() -> None:
    rng = np.random.default_rng(22)
    pred = rng.permutation(np.arange(1000, dtype=np.float32))[:, None]
    true = (rng.exponential(size=(1000, 1)) * (rng.uniform(size=(1000, 1)) < 0.02)).astype(np.float32)
    out = apply_calibration(fit_calibration("quantile", pred, true), pred)
    np.testing.assert_array_equal(np.sort(out[:, 0]), np.sort(true[:, 0]))  # the same multiset of values
    assert out[np.argmax(pred[:, 0]), 0] == true.max()  # and the rank order of the predictions
    assert np.mean(out > 0) == np.mean(true > 0)  # no false positives added by interpolation


def test_true_sample_blocks_match_a_dense_sample() -> None:
    from nlrewrite_core.quantile import SampleBlock, TrueSample

    rng = np.random.default_rng(23)
    dense = (rng.exponential(size=(400, 6)) * (rng.uniform(size=(400, 6)) < 0.1)).astype(np.float32)
    dense[:, 2] = 0.0  # a latent never active in the sample
    lat, ctx = np.nonzero(dense.T)
    sample = TrueSample(rng.permutation(len(lat)).take(np.arange(len(lat))) * 0 + lat, dense.T[lat, ctx], 400)
    block = sample.block(np.array([1, 2, 5]))
    ref = SampleBlock.from_dense(dense[:, [1, 2, 5]])
    j = np.arange(400)
    for c in range(3):
        np.testing.assert_array_equal(block.order_stat(np.full(400, c), j), ref.order_stat(np.full(400, c), j))
        np.testing.assert_array_equal(block.order_stat(np.full(400, c), j), np.sort(dense[:, [1, 2, 5][c]]))
