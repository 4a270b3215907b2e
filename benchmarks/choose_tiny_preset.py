"""Choose the `tiny` preset: train the subject and transcoder on this machine and measure them.

Prints per-layer MLP-ablation costs, zero-ablation cost, CE recovered and timings, and writes
``benchmarks/results/choose_tiny_preset.json``.

    python benchmarks/choose_tiny_preset.py                      # the tiny preset as configured
    python benchmarks/choose_tiny_preset.py --overrides '{"subject": {"num_layers": 2}}' \
        --layers 0 1 --out benchmarks/results/candidate.json      # a candidate
    python benchmarks/choose_tiny_preset.py --determinism         # also: train micro twice, compare
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from nlrewrite_core import corpus, subject, transcoder, transcoder_train
from nlrewrite_core.config import load_config

RESULTS = Path(__file__).parent / "results" / "choose_tiny_preset.json"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two modules have bit-identical state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def check_determinism() -> dict[str, bool]:
    """Train the micro preset's subject and transcoder twice; compare weights bit for bit."""
    cfg = load_config("micro")
    table, tok = corpus.build_corpus(cfg.corpus)
    train = corpus.split_tokens(table, "train")
    models, saes = [], []
    for _ in range(2):
        m = subject.build_model(cfg.subject, tok.get_vocab_size(), cfg.corpus.seq_len)
        subject.train_subject(m, train, cfg.subject)
        X, Y = transcoder.collect_mlp_io(m, cfg.transcoder.layer, train[:200], 32)
        sae, _ = transcoder_train.train_transcoder(X, Y, cfg.transcoder)
        models.append(m)
        saes.append(sae)
    return {"subject_identical": same_weights(*models), "transcoder_identical": same_weights(*saes)}


def run(overrides: dict, layers: list[int] | None) -> dict:
    """Train subject (+ a transcoder per layer) for the tiny preset with overrides; return measurements."""
    cfg = load_config("tiny", overrides=overrides)
    res: dict = {"config": cfg.model_dump(include={"corpus", "subject", "transcoder"}),
                 "threads": torch.get_num_threads()}
    t = time.perf_counter()
    table, tok = corpus.build_corpus(cfg.corpus)
    res["corpus_s"] = time.perf_counter() - t
    train, ev = corpus.split_tokens(table, "train"), corpus.split_tokens(table, "eval")
    res["n_train_seq"], res["n_eval_seq"] = len(train), len(ev)
    V = tok.get_vocab_size()
    model = subject.build_model(cfg.subject, V, cfg.corpus.seq_len)
    res["subject_params"] = subject.num_params(model)
    res["subject_fit"] = subject.train_subject(model, train, cfg.subject)
    bs = cfg.evaluate.batch_size
    res["ce_clean"] = float(subject.token_ce(model, ev, bs).mean())
    res["ce_unigram"] = subject.unigram_ce(train, ev, V)
    res["ce_mlp_zero_by_layer"] = subject.mlp_ablation_costs(model, ev, bs)
    res["mlp_ablation_cost_by_layer"] = [c - res["ce_clean"] for c in res["ce_mlp_zero_by_layer"]]
    res["transcoders"] = {}
    for layer in layers if layers is not None else [cfg.transcoder.layer]:
        t = time.perf_counter()
        n_seq = max(1, cfg.transcoder.max_train_tokens // cfg.corpus.seq_len)
        X, Y = transcoder.collect_mlp_io(model, layer, train[:n_seq], bs)
        cache_s = time.perf_counter() - t
        tc_cfg = cfg.transcoder.model_copy(update={"layer": layer})
        sae, fit = transcoder_train.train_transcoder(X, Y, tc_cfg)
        ce = transcoder.transcoder_ce(model, layer, sae, ev, bs)
        ce["zero_ablation_cost"] = ce["ce_zero_ablation"] - ce["ce_clean"]
        ce["zero_ablation_cost_rel"] = ce["zero_ablation_cost"] / ce["ce_clean"]
        res["transcoders"][str(layer)] = {"cache_s": cache_s, "fit": fit, **ce,
                                          "total_s": cache_s + fit["wall_s"]}
    return res


def print_table(res: dict) -> None:
    """Human-readable summary of one run."""
    s = res["subject"] if "subject" in res else res["config"]["subject"]
    print(f"\nsubject {s}  params {res['subject_params']:,}")
    f = res["subject_fit"]
    print(f"subject train: {f['wall_s']:.1f} s, {f['tokens_per_s']:.0f} tokens/s, final loss {f['final_train_loss']:.3f}")
    print(f"eval CE clean {res['ce_clean']:.4f}   unigram {res['ce_unigram']:.4f}")
    print("layer  CE(MLP zeroed)  cost (nats)  cost/clean")
    for i, (c, d) in enumerate(zip(res["ce_mlp_zero_by_layer"], res["mlp_ablation_cost_by_layer"])):
        print(f"{i:5d}  {c:14.4f}  {d:11.4f}  {d / res['ce_clean']:9.1%}")
    print("layer  CE transcoder  CE zero-abl  zero-abl cost  recovered  FVU     dead   cache_s  train_s")
    for layer, r in res["transcoders"].items():
        print(f"{layer:>5}  {r['ce_transcoder']:13.4f}  {r['ce_zero_ablation']:11.4f}  "
              f"{r['zero_ablation_cost_rel']:12.1%}  {r['ce_recovered']:9.3f}  {r['fit']['fvu']:.4f}  "
              f"{r['fit']['dead_fraction']:.3f}  {r['cache_s']:7.1f}  {r['fit']['wall_s']:7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overrides", default="{}", help="JSON overrides of the tiny preset")
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="layers to fit transcoders on")
    ap.add_argument("--determinism", action="store_true", help="also train the micro preset twice")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res = run(json.loads(args.overrides), args.layers)
    if args.determinism:
        res["determinism"] = check_determinism()
    print_table(res)
    if "determinism" in res:
        print("determinism:", res["determinism"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
