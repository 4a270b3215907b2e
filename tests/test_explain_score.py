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


def test_embedding_scores_by_latent_block_equal_one_block(small_upstream, tmp_path, monkeypatch):
    """The embedding scorer works a block of latents at a time (bounded memory): scores computed in
    blocks of 7 latents equal those computed in one block, latent for latent (on a copy of the
    session's small micro store: 16 latents, few contexts to embed)."""
    import shutil
    from pathlib import Path

    from conftest import SMALL, copy_run

    from nlrewrite_core import artifacts, stages
    from nlrewrite_core.config import load_config
    from nlrewrite_core.stages import score as score_stage
    from nlrewrite_core.storage import Store

    cfg = load_config("micro", overrides={**SMALL, "score": {"method": "embedding"}})
    keys = stages.plan(cfg)
    assert "embed" in stages.stage_configs(cfg)["score"][1]
    assert keys["explain"] == small_upstream[1]["explain"]
    copy = Path(copy_run(small_upstream[0], str(tmp_path / "store")))
    store = Store(str(copy))
    stages.run("embed", store, cfg, keys)  # the embedding scorer's embed stage also embeds the explain split
    tables = []
    for block in (score_stage.SCORE_BLOCK, 7):
        shutil.rmtree(copy / "artifacts" / "score" / keys["score"], ignore_errors=True)
        monkeypatch.setattr(score_stage, "SCORE_BLOCK", block)
        stages.run("score", store, cfg, keys)
        tables.append(artifacts.read_table(store, "score", keys["score"], "scores"))
    assert len(tables[0]) > 7 and tables[1].equals(tables[0])
    assert set(tables[0].column("scorer").to_pylist()) == {"embedding-detection"}


# ---- the lexical scorer --------------------------------------------------------------------------------
LEX_VOCAB = {0: "the", 1: " cat", 2: " sat", 3: "\n", 4: " on", 5: " mat", 6: " the"}
# rows 0-5: "the cat sat on the mat"; rows 6-11: "\n the cat sat \n cat"
LEX_TOKENS = np.array([[0, 1, 2, 4, 6, 5], [3, 6, 1, 2, 3, 1]])
LEX_CASES = {  # latent: (explanation, rows where it fires)
    7: ("Fires on \u201ccat\u201d (67% of examples), usually after \u201cthe\u201d. Example: \u201cthe cat\u201d.",
        [1, 8, 4]),
    8: ("Fires on \u201ca newline\u201d.", [6, 10]),
    9: ("mentions of a Mat or a cat", [5]),  # free text: no quotes, content words "mat" and "cat"
    10: ("Fires on \u201cat\u201d.", [1]),  # inside the token " cat": no match anywhere
    11: ("The phrase \"the mat\" at its end", [5]),
}
LEX_EXPECTED = {  # latent: (tp, tn, fp, fn) over every context (n_pos, n_neg cover them all)
    7: (2, 8, 1, 1),  # called: the " cat" rows 1, 8, 11; "the" follows "after", so row 4 is missed
    8: (2, 10, 0, 0),
    9: (1, 8, 3, 0),  # called: rows 1, 5, 8, 11 (" cat", " mat", case-insensitive)
    10: (0, 11, 0, 1),
    11: (1, 11, 0, 0),  # a two-token name ending at row 5
}


def _lexical_scores(seed: int = 0, tokens: np.ndarray = LEX_TOKENS, cases: dict = LEX_CASES, n: int = 20):
    from nlrewrite_core.config import ScoreConfig
    from nlrewrite_core.score import lexical_detection_scores

    firing = {lat: (np.array(rows, np.int64), np.linspace(1, 2, len(rows)).astype(np.float32))
              for lat, (_, rows) in cases.items()}
    lats = np.array(list(cases))
    return lexical_detection_scores(lats, [cases[int(l)][0] for l in lats], firing, tokens,
                                    lambda ids: "".join(LEX_VOCAB[int(i)] for i in ids),
                                    ScoreConfig(method="lexical", n_pos=n, n_neg=n, seed=seed)).to_pylist()


