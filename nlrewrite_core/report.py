"""The run report: ``report.html`` with PNG figures beside it.

Figures (numbered as in the paper):

- Figure 1, ``fig1_distributions.png``: true vs predicted activation distributions, before
  (raw) and after each calibration method.
- Figure 3, ``fig3_ce_vs_fraction.png``: next-token cross-entropy against the fraction of
  latents simulated, per selection (top / random / all) and calibration method, with the clean,
  transcoder and ablation baselines as horizontal lines.
- Figure 4, ``fig4_specificity_sensitivity.png``: per-latent specificity and sensitivity
  against the detection score, per calibration method.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display,
no network). Missing or empty inputs give a figure that says so instead of an error. All text
put into the HTML is escaped; images are referenced by relative path.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIG1 = "fig1_distributions.png"
FIG3 = "fig3_ce_vs_fraction.png"
FIG4 = "fig4_specificity_sensitivity.png"

CE_COLUMNS = ["condition", "selection", "fraction", "calibration", "seed", "ce_mean", "ce_lo", "ce_hi", "n"]
METRIC_COLUMNS = ["latent", "detection_score", "specificity", "sensitivity", "calibration"]
BASELINE_STYLE = {
    "clean": ("black", "-"),
    "transcoder": ("tab:green", "--"),
    "zero_ablation": ("tab:red", ":"),
    "mlp_ablation": ("tab:purple", "-."),
    "mean_ablation": ("tab:brown", (0, (5, 2, 1, 2))),
}
SELECTION_STYLE = {"top": ("-", "o"), "random": ("--", "s"), "all": ("none", "*")}
DPI = 110


# ---------------------------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------------------------


def _has_columns(frame: pd.DataFrame | None, columns: list[str]) -> bool:
    """Whether ``frame`` is a non-empty DataFrame holding ``columns``."""
    return isinstance(frame, pd.DataFrame) and not frame.empty and set(columns) <= set(frame.columns)


def aggregate_ce(ce: pd.DataFrame | None) -> pd.DataFrame:
    """Simulated CE rows as one point per (selection, calibration, fraction).

    Columns: selection, calibration, fraction, ce_mean, ce_lo, ce_hi, n_seeds. Over several seeds
    (random selection) the point is the mean over seeds and the interval the seeds' min-max
    spread; a single row keeps its own (bootstrap) interval. Rows of the ``all`` selection with
    no fraction are placed at fraction 1.
    """
    out_cols = ["selection", "calibration", "fraction", "ce_mean", "ce_lo", "ce_hi", "n_seeds"]
    needed = ["condition", "selection", "fraction", "calibration", "ce_mean"]
    if not _has_columns(ce, needed):
        return pd.DataFrame(columns=out_cols)
    sim = ce[ce["condition"] == "simulated"].copy()
    sim["fraction"] = pd.to_numeric(sim["fraction"], errors="coerce")
    sim.loc[sim["fraction"].isna() & (sim["selection"] == "all"), "fraction"] = 1.0
    sim = sim[np.isfinite(sim["fraction"]) & np.isfinite(pd.to_numeric(sim["ce_mean"], errors="coerce"))]
    for col in ("ce_lo", "ce_hi"):
        if col not in sim.columns:
            sim[col] = np.nan
    rows = []
    for (selection, calibration, fraction), group in sim.groupby(
        ["selection", "calibration", "fraction"], sort=True, dropna=False
    ):
        means = group["ce_mean"].to_numpy(dtype=float)
        if len(group) > 1:
            lo, hi = float(means.min()), float(means.max())
        else:
            lo, hi = float(group["ce_lo"].iloc[0]), float(group["ce_hi"].iloc[0])
        rows.append((selection, calibration, float(fraction), float(means.mean()), lo, hi, len(group)))
    return pd.DataFrame(rows, columns=out_cols)


def baselines(ce: pd.DataFrame | None) -> dict[str, float]:
    """Mean CE of each non-simulated condition (clean, transcoder, ablations): name -> mean."""
    if not _has_columns(ce, ["condition", "ce_mean"]):
        return {}
    rows = ce[ce["condition"] != "simulated"]
    means = pd.to_numeric(rows["ce_mean"], errors="coerce").groupby(rows["condition"], sort=True).mean()
    return {str(name): float(mean) for name, mean in means.items() if np.isfinite(mean)}


def _finite(values: Any) -> np.ndarray:
    """``values`` as a flat float array without NaN or inf (empty for None)."""
    if values is None:
        return np.zeros(0)
    arr = np.asarray(values, dtype=float).ravel()
    return arr[np.isfinite(arr)]


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _note(ax: Axes, text: str) -> None:
    """Write ``text`` in the middle of an empty axes."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, path: Path) -> None:
    """Save ``fig`` as PNG at ``path``."""
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_ce_sweep(ce: pd.DataFrame | None, path: Path) -> None:
    """Figure 3: mean CE against the fraction of latents simulated (log x), with baselines."""
    fig = _new_figure(7.5, 4.8)
    ax = fig.add_subplot()
    points = aggregate_ce(ce)
    points = points[points["fraction"] > 0]
    lines = baselines(ce)
    if points.empty and not lines:
        _note(ax, "No CE results.")
        _save(fig, path)
        return
    calibrations = sorted(points["calibration"].astype(str).unique())
    colors = {c: f"C{i % 10}" for i, c in enumerate(calibrations)}
    for (selection, calibration), group in points.groupby(["selection", "calibration"], sort=True):
        group = group.sort_values("fraction")
        linestyle, marker = SELECTION_STYLE.get(str(selection), (":", "^"))
        y = group["ce_mean"].to_numpy()
        lo = np.nan_to_num(y - group["ce_lo"].to_numpy(), nan=0.0).clip(min=0)
        hi = np.nan_to_num(group["ce_hi"].to_numpy() - y, nan=0.0).clip(min=0)
        ax.errorbar(
            group["fraction"].to_numpy(), y, yerr=np.vstack([lo, hi]), label=f"{selection} / {calibration}",
            color=colors[str(calibration)], linestyle=linestyle, marker=marker, markersize=5, capsize=3,
        )
    for name, mean in lines.items():
        color, style = BASELINE_STYLE.get(name, ("0.5", "-"))
        ax.axhline(mean, color=color, linestyle=style, linewidth=1.2, label=f"{name} ({mean:.3f})")
    if not points.empty:
        ax.set_xscale("log")
    ax.set_xlabel("fraction of latents simulated")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_title("CE with simulated latents (selection / calibration)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def _histogram(ax: Axes, named: dict[str, np.ndarray], bins: np.ndarray, title: str) -> None:
    """Step histograms (log y) of ``named`` arrays on shared bins."""
    for i, (name, values) in enumerate(named.items()):
        zero = float(np.mean(values == 0)) if values.size else math.nan
        label = f"{name} (n={values.size}, {zero:.1%} zero)"
        style = {"color": "black", "linewidth": 2.4, "alpha": 0.45} if name == "true" else {
            "color": f"C{i % 10}", "linewidth": 1.3}
        ax.hist(values, bins=bins, histtype="step", label=label, **style)
    ax.set_yscale("log")
    ax.set_xlabel("activation")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot_distributions(distributions: Mapping[str, Any] | None, path: Path) -> None:
    """Figure 1: true vs raw predictions (left) and true vs calibrated predictions (right)."""
    fig = _new_figure(10.0, 4.0)
    left, right = fig.subplots(1, 2)
    arrays = {str(k): _finite(v) for k, v in (distributions or {}).items()}
    arrays = {k: v for k, v in arrays.items() if v.size}
    if not arrays:
        _note(left, "No activation samples.")
        _note(right, "No activation samples.")
        _save(fig, path)
        return
    everything = np.concatenate(list(arrays.values()))
    lo, hi = float(everything.min()), float(everything.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
    true = {"true": arrays["true"]} if "true" in arrays else {}
    before = {**true, **({"raw": arrays["raw"]} if "raw" in arrays else {})}
    after = {**true, **{k: v for k, v in arrays.items() if k not in ("true", "raw")}}
    if len(before) > len(true):
        _histogram(left, before, bins, "before calibration")
    else:
        _note(left, "No raw predictions.")
    if len(after) > len(true):
        _histogram(right, after, bins, "after calibration")
    else:
        _note(right, "No calibrated predictions.")
    _save(fig, path)


def plot_specificity_sensitivity(
    latent_metrics: pd.DataFrame | None, path: Path, threshold: Any = None
) -> None:
    """Figure 4: per-latent specificity and sensitivity against detection score, per calibration."""
    fig = _new_figure(10.0, 4.0)
    axes = fig.subplots(1, 2)
    if not _has_columns(latent_metrics, METRIC_COLUMNS):
        for ax in axes:
            _note(ax, "No per-latent metrics.")
        _save(fig, path)
        return
    suffix = f" (active if prediction > {threshold})" if threshold is not None else ""
    for ax, metric in zip(axes, ("specificity", "sensitivity")):
        frame = pd.DataFrame({
            "detection_score": pd.to_numeric(latent_metrics["detection_score"], errors="coerce"),
            metric: pd.to_numeric(latent_metrics[metric], errors="coerce"),
            "calibration": latent_metrics["calibration"].astype(str),
        })
        frame = frame[np.isfinite(frame["detection_score"]) & np.isfinite(frame[metric])]
        if frame.empty:
            _note(ax, f"No finite {metric} values.")
            continue
        for i, (calibration, group) in enumerate(frame.groupby("calibration", sort=True)):
            ax.scatter(group["detection_score"], group[metric], s=8, alpha=0.5, color=f"C{i % 10}",
                       label=f"{calibration} (mean {group[metric].mean():.3f})")
        ax.set_xlabel("detection score (balanced accuracy)")
        ax.set_ylabel(metric)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{metric} vs detection score{suffix}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, markerscale=2)
    _save(fig, path)


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
    keys = [c for c in ("condition", "selection", "calibration", "fraction", "seed") if c in frame]
    if "condition" in frame:
        frame["_sim"] = frame["condition"] == "simulated"
        keys = ["_sim"] + keys
    return frame.sort_values(keys, kind="stable").drop(columns="_sim", errors="ignore")


def metrics_summary(latent_metrics: pd.DataFrame | None) -> pd.DataFrame | None:
    """Mean detection score, specificity and sensitivity per calibration method."""
    if not _has_columns(latent_metrics, METRIC_COLUMNS):
        return None
    numeric = ["detection_score", "specificity", "sensitivity"]
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


def write_report(
    out_dir: Path,
    ce: pd.DataFrame,
    latent_metrics: pd.DataFrame,
    distributions: dict[str, np.ndarray],
    summary: dict,
) -> Path:
    """Write ``report.html`` and its three PNG figures into ``out_dir``; return the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = dict(summary or {})
    threshold = summary.get("active_threshold")
    plot_distributions(distributions, out_dir / FIG1)
    plot_ce_sweep(ce, out_dir / FIG3)
    plot_specificity_sensitivity(latent_metrics, out_dir / FIG4, threshold)

    title = str(summary.get("title", "nlrewrite report"))
    figures = [
        (FIG1, "Figure 1. Distribution of true activations and of simulated activations before "
               "(raw) and after calibration, over sampled (context, latent) pairs (log count)."),
        (FIG3, "Figure 3. Next-token cross-entropy against the fraction of latents replaced by "
               "simulated activations (log scale), for top-scoring and random selections and each "
               "calibration method. Random: mean over seeds, bars span the seeds; top: bootstrap "
               "95% interval. Horizontal lines: clean model, transcoder with true latents, and "
               "ablations."),
        (FIG4, "Figure 4. Per-latent specificity and sensitivity of simulated activity against "
               "the latent's detection score, per calibration method. " + threshold_note(summary)),
    ]
    figure_html = "".join(
        f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption.split('.')[0])}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in figures
    )
    body = (
        f"<h1>{html.escape(title)}</h1>"
        f"<h2>Summary</h2>{summary_html(summary)}"
        f"<p class='note threshold'>{html.escape(threshold_note(summary))}</p>"
        f"<h2>Figures</h2>{figure_html}"
        f"<h2>Cross-entropy</h2>"
        f"{frame_html(_sorted_ce(ce), 'ce', 'No CE results.')}"
        f"<h2>Per-latent metrics (means)</h2>"
        f"{frame_html(metrics_summary(latent_metrics), 'latent-metrics', 'No per-latent metrics.')}"
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
