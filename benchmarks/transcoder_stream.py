"""Streamed transcoder training (the stage since issue 14) against the in-memory reference it replaced
(every MLP input/output collected first, then the same init, schedule and loss), on the tiny preset's
subject: held-out and eval-split FVU, CE recovered, wall time and peak RSS, at several token budgets
(transcoder.max_train_tokens). Each run is its own process, so peak RSS is that run's.

Needs the tiny preset's corpus and subject in --storage (run them first, e.g. `nlrewrite run` or
benchmarks/paper_shape.py --preset tiny), or builds them (the subject takes minutes).

    python benchmarks/transcoder_stream.py --storage /tmp/tiny --budgets 100000,400000
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


def train_once(storage: str, mode: str, budget: int) -> dict:
    import numpy as np
    import torch

    from nlrewrite_core import artifacts, stages, transcoder as tc, transcoder_train as tc_train
    from nlrewrite_core.config import load_config
    from nlrewrite_core.storage import Store

    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides={"transcoder": {"max_train_tokens": budget, "checkpoint_every": 0}})
    store, keys = Store(storage), stages.plan(cfg)
    stages.run("corpus", store, cfg, keys)
    stages.run("subject", store, cfg, keys)
    model = artifacts.load_subject(store, keys)
    layer, bs = cfg.transcoder.layer, cfg.evaluate.batch_size
    _, train = artifacts.load_tokens(store, keys, ("train",))
    train = train[: max(1, min(len(train), budget // train.shape[1]))].astype(np.int32)
    t0 = time.perf_counter()
    if mode == "in_memory":
        X, Y = tc.collect_mlp_io(model, layer, train, bs)
        sae, m = tc_train.train_transcoder(X, Y, cfg.transcoder)
        del X, Y
    else:
        sae, m = tc_train.train_streaming(model, layer, train, cfg.transcoder, bs)
    seconds = time.perf_counter() - t0
    _, eval_tokens = artifacts.load_tokens(store, keys, ("eval",))
    Xe, Ye = tc.collect_mlp_io(model, layer, eval_tokens, bs)
    fit = tc.evaluate_fit(sae, Xe, Ye)
    ce = tc.transcoder_ce(model, layer, sae, eval_tokens, bs)
    return {"mode": mode, "budget": budget, "train_tokens": m["train_tokens"], "held_out_fvu": m["fvu"],
            "eval_fvu": fit["fvu"], "eval_dead": fit["dead_fraction"], "ce_recovered": ce["ce_recovered"],
            "train_s": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--budgets", default="100000,400000", help="transcoder.max_train_tokens values")
    ap.add_argument("--modes", default="streaming,in_memory")
    ap.add_argument("--_run", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._run:
        mode, budget = a._run.split(":")
        res = train_once(a.storage, mode, int(budget))
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        print(json.dumps(res))
        return 0
    from _common import report

    rows = []
    for budget in a.budgets.split(","):
        for mode in a.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--storage", a.storage, "--_run", f"{mode}:{budget}"],
                                 stdout=subprocess.PIPE, text=True)
            if out.returncode:
                print(f"{mode} at {budget} failed (exit {out.returncode})", file=sys.stderr)
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
            print(json.dumps(rows[-1]), flush=True)
    report("transcoder_stream", rows, {"storage": a.storage})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
