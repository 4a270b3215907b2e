"""The micro preset switched to the LLM methods by config, with a tiny Llama through the
`transformers` backend: explain, score and simulate stages complete and record their cost."""

from __future__ import annotations

import json

import pytest

from nlrewrite_core import artifacts, stages
from nlrewrite_core.config import ConfigError, load_config
from nlrewrite_core.storage import Store

from llm_tiny import build_tiny_llama


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_llm_sections_keep_default_keys_and_validate():
    base = load_config("micro")
    assert "llm" not in base.model_dump()["explain"] and "renormalize" not in base.model_dump()["simulate"]
    with pytest.raises(ConfigError, match="simulate.llm is required"):
        load_config("micro", overrides={"simulate": {"method": "llm"}})
    with pytest.raises(ConfigError, match="unknown field"):
        load_config("micro", overrides={"simulate": {"method": "llm", "llm": {"model": "m", "bogus": 1}}})


def test_micro_stages_with_tiny_llama(small_upstream, tmp_path, prefect_server):
    """On a copy of the session's small micro store (corpus..explain by the stage functions)."""
    from conftest import SMALL, copy_run

    model = str(build_tiny_llama(tmp_path / "tiny-llama"))
    llm = {"backend": "transformers", "model": model, "device": "cpu", "max_new_tokens": 8, "batch_size": 64}
    yaml_file = tmp_path / "llm.yaml"
    yaml_file.write_text(json.dumps({**SMALL, "explain": {"method": "ngram"}, "score": {"method": "detection", "llm": llm},
                                     "simulate": {"method": "llm", "llm": {**llm, "top_logprobs": 400}}}))
    cfg = load_config("micro", config_file=yaml_file)  # JSON is YAML
    cfg_explain = load_config("micro", overrides={**SMALL, "explain": {"method": "llm", "llm": llm, "n_examples": 4,
                                                                        "window": 16, "max_retries": 0}})
    keys, keys_e = stages.plan(cfg), stages.plan(cfg_explain)
    assert keys["activations"] == keys_e["activations"] and keys["explain"] != keys_e["explain"]
    store = Store(copy_run(small_upstream[0], str(tmp_path / "store")))
    stages.run_all(store, cfg, keys, until="activations")  # the fixture's: found by their manifests
    assert {s: keys[s] for s in ("corpus", "subject", "transcoder", "activations")} == {
        s: small_upstream[1][s] for s in ("corpus", "subject", "transcoder", "activations")}

    stages.run("explain", store, cfg_explain, keys_e)
    m = store.read_manifest("explain", keys_e["explain"])
    assert m["cost"]["llm_backend"] == "transformers" and m["cost"]["tokens_in"] > 0 and m["cost"]["tokens_out"] > 0
    assert m["metrics"]["n_explained"] + m["metrics"]["n_unexplained"] + m["metrics"]["n_dead"] == 16
    e = store.read_parquet(f"{store.artifact_dir('explain', keys_e['explain'])}/explanations.parquet").to_pylist()
    assert all(r["reason"] for r in e if r["status"] == "unexplained")

    cfg_c = load_config("micro", overrides={**SMALL, "explain": {"method": "contrastive", "llm": llm, "n_examples": 4,
                                                                  "window": 16, "max_retries": 0, "n_contrast": 2}})
    keys_c = stages.plan(cfg_c)
    stages.run("explain", store, cfg_c, keys_c)
    assert store.read_manifest("explain", keys_c["explain"])["cost"]["tokens_in"] > m["cost"]["tokens_in"]

    stages.run("explain", store, cfg, keys)  # ngram explanations for the scorer and simulator
    stages.run("score", store, cfg, keys)
    m = store.read_manifest("score", keys["score"])
    assert m["cost"]["tokens_in"] > 0 and m["metrics"]["n_prompts"] > 0 and "n_malformed_prompts" in m["metrics"]
    num_latents = artifacts.num_latents(store, keys)
    for shard in range(len(stages.shard_ranges(num_latents, cfg.simulate.shard_latents))):
        stages.run("simulate", store, cfg, keys, shard=shard)
    m = store.read_manifest("simulate", keys["simulate"], "shard-00000")
    assert m["cost"]["tokens_in_cached"] > 0 and m["metrics"]["n_predictions"] + m["metrics"]["n_failed"] > 0
    stages.run("simulate", store, cfg, keys)
    shard_costs = [store.read_manifest("simulate", keys["simulate"], f"shard-{i:05d}")["cost"]
                   for i in range(len(stages.shard_ranges(num_latents, cfg.simulate.shard_latents)))]
    total = store.read_manifest("simulate", keys["simulate"])["cost"]
    assert total["tokens_in"] == sum(c["tokens_in"] for c in shard_costs) > 0
    assert total["shards_wall_s"] == pytest.approx(sum(c["wall_s"] for c in shard_costs), abs=0.01)
    p = artifacts.read_predictions(store, keys)
    max_act = artifacts.max_act(store, keys, num_latents)
    v, lat = p.column("pred").to_numpy(), p.column("latent").to_numpy()
    assert len(p) > 0 and (v >= 0).all() and (v <= max_act[lat] + 1e-6).all()
    stages.run("calibrate", store, cfg, keys)
    assert store.has_manifest("calibrate", keys["calibrate"])

    # The all-at-once simulator on the same upstream: the same (context, latent) pairs as `llm` are
    # predicted or failed (every position: `all`; one slot per eval sentence: `last`), values in range.
    pairs = {(r["context_id"], r["latent"]) for r in p.select(["context_id", "latent"]).to_pylist()}
    for shard in range(len(stages.shard_ranges(num_latents, cfg.simulate.shard_latents))):
        base = f"{store.artifact_dir('simulate', keys['simulate'])}/shard-{shard:05d}/failed.json"
        pairs |= {(r["context_id"], r["latent"]) for r in json.loads(store.read_bytes(base))}
    for positions in ("all", "last"):
        cfg_a = cfg.model_copy(update={"simulate": cfg.simulate.model_copy(
            update={"method": "llm-all-at-once", "eval_positions": positions})})
        keys_a = stages.plan(cfg_a)
        assert keys_a["simulate"] != keys["simulate"] and keys_a["activations"] == keys["activations"]
        got = set()
        for shard in range(len(stages.shard_ranges(num_latents, cfg_a.simulate.shard_latents))):
            stages.run("simulate", store, cfg_a, keys_a, shard=shard)
            d = f"{store.artifact_dir('simulate', keys_a['simulate'])}/shard-{shard:05d}"
            failed = json.loads(store.read_bytes(f"{d}/failed.json"))
            got |= {(r["context_id"], r["latent"]) for r in failed}
            m = store.read_manifest("simulate", keys_a["simulate"], f"shard-{shard:05d}")
            assert m["metrics"]["n_failed"] == len(failed) and m["cost"]["tokens_in_cached"] > 0
        stages.run("simulate", store, cfg_a, keys_a)
        pa_ = artifacts.read_predictions(store, keys_a)
        got |= {(r["context_id"], r["latent"]) for r in pa_.select(["context_id", "latent"]).to_pylist()}
        v, lat = pa_.column("pred").to_numpy(), pa_.column("latent").to_numpy()
        assert len(pa_) > 0 and (v >= 0).all() and (v <= max_act[lat] + 1e-6).all()
        calib = {c for c, _ in pairs} & set(artifacts.sim_context_ids(cfg_a, "calib", artifacts.load_tokens(
            store, keys, ("calib",))[0]).tolist())
        eval_ctx = set(artifacts.sim_context_ids(cfg_a, "eval", artifacts.load_tokens(store, keys, ("eval",))[0]).tolist())
        want = {(c, l) for c, l in pairs if c in calib} | {(c, l) for c in eval_ctx for l in {l for _, l in pairs}}
        assert got == want

    # The whole flow with the same config file: the stages above are found by manifest, evaluate and
    # report run on the LLM simulator's predictions, and no embed stage runs (LLM scorer and simulator).
    from flows.rewrite import rewrite

    result = rewrite(preset="micro", config_file=str(yaml_file), storage=str(tmp_path / "store"), run_id="llm")
    assert result["keys"] == keys and "embed" not in keys
    assert not (tmp_path / "store" / "artifacts" / "embed").exists()
    assert {r["condition"] for r in result["ce"]} >= {"clean", "transcoder", "zero_ablation", "simulated"}


def test_llm_methods_skip_the_embed_stage():
    """The context embeddings serve the embedding scorer/simulator only: a config whose scorer and
    simulator are both LLMs has no embed stage (nor embed upstream); one embedding method keeps it."""
    from nlrewrite_core.config import load_config

    llm = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1"}
    both = load_config("micro", overrides={"score": {"method": "detection", "llm": llm},
                                           "simulate": {"method": "llm", "llm": llm}})
    assert "embed" not in stages.plan(both)
    assert all("embed" not in ups for _, ups in stages.stage_configs(both).values())
    one = load_config("micro", overrides={"score": {"method": "embedding"}, "simulate": {"method": "llm", "llm": llm}})
    assert "embed" in stages.plan(one) and "embed" in stages.stage_configs(one)["score"][1]
    # The lexical scorer (the offline default) reads no embeddings: with an LLM simulator nothing embeds.
    lexical = load_config("micro", overrides={"simulate": {"method": "llm", "llm": llm}})
    assert lexical.score.method == "lexical" and "embed" not in stages.plan(lexical)
    assert "embed" in stages.plan(load_config("micro"))  # the embedding simulator still needs it
    assert all(load_config(p).score.method == "lexical" for p in ("tiny", "micro", "paper-shape"))
