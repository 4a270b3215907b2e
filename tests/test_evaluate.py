"""Patching, selection, metrics and the linear simulator map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nlrewrite_core import evaluate as ev
from nlrewrite_core import subject, transcoder, transcoder_train
from nlrewrite_core.config import SubjectConfig, TranscoderConfig
from nlrewrite_core.simulate import linear_prediction, predictions_table


@pytest.fixture(scope="module")
def model_and_sae():
    torch.manual_seed(0)
    model = subject.build_model(SubjectConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), 64, 16)
    model.eval()
    sae = transcoder_train.new_transcoder(32, TranscoderConfig(num_latents=96, k=6))
    with torch.no_grad():
        for p in (sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec, sae.W_skip):
            p.normal_(0, 0.1)
    return model, sae


def _true_post_topk(sae, x):
    acts, idx, _ = sae.encode(x)
    return torch.zeros(x.shape[0], sae.num_latents).scatter_(1, idx, acts)


def test_patching_with_true_latents_reproduces_transcoder(model_and_sae):
    _, sae = model_and_sae
    x = torch.randn(50, 32)
    with torch.no_grad():
        true = _true_post_topk(sae, x)
        latents = torch.tensor([3, 0, 95, 41])  # any order
        patched = ev.patched_output(sae, x, latents, true[:, latents])
        assert torch.equal(patched, ev.patched_output(sae, x))
        every = torch.arange(sae.num_latents)
        torch.testing.assert_close(ev.patched_output(sae, x, every, true), ev.patched_output(sae, x), rtol=0, atol=1e-6)
        torch.testing.assert_close(patched, transcoder.transcoder_output(sae, x), rtol=0, atol=1e-6)


def test_patching_true_latents_gives_transcoder_ce_exactly(model_and_sae):
    model, sae = model_and_sae
    tokens = np.random.default_rng(0).integers(0, 64, size=(6, 16))

    def patched_with_true(rows):
        def fn(x):
            flat = x.reshape(-1, x.shape[-1])
            return ev.patched_output(sae, flat, torch.arange(sae.num_latents), _true_post_topk(sae, flat)).reshape(x.shape)
        return fn

    tc = ev.ce_with(model, 1, tokens, 4, lambda r: transcoder.transcoder_fn(sae))
    patched = ev.ce_with(model, 1, tokens, 4, patched_with_true)
    np.testing.assert_allclose(patched, tc, rtol=0, atol=1e-5)
    clean = ev.ce_with(model, 1, tokens, 4, None)
    assert not np.allclose(clean, tc)


def test_every_latent_simulated_as_zero_is_exactly_zero_ablation(model_and_sae):
    _, sae = model_and_sae
    x = torch.randn(7, 32)
    with torch.no_grad():
        zero_vals = torch.zeros(7, sae.num_latents)
        out = ev.patched_output(sae, x, torch.arange(sae.num_latents), zero_vals)
        assert torch.equal(out, transcoder.skip_output(sae, x))
        torch.testing.assert_close(out, sae.b_dec + x @ sae.W_skip.T)


def test_truly_active_latents_simulated_as_zero_leak_nothing():
    """The issue's reproduction: a 256-latent k=8 transcoder, every truly active latent simulated as 0.
    From the true post-TopK vector (the paper's base) that is exactly zero-ablation; from the
    pre-TopK values (the leaky ablation) other latents refill the slots with their true values."""
    torch.manual_seed(1)
    sae = transcoder_train.new_transcoder(32, TranscoderConfig(num_latents=256, k=8))
    with torch.no_grad():
        for p in (sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec, sae.W_skip):
            p.normal_(0, 0.1)
        x = torch.randn(64, 32)
        zero = transcoder.skip_output(sae, x)
        for i in range(x.shape[0]):
            xi = x[i:i + 1]
            active = torch.nonzero(_true_post_topk(sae, xi)[0]).flatten()
            vals = torch.zeros(1, len(active))
            assert torch.equal(ev.patched_output(sae, xi, active, vals, base="topk"), transcoder.skip_output(sae, xi))
        # pre_topk: not zero-ablation, and most of the k slots are refilled by true encoder values
        pre = ev.pre_activations(sae, x)
        active_all = torch.nonzero(_true_post_topk(sae, x).sum(0)).flatten()
        vec = pre.clone()
        vec[:, active_all] = 0
        assert (vec.topk(8, dim=-1).values > 0).float().sum(-1).mean() > 4
        leaky = ev.patched_output(sae, x, active_all, torch.zeros(64, len(active_all)), base="pre_topk")
        assert not torch.allclose(leaky, zero)
        assert torch.equal(ev.patched_output(sae, x, active_all, torch.zeros(64, len(active_all))), zero)


def test_unselected_latent_outside_true_topk_contributes_nothing(model_and_sae):
    """Each row's (k+1)-th latent by encoder value (positive, just outside the true top-k) is left
    unselected while every other latent is simulated as 0: it must contribute nothing (zero-ablation);
    the leaky pre_topk base would put it into the top k."""
    _, sae = model_and_sae
    with torch.no_grad():
        x = torch.randn(30, 32)
        pre = ev.pre_activations(sae, x)
        order = pre.argsort(dim=-1, descending=True)
        for i in range(x.shape[0]):
            outside = int(order[i, sae.cfg.k])
            assert pre[i, outside] > 0
            sel = torch.tensor([j for j in range(sae.num_latents) if j != outside])
            low = torch.zeros(1, len(sel))
            xi = x[i:i + 1]
            assert torch.equal(ev.patched_output(sae, xi, sel, low), transcoder.skip_output(sae, xi))
            leaky = ev.patched_output(sae, xi, sel, low, base="pre_topk")
            torch.testing.assert_close(leaky, transcoder.skip_output(sae, xi) + pre[i, outside] * sae.W_dec[outside])


def test_re_topk_keeps_exactly_k(model_and_sae):
    _, sae = model_and_sae
    x = torch.randn(20, 32)
    with torch.no_grad():
        vec = _true_post_topk(sae, x)
        # simulated values large for 30 latents: TopK must still keep exactly k
        sel = torch.arange(30)
        vec[:, sel] = torch.rand(20, 30) * 10 + 5
        acts, idx = vec.topk(sae.cfg.k, dim=-1)
        assert idx.shape == (20, sae.cfg.k)
        assert (idx < 30).all()  # the big simulated values win
        out = ev.patched_output(sae, x, sel, vec[:, sel])
        dense = torch.zeros_like(vec).scatter(1, idx, acts)
        torch.testing.assert_close(out, dense @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T, rtol=1e-5, atol=1e-5)


def test_loaded_checkpoints_patch_like_their_own_forward(tmp_path):
    """A checkpoint saved and loaded from disk: patching every latent with its true value reproduces
    the module's own forward (with and without a skip connection); an SAE or a groupmax coder is refused."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(2)
    for skip in (True, False):
        sae = SparseCoder(32, SparseCoderConfig(num_latents=64, k=4, transcode=True, skip_connection=skip,
                                                normalize_decoder=False), device="cpu", dtype=torch.float32)
        with torch.no_grad():
            for p in (sae.encoder.bias, sae.W_dec, sae.b_dec) + ((sae.W_skip,) if skip else ()):
                p.normal_(0, 0.1)
        transcoder.save_transcoder(sae, tmp_path / f"tc{skip}")
        loaded = transcoder.load_transcoder(tmp_path / f"tc{skip}")
        ev.check_supported(loaded)
        x = torch.randn(25, 32)
        with torch.no_grad():
            own = loaded(x).sae_out
            ours = ev.patched_output(loaded, x, torch.arange(64), _true_post_topk(loaded, x))
            torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-5)
    for kw, match in (({"transcode": False}, "SAE"), ({"transcode": True, "activation": "groupmax"}, "groupmax")):
        coder = SparseCoder(32, SparseCoderConfig(num_latents=64, k=4, **kw), device="cpu", dtype=torch.float32)
        with pytest.raises(ValueError, match=match):
            ev.check_supported(coder)


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


