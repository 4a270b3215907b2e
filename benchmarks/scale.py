"""Scale benchmark (issue 6): time and peak RSS of the simulate and calibrate stages at fractions
of the paper's shape (32,768 latents x 10,000 calib contexts = 327M calib predictions), run
through the same library code as the pipeline's stages (simulate_shard_blocks + BlockWriter, as in
nlrewrite_core.stages.simulate.simulate_shard; calibrate_stream.stream_calibration, as in
nlrewrite_core.stages.calibrate.calibrate_predictions).

The upstream artifacts are synthetic, at the `paper-shape` preset's shapes: unit-norm context and
explanation embeddings (dim 384, all-MiniLM-L6-v2's), per-latent max activations, and sparse true
calib activations with k=32 of 32,768 latents active per context (the latents of a point are the
first fraction of them). A point scales the number of latents (so predictions scale linearly);
contexts stay at the paper's: 10,000 calib, and 1,000 eval (one per sentence, `positions: last`)
unless --eval-contexts says otherwise (the pipeline today simulates every eval position:
1,000 sentences x 50 = 50,000).

Each stage runs in its own process so that its peak RSS is its own. Baselines measured in the same
run: the machine's float32 matmul rate on the simulator's block shape (the embedding simulator's
work is two such products per block).

    python benchmarks/scale.py --quick            # the 1/16 point (2,048 latents), < 2 minutes
    python benchmarks/scale.py --points 1/16,1/4  # growth exponent over several points
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nlrewrite_core.stages import shard_ranges  # noqa: E402  (after the path set-up)

PAPER_LATENTS, PAPER_K, PAPER_CALIB, DIM = 32768, 32, 10_000, 384
SHARD_LATENTS, CONTEXT_BLOCK, N_KNOTS = 512, 8192, 257
METHODS = ["none", "quantile"]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stage_setup(d: Path, n_latents: int, n_eval: int, n_calib: int = PAPER_CALIB) -> dict:
    rng = np.random.default_rng(0)
    n_ctx = n_calib + n_eval
    # Context embeddings share a direction with the explanations, so similarities are mostly
    # positive and spread like real ones (not all clipped to 0).
    common = _unit(rng, 1)
    win = _unit(rng, n_ctx) + 1.5 * common
    tok = _unit(rng, n_ctx) + 1.5 * common
    expl = _unit(rng, n_latents) + 1.5 * common
    for name, a in (("win", win), ("tok", tok), ("expl", expl)):
        np.save(d / f"{name}.npy", (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32))
    np.save(d / "max_act", rng.uniform(1, 10, n_latents).astype(np.float32))
    np.save(d / "cids", np.arange(n_ctx, dtype=np.int64) * 3)  # ids with gaps, as (seq_id, pos) give
    lat = np.stack([rng.choice(PAPER_LATENTS, PAPER_K, replace=False) for _ in range(n_calib)])
    rows = np.repeat(np.arange(n_calib), PAPER_K)
    keep = lat.reshape(-1) < n_latents
    np.save(d / "true_rows", rows[keep])
    np.save(d / "true_lat", lat.reshape(-1)[keep])
    np.save(d / "true_act", rng.exponential(2.0, keep.sum()).astype(np.float32))
    return {}


def matmul_rate(n: int = CONTEXT_BLOCK, m: int = SHARD_LATENTS, reps: int = 5) -> float:
    """float32 GFLOP/s of [n, DIM] @ [DIM, m], best of `reps`."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(n, DIM)).astype(np.float32), rng.normal(size=(DIM, m)).astype(np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n * m * DIM / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def stage_simulate(d: Path, n_latents: int, n_eval: int, n_calib: int = PAPER_CALIB) -> dict:
    import pyarrow.fs as pafs

    from nlrewrite_core import simulate as S

    win, tok, expl = (np.load(d / f"{n}.npy") for n in ("win", "tok", "expl"))
    max_act, cids = np.load(d / "max_act.npy"), np.load(d / "cids.npy")
    base_rate = matmul_rate()
    compute = 0.0
    real_block = S.simulate_block

    def timed_block(*a, **k):
        nonlocal compute
        t = time.perf_counter()
        out = real_block(*a, **k)
        compute += time.perf_counter() - t
        return out

    S.simulate_block = timed_block
    rows = size = 0
    fs = pafs.LocalFileSystem()
    ranges = shard_ranges(n_latents, SHARD_LATENTS)  # the registry imports no torch: its memory is not the stage's
    for i, (lo, hi) in enumerate(ranges):
        w = S.BlockWriter(fs, str(d / "simulate" / f"shard-{i:05d}" / "predictions.parquet"))
        for block in S.simulate_shard_blocks(cids, win, tok, np.arange(lo, hi), expl[lo:hi], max_act[lo:hi], 0.5,
                                             CONTEXT_BLOCK):
            w.write(block)
        r, _, s = w.close()
        rows, size = rows + r, size + s
    flops = 2 * 2 * len(cids) * n_latents * DIM  # window and token products
    return {"predictions": rows, "bytes_per_prediction": size / rows, "disk_mib": size / 2**20,
            "simulate_compute_s": compute, "simulate_gflops": flops / compute / 1e9, "matmul_gflops": base_rate,
            "ratio_vs_matmul": flops / compute / 1e9 / base_rate}


