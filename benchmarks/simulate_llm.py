"""LLM simulator throughput: prefix-shared (each distinct prefix's KV cache computed once and reused
across the prompts that share it) vs one prompt at a time, for each simulator prompt order, same
prompts, outputs compared.

Orders (`simulate.prompt_order`): `explanation_first` (the paper's prompt; the prefix, instructions +
explanation, is shared by a latent's contexts) and `context_first` (the prefix, instructions + the
marked window + question, is shared by the latents; the suffix is the explanation + a short answer
cue). Every prompt is
one of `--latents` x `--contexts`, so each prefix is shared by `--contexts` prompts (explanation_first)
or `--latents` prompts (context_first). The batched path is FLOP-bound: its speedup over one at a
time is at most the tokens computed per prediction, (P + S) / (S + P / shared), which tends to
(P + S) / S (P, S: prefix and suffix tokens); both bounds are reported.

CPU (default): a small random-weight Llama and a tokenizer trained here on the prompts' words
(tests/llm_tiny.py; most words are one token, as with a real tokenizer).
GPU (--gpu-8b): a Llama-3.1-8B-shaped model with random weights in bf16 (same FLOPs as the real
one, no download), the same tokenizer; the paper did ~38 predictions/s per A40.

    python benchmarks/simulate_llm.py [--order both] [--latents 32] [--contexts 32] [--threads 1] [--repeats 2]
    python benchmarks/simulate_llm.py --gpu-8b   # batch 128, 128 latents x 128 contexts, 2 contexts one at a time
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from _common import report  # noqa: E402
from llm_tiny import build_tiny_llama  # noqa: E402

from nlrewrite_core.config import LLMConfig  # noqa: E402
from nlrewrite_core.llm import Prompt, make_llm  # noqa: E402
from nlrewrite_core.llm import prompts as P  # noqa: E402

ORDERS = ("explanation_first", "context_first")
WORDS = ["the", " cat", " sat", " on", " mat", " and", " dog", " ran", " to", " house", " where", " it", " found",
         " food", ".", "\n", " def", " return", " value", " 3", " of", " in", " a", " was", " for", " with", " is",
         " that", " by", " from", " this", " as"]
WHAT = ["The definite article \"the\" in English", "Nouns for animals such as cat and dog",
        "Verbs of motion like ran, sat or went", "Prepositions such as on, to and from",
        "Periods and newlines that end a sentence", "Python keywords like def and return",
        "Small numbers and single digits in text", "Pronouns such as it or this"]
WHERE = ["when it follows a determiner", "at the start of a new clause", "inside short code examples",
         "in simple narrative sentences about pets", "right before a location like house or mat",
         "after a verb describing an action", "in lists of several short items", "near the end of a sentence"]
HOW = ["with the strongest activation on the first occurrence", "especially when the next word is a noun",
       "and weaker activation on repeated mentions", "mostly in plain and simple descriptive text"]


def explanation(i: int) -> str:
    """The i-th of 256 distinct explanations of 16-24 words, shaped like the paper's LLM explanations."""
    return f"{WHAT[i % 8]} {WHERE[i // 8 % 8]}, {HOW[i // 64 % 4]}."


def contexts(n: int, window: int = 32) -> list[str]:
    """n context parts: a random window of `window` words, its last one marked."""
    toks = np.random.default_rng(0).integers(0, len(WORDS), (n, window))
    return [P.simulator_context("".join(WORDS[t] for t in row[:-1]), WORDS[row[-1]]) for row in toks]


def grid(order: str, latents: list[str], ctxs: list[str]) -> list[tuple[int, int, Prompt]]:
    """(latent, context, prompt) for every pair, prompts that share a prefix adjacent."""
    if order == "explanation_first":
        pairs = [(j, i) for j in range(len(latents)) for i in range(len(ctxs))]
    else:
        pairs = [(j, i) for i in range(len(ctxs)) for j in range(len(latents))]
    return [(j, i, P.simulator_prompt(latents[j], ctxs[i], order)) for j, i in pairs]


def max_diff(a: list[dict[str, float]], b: list[dict[str, float]]) -> tuple[float, float]:
    """(max |logprob difference| over the tokens both top-k lists hold, fraction of equal top-1 tokens)."""
    d = max((abs(x[t] - y[t]) for x, y in zip(a, b) for t in x.keys() & y.keys()), default=float("nan"))
    same = np.mean([max(x, key=x.get) == max(y, key=y.get) for x, y in zip(a, b)])
    return float(d), float(same)


def timed(f, *args, **kw) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = f(*args, **kw)
    return time.perf_counter() - t0, out


