"""The LLM interface and its `transformers` backend on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from nlrewrite_core.config import LLMConfig
from nlrewrite_core.llm import Prompt, Usage, make_llm, merge_logprob

from llm_tiny import build_tiny_llama


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=CUDA)])
def tiny_llm(tiny_dir, request):
    """The tiny Llama on CPU and, where a GPU is present, on CUDA (float32 on both: exact comparisons)."""
    return make_llm(LLMConfig(model=str(tiny_dir), device=request.param, dtype="float32", batch_size=7,
                              top_logprobs=8, max_new_tokens=12))


def test_prefix_shared_logprobs_equal_one_at_a_time(tiny_llm):
    prefixes = ["The cat sat on a mat.\n", "Example 1: the dog ran to the house\n", ""]
    suffixes = ["Answer:", " the dog ran to the house where it", " 3 4 5", "x", "yes no yes no yes"]
    prompts = [Prompt(p, s) for p in prefixes for s in suffixes if p or s] + [Prompt("only a prefix ", "")]
    shared = tiny_llm._top_logprobs(prompts, 8, share_prefix=True)
    alone = tiny_llm._top_logprobs(prompts, 8, share_prefix=False)
    assert len(shared) == len(alone) == len(prompts)
    for a, b in zip(shared, alone):
        assert set(a) == set(b)
        for t in a:
            assert abs(a[t] - b[t]) < 1e-4


def test_usage_counts_cached_prefix_tokens(tiny_llm):
    before = tiny_llm.usage.snapshot()
    tiny_llm.top_logprobs([Prompt("The cat sat on a mat.\n", s) for s in ("a", "b", "c")])
    cost = tiny_llm.usage.since(before)
    assert cost["llm_prompts"] == 3 and cost["tokens_out"] == 3
    assert cost["tokens_in_cached"] > 0 and cost["tokens_in"] > cost["tokens_in_cached"]
    assert cost["llm_seconds"] >= 0


def test_generate_returns_text_per_prompt(tiny_llm):
    out = tiny_llm.generate([Prompt("the cat", " sat"), "a much longer prompt about the dog and the house", ""])
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    assert tiny_llm.usage.tokens_out > 0


def test_merge_logprob_adds_probabilities():
    d: dict[str, float] = {}
    merge_logprob(d, "5", math.log(0.2))
    merge_logprob(d, "5", math.log(0.3))
    assert abs(math.exp(d["5"]) - 0.5) < 1e-12
    u = Usage()
    u.add(tokens_in=3)
    assert u.since({})["tokens_in"] == 3


@CUDA
def test_cuda_bfloat16_matches_cpu_float32(tiny_dir):
    """On a GPU in bf16 (the production dtype), prefix-shared expected digits stay close to the CPU
    float32 reference for simulator prompts (bf16 rounding only)."""
    from nlrewrite_core.llm import prompts as P

    ctx = [P.simulator_context("the cat sat on the", " mat"), P.simulator_context("def f(x): return", " 3")]
    prompts = [P.simulator_prompt(e, c, o) for e in ("nouns", "digits in code") for c in ctx
               for o in ("explanation_first", "context_first")]
    ref = make_llm(LLMConfig(model=str(tiny_dir), device="cpu", dtype="float32", top_logprobs=400))
    gpu = make_llm(LLMConfig(model=str(tiny_dir), device="cuda", dtype="bfloat16", top_logprobs=400))
    for a, b in zip(ref.top_logprobs(prompts), gpu.top_logprobs(prompts)):
        assert abs(P.expected_digit(a) - P.expected_digit(b)) < 0.1
