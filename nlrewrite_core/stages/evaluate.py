"""The evaluate stage: next-token CE of every condition (clean, transcoder, ablations, simulated latents by
calibration, selection and fraction, the strict all-latents condition), per-latent metrics and their
relation to the detection score, the specificity oracle, and the sample-size ablations (Figure A2).
The building blocks (patching, CE, metrics) are in nlrewrite_core.evaluate."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import artifacts as art, evaluate as eval_lib, progress, stages, subject as subject_lib, transcoder as tc_lib
from ..config import RewriteConfig
from ..manifest import ArtifactRef
from ..quantile import TrueSample
from ..storage import Store
from .calibrate import calibrate_shards

log = logging.getLogger("nlrewrite")


def raw_thresholds(max_act: np.ndarray, digit: float) -> np.ndarray:
    """Per-latent activity threshold of raw predictions: the level of simulator digit `digit`
    (prediction = E * max_act / 9, so digit d is at d * max_act / 9)."""
    return np.asarray(max_act, dtype=np.float64) * digit / 9.0


def evaluate_rewrite(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """CE of every condition (both position sets), per-latent metrics and their relation to the
    detection score, the specificity oracle, and the calibration sample-size ablation."""
    if ref := stages.reuse(store, "evaluate", keys):
        return ref
    w = stages.writer(store, "evaluate", cfg, keys)
    ev = cfg.evaluate
    device = art.device(cfg)
    model, sae = art.load_subject(store, keys, device), art.load_sae(store, keys, device)
    layer, seq_len, num_latents = cfg.transcoder.layer, cfg.corpus.seq_len, sae.num_latents
    seq_ids, tokens = art.load_tokens(store, keys, ("eval",))
    cids = art.sim_context_ids(cfg, "eval", seq_ids)
    cidx = art.context_index(cids)
    true = art.true_activations(store, keys, "eval", seq_len, cids, num_latents)
    # simulate.eval_positions 'last': one simulated context per sentence, patched at that position alone.
    position = eval_lib.scored_last_position(seq_len) if cfg.simulate.eval_positions == "last" else None
    per_row = 1 if position is not None else seq_len
    cal = art.read_table(store, "calibrate", keys["calibrate"], "calibrated")
    preds: dict[str, np.ndarray] = {}
    for method in cfg.calibrate.methods:
        t = cal.filter(pc.field("calibration") == method)
        preds[method] = art.dense(t.column("context_id").to_numpy(), t.column("latent").to_numpy(),
                              t.column("pred").to_numpy(), cidx, (len(cids), num_latents), fill=np.nan)
    del cal
    sc = art.read_table(store, "score", keys["score"], "scores")
    scores = np.full(num_latents, np.nan)
    sv = sc.column("score").to_numpy(zero_copy_only=False).astype(float)
    scores[sc.column("latent").to_numpy()] = sv
    live = np.unique(art.read_table(store, "calibrate", keys["calibrate"], "calibration", columns=["latent"])
                     .column("latent").to_numpy())
    # Latents active on some patched eval context: the ones whose true value can matter. A condition
    # that leaves any of them unsimulated keeps true information: its `n_true_kept` says how much.
    active_eval = np.flatnonzero((true > 0).any(axis=0))
    bs = ev.batch_size
    primary = ev.positions
    positions = [primary] + [p for p in eval_lib.POSITIONS if p != primary and position is None]

    # The CE runs planned, for the progress bar (an upper bound: a selection seen twice runs once).
    methods = list(cfg.calibrate.methods)
    n_fitted = len([m for m in methods if m != "none"])
    n_true_sizes = len(ev.true_sample_sizes) if "quantile" in methods and cfg.calibrate.true_sample == "cache" else 0
    planned = (5 + len(methods) * (1 + sum(len(ev.fractions) * (len(ev.random_seeds) if s == "random" else 1)
                                           for s in ev.selections))
               + len(ev.oracle_fp_rates) * len(ev.oracle_fn_rates)
               + len(ev.sample_size_fractions) * (len(ev.sample_sizes) * n_fitted + n_true_sizes))
    ran = [0]

    def ce_of(fn_for_rows) -> dict[str, np.ndarray]:
        """Per-sequence CE (each position set) of one forward pass over the eval split with the MLP patched."""
        ce = eval_lib.ce_with(model, layer, tokens, bs, fn_for_rows, position)
        ran[0] += 1
        progress.advance("evaluate", min(ran[0], planned), planned, "CE runs")
        return {p: eval_lib.per_sequence(ce, p) for p in positions}

    def patch_with(values: np.ndarray, sel: np.ndarray, what: str):
        """An MLP replacement patching dense values [n_ctx, len(sel)] (rows in context order) from
        evaluate.patch_base. A failed prediction (NaN) is patched as 0: it must be counted first."""
        return eval_lib.patch_rows(sae, np.nan_to_num(values, nan=0.0), sel, per_row, what, ev.patch_base)

    def rows_for(condition: str, ce: dict[str, np.ndarray], **kw: Any) -> list[dict[str, Any]]:
        return [eval_lib.ce_row(condition, ce[p], zero[p], ev.n_bootstrap, positions=p, patch_base=ev.patch_base,
                                **kw) for p in positions]

    def kept(sel: np.ndarray) -> int:
        return int(np.setdiff1d(active_eval, sel, assume_unique=True).size)

    t0 = time.perf_counter()
    n_runs = 0
    zero = ce_of(lambda r: tc_lib.skip_fn(sae))
    mean_acts = torch.as_tensor(art.calib_latent_means(store, keys, num_latents), device=device)
    base = {
        "clean": (ce_of(None), None),
        "transcoder": (ce_of(lambda r: eval_lib.flat(lambda x: eval_lib.patched_output(sae, x))), len(active_eval)),
        "zero_ablation": (zero, 0),
        "mlp_ablation": (ce_of(lambda r: subject_lib.zero_mlp), None),
        "mean_ablation": (ce_of(lambda r: eval_lib.flat(lambda x: eval_lib.mean_ablation_output(sae, x, mean_acts))),
                          0),
    }
    n_runs += len(base)
    rows = [r for name, (v, n_kept) in base.items() for r in rows_for(name, v, n_true_kept=n_kept)]
    done: dict[tuple[str, bytes], dict[str, np.ndarray]] = {}  # the same latents twice (e.g. fraction 1): one run
    n_failed_patched: dict[str, int] = {}
    all_latents = np.arange(num_latents)
    for method in cfg.calibrate.methods:
        n_failed_patched[method] = int(np.isnan(preds[method][:, live]).sum())
        for selection in ev.selections:
            for seed in (ev.random_seeds if selection == "random" else [-1]):
                for frac in ev.fractions:
                    sel = eval_lib.select_latents(live, scores[live], frac, selection, seed)
                    key = (method, sel.tobytes())
                    if key not in done:
                        done[key] = ce_of(patch_with(preds[method][:, sel], sel, f"{method} predictions"))
                        n_runs += 1
                    rows += rows_for("simulated", done[key], selection=selection, fraction=frac, calibration=method,
                                     seed=seed, n_latents=len(sel), n_true_kept=kept(sel))
        # Strict accounting of "all latents simulated": every latent is replaced; a latent without a
        # calibrated prediction (unexplained, dead on the explain split, too many failed answers)
        # predicts 0, so no true value is left (the paper's fraction 1.0 patches only its explained
        # latents; the `simulated` row at fraction 1.0 is that accounting).
        strict = np.where(np.isnan(preds[method]), 0.0, preds[method]).astype(np.float32)
        ce = ce_of(patch_with(strict, all_latents, f"{method} predictions (strict)"))
        n_runs += 1
        rows += rows_for("simulated_strict", ce, selection="all", fraction=1.0, calibration=method,
                         n_latents=num_latents, n_true_kept=0)
        del strict
    t_sweep = time.perf_counter() - t0
    log.info("evaluate: %d CE runs (sweep) in %.1fs", n_runs, t_sweep)
    ce_table = pa.Table.from_pylist(rows, schema=eval_lib.CE_SCHEMA)

    # Per-latent metrics: activity at a stated threshold, and threshold-free rank metrics.
    max_act = art.max_act(store, keys, num_latents)
    metric_rows, relation_rows = [], []
    true_live = true[:, live]
    for method in cfg.calibrate.methods:
        pred_live = preds[method][:, live]
        if method == "none":
            thr = raw_thresholds(max_act[live], ev.raw_active_digit)
            rule = f"pred > max_act * {ev.raw_active_digit:g} / 9 (raw: simulator digit > {ev.raw_active_digit:g})"
        else:
            thr = np.full(len(live), ev.active_threshold)
            rule = f"pred > {ev.active_threshold:g}"
        # A failed prediction (NaN) is left out of its latent's metrics, never counted as inactive.
        m = eval_lib.per_column(eval_lib.activity_metrics, pred_live, true_live, thr)
        rk = eval_lib.per_column(eval_lib.rank_metrics, pred_live, true_live)
        for j, lat in enumerate(live):
            metric_rows.append({"latent": int(lat), "calibration": method, "detection_score": scores[lat],
                                "specificity": m["specificity"][j], "sensitivity": m["sensitivity"][j],
                                "precision": m["precision"][j], "n_true_active": int(m["n_true_active"][j]),
                                "threshold": float(thr[j]), "threshold_rule": rule,
                                "spearman": rk["spearman"][j], "auroc": rk["auroc"][j]})
        for metric, values in (("specificity", m["specificity"]), ("sensitivity", m["sensitivity"]),
                               ("precision", m["precision"]), ("spearman", rk["spearman"]), ("auroc", rk["auroc"])):
            bins, rho, n_used = eval_lib.score_relation(scores[live], np.asarray(values, float), ev.n_score_bins)
            for b in bins:
                relation_rows.append({"calibration": method, "metric": metric, **b, "rho": rho,
                                      "n_latents_total": n_used, "threshold_rule": rule})

    # The oracle: true activations with injected false positives / negatives, all live latents patched.
    t1 = time.perf_counter()
    calib_acts = art.read_table(store, "activations", keys["activations"], "activations", columns=["latent", "act"],
                        filters=pc.field("split") == "calib")
    pool = eval_lib.ValuePool(calib_acts.column("latent").to_numpy(), calib_acts.column("act").to_numpy(), num_latents)
    del calib_acts
    oracle_rows = []
    for i_fn, fn_rate in enumerate(ev.oracle_fn_rates):
        for i_fp, fp_rate in enumerate(ev.oracle_fp_rates):
            rng = np.random.default_rng([ev.oracle_seed, i_fn, i_fp])
            values, c = eval_lib.inject_errors(true_live, live, fp_rate, fn_rate, pool, rng)
            ce = ce_of(patch_with(values, live, "oracle values"))
            n_runs += 1
            spec = c["tn"] / max(c["tn"] + c["fp"], 1)
            sens = c["tp"] / max(c["tp"] + c["fn"], 1)
            for r in rows_for("oracle", ce, selection="all", fraction=1.0, calibration="oracle", n_latents=len(live)):
                oracle_rows.append({"fp_rate": fp_rate, "fn_rate": fn_rate, "specificity": spec, "sensitivity": sens,
                                    **{k: r[k] for k in ("positions", "n_latents", "ce_mean", "ce_lo", "ce_hi", "n",
                                                         "delta_zero_mean", "delta_zero_lo", "delta_zero_hi")},
                                    **{f"n_{k}": v for k, v in c.items()}})
    zero_means = {p: float(zero[p].mean()) for p in positions}
    crossings = {}
    for p in positions:
        for fn_rate in ev.oracle_fn_rates:
            sub = [r for r in oracle_rows if r["positions"] == p and r["fn_rate"] == fn_rate]
            x = eval_lib.crossing_specificity(
                np.array([r["specificity"] for r in sub]), np.array([r["ce_mean"] for r in sub]), zero_means[p])
            crossings[f"{p}/fn={fn_rate:g}"] = None if math.isnan(x) else x  # None: no crossing (JSON-safe)
    t_oracle = time.perf_counter() - t1
    log.info("evaluate: oracle %d runs in %.1fs; specificity where CE crosses zero-ablation: %s",
             len(ev.oracle_fp_rates) * len(ev.oracle_fn_rates), t_oracle, crossings)

    # Sample-size ablation (Figure A2): maps fit on nested subsets of the calib sequences.
    t2 = time.perf_counter()
    size_rows = _sample_size_ablation(store, cfg, keys, live, scores, true, cids, ce_of, patch_with, rows_for,
                                      num_latents)
    n_runs += len(size_rows) // max(len(positions), 1)
    t_sizes = time.perf_counter() - t2

    progress.advance("evaluate", planned, planned, "CE runs")
    w.table("ce", ce_table)
    w.table("latent_metrics", pa.Table.from_pylist(metric_rows))
    w.table("score_relation", pa.Table.from_pylist(relation_rows, schema=SCORE_RELATION_SCHEMA))
    w.table("oracle", pa.Table.from_pylist(oracle_rows, schema=ORACLE_SCHEMA))
    w.table("sample_size", pa.Table.from_pylist(size_rows, schema=SAMPLE_SIZE_SCHEMA))
    return w.finish(metrics={"n_conditions": len(rows), "positions": primary, "all_positions": positions,
                             "patch_base": ev.patch_base, "n_live_latents": int(len(live)),
                             "n_active_eval_latents": int(len(active_eval)),
                             "n_failed_patched_as_zero": n_failed_patched,
                             "n_sequences": len(seq_ids), "n_ce_runs": n_runs,
                             "oracle_crossing_specificity": crossings,
                             "seconds": {"sweep": round(t_sweep, 1), "oracle": round(t_oracle, 1),
                                         "sample_size": round(t_sizes, 1)}})


SCORE_RELATION_SCHEMA = pa.schema([
    ("calibration", pa.string()), ("metric", pa.string()), ("bin", pa.int32()), ("score_lo", pa.float64()),
    ("score_hi", pa.float64()), ("score_mean", pa.float64()), ("n_latents", pa.int64()), ("mean", pa.float64()),
    ("rho", pa.float64()), ("n_latents_total", pa.int64()), ("threshold_rule", pa.string()),
])


ORACLE_SCHEMA = pa.schema([
    ("fp_rate", pa.float64()), ("fn_rate", pa.float64()), ("specificity", pa.float64()), ("sensitivity", pa.float64()),
    ("positions", pa.string()), ("n_latents", pa.int32()), ("ce_mean", pa.float64()), ("ce_lo", pa.float64()),
    ("ce_hi", pa.float64()), ("n", pa.int64()), ("delta_zero_mean", pa.float64()), ("delta_zero_lo", pa.float64()),
    ("delta_zero_hi", pa.float64()), ("n_tp", pa.int64()), ("n_fn", pa.int64()), ("n_fp", pa.int64()),
    ("n_tn", pa.int64()),
])


SAMPLE_SIZE_SCHEMA = pa.schema([
    ("varied", pa.string()), ("calibration", pa.string()), ("calib_fraction", pa.float64()),
    ("n_calib_sequences", pa.int32()), ("n_calib_contexts", pa.int64()), ("true_fraction", pa.float64()),
    ("n_true_tokens", pa.int64()), ("fraction", pa.float64()), ("n_latents", pa.int32()),
    ("positions", pa.string()), ("ce_mean", pa.float64()), ("ce_lo", pa.float64()), ("ce_hi", pa.float64()),
    ("n", pa.int64()), ("delta_zero_mean", pa.float64()), ("delta_zero_lo", pa.float64()),
    ("delta_zero_hi", pa.float64()), ("specificity", pa.float64()), ("sensitivity", pa.float64()),
    ("threshold", pa.float64()), ("n_failed", pa.int64()),
])
"""The sample-size ablations (Figure A2): `varied` is `calib_predictions` (the number of calib
predictions each map is fit on, the true sample fixed: the paper's 1K vs 10K) or `true_sample` (the
size of the true sample that `quantile` maps onto, the calib predictions fixed)."""


def calib_subsets(n_sequences: int, sizes: list[float], seed: int = 0) -> list[tuple[float, np.ndarray]]:
    """Nested subsets of n sequences (row indices, sorted) for each size fraction: one permutation,
    its first max(1, round(size * n)) entries."""
    perm = np.random.default_rng(seed).permutation(n_sequences)
    return [(s, np.sort(perm[:max(1, min(n_sequences, round(s * n_sequences)))])) for s in sizes]


def _sample_size_ablation(store: Store, cfg: RewriteConfig, keys: dict[str, str], live: np.ndarray,
                          scores: np.ndarray, true_eval: np.ndarray, eval_cids: np.ndarray, ce_of, patch_with,
                          rows_for, num_latents: int) -> list[dict[str, Any]]:
    """CE (top selection) and mean specificity/sensitivity with calibration maps fit on subsets, the
    paper's way (Figure A2): (1) subsets of the calib sequences' predictions with the true sample
    fixed, for every method except `none` (which fits nothing); (2) subsets of the true sample's
    sequences with every calib prediction, for `quantile` (the one method that maps onto the true
    sample; calibrate.true_sample 'cache' only). Each fit streams over the simulation shards as the
    calibrate stage does (one shard in memory)."""
    ev, seq_len = cfg.evaluate, cfg.corpus.seq_len
    methods: list[str] = [m for m in cfg.calibrate.methods if m != "none"]
    if not methods:
        return []
    calib_seq = art.load_tokens(store, keys, ("calib",))[0]
    all_calib = art.sim_context_ids(cfg, "calib", calib_seq)
    cached = cfg.calibrate.true_sample == "cache"
    sample, m_all = art.true_sample(store, keys, seq_len) if cached else (None, len(all_calib))
    eidx = art.context_index(eval_cids)
    plans: list[tuple[str, list[str], float, np.ndarray, float, TrueSample | None, int]] = []
    for size, seq_rows in (calib_subsets(len(calib_seq), ev.sample_sizes) if ev.sample_sizes else []):
        calib_cids = art.sim_context_ids(cfg, "calib", calib_seq[seq_rows])
        plans.append(("calib_predictions", methods, size, calib_cids, 1.0, sample,
                      m_all if cached else len(calib_cids)))
    if cached and "quantile" in methods and ev.true_sample_sizes:
        seqs = art.true_sample_sequences(store, keys)
        for size, rows in calib_subsets(len(seqs), ev.true_sample_sizes, seed=1):
            sub, m = art.true_sample(store, keys, seq_len, seqs[rows]) if size < 1 else (sample, m_all)
            plans.append(("true_sample", ["quantile"], 1.0, all_calib, size, sub, m))
    out = []
    for varied, meths, size, calib_cids, true_size, smp, m in plans:
        preds = {m_: np.full((len(eval_cids), num_latents), np.nan, dtype=np.float32) for m_ in meths}

        def collect(t: pa.Table, preds: dict[str, np.ndarray] = preds) -> None:  # this plan's arrays
            m_ = t.column("calibration")[0].as_py()
            preds[m_][eidx[t.column("context_id").to_numpy()], t.column("latent").to_numpy()] = \
                t.column("pred").to_numpy()

        res = calibrate_shards(store, cfg, keys, calib_cids, eval_cids, meths, collect, smp)
        fitted = np.concatenate(res.latents) if res.latents else np.zeros(0, np.int64)
        use = np.intersect1d(live, fitted)  # a subset can leave a latent without a calib prediction
        for method in meths:
            pred = preds[method]
            mt = eval_lib.per_column(eval_lib.activity_metrics, pred[:, use], true_eval[:, use], ev.active_threshold)
            spec, sens = float(np.nanmean(mt["specificity"])), float(np.nanmean(mt["sensitivity"]))
            for frac in ev.sample_size_fractions:
                sel = eval_lib.select_latents(use, scores[use], frac, "top", -1)
                n_failed = int(np.isnan(pred[:, sel]).sum())
                ce = ce_of(patch_with(pred[:, sel], sel, f"{method} predictions ({varied} subset)"))
                for r in rows_for("simulated", ce, selection="top", fraction=frac, calibration=method,
                                  n_latents=len(sel)):
                    out.append({"varied": varied, "calibration": method, "calib_fraction": size,
                                "n_calib_sequences": len(calib_cids) if cfg.simulate.eval_positions == "last"
                                else len(calib_cids) // seq_len,
                                "n_calib_contexts": len(calib_cids), "true_fraction": true_size, "n_true_tokens": m,
                                "fraction": frac, "n_latents": len(sel),
                                **{k: r[k] for k in ("positions", "ce_mean", "ce_lo", "ce_hi", "n", "delta_zero_mean",
                                                     "delta_zero_lo", "delta_zero_hi")},
                                "specificity": spec, "sensitivity": sens, "threshold": ev.active_threshold,
                                "n_failed": n_failed})
    return out