def run_order(llm, order: str, latents: list[str], ctxs: list[str], n_naive: int, repeats: int) -> dict:
    """Time the prefix-shared path on every prompt and the one-at-a-time path on the first n_naive
    contexts' prompts, alternately `repeats` times, keeping each path's best time (a shared machine)."""
    items = grid(order, latents, ctxs)
    prompts = [llm.wrap(p) for _, _, p in items]
    naive = [k for k, (_, i, _) in enumerate(items) if i < n_naive]
    for share in (True, False):  # warm up this order's shapes
        llm._top_logprobs(prompts[:2], 20, share_prefix=share)
    t_shared = t_naive = float("inf")
    for _ in range(repeats):
        t, shared = timed(llm._top_logprobs, prompts, 20, share_prefix=True)
        t_shared = min(t_shared, t)
        t, alone = timed(llm._top_logprobs, [prompts[k] for k in naive], 20, share_prefix=False)
        t_naive = min(t_naive, t)
    diff, top1 = max_diff([shared[k] for k in naive], alone)
    pre = float(np.mean([len(llm.ids(p.prefix, True)) for p in prompts]))
    suf = float(np.mean([len(llm.ids(p.suffix, False)) for p in prompts]))
    per_prefix = len(ctxs) if order == "explanation_first" else len(latents)
    naive_rate, shared_rate = len(naive) / t_naive, len(prompts) / t_shared
    return {"order": order, "prefix_tokens": pre, "suffix_tokens": suf, "prompts_per_prefix": per_prefix,
            "naive_prompts": len(naive), "naive_per_s": naive_rate, "shared_prompts": len(prompts),
            "shared_per_s": shared_rate, "speedup": shared_rate / naive_rate,
            "bound_(P+S)/S": (pre + suf) / suf, "bound_(P+S)/(S+P/n)": (pre + suf) / (suf + pre / per_prefix),
            "max_logprob_diff": diff, "top1_agree": top1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--order", choices=(*ORDERS, "both"), default="both")
    ap.add_argument("--latents", type=int, default=None, help="default 32 (CPU), 128 (--gpu-8b)")
    ap.add_argument("--contexts", type=int, default=None, help="default 32 (CPU), 128 (--gpu-8b)")
    ap.add_argument("--naive-contexts", type=int, default=None,
                    help="contexts whose prompts also run one at a time: default 8 (CPU), 2 (--gpu-8b)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64 (CPU), 128 (--gpu-8b)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1: steadier when shared)")
    ap.add_argument("--repeats", type=int, default=None, help="timings per path, best kept: 2 (CPU), 1 (--gpu-8b)")
    ap.add_argument("--gpu-8b", action="store_true")
    args = ap.parse_args()
    gpu = args.gpu_8b
    n_lat = args.latents or (128 if gpu else 32)
    n_ctx = args.contexts or (128 if gpu else 32)
    n_naive = min(n_ctx, args.naive_contexts or (2 if gpu else 8))
    repeats = args.repeats or (1 if gpu else 2)
    batch = args.batch_size or (128 if gpu else 64)
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    latents, ctxs = [explanation(j) for j in range(n_lat)], contexts(n_ctx)
    tmp = Path(tempfile.mkdtemp())
    frame = (P.simulator_explanation("") + P.simulator_context("", "") + P.SIMULATOR_QUESTION
             + P.CONTEXT_FIRST_QUESTION + P.CONTEXT_FIRST_CUE)
    build_tiny_llama(tmp, hidden=args.hidden, layers=args.layers, vocab_size=2000,
                     texts=[frame, "".join(WORDS), " ".join(WHAT + WHERE + HOW)] * 3)
    cfg = LLMConfig(model=str(tmp), device="cuda" if gpu else "cpu", batch_size=batch,
                    top_logprobs=20, dtype="bfloat16" if gpu else "float32")
    llm = make_llm(cfg)
    shape = f"llama hidden={args.hidden} layers={args.layers}"
    if gpu:
        from transformers import LlamaConfig, LlamaForCausalLM

        c = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
        with torch.device("cuda"):
            llm.model = LlamaForCausalLM(c).to(torch.bfloat16).eval()
        n = len(llm.tokenizer)
        llm._vocab_text = [llm.tokenizer.decode([i]) if i < n else f"<{i}>" for i in range(c.vocab_size)]
        shape = "Llama-3.1-8B shape, random bf16"
    device = torch.cuda.get_device_name() if gpu else f"cpu, {torch.get_num_threads()} threads"
    orders = ORDERS if args.order == "both" else (args.order,)
    rows = [run_order(llm, o, latents, ctxs, n_naive, repeats) for o in orders]
    print(f"{shape} on {device}, batch {batch}, {n_lat} latents x {n_ctx} contexts")
    report("simulate_llm" + ("_gpu_8b" if gpu else ""), rows,
           {"model": shape, "device": device, "batch_size": batch, "latents": n_lat, "contexts": n_ctx,
            "repeats": repeats})


if __name__ == "__main__":
    main()
