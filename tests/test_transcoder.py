"""Tests of the transcoder stage: formula, training, checkpoints in sparsify's format."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nlrewrite_core import subject, transcoder, transcoder_train
from nlrewrite_core.config import SubjectConfig, TranscoderConfig

D = 16
CFG = TranscoderConfig(num_latents=64, k=4, steps=30, batch_tokens=64, lr=1e-3)


def data(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g)
    W = torch.randn(D, D, generator=g) / 4
    return X, torch.relu(X @ W) + 0.1


@pytest.fixture(scope="module")
def trained():
    X, Y = data()
    return transcoder_train.train_transcoder(X, Y, CFG)


def test_output_matches_formula(trained) -> None:
    sae = copy.deepcopy(trained[0])
    with torch.no_grad():
        sae.W_skip.add_(0.01)  # make the skip path non-trivial
        x = torch.randn(2, 5, D)
        flat = x.reshape(-1, D)
        pre = torch.relu(flat @ sae.encoder.weight.T + sae.encoder.bias)
        vals, idx = pre.topk(CFG.k, dim=-1)
        dense = torch.zeros_like(pre).scatter(1, idx, vals)
        expected = dense @ sae.W_dec + sae.b_dec + flat @ sae.W_skip.T
        got = transcoder.transcoder_output(sae, x)
        torch.testing.assert_close(got, expected.reshape(2, 5, D), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(transcoder.skip_output(sae, x),
                                   (sae.b_dec + flat @ sae.W_skip.T).reshape(2, 5, D))
        # sparsify's own forward agrees
        torch.testing.assert_close(sae(flat).sae_out, expected, rtol=1e-5, atol=1e-5)


def test_training_metrics_and_determinism(trained) -> None:
    sae, metrics = trained
    assert 0 <= metrics["fvu"] < 1 and 0 <= metrics["dead_fraction"] <= 1 and metrics["steps"] == CFG.steps
    sae2, metrics2 = transcoder_train.train_transcoder(*data(), CFG)
    for k, v in sae.state_dict().items():
        assert torch.equal(v, sae2.state_dict()[k]), k
    assert metrics["fvu"] == metrics2["fvu"]


def test_init_like_sparsify() -> None:
    X, Y = data(200)
    cfg = CFG.model_copy(update={"steps": 1})
    sae = transcoder_train.new_transcoder(D, cfg)
    assert not sae.W_dec.any() and not sae.W_skip.any()
    transcoder_train.init_biases(sae, X, Y)
    torch.testing.assert_close(sae.b_dec.data, Y.mean(0))
    torch.testing.assert_close(X.mean(0) @ sae.encoder.weight.T + sae.encoder.bias, torch.zeros(64),
                               atol=1e-5, rtol=0)
    assert transcoder_train.default_lr(2**14) == pytest.approx(2e-4)


def test_save_reload_bit_identical(trained, tmp_path) -> None:
    sae, _ = trained
    transcoder.save_transcoder(sae, tmp_path / "tc")
    assert {p.name for p in (tmp_path / "tc").iterdir()} == {"cfg.json", "sae.safetensors"}
    assert set(load_file(tmp_path / "tc" / "sae.safetensors")) == {"encoder.weight", "encoder.bias", "W_dec",
                                                                    "b_dec", "W_skip"}
    loaded = transcoder.load_transcoder(tmp_path / "tc")
    for k, v in sae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert loaded.cfg.k == CFG.k and loaded.cfg.transcode and loaded.cfg.skip_connection
    x = torch.randn(7, D)
    assert torch.equal(transcoder.transcoder_output(sae, x), transcoder.transcoder_output(loaded, x))


def test_loads_checkpoint_written_by_sparsify(tmp_path) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(3)
    sc = SparseCoder(D, SparseCoderConfig(num_latents=32, k=2, transcode=True, skip_connection=True,
                                          normalize_decoder=False))
    with torch.no_grad():
        for p in sc.parameters():
            p.normal_()
    sc.save_to_disk(tmp_path / "ext")
    loaded = transcoder.load_transcoder(tmp_path / "ext")
    assert loaded.num_latents == 32 and loaded.cfg.k == 2
    x = torch.randn(5, D)
    with torch.no_grad():
        torch.testing.assert_close(transcoder.transcoder_output(loaded, x), sc(x).sae_out)


def test_collect_mlp_io_and_ce() -> None:
    scfg = SubjectConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    model = subject.build_model(scfg, 40, 8)
    toks = np.random.default_rng(0).integers(0, 40, size=(5, 8), dtype=np.int32)
    X, Y = transcoder.collect_mlp_io(model, 1, toks, batch_size=2)
    assert X.shape == (40, 16) and Y.shape == (40, 16)
    mlp = subject.mlp_module(model, 1)
    with torch.no_grad():
        torch.testing.assert_close(mlp(X), Y)
    sae, _ = transcoder_train.train_transcoder(X, Y, TranscoderConfig(num_latents=32, k=2, steps=5, batch_tokens=16,
                                                                max_train_tokens=1000, layer=1))
    ce = transcoder.transcoder_ce(model, 1, sae, toks, batch_size=2)
    assert set(ce) >= {"ce_clean", "ce_transcoder", "ce_zero_ablation", "ce_recovered", "ce_mlp_zero"}


def test_loads_checkpoint_from_the_hub_cache(tmp_path, monkeypatch) -> None:
    """hf://owner/repo/hookpoint goes through sparsify's hub loader (huggingface_hub's
    snapshot_download), here answered offline from a local HF cache laid out as the hub would."""
    sae = transcoder_train.new_transcoder(D, CFG)
    snap = tmp_path / "hub" / "models--acme--tc-tiny" / "snapshots" / ("0" * 40)
    transcoder.save_transcoder(sae, snap / "layers.1.mlp")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    loaded = transcoder.load_transcoder("hf://acme/tc-tiny/layers.1.mlp")
    x = torch.randn(4, D)
    assert torch.equal(transcoder.transcoder_output(sae, x), transcoder.transcoder_output(loaded, x))
    with pytest.raises(ValueError, match="hf://<owner>/<repo>"):
        transcoder.load_transcoder("hf://only-owner")
    with pytest.raises(Exception):  # not in the cache, offline: huggingface_hub's own error
        transcoder.load_transcoder("hf://acme/missing/layers.1.mlp")
