"""Patching, selection, metrics and the linear simulator map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nlrewrite_core import evaluate as ev
from nlrewrite_core import subject, transcoder
from nlrewrite_core.config import SubjectConfig, TranscoderConfig
from nlrewrite_core.simulate import linear_prediction, predictions_table


@pytest.fixture(scope="module")
def model_and_sae():
    torch.manual_seed(0)
    model = subject.build_model(SubjectConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), 64, 16)
    model.eval()
    sae = transcoder.new_transcoder(32, TranscoderConfig(num_latents=96, k=6))
    with torch.no_grad():
        for p in (sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec, sae.W_skip):
            p.normal_(0, 0.1)
    return model, sae


def test_patching_with_true_latents_reproduces_transcoder(model_and_sae):
    _, sae = model_and_sae
    x = torch.randn(50, 32)
    with torch.no_grad():
        pre = ev.pre_activations(sae, x)
        latents = torch.tensor([3, 0, 95, 41])  # any order
        patched = ev.patched_output(sae, x, latents, pre[:, latents])
        assert torch.equal(patched, ev.patched_output(sae, x))
        torch.testing.assert_close(patched, transcoder.transcoder_output(sae, x), rtol=0, atol=1e-6)


def test_patching_true_latents_gives_transcoder_ce_exactly(model_and_sae):
    model, sae = model_and_sae
    tokens = np.random.default_rng(0).integers(0, 64, size=(6, 16))
    x_of = {}

    def patched_with_true(rows):
        def fn(x):
            flat = x.reshape(-1, x.shape[-1])
            sel = torch.arange(sae.num_latents)
            return ev.patched_output(sae, flat, sel, ev.pre_activations(sae, flat)).reshape(x.shape)
        return fn

    tc = ev.ce_with(model, 1, tokens, 4, lambda r: transcoder.transcoder_fn(sae))
    patched = ev.ce_with(model, 1, tokens, 4, patched_with_true)
    np.testing.assert_allclose(patched, tc, rtol=0, atol=1e-5)
    clean = ev.ce_with(model, 1, tokens, 4, None)
    assert not np.allclose(clean, tc)


def test_zero_ablation_is_bdec_plus_skip(model_and_sae):
    _, sae = model_and_sae
    x = torch.randn(7, 32)
    with torch.no_grad():
        zero_vals = torch.zeros(7, sae.num_latents)
        out = ev.patched_output(sae, x, torch.arange(sae.num_latents), zero_vals)
        expected = sae.b_dec + x @ sae.W_skip.T
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(transcoder.skip_output(sae, x), expected)


def test_re_topk_keeps_exactly_k(model_and_sae):
    _, sae = model_and_sae
    x = torch.randn(20, 32)
    with torch.no_grad():
        pre = ev.pre_activations(sae, x)
        # simulated values large for 30 latents: TopK must still keep exactly k
        sel = torch.arange(30)
        pre[:, sel] = torch.rand(20, 30) * 10 + 5
        acts, idx = pre.topk(sae.cfg.k, dim=-1)
        assert idx.shape == (20, sae.cfg.k)
        assert (idx < 30).all()  # the big simulated values win
        out = ev.patched_output(sae, x, sel, pre[:, sel])
        dense = torch.zeros_like(pre).scatter(1, idx, acts)
        torch.testing.assert_close(out, dense @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T, rtol=1e-5, atol=1e-5)


def test_select_top_returns_latent_ids_by_score():
    live = np.array([10, 4, 7, 99, 2])
    scores = np.array([0.6, np.nan, 0.9, 0.7, 0.5])
    assert ev.select_latents(live, scores, 0.4, "top", -1).tolist() == [7, 99]
    # permuting the inputs together does not change which latents are chosen
    perm = np.array([3, 0, 4, 2, 1])
    assert ev.select_latents(live[perm], scores[perm], 0.4, "top", -1).tolist() == [7, 99]
    assert ev.select_latents(live, scores, 1.0, "top", -1).tolist() == sorted(live.tolist())


def test_select_random_is_seeded_and_chooses_ids():
    live = np.arange(100, 200)
    a = ev.select_latents(live, np.zeros(100), 0.1, "random", 1)
    assert len(a) == 10 and set(a) <= set(live.tolist())
    assert a.tolist() == ev.select_latents(live, np.zeros(100), 0.1, "random", 1).tolist()
    assert a.tolist() != ev.select_latents(live, np.zeros(100), 0.1, "random", 2).tolist()


def test_activity_metrics():
    true = np.array([[0, 1], [0, 0], [2, 0], [0, 0]], dtype=np.float32)
    pred = np.array([[0.5, 1], [0, 0], [1, 0.2], [0, 0]], dtype=np.float32)
    m = ev.activity_metrics(pred, true, threshold=0.3)
    np.testing.assert_allclose(m["specificity"], [2 / 3, 1.0])
    np.testing.assert_allclose(m["sensitivity"], [1.0, 1.0])
    # threshold 0: the raw expected value is rarely exactly 0, so specificity falls
    assert ev.activity_metrics(pred, true, 0.0)["specificity"][1] == pytest.approx(2 / 3)


def test_bootstrap_interval_contains_mean():
    v = np.random.default_rng(0).normal(3.0, 1.0, 200)
    mean, lo, hi = ev.bootstrap_mean(v, 500)
    assert lo < mean < hi and hi - lo < 0.5


def test_linear_map_end_points():
    max_act = np.array([2.0, 5.0], dtype=np.float32)
    sim = np.array([[-0.3, 0.0], [1.0, 1.2], [0.5, 0.25]], dtype=np.float32)
    out = linear_prediction(sim, max_act)
    np.testing.assert_allclose(out, [[0.0, 0.0], [2.0, 5.0], [1.0, 1.25]])


def test_predictions_table_joins_by_id():
    pred = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    t = predictions_table(np.array([100, 101]), np.array([7, 3]), pred).to_pylist()
    assert {(r["context_id"], r["latent"]): r["pred"] for r in t} == {
        (100, 7): 1.0, (101, 7): 3.0, (100, 3): 2.0, (101, 3): 4.0}
    with pytest.raises(ValueError, match="non-finite"):
        predictions_table(np.array([1]), np.array([1]), np.array([[np.nan]], dtype=np.float32))
