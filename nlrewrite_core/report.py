"""The run report: ``report.html``, with the PNG figures of :mod:`nlrewrite_core.figures` beside it.

This module holds the page: the headline, summary and result tables, the figure captions, and the
stamp text (run, split, n; explainer, scorer and simulator) that every figure and its caption state.
The headline table repeats rows of the ``ce`` table (4 decimals) for the primary positions.

All text put into the HTML is escaped; images are referenced by relative path.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .figures import (
    FIG1,
    FIG3,
    FIG4,
    FIG_CALIB,
    FIG_EXAMPLES,
    FIG_ORACLE,
    FIGA2,
    HEADLINE_FRACTIONS,
    METRIC_COLUMNS,
    baselines,
    calibration_comparison,
    has_columns,
    plot_calibration_comparison,
    plot_ce_sweep,
    plot_distributions,
    plot_examples,
    plot_oracle,
    plot_sample_size,
    plot_specificity_sensitivity,
)

CE_COLUMNS = ["condition", "selection", "fraction", "calibration", "seed", "positions", "ce_mean", "ce_lo", "ce_hi",
              "n"]


def pipeline_methods(cfg: Any) -> dict[str, str]:
    """Which explainer, scorer and simulator produced a run's numbers, from its config (a RewriteConfig):
    the method, with the model behind it when there is one."""
    def named(method: str, llm: Any) -> str:
        if method == "embedding":
            return f"embedding ({cfg.embedding.model})"
        return f"{method} ({llm.model})" if llm is not None else method

    return {"explainer": named(cfg.explain.method, cfg.explain.llm),
            "scorer": named(cfg.score.method, cfg.score.llm),
            "simulator": named(cfg.simulate.method, cfg.simulate.llm)}


def methods_text(methods: Mapping[str, str] | None) -> str:
    """The line "explainer X · scorer Y · simulator Z" (empty when the methods are not known)."""
    known = methods or {}
    return " · ".join(f"{role} {known[role]}" for role in ("explainer", "scorer", "simulator") if role in known)


def stamp_text(meta: Mapping[str, Any] | None, split: str, n: str) -> str:
    """The lines that state a figure's run, split and n, then (when meta has them) its explainer,
    scorer and simulator."""
    run = (meta or {}).get("run", "unknown run")
    methods = methods_text((meta or {}).get("methods"))
    return f"run {run} · {split} split · n = {n}" + (f"\n{methods}" if methods else "")


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    """A summary value as display text."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "NaN" if math.isnan(value) else f"{float(value):.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def summary_html(summary: Mapping[str, Any]) -> str:
    """The summary dict as an HTML table (escaped)."""
    if not summary:
        return "<p class='note'>No summary values.</p>"
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_format_value(v))}</td></tr>"
        for k, v in summary.items()
    )
    return f"<table class='summary'>{rows}</table>"


def frame_html(frame: pd.DataFrame | None, css_class: str, empty: str) -> str:
    """A DataFrame as an escaped HTML table, or ``empty`` as a note."""
    if frame is None or frame.empty:
        return f"<p class='note'>{html.escape(empty)}</p>"
    return frame.to_html(
        index=False, escape=True, na_rep="", border=0, classes=css_class,
        float_format=lambda v: f"{v:.4g}",
    )


def _sorted_ce(ce: pd.DataFrame | None) -> pd.DataFrame | None:
    """The CE table in display order: baselines first, then by selection, calibration, fraction."""
    if not isinstance(ce, pd.DataFrame) or ce.empty:
        return None
    cols = [c for c in CE_COLUMNS if c in ce.columns] + [c for c in ce.columns if c not in CE_COLUMNS]
    frame = ce[cols].copy()
    keys = [c for c in ("positions", "condition", "selection", "calibration", "fraction", "seed") if c in frame]
    if "condition" in frame:
        frame["_sim"] = frame["condition"] == "simulated"
        keys = ["_sim"] + keys
    return frame.sort_values(keys, kind="stable").drop(columns="_sim", errors="ignore")


def metrics_summary(latent_metrics: pd.DataFrame | None) -> pd.DataFrame | None:
    """Mean detection score, specificity and sensitivity per calibration method."""
    if not has_columns(latent_metrics, METRIC_COLUMNS):
        return None
    numeric = ["detection_score", "specificity", "sensitivity"] + [
        c for c in ("precision", "spearman", "auroc") if c in latent_metrics.columns]
    frame = latent_metrics[numeric + ["calibration"]].copy()
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    out = frame.groupby("calibration", sort=True)[numeric].mean()
    out["latents"] = frame.groupby("calibration", sort=True).size()
    return out.reset_index()


