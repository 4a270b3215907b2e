"""The pythia-160m preset's model stages at full width on CPU, and a projection of the real run on a GPU.

A GPT-NeoX with pythia-160m's exact shape (12 layers, d=768, 12 heads, MLP 3072, 50,304 embeddings;
random weights from a config), a tokenizer in Pythia's format (a byte-level BPE trained here: the hub
is not reachable) and a local `datasets` copy of the standard library's docstrings standing in for
the Pile go through the preset's corpus, subject, transcoder (32,768 latents, k=32, streamed training)
and activations stages, each in its own process, for a small token budget. Each stage's wall time
and peak RSS are measured; so are the corpus stage's streaming rate against the tokenizer's own batch
rate on the same documents, and this CPU's float32 matmul rate.

The projection of the real run (the preset's own budgets: 20M corpus tokens, 2,000 transcoder steps of
8,192 tokens, 32,768 latents explained, scored on 200 examples each and simulated on 11,000 contexts)
scales each measured model stage by its FLOP count (real / benchmark) and by the ratio of an assumed
effective GPU rate (--gpu-tflops, bf16) to the measured CPU matmul rate: the stage is assumed to reach
the same fraction of the machine's matmul rate on both. The corpus stage is CPU work: it is projected
at the measured rate. The LLM stages (Llama-3.1-70B explainer and scorer, 8B simulator on vLLM) cannot
run here: they are projected from their prompt counts and prompt lengths (the real prompt builders,
~4 characters per token) as prefill FLOPs at --gpu-tflops plus memory-bound decoding (--hbm-tbs,
--decode-batch sequences per step). Evaluation is projected from its forward count and the measured
subject forward rate. Every assumption is a flag and is printed.

    python benchmarks/pythia_shape.py                 # default: ~24K tokens, 4 transcoder steps (minutes)
    python benchmarks/pythia_shape.py --tokens 100000 --tc-steps 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT.parent / "tests"))

STAGES = ["corpus", "subject", "transcoder", "activations"]
PYTHIA_EMBEDDINGS = 50_304
N_PARAMS = {"8b": 8.0e9, "70b": 70.6e9}
CHARS_PER_TOKEN = 4.0


def bench_config(work: Path, tokens: int, tc_steps: int):
    """The pythia-160m preset pointed at the local stand-ins, with a small budget (model shapes unchanged)."""
    from nlrewrite_core.config import load_config

    return load_config("pythia-160m", overrides={
        "corpus": {"dataset": str(work / "pile-like"), "tokenizer": str(work / "pythia-160m-random"),
                   "max_tokens": tokens, "n_eval": 8, "n_calib": 4, "n_explain": 64},
        "subject": {"hub_id": str(work / "pythia-160m-random")},
        "transcoder": {"steps": tc_steps, "batch_tokens": 1024, "buffer_tokens": 8192,
                       "max_train_tokens": max(2048, tc_steps * 1024), "checkpoint_every": 0},
        "execution": {"device": "cpu"},
    })


def prepare(work: Path) -> dict:
    """The full-width random pythia-160m, its tokenizer and the local dataset (once per work dir)."""
    from pythia_tiny import PYTHIA_160M, build_pythia_like, documents, save_text_dataset

    if not (work / "pythia-160m-random" / "config.json").exists():
        docs = documents(100_000)
        save_text_dataset(work / "pile-like", docs)
        build_pythia_like(work / "pythia-160m-random", **PYTHIA_160M, vocab_size=8192, embeddings=PYTHIA_EMBEDDINGS,
                          texts=docs)
    return {"stage": "prepare"}


def corpus_rate(work: Path, tokens: int) -> dict:
    """Streaming corpus (dataset read + tokenize + cut + split) vs the tokenizer's own batch call on the
    same documents, tokens/s."""
    import datasets  # noqa: F401  (imports are not part of the rates)
    from transformers import AutoTokenizer

    from nlrewrite_core import corpus, corpus_sources
    from nlrewrite_core.config import CorpusConfig

    cfg = CorpusConfig(source="hf", dataset=str(work / "pile-like"), tokenizer=str(work / "pythia-160m-random"),
                       max_tokens=tokens, seq_len=50, n_eval=8, n_calib=4, n_explain=64)
    hf = AutoTokenizer.from_pretrained(cfg.tokenizer)
    t0 = time.perf_counter()
    table, _ = corpus.build_corpus(cfg)
    stream_s = time.perf_counter() - t0
    n_stream = len(table) * cfg.seq_len
    docs = list(corpus_sources.hf_documents(cfg))

    def rate(encode) -> float:
        n_tok, t0 = 0, time.perf_counter()
        for start in range(0, len(docs), corpus_sources.DOC_BATCH):
            n_tok += sum(len(x) + 1 for x in encode(docs[start:start + corpus_sources.DOC_BATCH]))
            if n_tok >= n_stream:
                break
        return n_tok / (time.perf_counter() - t0)

    rust, wrapped = rate(corpus.tokenizer_encoder(hf.backend_tokenizer)), rate(corpus.hf_encoder(hf))
    return {"stage": "corpus_rate", "stream_tokens_per_s": n_stream / stream_s, "tokenizer_batch_tokens_per_s": rust,
            "transformers_call_tokens_per_s": wrapped, "stream_vs_tokenizer": (n_stream / stream_s) / rust,
            "tokens": n_stream}


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """This process's float32 matmul rate (best of reps), GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def run_one(stage: str, work: Path, tokens: int, tc_steps: int) -> dict:
    if stage == "prepare":
        return prepare(work)
    if stage == "corpus_rate":
        return corpus_rate(work, max(tokens, 200_000))
    if stage == "matmul":
        return {"stage": "matmul", "gflops": matmul_gflops()}
    from paper_shape import run_stage_config

    return run_stage_config(stage, bench_config(work, tokens, tc_steps), str(work / "store"))


