"""The pythia-160m preset, end to end offline: a random GPT-NeoX of Pythia's architecture at reduced width
and a tokenizer in Pythia's format (tests/pythia_tiny.py) stand in for EleutherAI/pythia-160m, a local
`datasets` copy of text for the Pile, a tiny local Llama for the LLMs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nlrewrite_core import corpus as corpus_lib
from nlrewrite_core import artifacts, stages
from nlrewrite_core.config import ConfigError, load_config
from nlrewrite_core.storage import Store

from llm_tiny import build_tiny_llama
from pythia_tiny import build_pythia_like, documents, save_text_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_CORPUS = {"seq_len": 32, "n_eval": 8, "n_calib": 2, "n_explain": 16}


def test_preset_validates_and_plans():
    cfg = load_config("pythia-160m")
    assert cfg.subject.source == "hub" and cfg.subject.hub_id == "EleutherAI/pythia-160m"
    assert cfg.corpus.tokenizer == "EleutherAI/pythia-160m"
    assert (cfg.transcoder.layer, cfg.transcoder.num_latents, cfg.transcoder.k) == (6, 32768, 32)
    assert cfg.explain.method == "llm" and cfg.explain.llm.model == "meta-llama/Llama-3.1-70B-Instruct"
    assert cfg.simulate.method == "llm" and cfg.simulate.llm.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg.simulate.llm.backend == cfg.explain.llm.backend == "vllm"
    assert cfg.score.method == "detection" and cfg.execution.device == "cuda"
    # The paper's design: 10,000 calib and 1,000 eval sentences, one context each (the last position),
    # quantile normalisation onto >= 1M true cached tokens, the unrenormalized expected value.
    assert cfg.corpus.n_calib == 10_000 and cfg.simulate.eval_positions == "last"
    assert cfg.corpus.n_eval == 1000 and cfg.evaluate.positions == "last"  # eval sentences, one target each
    assert cfg.activations.sample_tokens >= 1_000_000 and cfg.calibrate.true_sample == "cache"
    assert cfg.simulate.renormalize is False and cfg.evaluate.patch_base == "topk"
    keys = stages.plan(cfg)
    assert list(keys) == [s for s in stages.plan(load_config("tiny")) if s != "embed"]  # LLM methods: no embed
    assert len(set(keys.values())) == len(keys) and cfg.simulate.eval_positions == "last"
    assert "tokenizer" in cfg.model_dump()["corpus"]
    # the default ("train") stays out of the dump, so tiny/micro keys are unchanged
    assert "tokenizer" not in load_config("micro").model_dump()["corpus"]
    # a checkpoint instead of training is one override away
    assert stages.plan(load_config("pythia-160m", overrides={"transcoder": {"checkpoint": "/ckpt"}}))["transcoder"] \
        != keys["transcoder"]


def test_hub_subject_needs_its_tokenizer():
    with pytest.raises(ConfigError, match=r"subject\.source is 'hub' but corpus\.tokenizer is 'train'"):
        load_config("pythia-160m", overrides={"corpus": {"tokenizer": "train"}})
    with pytest.raises(ConfigError, match="corpus.tokenizer"):
        load_config("micro", overrides={"subject": {"source": "hub", "hub_id": "x"}})


def test_pythia_preset_end_to_end_offline(tmp_path):
    """Every stage of the pythia-160m preset, evaluation and report included, at reduced width: a random
    GPT-NeoX of Pythia's architecture and depth-8 hook point (layer 6), a tokenizer in Pythia's format, a
    local `datasets` copy of a text corpus for the Pile (streamed to a token budget), and a tiny local
    Llama through the `transformers` backend for the explainer, the detection scorer and the simulator."""
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    docs = documents(600)
    local = build_pythia_like(tmp_path / "pythia-like", texts=docs)
    dataset = save_text_dataset(tmp_path / "pile-like", docs)
    llm_dir = str(build_tiny_llama(tmp_path / "tiny-llama"))
    llm = {"backend": "transformers", "model": llm_dir, "device": "cpu", "max_new_tokens": 8, "batch_size": 64}
    cfg = load_config("pythia-160m", overrides={
        "corpus": {**SMALL_CORPUS, "dataset": dataset, "tokenizer": local, "max_tokens": 40_000},
        "subject": {"hub_id": local},
        "transcoder": {"num_latents": 16, "k": 4, "steps": 30, "batch_tokens": 128, "max_train_tokens": 8_000,
                       "buffer_tokens": 1024, "checkpoint_every": 10},
        # The preset's LLM explainer runs below; a random tiny Llama explains nothing, so the scorer and the
        # simulator read ngram explanations (the evaluation needs explained latents).
        "explain": {"method": "ngram", "n_examples": 4},
        "score": {"n_pos": 4, "n_neg": 4, "llm": llm},
        "simulate": {"window": 16, "llm": {**llm, "top_logprobs": 400}},
        "calibrate": {"methods": ["none", "quantile"]},
        "evaluate": {"fractions": [0.5, 1.0], "random_seeds": [0], "n_bootstrap": 50, "sample_sizes": [],
                     "oracle_fp_rates": [0.0, 0.01], "oracle_fn_rates": [0.0]},
        "execution": {"device": "cpu"},
    })
    assert (cfg.transcoder.layer, cfg.corpus.source, cfg.simulate.eval_positions) == (6, "hf", "last")
    keys = stages.plan(cfg)
    store = Store(str(tmp_path / "store"))
    stages.run_all(store, cfg, keys, until="score")
    cfg_llm = cfg.model_copy(update={"explain": load_config("pythia-160m", overrides={"explain": {
        "n_examples": 4, "window": 16, "max_retries": 0, "llm": llm}}).explain})
    keys_llm = stages.plan(cfg_llm)
    stages.run("explain", store, cfg_llm, keys_llm)
    e = store.read_manifest("explain", keys_llm["explain"])
    assert e["cost"]["llm_backend"] == "transformers" and e["cost"]["tokens_in"] > 0
    for shard in range(len(stages.shard_ranges(cfg.transcoder.num_latents, cfg.simulate.shard_latents))):
        stages.run("simulate", store, cfg, keys, shard=shard)
    stages.run("simulate", store, cfg, keys)
    stages.run_all(store, cfg, keys, only=["calibrate", "evaluate", "report"])

    # corpus: the dataset streamed to its token budget, the local tokenizer's ids (eos = 0, Pythia's)
    hf = AutoTokenizer.from_pretrained(local)
    assert type(hf).__name__ == "GPTNeoXTokenizer" and hf.eos_token_id == 0
    _, tokens = artifacts.load_tokens(store, keys, ("train", "explain", "calib", "eval"))
    expected = corpus_lib.cut_sequences(corpus_lib.hf_encoder(hf), docs, 0, 32, max_tokens=40_000)
    assert tokens.shape == (40_000 // 32, 32) and tokens.max() < len(hf)
    assert {r.tobytes() for r in expected.astype(np.int64)} == {r.tobytes() for r in tokens}
    stored = artifacts.load_tokenizer(store, keys)
    assert stored.to_str() == hf.backend_tokenizer.to_str() and stored.decode(tokens[0].tolist()) == hf.decode(tokens[0])
    corpus_m = store.read_manifest("corpus", keys["corpus"])["metrics"]
    assert corpus_m["source"] == "hf" and corpus_m["tokens_per_s"] > 0

    # subject: the local model, weights unchanged
    original = GPTNeoXForCausalLM.from_pretrained(local).state_dict()
    loaded = artifacts.load_subject(store, keys).state_dict()
    assert original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)
    m = store.read_manifest("subject", keys["subject"])["metrics"]
    assert m["hub_id"] == local and m["tokenizer"] == local and np.isfinite(m["eval_ce"])

    # transcoder: streamed training on layer 6, checkpoints gone once the stage is done
    tm = store.read_manifest("transcoder", keys["transcoder"])["metrics"]
    assert tm["layer"] == 6 and tm["steps"] == 30 and tm["train_tokens"] <= 8_000 and np.isfinite(tm["eval_fvu"])
    assert "checkpoints" not in store.listdir(store.artifact_dir("transcoder", keys["transcoder"]))

    # the LLM stages ran on the transformers backend; evaluation measured CE of every condition
    assert store.read_manifest("score", keys["score"])["cost"]["tokens_in"] > 0
    assert store.read_manifest("simulate", keys["simulate"])["cost"]["tokens_in"] > 0
    ce = artifacts.read_table(store, "evaluate", keys["evaluate"], "ce").to_pylist()
    conditions = {r["condition"] for r in ce}
    assert {"clean", "transcoder", "zero_ablation", "simulated"} <= conditions
    assert all(np.isfinite(r["ce_mean"]) for r in ce) and {r["positions"] for r in ce} >= {"last"}
    assert store.has_manifest("report", keys["report"])