def test_activity_metrics_refuse_nan_and_leave_failed_out():
    true = np.array([[0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    pred = np.array([[np.nan, 1.0], [0.0, 0.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        ev.activity_metrics(pred, true, 0.5)
    m = ev.per_column(ev.activity_metrics, pred, true, np.array([0.5, 0.5]))
    assert m["specificity"][0] == 1.0 and m["n_true_active"][0] == 0  # measured on the valid context alone
    assert m["specificity"][1] == 1.0 and m["sensitivity"][1] == 1.0


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


# ---- issue 5: mean-ablation, rank metrics, score relation, the oracle ---------------------------
def test_mean_ablation_is_the_decoded_mean_plus_skip(model_and_sae):
    from nlrewrite_core.transcoder import skip_output

    _, sae = model_and_sae
    x = torch.randn(20, 32)
    with torch.no_grad():
        zero = ev.mean_ablation_output(sae, x, torch.zeros(sae.num_latents))
        torch.testing.assert_close(zero, skip_output(sae, x))
        mean = torch.zeros(sae.num_latents)
        mean[[3, 50]] = torch.tensor([0.5, 2.0])
        out = ev.mean_ablation_output(sae, x, mean)
        torch.testing.assert_close(out, skip_output(sae, x) + 0.5 * sae.W_dec[3] + 2.0 * sae.W_dec[50])


def test_check_patch_values_rejects_nan():
    ok = np.ones((3, 2), dtype=np.float32)
    assert ev.check_patch_values(ok, "x") is ok
    bad = ok.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ev.check_patch_values(bad, "quantile predictions")


def test_per_sequence_positions():
    ce = np.arange(12, dtype=float).reshape(3, 4)
    np.testing.assert_array_equal(ev.per_sequence(ce, "last"), [3, 7, 11])
    np.testing.assert_array_equal(ev.per_sequence(ce, "all"), [1.5, 5.5, 9.5])
    with pytest.raises(ValueError, match="positions"):
        ev.per_sequence(ce, "first")


def test_rank_metrics_match_scipy_and_sklearn():
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    true = (rng.exponential(size=(300, 4)) * (rng.uniform(size=(300, 4)) < 0.2)).astype(np.float32)
    pred = (true + rng.normal(0, 0.5, size=true.shape)).round(1).astype(np.float32)  # ties too
    pred[:, 3] = 1.0  # constant prediction
    m = ev.rank_metrics(pred, true)
    for j in range(3):
        assert m["spearman"][j] == pytest.approx(spearmanr(pred[:, j], true[:, j]).statistic)
        assert m["auroc"][j] == pytest.approx(roc_auc_score(true[:, j] > 0, pred[:, j]))
    assert np.isnan(m["spearman"][3]) and m["auroc"][3] == pytest.approx(0.5)
    dead = ev.rank_metrics(pred[:, :1], np.zeros((300, 1), dtype=np.float32))
    assert np.isnan(dead["auroc"][0]) and np.isnan(dead["spearman"][0])
    # a monotone map keeps both
    m2 = ev.rank_metrics(np.exp(pred[:, :3]), true[:, :3])
    np.testing.assert_allclose(m2["auroc"], m["auroc"][:3])


def test_score_relation_bins_and_rank_correlation():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, np.nan, 0.8])
    values = np.array([0.0, 0.1, 0.2, 0.3, 0.4, np.nan, 0.9, 0.7])
    rows, rho, n = ev.score_relation(scores, values, 3)
    assert n == 6 and rho == pytest.approx(1.0)
    assert [r["n_latents"] for r in rows] == [2, 2, 2]
    assert rows[0]["mean"] == pytest.approx(0.05) and rows[-1]["mean"] == pytest.approx((0.4 + 0.7) / 2)
    assert ev.score_relation(np.array([np.nan]), np.array([1.0]), 3) == ([], pytest.approx(np.nan, nan_ok=True), 0)


def test_inject_errors_rates_values_and_identity():
    rng = np.random.default_rng(0)
    true = (rng.exponential(size=(4000, 5)) * (rng.uniform(size=(4000, 5)) < 0.05)).astype(np.float32)
    latents = np.array([7, 2, 9, 4, 0])
    pool = ev.ValuePool(np.array([7, 7, 2, 9, 4, 4]), np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), 10)
    same, c = ev.inject_errors(true, latents, 0.0, 0.0, pool, np.random.default_rng(1))
    np.testing.assert_array_equal(same, true)
    assert c["fp"] == c["fn"] == 0
    out, c = ev.inject_errors(true, latents, 0.01, 0.3, pool, np.random.default_rng(1))
    active, now = true > 0, out > 0
    assert c["fp"] == int((now & ~active).sum()) and c["fn"] == int((~now & active).sum())
    assert c["tp"] + c["fn"] == active.sum() and c["tn"] + c["fp"] == (~active).sum()
    assert c["fp"] / (~active).sum() == pytest.approx(0.01, rel=0.2)
    assert c["fn"] / active.sum() == pytest.approx(0.3, rel=0.15)
    kept = active & now
    np.testing.assert_array_equal(out[kept], true[kept])
    # false positives take values from their own latent's pool (latent 0 has none: all values)
    own = {7: {1.0, 2.0}, 2: {3.0}, 9: {4.0}, 4: {5.0, 6.0}, 0: {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}}
    for j, lat in enumerate(latents):
        assert set(np.unique(out[now[:, j] & ~active[:, j], j]).tolist()) <= own[int(lat)]


def test_crossing_specificity():
    spec = np.array([1.0, 0.999, 0.99, 0.9])
    ce = np.array([3.0, 3.1, 3.5, 4.0])
    assert ev.crossing_specificity(spec, ce, 3.3) == pytest.approx(0.999 + 0.5 * (0.99 - 0.999))
    assert np.isnan(ev.crossing_specificity(spec, ce, 5.0))
    assert np.isnan(ev.crossing_specificity(spec, ce, 2.0))


def test_oracle_without_errors_reproduces_the_transcoder(model_and_sae):
    _, sae = model_and_sae
    x = torch.randn(40, 32)
    with torch.no_grad():
        acts, idx, _ = sae.encode(x)
        z = torch.zeros(40, sae.num_latents).scatter_(1, idx, acts).numpy()
        pool = ev.ValuePool(np.zeros(0, dtype=np.int64), np.zeros(0), sae.num_latents)
        live = np.arange(sae.num_latents)
        vals, _ = ev.inject_errors(z, live, 0.0, 0.0, pool, np.random.default_rng(0))
        out = ev.patched_output(sae, x, torch.as_tensor(live), torch.as_tensor(vals))
        torch.testing.assert_close(out, ev.patched_output(sae, x), rtol=0, atol=1e-6)


def test_micro_run_evaluate_tables(micro_run):
    """The evaluate stage's tables on the micro run: both position sets, mean-ablation, the oracle
    (no errors = the transcoder), the sample-size ablation (all calib = the main sweep), thresholds."""
    import pandas as pd

    from nlrewrite_core.config import load_config
    from nlrewrite_core.query import query
    from nlrewrite_core.storage import Store

    storage, _ = micro_run
    store = Store(storage)

    def frame(sql):
        cols, rows = query(store, "micro-test", sql)
        return pd.DataFrame(rows, columns=cols)

    cfg = load_config("micro")
    ce = frame("select * from ce")
    assert set(ce["positions"]) == {"all", "last"}
    assert len(ce[ce["condition"] == "mean_ablation"]) == 2
    base = ce[ce["condition"] != "simulated"].set_index(["condition", "positions"])["ce_mean"]
    oracle = frame("select * from oracle")
    assert len(oracle) == len(cfg.evaluate.oracle_fp_rates) * len(cfg.evaluate.oracle_fn_rates) * 2
    exact = oracle[(oracle["fp_rate"] == 0) & (oracle["fn_rate"] == 0)].set_index("positions")
    for pos in ("all", "last"):
        assert exact.loc[pos, "ce_mean"] == pytest.approx(base[("transcoder", pos)], abs=1e-6)
        assert exact.loc[pos, "specificity"] == 1.0 and exact.loc[pos, "sensitivity"] == 1.0
    assert (oracle["specificity"].between(0, 1)).all() and oracle["ce_mean"].notna().all()
    sizes = frame("select * from sample_size")
    assert set(sizes["calibration"]) == set(cfg.calibrate.methods) - {"none"}
    assert set(sizes.loc[sizes["varied"] == "true_sample", "calibration"]) == {"quantile"}
    # The paper's Figure A2: calib predictions varied with the true sample fixed, and the other way round.
    calib_varied = sizes[sizes["varied"] == "calib_predictions"]
    assert (calib_varied["n_true_tokens"] == calib_varied["n_true_tokens"].iloc[0]).all()
    true_varied = sizes[sizes["varied"] == "true_sample"]
    assert (true_varied["n_calib_contexts"] == true_varied["n_calib_contexts"].iloc[0]).all()
    assert true_varied["n_true_tokens"].nunique() == len(cfg.evaluate.true_sample_sizes)
    full = sizes[(sizes["calib_fraction"] == 1.0) & (sizes["true_fraction"] == 1.0)]
    assert set(full["varied"]) == {"calib_predictions", "true_sample"}
    for _, r in full.iterrows():
        main = ce[(ce["condition"] == "simulated") & (ce["selection"] == "top") & (ce["calibration"] == r["calibration"])
                  & (ce["positions"] == r["positions"]) & np.isclose(ce["fraction"].astype(float), r["fraction"])]
        assert main["ce_mean"].iloc[0] == pytest.approx(r["ce_mean"], abs=1e-9)
    assert calib_varied.groupby("calibration")["n_calib_contexts"].nunique().min() == len(cfg.evaluate.sample_sizes)
    # n_true_kept: every active latent for the transcoder, none when every latent is simulated (strict),
    # and the paper's fraction 1.0 keeps exactly the active latents that have no calibrated prediction.
    assert (ce.loc[ce["condition"] == "simulated_strict", "n_true_kept"] == 0).all()
    assert set(ce.loc[ce["condition"] == "simulated_strict", "calibration"]) == set(cfg.calibrate.methods)
    assert (ce.loc[ce["condition"] == "zero_ablation", "n_true_kept"] == 0).all()
    assert ce.loc[ce["condition"] == "clean", "n_true_kept"].isna().all()
    n_active = int(ce.loc[ce["condition"] == "transcoder", "n_true_kept"].iloc[0])
    live = frame("select distinct latent from calibration")["latent"].to_numpy()
    all_sim = ce[(ce["condition"] == "simulated") & (ce["fraction"] == 1.0)]
    assert (all_sim["n_latents"] == len(live)).all()
    active = frame("select distinct latent from activations where split = 'eval' and act > 0")["latent"].to_numpy()
    assert n_active == len(active)
    assert (all_sim["n_true_kept"] == len(np.setdiff1d(active, live))).all()
    assert (ce["patch_base"] == "topk").all()
    lm = frame("select * from latent_metrics")
    raw = lm[lm["calibration"] == "none"]
    stats = frame("select latent, max_act from latent_stats where split = 'explain'").set_index("latent")["max_act"]
    np.testing.assert_allclose(raw["threshold"], stats.loc[raw["latent"]].to_numpy() / 9, rtol=1e-6)
    assert (lm.loc[lm["calibration"] != "none", "threshold"] == cfg.evaluate.active_threshold).all()
    assert lm["threshold_rule"].notna().all()
    defined = lm["n_true_active"] > 0  # AUROC needs both classes on eval
    assert lm.loc[defined, "auroc"].between(0, 1).all() and lm.loc[~defined, "auroc"].isna().all()
    rel = frame("select * from score_relation")
    assert {"specificity", "sensitivity", "auroc", "spearman"} <= set(rel["metric"])


def test_replace_mlp_at_one_position_leaves_the_rest_clean(model_and_sae):
    """Patching one position: the CE of every earlier prediction is the clean model's (causal), the
    patched position and later ones change; position=None patches every position."""
    model, sae = model_and_sae
    tokens = np.random.default_rng(1).integers(0, 64, size=(5, 16))
    pos = ev.scored_last_position(16)
    assert pos == 14  # ce[:, -1] predicts token 15 from position 14
    clean = ev.ce_with(model, 1, tokens, 4, None)
    zero = lambda rows: subject.zero_mlp  # noqa: E731
    one = ev.ce_with(model, 1, tokens, 4, zero, position=pos)
    assert np.array_equal(one[:, :pos], clean[:, :pos])
    assert not np.allclose(one[:, pos], clean[:, pos])
    every = ev.ce_with(model, 1, tokens, 4, zero)
    assert not np.allclose(every[:, :pos], clean[:, :pos])
    mid = ev.ce_with(model, 1, tokens, 4, zero, position=5)
    assert np.array_equal(mid[:, :5], clean[:, :5]) and not np.allclose(mid[:, 5:], clean[:, 5:])


def test_eval_positions_last_needs_last_positions():
    from nlrewrite_core.config import load_config

    with pytest.raises(ValueError, match="evaluate.positions"):
        load_config("micro", overrides={"simulate": {"eval_positions": "last"}})
    cfg = load_config("micro", overrides={"simulate": {"eval_positions": "last"}, "evaluate": {"positions": "last"}})
    assert cfg.simulate.eval_positions == "last"
    assert "eval_positions" not in load_config("micro").model_dump()["simulate"]  # default keeps stage keys


@pytest.mark.slow
def test_micro_run_eval_positions_last(micro_run, tmp_path):
    """simulate.eval_positions 'last' on a copy of the micro run's storage (corpus..explain reused): one simulated
    eval context per sentence (its last scored position), patched there alone; CE reported at the last
    position only; the transcoder condition differs from clean only at that position; the oracle with no
    errors equals the transcoder; the sample-size ablation at all calib equals the main sweep."""
    import pandas as pd

    from conftest import copy_run
    from flows.rewrite import rewrite
    from nlrewrite_core import artifacts, stages
    from nlrewrite_core.config import load_config
    from nlrewrite_core.query import query
    from nlrewrite_core.storage import Store

    storage = copy_run(micro_run[0], str(tmp_path / "store"))
    overrides = {"simulate": {"eval_positions": "last"}, "evaluate": {"positions": "last"}}
    rewrite(preset="micro", storage=storage, run_id="micro-last", overrides=overrides)
    cfg = load_config("micro", overrides=overrides)
    store, keys, base_keys = Store(storage), stages.plan(cfg), stages.plan(load_config("micro"))
    assert all(keys[s] == base_keys[s] for s in ("corpus", "subject", "transcoder", "activations", "explain"))
    assert keys["embed"] != base_keys["embed"]
    seq_ids, _ = artifacts.load_tokens(store, keys, ("eval",))
    n_lat = artifacts.num_latents(store, keys)

    def frame(sql):
        cols, rows = query(store, "micro-last", sql)
        return pd.DataFrame(rows, columns=cols)

    cal = artifacts.read_table(store, "calibrate", keys["calibrate"], "calibrated")
    want = seq_ids * cfg.corpus.seq_len + cfg.corpus.seq_len - 2
    assert np.array_equal(np.unique(cal.column("context_id").to_numpy()), np.sort(want))
    # Calibration is fit on the position set that is evaluated: the simulated calib contexts are the
    # last scored position of each calib sentence too (the embedded contexts, and the shards' rows).
    calib_seq, _ = artifacts.load_tokens(store, keys, ("calib",))
    calib_want = np.sort(calib_seq * cfg.corpus.seq_len + cfg.corpus.seq_len - 2)
    emb = artifacts.read_table(store, "embed", keys["embed"], "contexts", columns=["context_id", "split"]).to_pandas()
    assert np.array_equal(np.sort(emb.loc[emb["split"] == "calib", "context_id"].to_numpy()), calib_want)
    shard_ctx = np.unique(artifacts.read_predictions(store, keys, columns=["context_id"]).column("context_id").to_numpy())
    assert np.array_equal(shard_ctx, np.union1d(calib_want, want))
    assert store.read_manifest("calibrate", keys["calibrate"])["metrics"]["n_calib_contexts"] == len(calib_want)
    n_methods = len(cfg.calibrate.methods)
    assert len(cal) == len(want) * len(np.unique(cal.column("latent").to_numpy())) * n_methods
    assert len(cal) <= len(want) * n_lat * n_methods
    ce = frame("select * from ce")
    assert set(ce["positions"]) == {"last"}
    base = ce[~ce["condition"].str.startswith("simulated")].set_index("condition")["ce_mean"]
    assert base["transcoder"] != base["clean"] and base["zero_ablation"] != base["transcoder"]
    oracle = frame("select * from oracle")
    exact = oracle[(oracle["fp_rate"] == 0) & (oracle["fn_rate"] == 0)]
    assert exact["ce_mean"].iloc[0] == pytest.approx(base["transcoder"], abs=1e-6)
    sizes = frame("select * from sample_size where calib_fraction = 1.0 and true_fraction = 1.0")
    for _, r in sizes.iterrows():
        main = ce[(ce["condition"] == "simulated") & (ce["selection"] == "top") & (ce["calibration"] == r["calibration"])
                  & np.isclose(ce["fraction"].astype(float), r["fraction"])]
        assert main["ce_mean"].iloc[0] == pytest.approx(r["ce_mean"], abs=1e-9)
    lm = frame("select * from latent_metrics")
    assert lm["n_true_active"].max() <= len(want)


def test_float16_cache_refuses_values_it_would_turn_into_inf():
    from nlrewrite_core.activations import check_storable

    ok = np.array([0.5, 65504.0], dtype=np.float32)
    check_storable(ok, "float16")
    assert np.isfinite(ok.astype(np.float16)).all()
    big = np.array([1.0, 70000.0], dtype=np.float32)
    assert np.isinf(big.astype(np.float16)).any()  # what the cache would have stored
    with pytest.raises(ValueError, match="activations.dtype: float32"):
        check_storable(big, "float16")
    check_storable(big, "float32")
    with pytest.raises(ValueError, match="float16"):
        check_storable(np.array([np.inf], dtype=np.float32), "float16")
