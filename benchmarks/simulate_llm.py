"""LLM simulator throughput, every path in one run, same (latent, context) predictions, outputs compared.

Paths:
- `one-at-a-time`: every prompt run alone from scratch (the reference; timed on a subset).
- `broadcast`: per-position simulator, each distinct prefix computed once, its KV cache broadcast over a
  batch of suffixes (materialised once per batch by the model's first cache update).
- `cascade`: the same with the shared-prefix (cascade / Hydragen) attention: prefix KV kept once, suffix
  queries of the whole batch folded into one attention call over it, merged by log-sum-exp.
- `all-at-once`: one prompt per (latent, sentence), the sentence one token per line with an activation
  slot each; every slot read in one pass (prefix shared across a latent's sentences, cascade attention).
  Its own one-at-a-time reference is each slot's prompt cut there, run alone.

Per-position prompts come in both orders (`simulate.prompt_order`): `explanation_first` (the paper's:
the prefix, instructions + explanation, is shared by a latent's contexts) and `context_first` (the prefix,
instructions + window + question, is shared by the latents). The contexts are every position of
`--sentences` sentences of `--positions` tokens (32-token windows ending there), so the per-position and
all-at-once paths make the same predictions. Columns: predictions/s; `x_alone`, the speedup over the
one-at-a-time reference of that prompt format; `bound`, its token bound (tokens per prediction alone /
tokens computed per prediction: a FLOP-bound path can't beat it); `of_bound` = x_alone / bound;
`tok/pred`, tokens computed per prediction; `gemm_frac`, model FLOPs (2 x non-embedding parameters per
token computed + the LM head at each prediction; attention left out) per second over the device's
measured matmul rate; `days_327M`, device-days for the paper's 327M predictions (the paper: ~38
predictions/s per A40, about 100 GPU-days).

CPU (default): a small random-weight Llama and a tokenizer trained here on the prompts' words
(tests/llm_tiny.py; most words are one token, as with a real tokenizer), float32, 1 thread.
GPU (--gpu-8b): a Llama-3.1-8B-shaped model with random weights in bf16 (same FLOPs as the real
one, no download), the same tokenizer.

    python benchmarks/simulate_llm.py [--latents 16] [--sentences 4] [--positions 32] [--threads 1] [--repeats 2]
    python benchmarks/simulate_llm.py --gpu-8b   # batch 128, 64 latents x 4 sentences x 64 positions
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


def sentences(n: int, length: int) -> list[list[str]]:
    """n random sentences of `length` words (one token each with this tokenizer)."""
    toks = np.random.default_rng(0).integers(0, len(WORDS), (n, length))
    return [[WORDS[t] for t in row] for row in toks]


def windows(sents: list[list[str]], window: int = 32) -> list[str]:
    """The per-position simulator's context part at every position of every sentence."""
    return [P.simulator_context("".join(s[max(0, i - window + 1):i]), s[i]) for s in sents for i in range(len(s))]


def grid(order: str, latents: list[str], ctxs: list[str]) -> list[tuple[int, int, Prompt]]:
    """(latent, context, prompt) for every pair, prompts that share a prefix adjacent."""
    if order == "explanation_first":
        pairs = [(j, i) for j in range(len(latents)) for i in range(len(ctxs))]
    else:
        pairs = [(j, i) for i in range(len(ctxs)) for j in range(len(latents))]
    return [(j, i, P.simulator_prompt(latents[j], ctxs[i], order)) for j, i in pairs]