def threshold_note(summary: Mapping[str, Any]) -> str:
    """The sentence that states the specificity threshold (or that none was given)."""
    if "active_threshold" in summary:
        thr = _format_value(summary["active_threshold"])
        return (
            f"Specificity and sensitivity count a context as predicted active when its simulated "
            f"(raw or calibrated) activation exceeds active_threshold = {thr}. Raw expected-value predictions are "
            f"never exactly 0, so specificity depends on this threshold."
        )
    return "No specificity threshold (active_threshold) was given: specificity figures are not comparable."


_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
table.summary th { text-align: left; background: #f4f4f4; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #444; } .note { color: #555; font-style: italic; }
"""


def primary_rows(frame: pd.DataFrame | None, positions: str | None) -> pd.DataFrame | None:
    """Rows of the primary positions (all rows when there is no ``positions`` column or value)."""
    if not isinstance(frame, pd.DataFrame) or positions is None or "positions" not in frame.columns:
        return frame
    return frame[frame["positions"] == positions]


HEADLINE_COLUMNS = ["condition", "selection", "fraction", "calibration", "positions", "n_latents", "n_true_kept",
                    "ce_mean", "ce_lo", "ce_hi", "delta_zero_mean", "delta_zero_lo", "delta_zero_hi", "n"]
HEADLINE_NUMBERS = ["ce_mean", "ce_lo", "ce_hi", "delta_zero_mean", "delta_zero_lo", "delta_zero_hi"]


def headline(ce: pd.DataFrame | None, positions: str | None = None) -> pd.DataFrame | None:
    """The headline rows of the ``ce`` table: every baseline, and the top selection at the
    headline fractions for each calibration method (primary positions), numbers as in ``ce``."""
    ce = primary_rows(ce, positions)
    if not has_columns(ce, ["condition", "ce_mean"]):
        return None
    base = ce[~ce["condition"].astype(str).str.startswith("simulated")]
    sim = ce[ce["condition"] == "simulated"]
    if {"selection", "fraction"} <= set(sim.columns):
        frac = pd.to_numeric(sim["fraction"], errors="coerce")
        keep = np.zeros(len(sim), dtype=bool)
        for f in HEADLINE_FRACTIONS:
            keep |= np.isclose(frac.to_numpy(float), f)
        sim = sim[(sim["selection"] == "top") & keep]
    # "All latents simulated" both ways: the paper's accounting (fraction 1.0 of the latents with a
    # calibrated prediction; the rest keep their true values, n_true_kept) beside the strict one.
    strict = ce[ce["condition"] == "simulated_strict"]
    out = pd.concat([base, sim, strict], ignore_index=True)
    return out[[c for c in HEADLINE_COLUMNS if c in out.columns]]


def headline_html(frame: pd.DataFrame | None) -> str:
    """The headline table: numbers with 4 decimals (a test compares them with the ``ce`` table)."""
    if frame is None or frame.empty:
        return "<p class='note'>No CE results.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = []
    for _, r in frame.iterrows():
        cells = []
        for c in frame.columns:
            v = r[c]
            if c in HEADLINE_NUMBERS:
                text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.4f}"
            elif c == "fraction":
                text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):g}"
            else:
                text = _format_value(v)
            cells.append(f"<td data-col='{html.escape(c)}'>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='headline'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def oracle_note(crossings: Mapping[str, Any] | None) -> str:
    """The sentence giving the specificity at which the oracle's CE crosses zero-ablation."""
    if not crossings:
        return "No oracle crossing was computed."
    parts = []
    for name, value in crossings.items():
        v = float(value) if value is not None else math.nan
        parts.append(f"{name}: " + ("never crosses in the measured range" if math.isnan(v) else f"{v:.5f}"))
    return ("Specificity at which the oracle's CE crosses zero-ablation (positions / false-negative rate; "
            "linear interpolation between measured points): " + "; ".join(parts) + ".")


def examples_html(examples: Sequence[Mapping[str, Any]] | None) -> str:
    """The example latents as an escaped table: explanation, score, metrics, top contexts."""
    if not examples:
        return "<p class='note'>No example latents.</p>"
    rows = []
    for ex in examples:
        contexts = "".join(f"<li>{html.escape(str(c))}</li>" for c in ex.get("top_contexts", []))
        metrics = ", ".join(f"{k} {_format_value(v)}" for k, v in (ex.get("metrics") or {}).items())
        rows.append(
            f"<tr><td>{html.escape(str(ex.get('latent')))}</td><td>{html.escape(_format_value(ex.get('score')))}</td>"
            f"<td class='text'>{html.escape(str(ex.get('explanation', '')))}</td>"
            f"<td class='text'>{html.escape(metrics)}</td><td class='text'><ol>{contexts}</ol></td></tr>")
    return ("<table class='examples'><tr><th>latent</th><th>detection score</th><th>explanation</th>"
            "<th>raw predictions (eval)</th>"
            "<th>top eval contexts (true activation; target token in [brackets])</th></tr>"
            + "".join(rows) + "</table>")


_CSS = _CSS + "td.text { text-align: left; max-width: 420px; } ol { margin: 0; padding-left: 1.2em; }\n"


def write_report(
    out_dir: Path,
    ce: pd.DataFrame,
    latent_metrics: pd.DataFrame,
    distributions: dict[str, np.ndarray],
    summary: dict,
    *,
    oracle: pd.DataFrame | None = None,
    sample_size: pd.DataFrame | None = None,
    relation: pd.DataFrame | None = None,
    examples: Sequence[Mapping[str, Any]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``report.html`` and its PNG figures (:data:`ALL_FIGURES`) into ``out_dir``; return the
    HTML path. ``meta`` holds run (a name), positions (the primary positions), n_sequences,
    n_contexts, n_latents, n_calib_contexts, crossings (oracle) and methods (pipeline_methods: the
    explainer, scorer and simulator, stated on every figure, caption and in the summary) for the captions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = dict(summary or {})
    meta = dict(meta or {})
    for role, name in (meta.get("methods") or {}).items():  # the summary table names them too
        summary.setdefault(role, name)
    threshold = summary.get("active_threshold")
    positions = meta.get("positions")
    ce_main = primary_rows(ce, positions)
    n_seq, n_ctx, n_lat = meta.get("n_sequences", "?"), meta.get("n_contexts", "?"), meta.get("n_latents", "?")
    pos_text = f"{positions} positions" if positions else "positions as configured"
    n_dist = sum(np.size(v) for k, v in (distributions or {}).items() if k == "true")
    stamps = {
        FIG1: stamp_text(meta, "eval", f"{n_dist} sampled (context, latent) pairs per series"),
        FIG3: stamp_text(meta, "eval", f"{n_seq} sequences ({pos_text})"),
        FIG4: stamp_text(meta, "eval", f"{n_lat} latents x {n_ctx} contexts"),
        FIG_CALIB: stamp_text(meta, "calib (fit) / eval (judged)", f"{n_seq} sequences, {n_lat} latents ({pos_text})"),
        FIG_ORACLE: stamp_text(meta, "eval", f"{n_seq} sequences, {n_lat} latents ({pos_text})"),
        FIGA2: stamp_text(meta, "calib subsets (fit) / eval (judged)", f"{n_seq} eval sequences ({pos_text})"),
        FIG_EXAMPLES: stamp_text(meta, "eval", f"{n_ctx} contexts per latent"),
    }
    lines = baselines(ce_main)
    zero = lines.get("zero_ablation")
    comparison = calibration_comparison(ce_main, latent_metrics)
    plot_distributions(distributions, out_dir / FIG1, stamps[FIG1])
    plot_ce_sweep(ce_main, out_dir / FIG3, stamps[FIG3])
    plot_specificity_sensitivity(latent_metrics, out_dir / FIG4, threshold, relation, stamps[FIG4])
    plot_calibration_comparison(comparison, out_dir / FIG_CALIB, zero, stamps[FIG_CALIB])
    plot_oracle(primary_rows(oracle, positions), out_dir / FIG_ORACLE,
                {k: v for k, v in lines.items() if k in ("zero_ablation", "transcoder", "clean")}, stamps[FIG_ORACLE])
    plot_sample_size(primary_rows(sample_size, positions), out_dir / FIGA2, zero, stamps[FIGA2])
    plot_examples(examples, out_dir / FIG_EXAMPLES, stamps[FIG_EXAMPLES])

    title = str(summary.get("title", "nlrewrite report"))
    figures = [
        (FIG1, "Figure 1. Distribution of true activations and of simulated activations before "
               "(raw) and after calibration, over sampled (context, latent) pairs (log count)."),
        (FIG3, "Figure 3. Next-token cross-entropy minus zero-ablation cross-entropy on the same sequences "
               "(below 0: better than zeroing every latent), against the fraction of latents replaced by "
               "simulated activations (log scale); one panel per calibration method, shared y axis. Blue: the "
               "top latents by detection score, band = paired bootstrap 95% interval of the difference. Orange: "
               "random latents, mean over the seeds, band = the seeds' min-max spread (with one seed: its paired "
               "interval). Hollow diamond at 100%: every latent simulated, strict (a latent without a calibrated "
               "prediction predicts 0 instead of keeping its true value), with its paired interval. Horizontal "
               "lines, named at their right end: zero-ablation (0), the transcoder with true latents and, when "
               "it fits the scale, the clean model; the other ablations are in the headline table."),
        (FIG4, "Figure 4. Per-latent specificity and sensitivity of simulated activity against "
               "the latent's detection score, per calibration method; lines are means over equal-count bins "
               "of detection score, rho the Spearman rank correlation over latents. " + threshold_note(summary)),
        (FIG_CALIB, "Calibration comparison. Left: CE with the top 10% and 100% of latents (by detection score) "
                    "simulated, per calibration method, with bootstrap 95% intervals and zero-ablation. Right: "
                    "mean per-latent specificity, sensitivity and (threshold-free) AUROC; each method's activity "
                    "threshold is in the table below."),
        (FIG_ORACLE, "Specificity threshold (oracle). The true activations of every explained latent, with false "
                     "positives injected at a controlled rate (values drawn from the latent's calib activations) "
                     "and true activations dropped at a false-negative rate, patched in like simulated ones (TopK "
                     "re-applied). Specificity and sensitivity are measured on the injected activity before TopK. "
                     + oracle_note(meta.get("crossings"))),
        (FIGA2, "Figure A2. Calibration sample size: maps fit on nested subsets of the calib split's sequences, "
                "judged on eval: CE with the top latents simulated (left) and mean specificity/sensitivity "
                "(right, a calibrated prediction counts as active above active_threshold)."),
        (FIG_EXAMPLES, "Example latents: predicted against true activation on every eval context, raw and after "
                       "calibration (dotted: y = x). Their explanations and top contexts are in the table below."),
    ]
    stamp_by_name = dict(stamps)
    figure_html = "".join(
        f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption.split('.')[0])}'>"
        f"<figcaption>{html.escape(caption)} [{html.escape(stamp_by_name[name])}]</figcaption></figure>"
        for name, caption in figures
    )
    crossing_text = oracle_note(meta.get("crossings"))
    body = (
        f"<h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(INTRO)}</p>"
        f"<h2>Headline</h2>"
        f"<p class='note'>{html.escape(stamp_text(meta, 'eval', f'{n_seq} sequences ({pos_text})'))}; "
        f"CE in nats, bootstrap 95% intervals over sequences; delta_zero = paired difference against zero-ablation "
        f"(negative: better than zeroing the layer).</p>"
        f"{headline_html(headline(ce, positions))}"
        f"<p class='note oracle'>{html.escape(crossing_text)}</p>"
        f"<h2>Summary</h2>{summary_html(summary)}"
        f"<p class='note threshold'>{html.escape(threshold_note(summary))}</p>"
        f"<h2>Figures</h2>{figure_html}"
        f"<h2>Calibration comparison</h2>"
        f"{frame_html(comparison, 'calibration', 'No calibration results.')}"
        f"<h2>Specificity threshold (oracle)</h2>"
        f"{frame_html(oracle, 'oracle', 'No oracle results.')}"
        f"<h2>Calibration sample size</h2>"
        f"{frame_html(sample_size, 'sample-size', 'No sample-size ablation.')}"
        f"<h2>Example latents</h2>{examples_html(examples)}"
        f"<h2>Cross-entropy (every condition, both position sets)</h2>"
        f"{frame_html(_sorted_ce(ce), 'ce', 'No CE results.')}"
        f"<h2>Per-latent metrics (means)</h2>"
        f"{frame_html(metrics_summary(latent_metrics), 'latent-metrics', 'No per-latent metrics.')}"
        f"<h2>Detection score vs activity (binned means)</h2>"
        f"{frame_html(relation, 'score-relation', 'No binned metrics.')}"
    )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
    path = out_dir / "report.html"
    tmp = out_dir / "report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


INTRO = (
    "This run replaces one MLP layer of a small language model with a sparse transcoder, writes a "
    "natural-language explanation for every transcoder latent, lets a simulator predict each latent's "
    "activation from its explanation alone, calibrates those predictions on a held-out split, and patches "
    "them back into the model. Next-token cross-entropy (CE, nats; lower is better) shows how much of the "
    "layer the explanations capture: the clean model and the transcoder with its true latents are the "
    "floor; zero-ablation (every latent 0) is what the layer is worth; a simulated condition is only "
    "useful when its CE is below zero-ablation."
)
