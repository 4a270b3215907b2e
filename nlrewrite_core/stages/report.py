"""The report stage: the HTML report and its figures from the evaluate stage's tables (nlrewrite_core.report)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from .. import artifacts as art, report as report_lib, stages
from ..config import RewriteConfig
from ..figures import ALL_FIGURES
from ..manifest import ArtifactRef
from ..storage import Store

log = logging.getLogger("nlrewrite")


def _example_latents(store: Store, keys: dict[str, str], cfg: RewriteConfig, lm: Any, preds: dict[str, np.ndarray],
                     true: np.ndarray, tokens: np.ndarray, ctx_row: np.ndarray, ctx_pos: np.ndarray,
                     n_examples: int = 4) -> list[dict[str, Any]]:
    """A few example latents for the report: the best, two middle and the worst by detection score
    among latents active on eval, with explanation, raw-prediction metrics, top eval contexts and
    (true, predicted) activations per method. ``preds`` holds dense [n_ctx, n_latents] arrays; context
    row i is position ctx_pos[i] of token row ctx_row[i]."""
    raw = lm[lm["calibration"] == "none"] if "none" in set(lm["calibration"]) else lm.drop_duplicates("latent")
    raw = raw[(raw["n_true_active"] > 0) & np.isfinite(raw["detection_score"].astype(float))]
    if raw.empty:
        return []
    raw = raw.sort_values(["detection_score", "latent"], ascending=[False, True])
    picks = sorted({int(round(q * (len(raw) - 1))) for q in np.linspace(0, 1, n_examples)})
    chosen = raw.iloc[picks]
    expl = art.read_table(store, "explain", keys["explain"], "explanations").to_pandas().set_index("latent")
    tokenizer = art.load_tokenizer(store, keys)
    out = []
    for _, r in chosen.iterrows():
        lat = int(r["latent"])
        col = true[:, lat]
        top = np.argsort(-col, kind="stable")[:3]
        contexts = []
        for row in top[col[top] > 0]:
            s, pos = int(ctx_row[row]), int(ctx_pos[row])
            left = tokenizer.decode(tokens[s, max(0, pos - 12):pos].tolist())
            target = tokenizer.decode([int(tokens[s, pos])])
            contexts.append(f"{col[row]:.3f}: …{left}[{target}]")
        out.append({"latent": lat, "score": float(r["detection_score"]),
                    "explanation": str(expl["explanation"].get(lat, "")) if lat in expl.index else "",
                    "metrics": {k: float(r[k]) for k in ("spearman", "auroc", "specificity", "sensitivity") if k in r},
                    "top_contexts": contexts, "true": col,
                    "preds": {m: p[:, lat] for m, p in preds.items()}})
    return out


def write_report(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """The HTML report with its figures and summary, from the evaluate stage's tables."""
    if ref := stages.reuse(store, "report", keys):
        return ref
    w = stages.writer(store, "report", cfg, keys)

    def ev_table(name: str) -> pd.DataFrame:
        return art.read_table(store, "evaluate", keys["evaluate"], name).to_pandas()

    ce, lm = ev_table("ce"), ev_table("latent_metrics")
    oracle, sizes, relation = ev_table("oracle"), ev_table("sample_size"), ev_table("score_relation")
    ev_metrics = store.read_manifest("evaluate", keys["evaluate"])["metrics"]
    fit = store.read_manifest("transcoder", keys["transcoder"])["metrics"]
    subj = store.read_manifest("subject", keys["subject"])["metrics"]
    score_m = store.read_manifest("score", keys["score"])["metrics"]
    cal_m = store.read_manifest("calibrate", keys["calibrate"])["metrics"]
    # Activation distributions on the eval split, before and after calibration, for explained latents:
    # one sample of (context, latent) pairs, the same for every method (the tables share their row order).
    num_latents, seq_len = art.num_latents(store, keys), cfg.corpus.seq_len
    seq_ids, tokens = art.load_tokens(store, keys, ("eval",))
    eval_cids = art.sim_context_ids(cfg, "eval", seq_ids)
    true = art.true_activations(store, keys, "eval", seq_len, eval_cids, num_latents)
    cal = art.read_table(store, "calibrate", keys["calibrate"], "calibrated")
    cidx = art.context_index(eval_cids)
    dists: dict[str, np.ndarray] = {}
    dense_preds: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    sample = None
    for method in cfg.calibrate.methods:
        t = cal.filter(pc.field("calibration") == method)
        c, lat, v = t.column("context_id").to_numpy(), t.column("latent").to_numpy(), t.column("pred").to_numpy()
        if sample is None:
            sample = np.sort(rng.choice(len(t), size=min(len(t), 300_000), replace=False))
            dists["true"] = true[cidx[c[sample]], lat[sample]]
        dists[method] = v[sample]
        dense_preds[method] = art.dense(c, lat, v, cidx, (len(eval_cids), num_latents))
    del cal
    examples = _example_latents(store, keys, cfg, lm, dense_preds, true, tokens,
                                np.searchsorted(seq_ids, eval_cids // seq_len), eval_cids % seq_len)
    del dense_preds
    methods = report_lib.pipeline_methods(cfg)
    summary = {
        "preset": cfg.preset,
        **methods,
        "eval CE, clean subject": subj.get("eval_ce"),
        "unigram CE": subj.get("unigram_ce"),
        "transcoder layer": cfg.transcoder.layer,
        "latents / k": f"{num_latents} / {cfg.transcoder.k}",
        "FVU (eval)": fit.get("eval_fvu"),
        "dead fraction (eval)": fit.get("eval_dead_fraction"),
        "CE recovered": fit.get("ce_recovered"),
        "mean detection score": score_m.get("mean_detection_score"),
        "explained latents": cal_m.get("n_latents"),
        "latents excluded (failed predictions)": cal_m.get("n_latents_excluded_failed"),
        "latents with failed contexts patched as 0": cal_m.get("n_latents_with_failed_contexts"),
        "latents with no calib activity": cal_m.get("n_latents_no_calib_activity"),
        "calib contexts": cal_m.get("n_calib_contexts"),
        "true sample (tokens) for quantile": cal_m.get("n_true_sample_tokens"),
        "patch base": cfg.evaluate.patch_base,
        "explainer / scorer / simulator": f"{cfg.explain.method} / {cfg.score.method} / {cfg.simulate.method}",
        "eval sequences / contexts": f"{len(seq_ids)} / {len(eval_cids)}",
        "positions": cfg.evaluate.positions,
        "active_threshold": cfg.evaluate.active_threshold,
        "raw_active_digit": cfg.evaluate.raw_active_digit,
        "oracle crossing specificity": ev_metrics.get("oracle_crossing_specificity"),
    }
    meta = {"run": f"{cfg.preset} (report key {keys['report'][:10]})", "positions": cfg.evaluate.positions,
            "n_sequences": len(seq_ids), "n_contexts": len(eval_cids), "n_latents": cal_m.get("n_latents"),
            "n_calib_contexts": cal_m.get("n_calib_contexts"),
            "crossings": ev_metrics.get("oracle_crossing_specificity"), "methods": methods}
    with tempfile.TemporaryDirectory() as tmp:
        report_lib.write_report(Path(tmp), ce, lm, dists, summary, oracle=oracle, sample_size=sizes,
                                relation=relation, examples=examples, meta=meta)
        w.directory("html", tmp)
    return w.finish(metrics={"summary": summary, "figures": list(ALL_FIGURES)})
