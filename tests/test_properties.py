"""Property tests (hypothesis, issue 12): config loading from arbitrary YAML, the LLM answer parsers on
arbitrary text, and calibration maps."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nlrewrite_core import calibrate
from nlrewrite_core.config import PRESETS, ConfigError, RewriteConfig, load_config
from nlrewrite_core.llm import prompts as P

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- config loading: a config or a ConfigError, never another exception -----------------------------------
def _load_yaml_text(text: str, preset: str = "micro") -> RewriteConfig | ConfigError:
    fd, path = tempfile.mkstemp(suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        try:
            return load_config(preset, path)
        except ConfigError as e:
            assert str(e) and "\n" not in str(e).strip()  # one line for the CLI
            return e
    finally:
        os.unlink(path)


FIELDS = sorted({name for section in RewriteConfig.model_fields.values()
                 for name in getattr(section.annotation, "model_fields", {})} | set(RewriteConfig.model_fields)
                | {"llm", "backend", "model", "base_url", "device"})
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["cuda", "cpu", "openai", "llm", "quantile", "hf://a/b", "", "0"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4), max_leaves=12)
YAML_SNIPPETS = ["a: &x [*x]", "!!python/object:os.system {}", "!!binary aGVsbG8=", "!!set {a, b}", "corpus: !!str 5",
                 "? [1, 2]\n: 3", "corpus: {seq_len: 1e400}", "- - - -", "%YAML 1.1\n---\n{}", "\t", "{", "\ufeffx: 1",
                 "corpus: &c {seq_len: 16}\nsubject: *c", "transcoder: {k: .nan}", "evaluate: {fractions: [.inf]}"]


@SETTINGS
@given(st.text(max_size=200) | st.sampled_from(YAML_SNIPPETS))
def test_any_yaml_text_gives_a_config_or_a_config_error(text):
    _load_yaml_text(text)


@SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(RewriteConfig.model_fields)) | st.text(max_size=6) | st.integers(),
                       VALUES, max_size=5),
       st.sampled_from(sorted(PRESETS)))
def test_any_yaml_mapping_gives_a_config_or_a_config_error(data, preset):
    _load_yaml_text(yaml.safe_dump(data, allow_unicode=True), preset)


# ---- the LLM answer parsers: a value or a recorded failure, never an exception ---------------------------
FRAGMENTS = st.sampled_from(["[EXPLANATION]:", "[", "]", "1", "0", ",", " ", "\n", "yes", "No", "'", '"', "true",
                             "<<", ">>", "Activation:", "9", "é", "\x00", "\ud800"])
ANSWERS = st.none() | st.text() | st.lists(FRAGMENTS | st.text(max_size=4), max_size=30).map("".join)


@SETTINGS
@given(ANSWERS)
def test_parse_explanation(answer):
    text, reason = P.parse_explanation(answer)
    assert (text is None) != (reason is None)
    if text is not None:
        assert text.strip() == text and 0 < len(text) <= P.MAX_EXPLANATION_CHARS and any(c.isalpha() for c in text)
    else:
        assert isinstance(reason, str) and reason


@SETTINGS
@given(ANSWERS, st.integers(0, 12))
def test_parse_detection(answer, n):
    vals, reason = P.parse_detection(answer, n)
    assert (vals is None) != (reason is None)
    if vals is not None:
        assert len(vals) == n and set(vals) <= {0, 1}
    else:
        assert isinstance(reason, str) and reason


@SETTINGS
@given(st.none() | st.dictionaries(FRAGMENTS | st.text(max_size=3),
                                   st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10), max_size=12),
       st.booleans())
def test_expected_digit(top, renormalize):
    e = P.expected_digit(top, renormalize)
    assert e is None or (isinstance(e, float) and 0.0 <= e <= 9.0 and math.isfinite(e))
    if e is not None:
        assert 0.0 <= P.digit_to_activation(e, 3.5) <= 3.5


# ---- calibration maps: monotone, finite, exact on their knots ----------------------------------------------
def _matrix(shape, hi):
    # Sparse, tied, and spread values: the shapes calibration meets (most true activations are 0).
    return hnp.arrays(np.float32, shape, elements=st.one_of(st.just(0.0), st.floats(0, hi, width=32),
                                                             st.sampled_from([0.5, 1.0, hi])))


@st.composite
def calib_data(draw):
    n_ctx, n_lat = draw(st.integers(1, 40)), draw(st.integers(1, 3))
    return draw(_matrix((n_ctx, n_lat), 10.0)), draw(_matrix((n_ctx, n_lat), 100.0)), draw(st.integers(2, 33))


@pytest.mark.parametrize("method", sorted(calibrate.METHODS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=calib_data(), probes=hnp.arrays(np.float64, 16, elements=st.floats(-5, 20)))
def test_calibration_maps_are_monotone_finite_and_exact_on_knots(method, data, probes):
    pred, true, n_knots = data
    maps = calibrate.fit_calibration(method, pred, true, n_knots)
    assert maps.n_latents == pred.shape[1]
    grid = np.sort(np.concatenate([probes, pred.ravel().astype(np.float64), [-1e6, 1e6]]))
    for j in range(pred.shape[1]):
        out = calibrate.apply_calibration(maps, np.repeat(grid[:, None], 1, axis=1), latents=np.array([j]))[:, 0]
        assert np.all(np.isfinite(out))
        assert np.all(np.diff(out.astype(np.float64)) >= 0), f"{method}: not monotone for latent {j}"
        row = int(np.searchsorted(maps.latents, j))
        x, y = maps.x[row].astype(np.float64), maps.y[row].astype(np.float64)
        at_knots = calibrate.apply_calibration(maps, x[:, None], latents=np.array([j]))[:, 0].astype(np.float64)
        for xk, got in zip(x, at_knots):  # at a knot: that knot's y (the y of the knots that share its x)
            same = y[x == xk]
            assert same.min() - 1e-6 * (1 + abs(same.min())) <= got <= same.max() + 1e-6 * (1 + abs(same.max())), \
                (method, xk, got, same)