def max_diff(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    """Max |logprob difference| over the tokens both top-k lists hold."""
    return float(max((abs(x[t] - y[t]) for x, y in zip(a, b) for t in x.keys() & y.keys()), default=float("nan")))


class Meter:
    """Times a path (best of `repeats`) and counts the tokens it computes per prediction. On CPU the time is
    the process's CPU time (one torch thread: the machine is shared, and wall time would measure the other
    tenants too); on CUDA it is wall time (every path ends in a device-to-host copy, so it is synchronised)."""

    def __init__(self, llm, repeats: int, gemm: float, params: int, head_flops: float, clock=time.perf_counter):
        self.llm, self.repeats, self.gemm, self.params, self.head_flops = llm, repeats, gemm, params, head_flops
        self.clock = clock

    def run(self, f, n_pred: int):
        best, out, tokens = float("inf"), None, 0.0
        for _ in range(self.repeats):
            before = self.llm.usage.snapshot()
            t0 = self.clock()
            out = f()
            best = min(best, self.clock() - t0)
            u = self.llm.usage.since(before)
            tokens = u["tokens_in"] - u["tokens_in_cached"]
        flops = 2 * self.params * tokens + self.head_flops * n_pred
        return out, {"per_s": n_pred / best, "tok/pred": tokens / n_pred, "gemm_frac": flops / best / self.gemm}


def row(path: str, order: str, n: int, m: dict, alone: dict, diff: float) -> dict:
    return {"path": path, "order": order, "predictions": n, "per_s": m["per_s"], "x_alone": m["per_s"] / alone["per_s"],
            "bound": alone["tok/pred"] / m["tok/pred"],
            "of_bound": m["per_s"] / alone["per_s"] / (alone["tok/pred"] / m["tok/pred"]),
            "tok/pred": m["tok/pred"], "gemm_frac": m["gemm_frac"], "days_327M": 327e6 / m["per_s"] / 86400,
            "max_logprob_diff": diff}


def per_position(llm, meter: Meter, order: str, latents: list[str], ctxs: list[str], n_alone: int) -> list[dict]:
    """The per-position simulator in one order: one-at-a-time (first n_alone contexts), broadcast, cascade."""
    prompts = [llm.wrap(p) for _, _, p in grid(order, latents, ctxs)]
    subset = [k for k, (_, i, _) in enumerate(grid(order, latents, ctxs)) if i < n_alone]
    for share in (True, False):  # warm up this order's shapes
        llm._top_logprobs(prompts[:2], 20, share_prefix=share)
    ref, alone = meter.run(lambda: llm._top_logprobs([prompts[k] for k in subset], 20, share_prefix=False), len(subset))
    rows = [row("one-at-a-time", order, len(subset), alone, alone, 0.0)]
    cascade = llm.cascade
    for path, on in (("broadcast", False), ("cascade", True)):
        llm.cascade = on and cascade
        out, m = meter.run(lambda: llm._top_logprobs(prompts, 20, share_prefix=True), len(prompts))
        rows.append(row(path, order, len(prompts), m, alone, max_diff([out[k] for k in subset], ref)))
    llm.cascade = cascade
    return rows


def all_at_once(llm, meter: Meter, latents: list[str], sents: list[list[str]], n_alone: int) -> list[dict]:
    """The all-at-once simulator: every slot of every (latent, sentence) prompt; its one-at-a-time
    reference runs each slot's prompt cut there, alone, for the first n_alone latents' first sentence."""
    prompts = [llm.wrap_slots(P.all_at_once_prompt(e, s)) for e in latents for s in sents]
    n = sum(len(s) for s in sents) * len(latents)
    cut = [llm.wrap_slots(P.all_at_once_prompt(e, sents[0], [i])) for e in latents[:n_alone] for i in range(len(sents[0]))]
    llm._slot_logprobs(prompts[:2], 20)
    ref, alone = meter.run(lambda: llm._slot_logprobs(cut, 20, share_prefix=False), len(cut))
    out, m = meter.run(lambda: llm._slot_logprobs(prompts, 20), n)
    got = [x for j in range(n_alone) for x in out[j * len(sents)]]
    return [row("one-at-a-time", "all-at-once", len(cut), alone, alone, 0.0),
            row("all-at-once", "all-at-once", n, m, alone, max_diff(got, [r[0] for r in ref]))]


def gemm_rate(device: str, dtype: torch.dtype, n: int, clock) -> float:
    """The device's measured matmul rate (FLOP/s) at n x n x n, best of 3 (`clock`: as the Meter's)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        for _ in range(10 if device == "cuda" else 1):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (clock() - t0) / (10 if device == "cuda" else 1))
    return 2 * n ** 3 / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--order", choices=(*ORDERS, "both"), default="both")
    ap.add_argument("--latents", type=int, default=None, help="default 16 (CPU), 64 (--gpu-8b)")
    ap.add_argument("--sentences", type=int, default=None, help="default 4 (CPU and --gpu-8b)")
    ap.add_argument("--positions", type=int, default=None, help="tokens per sentence: 32 (CPU), 64 (--gpu-8b)")
    ap.add_argument("--alone", type=int, default=None,
                    help="contexts (per-position) or latents (all-at-once) also run one at a time: 4 (CPU), 1 (GPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64 (CPU), 128 (--gpu-8b)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1: steadier when shared)")
    ap.add_argument("--repeats", type=int, default=None, help="timings per path, best kept: 2 (CPU), 1 (--gpu-8b)")
    ap.add_argument("--gpu-8b", action="store_true")
    args = ap.parse_args()
    gpu = args.gpu_8b
    n_lat = args.latents or (64 if gpu else 16)
    n_sent = args.sentences or 4
    n_pos = args.positions or (64 if gpu else 32)
    n_alone = args.alone or (1 if gpu else 4)
    repeats = args.repeats or (1 if gpu else 2)
    batch = args.batch_size or (128 if gpu else 64)
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    latents, sents = [explanation(j) for j in range(n_lat)], sentences(n_sent, n_pos)
    tmp = Path(tempfile.mkdtemp())
    frame = (P.simulator_explanation("") + P.simulator_context("", "") + P.SIMULATOR_QUESTION
             + P.CONTEXT_FIRST_QUESTION + P.CONTEXT_FIRST_CUE + P.all_at_once_prefix("") + P.SLOT_FILLER + "\t\n")
    build_tiny_llama(tmp, hidden=args.hidden, layers=args.layers, vocab_size=2000,
                     texts=[frame, "".join(WORDS), " ".join(WHAT + WHERE + HOW)] * 3)
    cfg = LLMConfig(model=str(tmp), device="cuda" if gpu else "cpu", batch_size=batch,
                    top_logprobs=20, dtype="bfloat16" if gpu else "float32")
    llm = make_llm(cfg)
    shape = f"llama hidden={args.hidden} layers={args.layers}"
    if gpu:
        from transformers import LlamaConfig, LlamaForCausalLM

        from nlrewrite_core.llm.hf import fuse_rms_norms

        c = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
        with torch.device("cuda"):
            llm.model = LlamaForCausalLM(c).to(torch.bfloat16).eval()
        fuse_rms_norms(llm.model)
        n = len(llm.tokenizer)
        llm._vocab_text = [llm.tokenizer.decode([i]) if i < n else f"<{i}>" for i in range(c.vocab_size)]
        shape = "Llama-3.1-8B shape, random bf16"
    model_cfg = llm.model.config
    d, vocab = model_cfg.hidden_size, model_cfg.vocab_size
    params = sum(p.numel() for p in llm.model.parameters()) - 2 * d * vocab  # embeddings and LM head left out
    clock = time.perf_counter if gpu else time.process_time
    gemm = gemm_rate(llm.device, llm.dtype, 8192 if gpu else 1024, clock)
    meter = Meter(llm, repeats, gemm, params, 2 * d * vocab, clock)
    device = torch.cuda.get_device_name() if gpu else f"cpu, {torch.get_num_threads()} threads"
    orders = ORDERS if args.order == "both" else (args.order,)
    ctxs = windows(sents)
    rows = [r for o in orders for r in per_position(llm, meter, o, latents, ctxs, n_alone)]
    rows += all_at_once(llm, meter, latents, sents, n_alone)
    best_pp = max(r["per_s"] for r in rows if r["path"] == "cascade")
    aao = next(r for r in rows if r["path"] == "all-at-once")
    print(f"{shape} on {device}, batch {batch}, {n_lat} latents x {n_sent} sentences x {n_pos} positions, "
          f"matmul {gemm / 1e9:.1f} GFLOP/s, {'wall' if gpu else 'CPU'} time")
    report("simulate_llm" + ("_gpu_8b" if gpu else ""), rows,
           {"model": shape, "device": device, "batch_size": batch, "latents": n_lat, "sentences": n_sent,
            "positions": n_pos, "repeats": repeats, "gemm_flops": gemm, "clock": "wall" if gpu else "process CPU time",
            "all_at_once_vs_best_per_position": aao["per_s"] / best_pp,
            "paper_per_s_per_a40": 38.0, "paper_days_327M": 327e6 / 38 / 86400})
    print(f"all-at-once vs the best per-position (cascade) path at equal predictions: {aao['per_s'] / best_pp:.1f}x; "
          f"the paper: ~38 predictions/s per A40 = {327e6 / 38 / 86400:.0f} GPU-days for 327M")


if __name__ == "__main__":
    main()
