"""Tests of the subject stage: model building, deterministic training, MLP replacement, CE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nlrewrite_core import subject
from nlrewrite_core.config import SubjectConfig

CFG = SubjectConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, steps=3, batch_size=4)
VOCAB, SEQ = 50, 12


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, SEQ), dtype=np.int32)


@pytest.fixture()
def model() -> torch.nn.Module:
    return subject.build_model(CFG, VOCAB, SEQ)


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_is_seeded(model) -> None:
    assert state_equal(model, subject.build_model(CFG, VOCAB, SEQ))
    other = subject.build_model(CFG.model_copy(update={"seed": 1}), VOCAB, SEQ)
    assert not state_equal(model, other)
    assert model.get_output_embeddings().weight.shape == (VOCAB, CFG.hidden_size)


def test_training_is_deterministic() -> None:
    data = tokens(20)
    a, b = subject.build_model(CFG, VOCAB, SEQ), subject.build_model(CFG, VOCAB, SEQ)
    ma = subject.train_subject(a, data, CFG)
    mb = subject.train_subject(b, data, CFG)
    assert state_equal(a, b)
    assert ma["final_train_loss"] == mb["final_train_loss"] and ma["steps"] == 3
    assert not state_equal(a, subject.build_model(CFG, VOCAB, SEQ))


def test_replace_mlp_replaces_and_restores(model) -> None:
    data = tokens(3)
    clean = subject.token_ce(model, data, batch_size=2)
    assert clean.shape == (3, SEQ - 1) and clean.dtype == torch.float32
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape)
        return torch.zeros_like(x)

    with subject.replace_mlp(model, 1, fn):
        zeroed = subject.token_ce(model, data, batch_size=2)
    assert seen and seen[0][-1] == CFG.hidden_size
    assert not torch.equal(clean, zeroed)
    assert torch.equal(clean, subject.token_ce(model, data, batch_size=2))  # hook removed
    # the ablation helper agrees with an explicit replace_mlp
    costs = subject.mlp_ablation_costs(model, data, batch_size=2)
    assert len(costs) == CFG.num_layers and costs[1] == pytest.approx(float(zeroed.mean()))


def test_replace_mlp_restores_on_error(model) -> None:
    with pytest.raises(RuntimeError):
        with subject.replace_mlp(model, 0, subject.zero_mlp):
            raise RuntimeError("boom")
    assert not subject.mlp_module(model, 0)._forward_hooks


def test_replace_mlp_identity_on_sequential_residual() -> None:
    cfg = subject.model_config(CFG, VOCAB, SEQ)
    cfg.use_parallel_residual = False
    torch.manual_seed(0)
    model = subject.GPTNeoXForCausalLM(cfg).eval()
    mlp = subject.mlp_module(model, 0)
    data = tokens(2)
    clean = subject.token_ce(model, data, batch_size=2)
    with subject.replace_mlp(model, 0, lambda x: mlp.dense_4h_to_h(mlp.act(mlp.dense_h_to_4h(x)))):
        same = subject.token_ce(model, data, batch_size=2)
    torch.testing.assert_close(clean, same)


def test_unigram_ce() -> None:
    train = np.array([[0, 0, 0, 1]])
    ev = np.array([[5, 0, 1]])
    counts = np.array([4, 2, 1, 1]) / 8
    expected = -(np.log(counts[0]) + np.log(counts[1])) / 2
    assert subject.unigram_ce(train, ev, 4) == pytest.approx(expected)


def test_layer_out_of_range(model) -> None:
    with pytest.raises(IndexError):
        subject.mlp_module(model, 5)