def stage_calibrate(d: Path, n_latents: int, n_eval: int, n_calib: int = PAPER_CALIB) -> dict:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from nlrewrite_core import calibrate_stream as CS
    from nlrewrite_core import simulate as S
    from nlrewrite_core.simulate import CALIBRATED_SCHEMA

    cids = np.load(d / "cids.npy")
    calib_cids, eval_cids = cids[:n_calib], cids[n_calib:]
    true = CS.SparseColumns(np.load(d / "true_rows.npy"), np.load(d / "true_lat.npy"), np.load(d / "true_act.npy"),
                           n_calib)
    files = sorted((d / "simulate").glob("shard-*/predictions.parquet"))
    w = S.BlockWriter(pafs.LocalFileSystem(), str(d / "calibrated.parquet"), schema=CALIBRATED_SCHEMA)
    t0 = time.perf_counter()
    res = CS.stream_calibration((CS.ShardReader(pq.ParquetFile(f)) for f in files),
                               METHODS, N_KNOTS, calib_cids, eval_cids, true, w.write)
    w.close()
    total = time.perf_counter() - t0
    q = res.fit_seconds["quantile"]
    return {"calib_predictions": res.n_fit, "calibrated_rows": w.rows,
            "quantile_fit_predictions_per_s": res.n_fit / q, "stage_calib_predictions_per_s": res.n_fit / total}


STAGES = {"setup": stage_setup, "simulate": stage_simulate, "calibrate": stage_calibrate}


def run_child(stage: str, d: Path, n_latents: int, n_eval: int, n_calib: int = PAPER_CALIB) -> dict:
    """Run one stage in a fresh process; its result with its own peak RSS (MiB) and seconds."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--_stage", stage, "--_dir", str(d), "--_latents", str(n_latents),
                          "--eval-contexts", str(n_eval), "--calib-contexts", str(n_calib)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"stage {stage} failed:\n{out.stderr[-4000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the 1/16 point")
    ap.add_argument("--points", default="1/16,1/4,1", help="fractions of the paper's 32,768 latents")
    ap.add_argument("--eval-contexts", type=int, default=1000)
    ap.add_argument("--calib-contexts", type=int, default=PAPER_CALIB)
    ap.add_argument("--workdir", default=None, help="where shards go (default: a temporary directory)")
    ap.add_argument("--_stage", help=argparse.SUPPRESS)
    ap.add_argument("--_dir", help=argparse.SUPPRESS)
    ap.add_argument("--_latents", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._stage:
        import nlrewrite_core.calibrate_stream  # noqa: F401  (imports are not the stage's time; their memory is)
        import nlrewrite_core.simulate  # noqa: F401

        t = time.perf_counter()
        res = STAGES[a._stage](Path(a._dir), a._latents, a.eval_contexts, a.calib_contexts)
        print(json.dumps({**res, "stage_s": time.perf_counter() - t, "peak_rss_mib": _peak_rss_mib()}))
        return 0
    points = [Fraction(1, 16)] if a.quick else [Fraction(p) for p in a.points.split(",")]
    rows, t_all = [], time.perf_counter()
    for f in points:
        n_lat = int(PAPER_LATENTS * f)
        with tempfile.TemporaryDirectory(dir=a.workdir, prefix="nlrewrite-scale-") as tmp:
            d = Path(tmp)
            for stage in STAGES:
                r = run_child(stage, d, n_lat, a.eval_contexts, a.calib_contexts)
                n_pred = n_lat * (a.calib_contexts + a.eval_contexts)
                rows.append({"point": str(f), "latents": n_lat, "contexts": a.calib_contexts + a.eval_contexts,
                             "stage": stage, "predictions": n_pred, "seconds": round(r["stage_s"], 2),
                             "peak_rss_mib": round(r["peak_rss_mib"], 1),
                             "per_s": round(n_pred / r["stage_s"]) if stage != "setup" else 0,
                             **{k: v for k, v in r.items() if k not in ("stage_s", "peak_rss_mib", "wall_s")}})
    # Growth exponent per stage: time ~ size^b, least squares on log-log over the points.
    exponents = {}
    for stage in ("simulate", "calibrate"):
        pts = [(r["predictions"], r["seconds"]) for r in rows if r["stage"] == stage]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([max(p[1], 1e-6) for p in pts])
            exponents[stage] = float(np.polyfit(x, y, 1)[0])
    from _common import report

    table = [{k: r[k] for k in ("point", "latents", "contexts", "stage", "predictions", "seconds", "peak_rss_mib",
                                "per_s")} for r in rows]
    name = ("scale_quick" if a.quick else "scale") + (f"_eval{a.eval_contexts}" if a.eval_contexts != 1000 else "") \
        + (f"_calib{a.calib_contexts}" if a.calib_contexts != PAPER_CALIB else "")
    report(name, table,
           {"details": rows, "growth_exponents": exponents, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "cpus": os.cpu_count(), "total_s": time.perf_counter() - t_all,
            "shapes": {"paper_latents": PAPER_LATENTS, "k": PAPER_K, "calib_contexts": a.calib_contexts,
                       "eval_contexts": a.eval_contexts, "dim": DIM, "shard_latents": SHARD_LATENTS,
                       "context_block": CONTEXT_BLOCK, "methods": METHODS, "n_knots": N_KNOTS}})
    for r in rows:
        extra = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                 if k not in table[0] and k != "wall_s"}
        if extra:
            print(f"{r['point']} {r['stage']}: {extra}")
    if exponents:
        print("growth exponents (time ~ predictions^b):", {k: round(v, 3) for k, v in exponents.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
