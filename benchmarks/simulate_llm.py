"""LLM simulator throughput: prefix-shared (the prefix KV cache computed once per latent and
reused across its contexts) vs one prompt at a time, same run, same prompts, outputs compared.

CPU (default): a small random-weight Llama and a tokenizer trained here (tests/llm_tiny.py).
GPU (--gpu-8b): a Llama-3.1-8B-shaped model with random weights in bf16 (same FLOPs as the real
one, no download) and a tiny tokenizer; the paper did ~38 predictions/s per A40.

    python benchmarks/simulate_llm.py [--latents 4] [--contexts 256] [--batch-size 64] [--gpu-8b]
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

WORDS = ["the", " cat", " sat", " on", " mat", " and", " dog", " ran", " to", " house", " where", " it", " found",
         " food", ".", "\n", " def", " return", " value", " 3"]


def prompts_for(n_latents: int, n_contexts: int, window: int = 32) -> list[Prompt]:
    rng = np.random.default_rng(0)
    toks = rng.integers(0, len(WORDS), (n_contexts, window))
    sufs = [P.simulator_suffix("".join(WORDS[t] for t in row[:-1]), WORDS[row[-1]]) for row in toks]
    expl = [f"Fires on the word {WORDS[i % len(WORDS)].strip()} when it follows a noun, in latent {i}."
            for i in range(n_latents)]
    return [Prompt(P.simulator_prefix(e), s) for e in expl for s in sufs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", type=int, default=4)
    ap.add_argument("--contexts", type=int, default=256)
    ap.add_argument("--naive-contexts", type=int, default=None, help="contexts run one at a time (default: all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gpu-8b", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    build_tiny_llama(tmp, hidden=args.hidden, layers=args.layers)
    cfg = LLMConfig(model=str(tmp), device="cuda" if args.gpu_8b else "cpu", batch_size=args.batch_size,
                    top_logprobs=20, dtype="bfloat16" if args.gpu_8b else "float32")
    llm = make_llm(cfg)
    shape = f"llama hidden={args.hidden} layers={args.layers}"
    if args.gpu_8b:
        from transformers import LlamaConfig, LlamaForCausalLM

        c = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
        with torch.device("cuda"):
            llm.model = LlamaForCausalLM(c).to(torch.bfloat16).eval()
        llm._vocab_text = [llm.tokenizer.decode([i]) if i < len(llm.tokenizer) else f"<{i}>" for i in range(c.vocab_size)]
        shape = "Llama-3.1-8B shape, random bf16"
    prompts = prompts_for(args.latents, args.contexts)
    n_naive = args.naive_contexts or args.contexts
    naive_prompts = [p for i, p in enumerate(prompts) if i % args.contexts < n_naive]
    llm.top_logprobs(prompts[:8])  # warm up
    if llm.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    shared = llm._top_logprobs([llm.wrap(p) for p in prompts], 20, share_prefix=True)
    t_shared = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = llm._top_logprobs([llm.wrap(p) for p in naive_prompts], 20, share_prefix=False)
    t_naive = time.perf_counter() - t0
    index = [i for i in range(len(prompts)) if i % args.contexts < n_naive]
    e_s = np.array([P.expected_digit(shared[i]) or -1.0 for i in index])
    e_n = np.array([P.expected_digit(a) or -1.0 for a in alone])
    diff = float(np.abs(e_s - e_n).max())
    n_tok = np.mean([len(llm.ids(p.prefix, True)) + len(llm.ids(p.suffix, False)) for p in prompts[:50]])
    rows = [
        {"path": "one prompt at a time", "prompts": len(naive_prompts), "seconds": t_naive,
         "predictions_per_s": len(naive_prompts) / t_naive},
        {"path": "prefix-shared batched", "prompts": len(prompts), "seconds": t_shared,
         "predictions_per_s": len(prompts) / t_shared},
    ]
    speedup = rows[1]["predictions_per_s"] / rows[0]["predictions_per_s"]
    print(f"{shape}, device {llm.device}, threads {torch.get_num_threads()}, ~{n_tok:.0f} tokens/prompt, "
          f"batch {args.batch_size}: speedup {speedup:.1f}x, max |E diff| {diff:.2e}")
    report("simulate_llm" + ("_gpu_8b" if args.gpu_8b else ""), rows,
           {"model": shape, "device": llm.device, "threads": torch.get_num_threads(), "tokens_per_prompt": n_tok,
            "speedup": speedup, "max_abs_expected_value_diff": diff, "batch_size": args.batch_size})


if __name__ == "__main__":
    main()