def test_lexical_scorer_exact_balanced_accuracy():
    for row in _lexical_scores():
        tp, tn, fp, fn = LEX_EXPECTED[row["latent"]]
        assert (row["tp"], row["tn"], row["fp"], row["fn"]) == (tp, tn, fp, fn), row
        assert (row["n_pos"], row["n_neg"]) == (tp + fn, tn + fp)
        assert row["score"] == balanced_accuracy(tp, tn, fp, fn) and row["scorer"] == "lexical-detection"
    by_lat = {r["latent"]: r["score"] for r in _lexical_scores()}
    assert by_lat[7] == 0.5 * (2 / 3 + 8 / 9) and by_lat[8] == 1.0 and by_lat[9] == 0.5 * (1 + 8 / 11)


def test_lexical_names_follow_the_ngram_explainer_and_free_text():
    from nlrewrite_core.score import explanation_names

    ngram = ("Fires on \u201cthe\u201d and \u201ca space\u201d (85% of examples), usually after \u201cof\u201d and "
             "\u201cin\u201d. Example: \u201cone of the\u201d.")
    names = explanation_names(ngram)
    assert names.exact == {"the", "one of the"} and names.whitespace == {" "} and not names.folded
    free = explanation_names("Python keywords such as def and class at the start of a line")
    assert not free.exact and free.folded == {"python", "keywords", "def", "class", "start", "line"}
    assert explanation_names("the token 'of' before capitalised words; it's common").exact == {"of"}


def test_lexical_scorer_is_deterministic_with_its_seed():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 7, size=(40, 6))
    cases = {lat: ("Fires on \u201ccat\u201d.", sorted(rng.choice(240, size=60, replace=False).tolist()))
             for lat in range(8)}
    a, b, other = (_lexical_scores(seed, tokens, cases, n=10) for seed in (0, 0, 1))
    assert a == b
    assert a != other  # another seed draws other contexts
    assert all(r["n_pos"] == 10 and r["n_neg"] == 10 for r in a)


def test_lexical_scorer_runs_without_the_embedding_module():
    """The lexical scorer shares nothing with the embedding simulator: it runs (same numbers) in a
    process where nlrewrite_core.embedding and sentence_transformers cannot be imported."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, json\n"
        "sys.modules['nlrewrite_core.embedding'] = None\n"
        "sys.modules['sentence_transformers'] = None\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_explain_score import _lexical_scores\n"
        "print(json.dumps(_lexical_scores()))\n"
        "assert 'nlrewrite_core.embedding' not in {k for k, v in sys.modules.items() if v is not None}\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == _lexical_scores()


def test_lexical_score_stage_reads_no_embeddings(micro_run, tmp_path, monkeypatch):
    """The micro preset scores lexically: its score stage has no embed upstream, and recomputing it with
    the embed artifacts deleted and the embedding module unusable gives the same table."""
    import shutil
    import sys

    from nlrewrite_core import artifacts, stages
    from nlrewrite_core.config import load_config
    from nlrewrite_core.storage import Store

    storage, _ = micro_run
    cfg = load_config("micro")
    assert cfg.score.method == "lexical"
    keys = stages.plan(cfg)
    section, ups = stages.stage_configs(cfg)["score"]
    assert "embed" not in ups and "token_weight" not in section
    assert Store(storage).read_manifest("score", keys["score"])["upstream"] == {u: keys[u] for u in ups}
    # ... and the embed stage (for the embedding simulator) embeds no explain-split window
    embedded = artifacts.read_table(Store(storage), "embed", keys["embed"], "contexts", columns=["split"])
    assert set(embedded.column("split").to_pylist()) == {"calib", "eval"}
    copy = tmp_path / "store"
    shutil.copytree(storage, copy)
    shutil.rmtree(copy / "artifacts" / "score" / keys["score"])
    shutil.rmtree(copy / "artifacts" / "embed")

    class NoEmbedding:
        def __getattr__(self, name):
            raise AssertionError(f"the lexical scorer used embedding.{name}")

    from nlrewrite_core.stages import score as score_stage

    for module in (score_stage, artifacts):  # the score stage and the readers it could call
        monkeypatch.setattr(module, "emb_lib", NoEmbedding())
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    stages.run("score", Store(str(copy)), cfg, keys)
    got = artifacts.read_table(Store(str(copy)), "score", keys["score"], "scores")
    want = artifacts.read_table(Store(storage), "score", keys["score"], "scores")
    assert got.equals(want) and set(got.column("scorer").to_pylist()) == {"lexical-detection"}
    assert np.isfinite(np.array(got.column("score").to_pylist(), dtype=float)).sum() > 10

