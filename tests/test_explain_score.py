"""The ngram explainer and the detection scorer."""

from __future__ import annotations

import numpy as np

from nlrewrite_core.config import ExplainConfig
from nlrewrite_core.explain import ngram_explanations, sample_across_bins
from nlrewrite_core.score import balanced_accuracy, detection_score, fit_threshold, score_latents

VOCAB = {0: "the", 1: " cat", 2: " sat", 3: "\n", 4: " on"}


def test_explanations_name_tokens_and_mark_dead_latents():
    tokens = {0: np.array([0, 1, 2, 4, 0, 1]), 1: np.array([3, 0, 1, 2, 3, 0])}
    # latent 0 fires on " cat" (after "the"); latent 2 never fires
    seq = np.array([0, 0, 1, 0])
    pos = np.array([1, 5, 2, 3])
    lat = np.array([0, 0, 0, 1])
    act = np.array([3.0, 2.0, 1.0, 0.5], dtype=np.float32)
    t = ngram_explanations(seq, pos, lat, act, tokens, VOCAB.__getitem__, lambda ids: "".join(VOCAB[i] for i in ids),
                           3, ExplainConfig(n_examples=10, n_bins=2)).to_pylist()
    assert [r["status"] for r in t] == ["explained", "explained", "dead"]
    assert "\u201ccat\u201d" in t[0]["explanation"] and "after \u201cthe\u201d" in t[0]["explanation"]
    assert t[2]["explanation"] is None and t[2]["n_examples"] == 0
    assert [r["latent"] for r in t] == [0, 1, 2]


def test_sample_across_bins_covers_all_ranks():
    order = np.arange(1000)
    picked = sample_across_bins(order, 20, 10, np.random.default_rng(0))
    assert len(picked) == 20
    assert np.histogram(picked, bins=10, range=(0, 1000))[0].tolist() == [2] * 10


def test_threshold_fit_and_balanced_accuracy():
    assert balanced_accuracy(5, 5, 0, 0) == 1.0
    assert balanced_accuracy(0, 5, 0, 5) == 0.5
    t = fit_threshold(np.array([0.8, 0.9]), np.array([0.1, 0.2]))
    assert 0.2 < t < 0.8


def test_detection_score_perfect_and_chance():
    rng = np.random.default_rng(0)
    score, (tp, tn, fp, fn) = detection_score(np.linspace(0.6, 1, 20), np.linspace(0, 0.4, 20), rng)
    assert score == 1.0 and tp + fn == 10 and tn + fp == 10  # judged on the held-out halves only
    same = rng.random(400)
    score, _ = detection_score(same[:200], same[200:], rng)
    assert 0.35 < score < 0.65


def test_score_latents_null_without_positives():
    sim = np.random.default_rng(0).random((50, 2))
    firing = np.zeros((50, 2), dtype=bool)
    firing[:10, 0] = True
    t = score_latents(sim, firing, np.array([5, 9]), 6, 6, 0, "embedding").to_pylist()
    assert t[0]["latent"] == 5 and t[0]["score"] is not None and t[0]["n_pos"] == 6
    assert t[1]["latent"] == 9 and t[1]["score"] is None and t[1]["n_pos"] == 0


def test_embedding_scores_by_latent_block_equal_one_block(micro_run, tmp_path, monkeypatch):
    """The embedding scorer works a block of latents at a time (bounded memory): scores computed in
    blocks of 7 latents equal those of the micro run (one block), latent for latent."""
    import shutil

    from nlrewrite_core import stages
    from nlrewrite_core.config import load_config
    from nlrewrite_core.storage import Store

    storage, _ = micro_run
    cfg = load_config("micro")
    keys = stages.plan(cfg)
    copy = tmp_path / "store"
    shutil.copytree(storage, copy)
    shutil.rmtree(copy / "artifacts" / "score" / keys["score"])
    monkeypatch.setattr(stages, "SCORE_BLOCK", 7)
    stages.run_score(Store(str(copy)), cfg, keys)
    got = stages._table(Store(str(copy)), "score", keys["score"], "scores")
    want = stages._table(Store(storage), "score", keys["score"], "scores")
    assert len(got) > 7 and got.equals(want)


def test_scorer_truth_holds_only_the_scoring_contexts(micro_run):
    """The scorer's true activations at the scoring half's contexts: activations of the explainer's
    half must not land anywhere (an earlier version wrote them onto the last context: -1 index)."""
    import pyarrow.compute as pc

    from nlrewrite_core import stages
    from nlrewrite_core.config import load_config
    from nlrewrite_core.storage import Store

    storage, _ = micro_run
    store, cfg = Store(storage), load_config("micro")
    keys = stages.plan(cfg)
    seq_ids, _ = stages.load_tokens(store, keys, ("explain",))
    shown, scoring = stages.explain_halves(seq_ids)
    cids = stages.context_ids(scoring, cfg.corpus.seq_len)
    n_lat = stages._num_latents(store, keys)
    dense = stages.true_activations(store, keys, "explain", cfg.corpus.seq_len, cids, n_lat)
    assert (dense > 0).sum(axis=1).max() <= cfg.transcoder.k
    a = stages._table(store, "activations", keys["activations"], "activations",
                      filters=pc.field("split") == "explain").to_pandas()
    a = a[a["seq_id"].isin(scoring)]
    assert (dense > 0).sum() == (a["act"] > 0).sum()
    sparse = stages.true_sparse(store, keys, "explain", cfg.corpus.seq_len, cids)
    assert np.array_equal(sparse.dense(np.arange(n_lat)), dense)