# ---- FLOP counts of the model stages ------------------------------------------------------------------
def forward_flops(d: int = 768, layers: int = 12, mlp: int = 3072, vocab: int = PYTHIA_EMBEDDINGS,
                  upto: int | None = None) -> float:
    """Matmul FLOPs per token of a GPT-NeoX forward (all layers and the unembedding, or layers 0..upto)."""
    per_layer = 2 * (4 * d * d + 2 * d * mlp)
    if upto is not None:
        return per_layer * (upto + 1)
    return per_layer * layers + 2 * d * vocab


def stage_flops(cfg) -> dict[str, float]:
    """FLOPs of each model stage of a config (forwards and transcoder steps; attention's n^2 term ignored)."""
    c, t = cfg.corpus, cfg.transcoder
    full, half = forward_flops(), forward_flops(upto=t.layer)
    d, n = 768, t.num_latents
    eval_tok = c.n_eval * c.seq_len
    sae_step_tok = 6 * d * n + 6 * d * d + 6 * t.k * d  # encoder and skip fwd+bwd, sparse decoder
    return {
        "subject": (1 + 12) * eval_tok * full,  # eval CE, and one forward per MLP ablation
        # the mean pass, one pass per shuffle buffer (~steps x batch tokens), SAE steps, the fit on eval
        "transcoder": (t.max_train_tokens + t.steps * t.batch_tokens) * half + t.steps * t.batch_tokens * sae_step_tok
                      + 4 * eval_tok * full,
        "activations": (c.n_explain + c.n_calib + c.n_eval) * c.seq_len * (full + 2 * d * n),
    }


def evaluate_forwards(cfg) -> int:
    """Forward passes over the eval split that the evaluate stage runs (conditions x fractions x ...)."""
    e, methods = cfg.evaluate, len(cfg.calibrate.methods)
    sweep = len(e.fractions) * (("top" in e.selections) + ("random" in e.selections) * len(e.random_seeds)) * methods
    oracle = len(e.oracle_fp_rates) * len(e.oracle_fn_rates)
    sample = len(e.sample_sizes) * len(e.sample_size_fractions) * methods
    return 5 + sweep + oracle + sample


def llm_prompt_tokens(cfg) -> dict[str, dict[str, float]]:
    """Prompts and tokens per prompt (computed: after the shared prefix; out: generated) of the LLM stages,
    from the real prompt builders on typical text (an explanation of ~20 words, 32-token windows)."""
    from nlrewrite_core.llm import prompts

    word = "token "
    window = word * cfg.simulate.window
    explanation = "the word 'the' at the start of a clause after a comma or a conjunction in English prose"
    ex = [([(window, False), ("token", True)], [("token", 7)] * 3)] * cfg.explain.n_examples
    explain_chars = len(prompts.explainer_prompt(ex).text)
    det = prompts.detection_prompt(explanation, [window] * cfg.score.examples_per_prompt)
    sim = prompts.simulator_prompt(explanation, prompts.simulator_context(window, "token"))
    n_lat = cfg.transcoder.num_latents
    contexts = cfg.corpus.n_calib * cfg.corpus.seq_len + cfg.corpus.n_eval  # eval: the last position only
    return {
        "explain": {"prompts": n_lat, "in": explain_chars / CHARS_PER_TOKEN, "out": 80, "model": "70b"},
        "score": {"prompts": n_lat * (cfg.score.n_pos + cfg.score.n_neg) / cfg.score.examples_per_prompt,
                  "in": len(det.suffix) / CHARS_PER_TOKEN, "out": 3 * cfg.score.examples_per_prompt, "model": "70b",
                  "prefix_in": len(det.prefix) / CHARS_PER_TOKEN},
        "simulate": {"prompts": n_lat * contexts, "in": len(sim.suffix) / CHARS_PER_TOKEN, "out": 1, "model": "8b",
                     "prefix_in": len(sim.prefix) / CHARS_PER_TOKEN},
    }


