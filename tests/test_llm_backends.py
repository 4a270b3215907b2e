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


# ---- shared-prefix (cascade) attention ---------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_cascade_attention_equals_attention_over_the_concatenation(device, heads, kv_heads):
    """Prefix part (batch and query-head groups folded into one query dimension) + causal suffix part,
    merged by log-sum-exp, equals plain causal attention over [prefix repeated per row; suffix]."""
    from nlrewrite_core.llm.hf import cascade_attention

    g = torch.Generator().manual_seed(0)
    B, S, P, d = 3, 5, 7, 8
    q = torch.randn(B, S, heads, d, generator=g).transpose(1, 2)  # HF's layout: a transposed view
    k, v = (torch.randn(B, kv_heads, S, d, generator=g) for _ in range(2))
    pk, pv = (torch.randn(1, kv_heads, P, d, generator=g) for _ in range(2))
    q, k, v, pk, pv = (x.to(device) for x in (q, k, v, pk, pv))
    got = cascade_attention(q, k, v, pk, pv, d ** -0.5)  # [B, S, H, d]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(heads // kv_heads, 1)
    vals = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(heads // kv_heads, 1)
    mask = torch.ones(S, P + S, dtype=torch.bool, device=device).tril(P)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, vals, attn_mask=mask).transpose(1, 2)
    assert got.shape == (B, S, heads, d)
    assert (got - want).abs().max().item() < 1e-5


def _tiny_neox(path):
    """A random GPT-NeoX (no grouped-query heads, partial rotary) with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(1)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
                                             max_position_embeddings=4096, bos_token_id=1, eos_token_id=2))
    return model, tok


PROMPTS = [Prompt(p, s) for p in ("The cat sat on a mat.\n", "Example 1: the dog ran to the house\n")
           for s in ("Answer:", " the dog ran to the house where it", " 3 4 5", "x", "yes no yes no yes")]


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_cascade_suffix_pass_never_repeats_the_prefix(tiny_dir, family, monkeypatch):
    """The suffix pass of both supported families runs the cascade attention (the broadcast cache is never
    built) and equals the one-prompt-at-a-time path and the broadcast-cache path within 1e-4 (float32)."""
    from nlrewrite_core.llm import hf

    model, tok = _tiny_neox(tiny_dir) if family == "gpt_neox" else (None, None)
    llm = hf.TransformersLLM(LLMConfig(model=str(tiny_dir), device="cpu", dtype="float32", batch_size=3,
                                       top_logprobs=8), model=model, tokenizer=tok)
    assert llm.cascade
    alone = llm._top_logprobs(PROMPTS, 8, share_prefix=False)
    broadcast = copy_llm_path(llm, cascade=False)
    calls = []
    real = hf.cascade_attention
    monkeypatch.setattr(hf, "cascade_attention", lambda *a: calls.append(a[3].shape) or real(*a))
    monkeypatch.setattr(hf, "_expanded", lambda *a: pytest.fail("the prefix cache was broadcast per row"))
    shared = llm._top_logprobs(PROMPTS, 8, share_prefix=True)
    n_layers = llm.model.config.num_hidden_layers
    assert len(calls) == n_layers * 4  # 2 prefixes x 2 suffix batches (5 suffixes, batch 3) x layers
    assert all(shape[0] == 1 for shape in calls)  # one copy of the prefix keys, whatever the batch
    for a, b, c in zip(shared, alone, broadcast):
        assert set(a) == set(b) == set(c)
        assert max(abs(a[t] - b[t]) for t in a) < 1e-4 and max(abs(a[t] - c[t]) for t in a) < 1e-4
    assert llm.model.config._attn_implementation != hf.ATTENTION_NAME  # restored after the suffix pass


def copy_llm_path(llm, cascade: bool) -> list[dict[str, float]]:
    """The prefix-shared logprobs of PROMPTS with the cascade attention switched on or off."""
    before, llm.cascade = llm.cascade, cascade
    try:
        return llm._top_logprobs(PROMPTS, 8, share_prefix=True)
    finally:
        llm.cascade = before


def test_fused_rms_norm_equals_llama_rms_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from nlrewrite_core.llm.hf import fuse_rms_norms

    norm = LlamaRMSNorm(16, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 4, 16)
    want = norm(x)
    assert fuse_rms_norms(norm) == 1
    assert (norm(x) - want).abs().max().item() < 1e-6
