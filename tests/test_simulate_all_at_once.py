"""The all-at-once simulator (`simulate.method: llm-all-at-once`): its prompt, slot alignment against
tokenization, the transformers backend's slots equal to scoring each slot alone, and the predictions
keyed by (context, latent) with failures counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nlrewrite_core.config import LLMConfig, SimulateConfig
from nlrewrite_core.llm import LLM, SlotPrompt, make_llm
from nlrewrite_core.llm import prompts as P
from nlrewrite_core import simulate
from nlrewrite_core.simulate import FAIL_REASONS, llm_all_at_once_predictions, sentence_token_texts

from llm_tiny import build_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Subject tokens that could break a one-token-per-line layout: multi-byte characters (whole, and a byte-level
# token that is part of one, decoded as U+FFFD), newlines, tabs, digits, a lone backslash, an empty token.
SENTENCES = [["The", " cat", " sat", "\n", "3", " é", "日本"],
             ["a", " dog\t", "12", ".\n", "\ufffd", "\\", ""],
             ["x"]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=CUDA)])
def tiny_llm(tiny_dir, request):
    return make_llm(LLMConfig(model=str(tiny_dir), device=request.param, dtype="float32", batch_size=3, top_logprobs=8))


def test_prompt_layout():
    p = P.all_at_once_prompt("Nouns for animals.", SENTENCES[1])
    assert p.prefix == P.ALL_AT_ONCE_SYSTEM + "Explanation of the latent: Nouns for animals.\n\nText:\n"
    lines = "".join(p.pieces).split("\n")
    assert lines == ["a\tunknown", " dog\\t\tunknown", "12\tunknown", ".\\n\tunknown", "\ufffd\tunknown",
                     "\\\\\tunknown", "\t"]  # one line per token; the last slot ends the prompt
    assert p.slots == tuple(range(7)) and len(p.offsets()) == 7
    assert all(p.text[c - 1] == "\t" for c in p.offsets())
    last = P.all_at_once_prompt("Nouns for animals.", SENTENCES[1], [2])
    assert last.pieces == p.pieces[:3] and last.slots == (2,) and last.offsets() == [p.offsets()[2]]
    for bad in ([], [3, 1], [1, 1], [7]):
        with pytest.raises(ValueError, match="read positions"):
            P.all_at_once_prompt("x", SENTENCES[1], bad)
    assert SimulateConfig(method="llm-all-at-once", llm=LLMConfig(model="m")).method == "llm-all-at-once"
    with pytest.raises(ValueError, match="simulate.llm is required"):
        SimulateConfig(method="llm-all-at-once")


def test_slots_align_with_tokenization(tiny_llm):
    """Each read slot sits right after its line's tab token and before the slot's own token; the suffix tokens
    up to a slot decode to exactly the prompt's text up to it (nothing merged across a slot), whatever the
    subject token holds."""
    tok = tiny_llm.tokenizer
    for sent in SENTENCES:
        for read in (None, [len(sent) - 1]):
            p = P.all_at_once_prompt("cats", sent, read)
            pre, suf, cols = tiny_llm.slot_ids(p)
            assert len(cols) == len(p.slots)
            ends = [len("".join(p.pieces[:i + 1])) for i in p.slots]
            for c, end in zip(cols, ends):
                assert tok.decode(suf[:c + 1]) == "".join(p.pieces)[:end]
                assert tok.decode(suf[c:c + 1]).endswith("\t")
                if c + 1 < len(suf):
                    assert tok.decode(suf[c + 1:c + 2]).startswith(P.SLOT_FILLER[0])


def test_slots_equal_scoring_each_slot_alone(tiny_llm):
    """Prefix shared across a latent's sentences (cascade attention, sentences batched): every slot equals the
    prompt cut at that slot run alone, and the whole prompt run alone; `last` reads the same value as `all`."""
    prompts = [P.all_at_once_prompt(e, s) for e in ("cats", "digits and code") for s in SENTENCES]
    prompts += [P.all_at_once_prompt("cats", SENTENCES[0], [2, 6]), P.all_at_once_prompt("cats", SENTENCES[0], [4])]
    shared = tiny_llm._slot_logprobs(prompts, 8, share_prefix=True)
    whole = tiny_llm._slot_logprobs(prompts, 8, share_prefix=False)
    for p, a_row, b_row in zip(prompts, shared, whole):
        pre, suf, cols = tiny_llm.slot_ids(p)
        assert len(a_row) == len(b_row) == len(cols)
        for c, a, b in zip(cols, a_row, b_row):
            ids = pre + suf[:c + 1]
            alone = tiny_llm._top(tiny_llm._last_logits([ids], [len(ids)])[0], 8)[0]
            for other in (b, alone):
                assert set(a) == set(other) and max(abs(a[t] - other[t]) for t in a) < 1e-4
    for i, pos in ((-2, [2, 6]), (-1, [4])):  # `last`-style subsets read what the full prompt reads there
        for got, p in zip(shared[i], pos):
            full = shared[0][p]
            assert max(abs(got[t] - full[t]) for t in got) < 1e-4
    assert tiny_llm.usage.tokens_in_cached > 0


class Recording(LLM):
    """Slot logprobs from a function of (prompt, slot position); records each call's prompts."""

    backend = "recording"

    def __init__(self, top):
        super().__init__(LLMConfig(model="recording"))
        self.top, self.calls = top, []

    def _slot_logprobs(self, prompts: list[SlotPrompt], k: int):
        self.calls.append(prompts)
        return [[self.top(p, i) for i in p.slots] for p in prompts]


