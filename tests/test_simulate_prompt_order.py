"""The simulator prompt orders (`simulate.prompt_order`): well-formed prompts, the prefix-shared
transformers path equal to one prompt at a time, and llm_predictions keyed by (context, latent)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nlrewrite_core.config import LLMConfig, SimulateConfig
from nlrewrite_core.llm import LLM, Prompt, make_llm
from nlrewrite_core.llm import prompts as P
from nlrewrite_core import simulate
from nlrewrite_core.simulate import context_suffixes, llm_predictions

from llm_tiny import build_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ORDERS = ("explanation_first", "context_first")
VOCAB = ["the", " cat", " sat", "\n", " on", " mat", " dog", " ran"]


def _decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


class Recording(LLM):
    """Top logprobs from a function of the prompt text; records each call's prompts."""

    backend = "recording"

    def __init__(self, top):
        super().__init__(LLMConfig(model="recording"))
        self.top, self.calls = top, []

    def _top_logprobs(self, prompts: list[Prompt], k: int) -> list[dict[str, float]]:
        self.calls.append(prompts)
        return [self.top(p.text) for p in prompts]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_config_default_keeps_keys():
    assert "prompt_order" not in SimulateConfig().model_dump()
    assert SimulateConfig(prompt_order="context_first").model_dump()["prompt_order"] == "context_first"


@pytest.mark.parametrize("order", ORDERS)
def test_prompts_are_well_formed(order):
    ctx = P.simulator_context("the cat <<sat>> on", " mat")
    p = P.simulator_prompt("Nouns after the, like cat or mat.", ctx, order)
    text = p.text
    assert text.startswith(P.SIMULATOR_SYSTEM)
    assert text.endswith(P.SIMULATOR_QUESTION if order == "explanation_first" else P.CONTEXT_FIRST_CUE)
    assert "Explanation of the latent: Nouns after the, like cat or mat." in text
    assert text.count("<<") == text.count(">>") == 1 + P.SIMULATOR_SYSTEM.count("<<")
    assert "<< mat>>" in text
    expl_part = "Nouns after the, like cat or mat."
    first, second = (expl_part, "Text:") if order == "explanation_first" else ("Text:", expl_part)
    assert first in p.prefix and second in p.suffix and second not in p.prefix
    other = P.simulator_prompt("Something else entirely.", P.simulator_context("a dog", " ran"), order)
    same_expl = P.simulator_prompt("Nouns after the, like cat or mat.", P.simulator_context("a dog", " ran"), order)
    same_ctx = P.simulator_prompt("Something else entirely.", ctx, order)
    shared = same_expl if order == "explanation_first" else same_ctx
    assert shared.prefix == p.prefix and other.prefix != p.prefix
    if order == "explanation_first":  # the paper's prompt, unchanged
        assert p.prefix == P.SIMULATOR_SYSTEM + "Explanation of the latent: Nouns after the, like cat or mat.\n\n"
        assert p.suffix == "Text: the cat \u2039\u2039sat\u203a\u203a on<< mat>>\n\nActivation of the last token (0-9):"
    else:  # the question asked once in the shared prefix; the suffix is the explanation and a cue
        assert p.suffix == " Nouns after the, like cat or mat.\nActivation:"
    with pytest.raises(ValueError):
        P.simulator_prompt("x", ctx, "sideways")  # type: ignore[arg-type]


def test_context_first_prefix_shared_equals_one_at_a_time(tiny_dir):
    llm = make_llm(LLMConfig(model=str(tiny_dir), device="cpu", batch_size=3, top_logprobs=8))
    contexts = context_suffixes(np.array([[0, 1, 2, 4, 0, 5, 6, 7]]), 5, _decode)[::2]
    expls = ["cats", "the word mat after on", "dog ran to the house where it found some food", ""]
    prompts = [llm.wrap(P.simulator_prompt(e, c, "context_first")) for c in contexts for e in expls]
    shared = llm._top_logprobs(prompts, 8, share_prefix=True)
    alone = llm._top_logprobs(prompts, 8, share_prefix=False)
    for a, b in zip(shared, alone):
        assert set(a) == set(b) and all(abs(a[t] - b[t]) < 1e-4 for t in a)


@pytest.mark.parametrize("order", ORDERS)
def test_llm_predictions_keyed_by_context_and_latent(order, monkeypatch):
    """A digit that depends on the (explanation, context) pair lands on that pair in either order; each
    call holds whole groups of prompts sharing a prefix, adjacent."""
    monkeypatch.setattr(simulate, "PROMPTS_PER_CALL", 5)
    tokens = np.array([[0, 1, 2, 4, 0, 5], [6, 7, 3, 0, 1, 5]])
    contexts = context_suffixes(tokens, 3, _decode)
    expls = ["first", "second", "third"]

    def top(text: str) -> dict[str, float]:
        e = next(i for i, x in enumerate(expls) if f"latent: {x}" in text)
        c = next(i for i, x in enumerate(contexts) if x in text)
        return {} if (e, c) == (1, 4) else {str((e + c) % 10): 0.0}

    llm = Recording(top)
    pred, failed = llm_predictions(np.array([7, 3, 5]), expls, contexts, np.arange(12) + 100,
                                   np.array([9.0, 18.0, 9.0], np.float32), llm, order=order)
    got = {(r["latent"], r["context_id"]): r["pred"] for r in pred.to_pylist()}
    want = {(lat, 100 + c): float((e + c) % 10) * (2 if lat == 3 else 1)
            for e, lat in enumerate([7, 3, 5]) for c in range(12) if (e, c) != (1, 4)}
    assert got == want and len(pred) == 35
    assert failed.to_pylist() == [{"context_id": 104, "latent": 3, "reason": "no digit 0-9 among the top logprobs"}]
    group = 12 if order == "explanation_first" else 3
    assert all(len(call) % group == 0 for call in llm.calls)
    for call in llm.calls:
        prefixes = [p.prefix for p in call]
        assert all(len(set(prefixes[a:a + group])) == 1 for a in range(0, len(call), group))


@pytest.mark.parametrize("order", ORDERS)
def test_tiny_llama_llm_predictions_both_orders(tiny_dir, order):
    llm = make_llm(LLMConfig(model=str(tiny_dir), device="cpu", batch_size=4, top_logprobs=50))
    contexts = context_suffixes(np.array([[0, 1, 2, 4, 0, 5]]), 4, _decode)
    pred, failed = llm_predictions(np.array([0, 1]), ["cats", "dogs on mats"], contexts, np.arange(6),
                                   np.array([2.0, 3.0], np.float32), llm, order=order)
    keys = [(r["latent"], r["context_id"]) for r in pred.to_pylist() + failed.to_pylist()]
    assert sorted(keys) == [(lat, c) for lat in (0, 1) for c in range(6)]
    assert all(math.isfinite(v) and v >= 0 for v in pred.column("pred").to_pylist())
    assert llm.usage.tokens_in_cached > 0


def test_context_suffixes_for_a_mask_of_contexts():
    tokens = np.array([[0, 1, 2, 4, 0, 5], [6, 7, 0, 1, 2, 4]])
    keep = np.zeros(tokens.size, dtype=bool)
    keep[[4, 11]] = True  # the scored last position (seq_len - 2) and the very last one
    every = context_suffixes(tokens, 4, _decode)
    assert context_suffixes(tokens, 4, _decode, keep) == [every[4], every[11]]