def llm_seconds(p: dict[str, float], gpu_tflops: float, hbm_tbs: float, decode_batch: int) -> float:
    """Prefill FLOPs at the GPU rate plus memory-bound decoding (bf16 weights read once per step)."""
    params = N_PARAMS[p["model"]]
    prefill = p["prompts"] * p["in"] * 2 * params / (gpu_tflops * 1e12)
    decode_steps = p["prompts"] * max(p["out"] - 1, 0) / decode_batch
    return prefill + decode_steps * (2 * params) / (hbm_tbs * 1e12)


def project(rows: list[dict], bench, real, a) -> list[dict]:
    by = {r["stage"]: r for r in rows}
    cpu_gflops = by["matmul"]["gflops"]
    speedup = a.gpu_tflops * 1e3 / cpu_gflops
    fb, fr = stage_flops(bench), stage_flops(real)
    out = [{"stage": "corpus", "work": f"{real.corpus.max_tokens:,} tokens (CPU)",
            "projected_s": real.corpus.max_tokens / by["corpus_rate"]["stream_tokens_per_s"]}]
    for s in ("subject", "transcoder", "activations"):
        out.append({"stage": s, "work": f"{fr[s] / 1e12:,.0f} TFLOP",
                    "projected_s": by[s]["seconds"] * fr[s] / fb[s] / speedup})
    for s, p in llm_prompt_tokens(real).items():
        out.append({"stage": s, "work": f"{p['prompts']:,.0f} prompts x {p['in']:.0f}+{p['out']} tokens ({p['model']})",
                    "projected_s": llm_seconds(p, a.gpu_tflops, a.hbm_tbs, a.decode_batch)})
    subject_rate = by["subject"]["seconds"] / fb["subject"]  # CPU seconds per FLOP of plain forwards
    n_fwd = evaluate_forwards(real)
    ev_flops = n_fwd * real.corpus.n_eval * real.corpus.seq_len * forward_flops()
    out.append({"stage": "evaluate", "work": f"{n_fwd} forwards of the eval split",
                "projected_s": ev_flops * subject_rate / speedup})
    for r in out:
        r["projected_h"] = r["projected_s"] / 3600
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/pythia-shape", help="model, dataset and storage (reused when present)")
    ap.add_argument("--tokens", type=int, default=24_000, help="corpus token budget of the measured run")
    ap.add_argument("--tc-steps", type=int, default=4, help="transcoder steps (1,024 tokens each) of the measured run")
    ap.add_argument("--gpu-tflops", type=float, default=400.0, help="effective bf16 TFLOP/s of one GPU (H100: ~40%% of 989)")
    ap.add_argument("--hbm-tbs", type=float, default=3.35, help="GPU memory bandwidth, TB/s (H100 SXM)")
    ap.add_argument("--decode-batch", type=int, default=64, help="sequences decoded per step by vLLM")
    ap.add_argument("--_stage", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    work = Path(a.work)
    if a._stage:
        import logging

        import torch

        torch.set_num_threads(1)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
        res = run_one(a._stage, work, a.tokens, a.tc_steps)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        print(json.dumps(res))
        return 0
    from _common import report

    from nlrewrite_core.config import load_config

    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for stage in ["prepare", "matmul", "corpus_rate", *STAGES]:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--work", str(work), "--tokens", str(a.tokens),
                              "--tc-steps", str(a.tc_steps), "--_stage", stage], stdout=subprocess.PIPE, text=True)
        if out.returncode:
            print(f"stage {stage} failed (exit {out.returncode}); its log is above", file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
        print(json.dumps(rows[-1]), flush=True)
    bench, real = bench_config(work, a.tokens, a.tc_steps), load_config("pythia-160m")
    proj = project(rows, bench, real, a)
    measured = [{"stage": r["stage"], "cached": r.get("cached", ""), "seconds": r.get("seconds", r["wall_s"]),
                 "peak_rss_mib": r["peak_rss_mib"],
                 "detail": ", ".join(f"{k}={v}" for k, v in r.items()
                                     if k not in ("stage", "cached", "seconds", "peak_rss_mib", "wall_s"))}
                for r in rows]
    assumptions = {"gpu_tflops": a.gpu_tflops, "hbm_tbs": a.hbm_tbs, "decode_batch": a.decode_batch,
                   "chars_per_token": CHARS_PER_TOKEN, "cpu_matmul_gflops": rows[1]["gflops"]}
    report("pythia_shape_measured", measured, {"tokens": a.tokens, "tc_steps": a.tc_steps})
    print("\nprojection of the real pythia-160m run on one GPU,", json.dumps(assumptions))
    report("pythia_shape_projection", [{**r, "projected_s": round(r["projected_s"], 1),
                                        "projected_h": round(r["projected_h"], 3)} for r in proj],
           {"assumptions": assumptions, "measured": rows,
            "total_projected_h": round(sum(r["projected_h"] for r in proj), 2)})
    print(f"total projected: {sum(r['projected_h'] for r in proj):.1f} GPU-hours "
          "(simulate fans out over GPU workers: divide its share by their number)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
