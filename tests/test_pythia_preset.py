"""The pythia-160m preset, wired end to end offline: a tiny random GPT-NeoX and its own tokenizer,
saved with save_pretrained into a local dir, stand in for EleutherAI/pythia-160m."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nlrewrite_core import corpus as corpus_lib
from nlrewrite_core import stages
from nlrewrite_core.config import ConfigError, SubjectConfig, load_config
from nlrewrite_core.storage import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_CORPUS = {"max_chars": 200_000, "seq_len": 32, "n_eval": 8, "n_calib": 8, "n_explain": 16}


def build_tiny_neox(path) -> str:
    """A random-weight GPT-NeoX and a BPE tokenizer (eos `<|endoftext|>` is id 1, not 0 as in the
    tokenizer trained by the corpus stage) saved with save_pretrained to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from nlrewrite_core import subject

    text = corpus_lib.collect_text(load_config("micro", overrides={"corpus": {"max_chars": 50_000}}).corpus)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=333, special_tokens=["<pad>", corpus_lib.EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lib.split_documents(text), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=corpus_lib.EOS, pad_token="<pad>")
    torch.manual_seed(123)
    cfg = subject.model_config(SubjectConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                               len(fast) + 7, 128)  # padded embedding matrix, like Pythia's 50304 > 50277
    GPTNeoXForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


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


def test_pythia_preset_on_local_tiny_neox(tmp_path):
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    local = build_tiny_neox(tmp_path / "tiny-neox")
    cfg = load_config("pythia-160m", overrides={
        "corpus": {**SMALL_CORPUS, "tokenizer": local},
        "subject": {"hub_id": local},
        "transcoder": {"layer": 1, "num_latents": 32, "k": 4, "steps": 20, "batch_tokens": 128,
                       "max_train_tokens": 4_000},
        "explain": {"method": "ngram", "n_examples": 6},
        "score": {"method": "embedding", "n_pos": 4, "n_neg": 4},
        "simulate": {"method": "embedding", "window": 8},
        "execution": {"device": "cpu"},
    })
    keys = stages.plan(cfg)
    store = Store(str(tmp_path / "store"))
    for run in (stages.run_corpus, stages.run_subject, stages.run_transcoder, stages.run_activations):
        run(store, cfg, keys)

    # corpus: the local tokenizer's ids, documents separated by its eos (id 1), stored as tokenizer.json
    hf = AutoTokenizer.from_pretrained(local)
    _, tokens = stages.load_tokens(store, keys, ("train", "explain", "calib", "eval"))
    assert tokens.shape[1] == 32 and tokens.max() < len(hf) and (tokens == hf.eos_token_id).any()
    assert hf.eos_token_id == 1 and not (tokens == 0).any()  # not the trained tokenizer's layout (eos = 0)
    expected = corpus_lib.tokenize_sequences_hf(hf, corpus_lib.collect_text(cfg.corpus), 32)
    assert {r.tobytes() for r in expected.astype(np.int64)} == {r.tobytes() for r in tokens}
    stored = stages.load_tokenizer(store, keys)
    assert stored.to_str() == hf.backend_tokenizer.to_str()
    row = tokens[0].tolist()
    assert stored.decode(row) == hf.decode(row)
    doc = corpus_lib.split_documents(corpus_lib.collect_text(cfg.corpus))[0]
    assert stored.encode(doc, add_special_tokens=False).ids == hf(doc, add_special_tokens=False)["input_ids"]
    assert hf.decode(hf(doc, add_special_tokens=False)["input_ids"]) == doc  # round trip

    # subject: the local model, weights unchanged
    original = GPTNeoXForCausalLM.from_pretrained(local).state_dict()
    loaded = stages.load_subject(store, keys).state_dict()
    assert original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)
    m = store.read_manifest("subject", keys["subject"])["metrics"]
    assert m["hub_id"] == local and m["tokenizer"] == local and np.isfinite(m["eval_ce"])

    assert store.read_manifest("transcoder", keys["transcoder"])["metrics"]["layer"] == 1
    acts = store.read_manifest("activations", keys["activations"])["metrics"]
    assert acts["num_latents"] == 32 and acts["rows"] > 0
    stages.run_explain(store, cfg, keys)
    assert store.has_manifest("explain", keys["explain"])
