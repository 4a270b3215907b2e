"""Latent-cache throughput vs the bare subject forward on the same tokens, in one run
(target: overhead <= 1.25x). Uses the tiny preset's shapes with random weights. The cache stops
the forward pass at the transcoder's layer, so it is also timed at the last layer (worst case).

    python benchmarks/latent_cache.py [--seqs 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from nlrewrite_core import activations, subject, transcoder_train  # noqa: E402
from nlrewrite_core.config import load_config  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = subject.build_model(cfg.subject, cfg.corpus.vocab_size, cfg.corpus.seq_len).eval()
    sae = transcoder_train.new_transcoder(cfg.subject.hidden_size, cfg.transcoder).eval()
    with torch.no_grad():
        sae.encoder.weight.normal_()
    tokens = np.random.default_rng(0).integers(0, cfg.corpus.vocab_size, size=(args.seqs, cfg.corpus.seq_len))
    seq_ids = np.arange(args.seqs)

    @torch.no_grad()
    def bare() -> None:
        for s in range(0, args.seqs, args.batch_size):
            model(input_ids=torch.as_tensor(tokens[s:s + args.batch_size]))

    def cache(layer: int) -> None:
        batches = list(activations.iter_latents(model, sae, layer, tokens, seq_ids, args.batch_size))
        pa.Table.from_batches(batches)

    last = cfg.subject.num_layers - 1
    bare(); cache(cfg.transcoder.layer)  # warm-up
    t_bare = best_of(bare, args.repeats)
    t_cache = best_of(lambda: cache(cfg.transcoder.layer), args.repeats)
    t_last = best_of(lambda: cache(last), args.repeats)
    n = tokens.size
    report("latent_cache", [
        {"what": "bare subject forward", "seconds": t_bare, "tokens_per_s": n / t_bare, "ratio_vs_bare": 1.0},
        {"what": f"latent cache, preset layer {cfg.transcoder.layer}", "seconds": t_cache,
         "tokens_per_s": n / t_cache, "ratio_vs_bare": t_cache / t_bare},
        {"what": f"latent cache, last layer {last} (worst case)", "seconds": t_last,
         "tokens_per_s": n / t_last, "ratio_vs_bare": t_last / t_bare},
    ], {"layer": cfg.transcoder.layer, "num_layers": cfg.subject.num_layers, "num_latents": cfg.transcoder.num_latents,
        "k": cfg.transcoder.k, "tokens": n, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