def test_predictions_keyed_by_context_and_latent_with_failures(monkeypatch):
    monkeypatch.setattr(simulate, "SLOT_PROMPTS_PER_CALL", 4)
    sentences = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    read = [np.array([0, 1, 2]), np.array([], int), np.array([2])]  # sentence 1 not simulated
    cids = np.array([100, 101, 102, 302])
    expls = ["first", "second"]

    def top(p: SlotPrompt, i: int):
        e = next(n for n, x in enumerate(expls) if f"latent: {x}\n" in p.prefix)
        s = 0 if "a\t" in p.text else 2
        if (e, s, i) == (1, 0, 1):
            return None  # not on a token boundary
        if (e, s, i) == (0, 2, 2):
            return {"x": -0.1}  # no digit
        return {str(e + s + i): -0.5, "unknown": -0.2}

    llm = Recording(top)
    pred, failed = llm_all_at_once_predictions(np.array([7, 3]), expls, sentences, read, cids,
                                               np.array([9.0, 18.0], np.float32), llm)
    got = {(r["latent"], r["context_id"]): r["pred"] for r in pred.to_pylist()}
    assert got == {(7, 100): 0.0, (7, 101): 1.0, (7, 102): 2.0, (3, 100): 2.0, (3, 102): 6.0, (3, 302): 10.0}
    assert failed.to_pylist() == [{"context_id": 302, "latent": 7, "reason": FAIL_REASONS[0]},  # by latent row
                                  {"context_id": 101, "latent": 3, "reason": FAIL_REASONS[1]}]
    assert [len(c) for c in llm.calls] == [4]  # two latents x two simulated sentences, one call
    assert [p.slots for p in llm.calls[0]] == [(0, 1, 2), (2,), (0, 1, 2), (2,)]
    raw, _ = llm_all_at_once_predictions(np.array([7, 3]), expls, sentences, read, cids,
                                         np.array([9.0, 18.0], np.float32), llm, renormalize=False)
    p_digit = np.exp(-0.5)  # unrenormalized: E = d * p(d)
    assert np.isclose({(r["latent"], r["context_id"]): r["pred"] for r in raw.to_pylist()}[(7, 102)], 2 * p_digit)
    with pytest.raises(ValueError, match="context ids"):
        llm_all_at_once_predictions(np.array([7]), expls[:1], sentences, read, cids[:3], np.array([9.0]), llm)


def test_tiny_llama_all_at_once_predictions_all_and_last(tiny_dir):
    """On the tiny Llama: every (latent, context) is a prediction or a failure, values in [0, max_act], and
    the `last` reading (one slot per sentence) equals the `all` reading at that position."""
    llm = make_llm(LLMConfig(model=str(tiny_dir), device="cpu", batch_size=4, top_logprobs=400))
    tokens = np.array([[0, 1, 2, 4, 0, 5], [6, 7, 3, 0, 1, 5]])
    vocab = ["the", " cat", " sat", "\n", " on", " mat", " dog", " ran"]
    sentences = sentence_token_texts(tokens, lambda t: vocab[t])
    assert sentences[1][2] == "\n"
    args = (np.array([0, 1]), ["cats", "dogs on mats"], sentences)
    max_act = np.array([2.0, 3.0], np.float32)
    every, f_every = llm_all_at_once_predictions(*args, [np.arange(6)] * 2, np.arange(12), max_act, llm)
    assert len(every) + len(f_every) == 24 and len(f_every) == 0
    v = every.column("pred").to_numpy()
    assert (v >= 0).all() and (v <= 3.0).all()
    last, _ = llm_all_at_once_predictions(*args, [np.array([4])] * 2, np.array([4, 10]), max_act, llm)
    ref = {(r["latent"], r["context_id"]): r["pred"] for r in every.to_pylist()}
    for r in last.to_pylist():
        assert abs(r["pred"] - ref[(r["latent"], r["context_id"])]) < 1e-4


class _VLLMLogprob:
    def __init__(self, logprob: float, rank: int, decoded_token: str):
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token


class _TinyEngine:
    """vLLM cannot run here (no GPU, not installed): a stand-in for `vllm.LLM` with vLLM's output format
    (`prompt_logprobs[p]`: {token id: Logprob} at prompt position p, None at 0, the prompt's own token
    included whatever its rank; `outputs[0].logprobs[0]`: the first sampled position), computed by the tiny
    Llama's real forward pass."""

    def __init__(self, hf_llm):
        self.hf = hf_llm

    def get_tokenizer(self):
        return self.hf.tokenizer

    def generate(self, inputs, params, use_tqdm=False):
        from types import SimpleNamespace

        outs = []
        for x in inputs:
            ids = x["prompt_token_ids"]
            with torch.inference_mode():
                lp = torch.log_softmax(self.hf.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            ranks = lp.argsort(-1, descending=True).argsort(-1) + 1

            def entry(p: int, own: int | None) -> dict:
                top = lp[p].topk(params.prompt_logprobs).indices.tolist() + ([own] if own is not None else [])
                return {t: _VLLMLogprob(float(lp[p, t]), int(ranks[p, t]), self.hf.tokenizer.decode([t])) for t in top}

            plp = [None] + [entry(p - 1, ids[p]) for p in range(1, len(ids))]
            gen = int(lp[-1].argmax())
            outs.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=plp, num_cached_tokens=0,
                                        outputs=[SimpleNamespace(token_ids=[gen], logprobs=[entry(len(ids) - 1, None)])]))
        return outs


def test_vllm_prompt_logprob_slots_equal_transformers(tiny_dir):
    """The vllm backend's slot arithmetic (prompt logprobs entry of the token after each slot, the sampled
    position for a slot at the end, the prompt's own token dropped when outside the top k) on vLLM's output
    format gives the transformers backend's distributions."""
    from types import SimpleNamespace

    from nlrewrite_core.llm.vllm_backend import VLLMLLM

    ref = make_llm(LLMConfig(model=str(tiny_dir), device="cpu", dtype="float32", top_logprobs=5))
    llm = VLLMLLM.__new__(VLLMLLM)
    LLM.__init__(llm, LLMConfig(backend="vllm", model=str(tiny_dir), top_logprobs=5))
    llm.engine = _TinyEngine(ref)
    llm._vllm = SimpleNamespace(SamplingParams=lambda **kw: SimpleNamespace(**kw))
    prompts = [P.all_at_once_prompt(e, s) for e in ("cats", "digits") for s in SENTENCES]
    prompts.append(P.all_at_once_prompt("cats", SENTENCES[0], [1, 3]))
    got, want = llm.slot_logprobs(prompts), ref.slot_logprobs(prompts)
    assert [len(x) for x in got] == [len(p.slots) for p in prompts]
    for a_row, b_row in zip(got, want):
        for a, b in zip(a_row, b_row):
            assert set(a) == set(b) and max(abs(a[t] - b[t]) for t in a) < 1e-4
